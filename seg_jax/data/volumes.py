"""Volumes (CT, MRI) on the host: the cases of a split, random training patches, 3D augmentation.

A volumetric dataset (`registry.DatasetEntry(volumetric=True)`: the embedded `shapes3d`,
`decathlon`) prepares a `VolumeSet`: every case of every split in memory as numpy, already
resampled and normalised (`image` float32 [D, H, W, C], `mask` uint8 [D, H, W] class ids,
`spacing` (D, H, W) mm). Volumes are few and large, so training does not stream examples through
tf.data as the 2D pipeline does; it draws patches from the cases in memory.

Training batches (`train_batches`) follow the data contract of shared/DESIGN.md: `image` float32
[B, d, h, w, C] and `mask` int32 [B, d, h, w] with d, h, w = `dataset.patch_size`. Row r of the
batch at step s is a pure function of (seed, s, r): its case, its centre (a random foreground
voxel of a random class present in the case for a fraction `dataset.foreground_fraction` of
rows, nnU-Net's oversampling; else uniform) and its augmentation come from
`np.random.default_rng([seed, s, r])`, so a resumed run sees bit-identical batches, and each
process builds only its own rows of the global batch.

Patches that reach past a volume's end are padded: image with 0 (the normalised mean), mask with
`ignore_label`, which never counts.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import ml_collections
import numpy as np

from seg_jax import parallel
from seg_jax import registry

# The keys of every volumetric dataset: all of them share this one set, so that a config made
# for one (configs/unet3d.py: shapes3d) runs another by `--config.dataset.name=decathlon
# --config.dataset.root=DIR` alone. Each dataset reads the keys of its own source.
DEFAULTS = {
    # shapes3d (embedded synthetic volumes): what is generated
    "seed": 0,                       # shapes3d: which volumes; decathlon: the seeded split
    "num_train": 24,                 # shapes3d: cases per split
    "num_validation": 6,
    "volume_shape": (32, 64, 64),    # shapes3d: (D, H, W) voxels of every case
    "spacing": (2.5, 1.5, 1.5),      # shapes3d: (D, H, W) mm per voxel (thick slices)
    # decathlon (a Medical Segmentation Decathlon folder; seg_jax/data/decathlon.py)
    "root": "",                      # the folder holding dataset.json, imagesTr/, labelsTr/
    "fold": 0,                       # fold of root/splits_final.json (nnU-Net's), if present
    "validation_fraction": 0.2,      # without splits_final.json: seeded split of the training cases
    "target_spacing": (0.0, 0.0, 0.0),  # (D, H, W) mm; 0 = the training cases' median
    "normalization": "auto",         # auto (from dataset.json's modality) | ct | zscore
    # every volumetric dataset: patches, augmentation, evaluation
    "patch_size": (48, 48, 48),      # (D, H, W) voxels of training patches and eval windows
    "foreground_fraction": 1 / 3,    # patches centred on a foreground voxel (nnU-Net: 1/3)
    "flip": True,                    # random flips along each axis
    "rotate90": True,                # random in-plane (H, W) quarter turns (square patches: any)
    "intensity_scale": 0.1,          # image *= U(1 - s, 1 + s)
    "intensity_shift": 0.1,          # image += U(-s, s) (units: normalised intensity)
    "gamma_probability": 0.3,        # chance of a gamma transform of the patch's intensities
    "gamma_range": (0.7, 1.5),       # its exponent's range
    "eval_overlap": 0.5,             # sliding-window eval: fraction of a window shared per axis
    "eval_window_batch": 2,          # windows per device call (a multiple of the device count)
    "eval_tta": False,               # also average the predictions of the 7 axis flips
    "nsd_tolerance_mm": 2.0,         # normalised surface Dice tolerance
}


@dataclasses.dataclass
class VolumeCase:
  """One case, resampled and normalised. `spacing`: mm per voxel along (D, H, W)."""
  id: str
  image: np.ndarray            # float32 [D, H, W, C]
  mask: np.ndarray             # uint8 [D, H, W] class ids
  spacing: tuple[float, float, float]


@dataclasses.dataclass
class VolumeSet:
  """The prepared cases of every split, what `prepare` of a volumetric dataset returns."""
  splits: dict[str, list[VolumeCase]]
  channels: int
  # how raw scans become model inputs (target spacing, per-channel normalisation), recorded in
  # the workdir so that --mode=predict prepares NIfTI files the same way; None: not from files
  preprocessing: dict | None = None

  def __post_init__(self):
    self._foreground: dict[str, list[np.ndarray]] = {}

  def foreground_voxels(self, case: VolumeCase, num_classes: int) -> list[np.ndarray]:
    """[n_c, 3] voxel indices of each foreground class 1..K-1 in `case` (cached per case)."""
    if case.id not in self._foreground:
      self._foreground[case.id] = [np.argwhere(case.mask == c) for c in range(1, num_classes)]
    return self._foreground[case.id]


def check(config: ml_collections.ConfigDict) -> None:
  """ConfigError for a bad value of the volumetric keys (DEFAULTS)."""
  d = config.dataset
  patch = d.patch_size
  if (not isinstance(patch, (tuple, list)) or len(patch) != 3
      or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in patch)):
    registry.fail("dataset.patch_size", patch, "must be (D, H, W), three positive ints")
  registry.check_fraction("dataset.foreground_fraction", d.foreground_fraction)
  registry.check_fraction("dataset.gamma_probability", d.gamma_probability)
  registry.check_fraction("dataset.eval_overlap", d.eval_overlap, closed=False)
  registry.check_int("dataset.eval_window_batch", d.eval_window_batch)
  for key in ("flip", "rotate90", "eval_tta"):
    if not isinstance(d[key], bool):
      registry.fail(f"dataset.{key}", d[key], "must be True or False")
  for key in ("intensity_scale", "intensity_shift", "nsd_tolerance_mm"):
    if not isinstance(d[key], (int, float)) or d[key] < 0:
      registry.fail(f"dataset.{key}", d[key], "must be a number >= 0")
  lo, hi = d.gamma_range
  if not 0 < lo <= hi:
    registry.fail("dataset.gamma_range", d.gamma_range, "must be (low, high) with 0 < low <= high")


def pad_to(array: np.ndarray, shape: tuple[int, ...], value) -> np.ndarray:
  """`array` padded at the end of its first len(shape) axes to at least `shape`."""
  pads = [(0, max(0, s - n)) for s, n in zip(shape, array.shape)]
  pads += [(0, 0)] * (array.ndim - len(shape))
  if not any(hi for _, hi in pads):
    return array
  return np.pad(array, pads, constant_values=value)


def patch_corner(rng: np.random.Generator, shape: tuple[int, ...], patch: tuple[int, ...],
                 centre: np.ndarray | None) -> tuple[int, ...]:
  """First voxel of a patch inside a volume of `shape` (padded to the patch where smaller):
  uniform, or the one that centres `centre` as far as the volume allows."""
  corner = []
  for axis, (n, p) in enumerate(zip(shape, patch)):
    room = max(n - p, 0)
    if centre is None:
      corner.append(int(rng.integers(0, room + 1)))
    else:
      corner.append(int(np.clip(centre[axis] - p // 2, 0, room)))
  return tuple(corner)


def sample_patch(case: VolumeCase, foreground: list[np.ndarray], rng: np.random.Generator, *,
                 patch: tuple[int, int, int], foreground_fraction: float, ignore_label: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """One (image [d, h, w, C], mask [d, h, w] int32) patch of `case`; with probability
  `foreground_fraction` centred on a random voxel of a random class present in the case."""
  centre = None
  if rng.random() < foreground_fraction:
    present = [voxels for voxels in foreground if len(voxels)]
    if present:
      voxels = present[int(rng.integers(len(present)))]
      centre = voxels[int(rng.integers(len(voxels)))]
  z, y, x = patch_corner(rng, case.mask.shape, patch, centre)
  d, h, w = patch
  image = pad_to(case.image[z:z + d, y:y + h, x:x + w], patch, 0.0)
  mask = pad_to(case.mask[z:z + d, y:y + h, x:x + w].astype(np.int32), patch, ignore_label)
  return image, mask


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            aug: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """Random flips, in-plane quarter turns, intensity scale and shift, and gamma of one patch
  (`aug`: the dataset config's keys). Geometry moves image and mask alike."""
  if aug.flip:
    for axis in range(3):
      if rng.random() < 0.5:
        image, mask = np.flip(image, axis), np.flip(mask, axis)
  if aug.rotate90:
    turns = int(rng.integers(4)) if image.shape[1] == image.shape[2] else 2 * int(rng.integers(2))
    image, mask = np.rot90(image, turns, axes=(1, 2)), np.rot90(mask, turns, axes=(1, 2))
  image = np.array(image, np.float32)
  if rng.random() < aug.gamma_probability:
    # nnU-Net's gamma: on intensities rescaled to [0, 1], then back to their range.
    lo, hi = float(image.min()), float(image.max())
    gamma = rng.uniform(*aug.gamma_range)
    if hi > lo:
      image = ((image - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
  scale = rng.uniform(1 - aug.intensity_scale, 1 + aug.intensity_scale)
  shift = rng.uniform(-aug.intensity_shift, aug.intensity_shift)
  return (image * scale + shift).astype(np.float32), np.ascontiguousarray(mask)


def train_example(volumes: VolumeSet, config: ml_collections.ConfigDict, step: int,
                  row: int) -> tuple[np.ndarray, np.ndarray]:
  """Row `row` of the global training batch of step `step` (1-based), a function of
  (seed, step, row) alone."""
  d = config.dataset
  cases = volumes.splits["train"]
  rng = np.random.default_rng([config.seed, step, row])
  case = cases[int(rng.integers(len(cases)))]
  image, mask = sample_patch(case, volumes.foreground_voxels(case, d.num_classes), rng,
                             patch=tuple(d.patch_size), foreground_fraction=d.foreground_fraction,
                             ignore_label=d.ignore_label)
  return augment(image, mask, rng, d)


def train_batches(config: ml_collections.ConfigDict, volumes: VolumeSet, *,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of the global batches of steps start_step + 1, start_step + 2, ..."""
  host_batch = parallel.per_host_batch_size(config.batch_size)
  rows = range(jax.process_index() * host_batch, (jax.process_index() + 1) * host_batch)
  step = start_step
  while True:
    step += 1
    examples = [train_example(volumes, config, step, row) for row in rows]
    yield {"image": np.stack([e[0] for e in examples]), "mask": np.stack([e[1] for e in examples])}
