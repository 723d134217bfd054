"""`shapes3d`: the embedded synthetic CT-like volumes (TFDS builder `seg_shapes3d`), drawn from a seed.

Every case is a textured, noisy body (a large ellipsoid on dark air) holding organ-like
structures whose class is given by shape and intensity together:

- `organ`: a randomly rotated ellipsoid (semi-axes 15-28 mm), bright;
- `vessel`: a tube of radius 3-5 mm along a wavy path through the body, brightest;
- `lesion`: one or two lumpy blobs (radius 4-8 mm) inside the organ, darker than it.

Shapes are drawn in millimetres and sampled at an anisotropic spacing (thick slices:
`spacing` (D, H, W) mm, stored with every case), so they look as a scan of round objects does.
Case i of split k is `np.random.default_rng([seed, k, i])`'s draw: independent of order.
Intensities are arbitrary units; `prepare` z-scores each volume (MRI-style normalisation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from etils import epath
import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

from seg_jax import registry
from seg_jax.data import volumes

CLASS_NAMES = ("background", "organ", "vessel", "lesion")
SPLITS = ("train", "validation")
OFFLINE_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)


def _centres(shape, spacing) -> tuple[np.ndarray, ...]:
  """Voxel centres in mm along each axis, broadcastable to `shape`."""
  axes = [(np.arange(n, dtype=np.float32) + 0.5) * s for n, s in zip(shape, spacing)]
  return np.meshgrid(*axes, indexing="ij", sparse=True)


def _rotation(rng: np.random.Generator) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  return (q * np.sign(np.diag(r))).astype(np.float32)


def _ellipsoid(grid, centre, semi_axes, rotation) -> np.ndarray:
  offsets = np.stack(np.broadcast_arrays(*[g - c for g, c in zip(grid, centre)]), axis=-1)
  local = offsets @ rotation
  return np.sum((local / np.asarray(semi_axes, np.float32)) ** 2, axis=-1) <= 1.0


def _tube(grid, points: np.ndarray, radius: float) -> np.ndarray:
  """Voxels within `radius` mm of the polyline through `points` [n, 3]."""
  voxels = np.stack(np.broadcast_arrays(*grid), axis=-1).reshape(-1, 3)
  nearest = np.full(len(voxels), np.inf, np.float32)
  for a, b in zip(points[:-1], points[1:]):
    ab = b - a
    t = np.clip((voxels - a) @ ab / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    nearest = np.minimum(nearest, np.linalg.norm(voxels - (a + t[:, None] * ab), axis=1))
  return (nearest <= radius).reshape(np.broadcast_shapes(*[g.shape for g in grid]))


def generate_case(rng: np.random.Generator, shape: tuple[int, int, int],
                  spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
  """(image float32 [D, H, W], mask uint8 [D, H, W]) of one synthetic scan."""
  grid = _centres(shape, spacing)
  extent = np.asarray(shape, np.float32) * np.asarray(spacing, np.float32)
  middle = extent / 2
  body = _ellipsoid(grid, middle, extent * rng.uniform(0.42, 0.5, 3), np.eye(3, dtype=np.float32))
  mask = np.zeros(shape, np.uint8)

  organ_centre = middle + rng.uniform(-0.12, 0.12, 3) * extent
  organ_axes = rng.uniform(15, 28, 3).astype(np.float32)
  organ_axes[0] = min(organ_axes[0], extent[0] * 0.35)
  organ = _ellipsoid(grid, organ_centre, organ_axes, _rotation(rng)) & body
  mask[organ] = 1

  start = middle + (rng.uniform(-0.3, 0.3, 3) * extent)
  direction = rng.normal(size=3)
  direction /= np.linalg.norm(direction)
  wobble = rng.normal(size=3) * rng.uniform(3, 8)
  t = np.linspace(-0.6, 0.6, 16)[:, None] * extent.max()
  points = (start + t * direction + np.sin(t / 12.0) * wobble).astype(np.float32)
  vessel = _tube(grid, points, rng.uniform(3.0, 5.0)) & body
  mask[vessel & ~organ] = 2

  organ_voxels = np.argwhere(organ)
  lesions = np.zeros(shape, bool)
  for _ in range(int(rng.integers(1, 3)) if len(organ_voxels) else 0):
    centre = (organ_voxels[rng.integers(len(organ_voxels))] + 0.5) * np.asarray(spacing)
    radius = rng.uniform(4, 8)
    lumps = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    lumps *= radius * 0.3 / (lumps.std() + 1e-6)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    lesions |= distance <= radius + lumps
  mask[lesions & organ] = 3

  base = {0: 0.0, 1: 1.0, 2: 2.0, 3: 0.3}
  contrast = rng.uniform(0.8, 1.2, 4)
  image = np.where(body, 0.0, -2.0).astype(np.float32)
  for label, level in base.items():
    if label:
      image[mask == label] = level * contrast[label]
  texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.5)
  image += 0.35 * texture / (texture.std() + 1e-6) + rng.normal(0, 0.25, shape).astype(np.float32)
  image = image * rng.uniform(0.7, 1.3) + rng.uniform(-0.3, 0.3)
  return image.astype(np.float32), mask


@dataclasses.dataclass(eq=False)
class Shapes3DConfig(tfds.core.BuilderConfig):
  """Configuration of `SegShapes3D`; `name` encodes every field, so each has its own cache."""
  name: str = dataclasses.field(default="", init=False)
  shape: tuple[int, int, int] = (32, 64, 64)
  spacing: tuple[float, float, float] = (2.5, 1.5, 1.5)
  num_train: int = 24
  num_validation: int = 6
  seed: int = 0

  def __post_init__(self):
    self.name = (f"shape{'x'.join(map(str, self.shape))}_spacing"
                 f"{'x'.join(f'{s:g}' for s in self.spacing)}_train{self.num_train}"
                 f"_val{self.num_validation}_seed{self.seed}")


class SegShapes3D(tfds.core.GeneratorBasedBuilder):
  """Synthetic CT-like volumes: `image` float32 [D, H, W, 1], `mask` uint8 [D, H, W] class ids,
  `spacing` float32 [3] mm, `id` '<split>_<index>'."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [Shapes3DConfig()]
  code_path = epath.Path(__file__)  # see shapes.py: skips a checksum lookup tfds 4.9.10 fails

  def _info(self) -> tfds.core.DatasetInfo:
    shape = tuple(self.builder_config.shape)
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(*shape, 1), dtype=np.float32),
            "mask": tfds.features.Tensor(shape=shape, dtype=np.uint8),
            "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "id": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[Any]]:
    del dl_manager  # generated locally
    counts = {"train": self.builder_config.num_train,
              "validation": self.builder_config.num_validation}
    return {split: self._generate_examples(split) for split, n in counts.items() if n > 0}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    cfg = self.builder_config
    count = cfg.num_train if split == "train" else cfg.num_validation
    for i in range(count):
      image, mask = generate_case(np.random.default_rng([cfg.seed, SPLITS.index(split), i]),
                                  tuple(cfg.shape), tuple(cfg.spacing))
      key = f"{split}_{i:04d}"
      yield key, {"image": image[..., None], "mask": mask,
                  "spacing": np.asarray(cfg.spacing, np.float32), "id": key}


def zscore(image: np.ndarray) -> np.ndarray:
  """Per-volume z-score of [D, H, W, C], per channel."""
  mean = image.mean(axis=(0, 1, 2), keepdims=True)
  std = image.std(axis=(0, 1, 2), keepdims=True)
  return ((image - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def _prepare(config, data_dir: str | None) -> tuple[volumes.VolumeSet, list[str]]:
  d = config.dataset
  builder_config = Shapes3DConfig(shape=tuple(d.volume_shape), spacing=tuple(d.spacing),
                                  num_train=d.num_train, num_validation=d.num_validation,
                                  seed=d.seed)
  registered = SegShapes3D.get_builder_config(builder_config.name)
  builder = SegShapes3D(config=registered or builder_config, data_dir=data_dir)
  builder.download_and_prepare(download_config=OFFLINE_DOWNLOAD_CONFIG)
  splits = {}
  for split in builder.info.splits:
    cases = [volumes.VolumeCase(id=ex["id"].decode(), image=zscore(ex["image"]), mask=ex["mask"],
                                spacing=tuple(float(s) for s in ex["spacing"]))
             for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]
    splits[split] = sorted(cases, key=lambda case: case.id)
  return volumes.VolumeSet(splits=splits, channels=1), list(CLASS_NAMES)


def _check(config) -> None:
  d = config.dataset
  volumes.check(config)
  for key in ("num_train", "num_validation"):
    registry.check_int(f"dataset.{key}", d[key])
  registry.check_int("dataset.seed", d.seed, minimum=0)
  if len(d.volume_shape) != 3 or any(not isinstance(v, int) or v < 8 for v in d.volume_shape):
    registry.fail("dataset.volume_shape", d.volume_shape, "must be (D, H, W), ints >= 8")
  if len(d.spacing) != 3 or any(not isinstance(v, (int, float)) or v <= 0 for v in d.spacing):
    registry.fail("dataset.spacing", d.spacing, "must be (D, H, W) mm, three numbers > 0")


ENTRY = registry.register_dataset(registry.DatasetEntry(
    name="shapes3d",
    defaults={**volumes.DEFAULTS, "patch_size": (32, 48, 48)},
    prepare=_prepare, num_classes=(len(CLASS_NAMES),), default_num_classes=len(CLASS_NAMES),
    volumetric=True, check=_check,
    description="synthetic CT-like volumes: organ, vessel and lesion in textured noise (offline)"))
