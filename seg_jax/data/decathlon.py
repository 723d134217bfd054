"""`decathlon`: a Medical Segmentation Decathlon folder (CT, MRI) as a volumetric dataset.

Layout (MSD, also nnU-Net's raw format)::

    ROOT/dataset.json        labels ({"0": "background", "1": "liver"} or nnU-Net v2's
                             {"background": 0, ...}), modality / channel_names, training list
    ROOT/imagesTr/CASE.nii.gz          one file: 3D, or 4D with the modalities last
    ROOT/imagesTr/CASE_0000.nii.gz ... or one 3D file per modality (nnU-Net's naming)
    ROOT/labelsTr/CASE.nii.gz          3D class ids
    ROOT/splits_final.json   optional, nnU-Net's [{"train": [...], "val": [...]}, ...]

The class names and count come from `labels`. Fold `dataset.fold` of splits_final.json gives
the train and validation cases; without it a seeded split (`dataset.seed`,
`dataset.validation_fraction`) of the training list.

Preprocessing, host side, before training (`prepare`), like nnU-Net's:
- orientation made consistent: `nibabel.as_closest_canonical` (RAS+), arrays transposed from
  (x, y, z) to (D, H, W) = (z, y, x); the spacing read from the canonical affine's zooms;
- resampled to `dataset.target_spacing` (0 = the training cases' median per axis):
  images trilinear, labels nearest (scipy.ndimage.zoom, grid_mode: voxel centres map with the
  extent kept);
- intensities per channel: CT (clip to the 0.5 and 99.5 percentiles of the training cases'
  foreground voxels, then z-score with those voxels' mean and std) or per-volume z-score
  (everything else), from dataset.json's modality unless `dataset.normalization` says.

Every problem (an unreadable or truncated file, image and label of different shape or affine,
label values outside the declared labels, a listed case missing, a label that is not 3D, a
modality count that differs) is listed at once, one line each naming the file, in a
`DataError`, before anything is written. The preprocessed cases are cached under
DATA_DIR/seg_decathlon/<fingerprint>/ (the fingerprint covers the files' names, sizes and times
and the preprocessing keys), so a second run starts at once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from scipy import ndimage

from seg_jax import registry
from seg_jax.data import volumes
from seg_jax.data.errors import DataError

CACHE_VERSION = 1
NORMALIZATIONS = ("auto", "ct", "zscore")


def _nib():
  import nibabel  # pylint: disable=g-import-not-at-top (only volumetric runs need it)
  return nibabel


# ---------------------------------------------------------------------------- reading

def read_labels(meta: dict) -> list[str]:
  """Class names by id from dataset.json's `labels` (MSD {"0": name} or nnU-Net v2 {name: 0})."""
  labels = meta["labels"]
  if all(str(k).isdigit() for k in labels):
    by_id = {int(k): str(v) for k, v in labels.items()}
  else:
    by_id = {int(v): str(k) for k, v in labels.items()}
  if sorted(by_id) != list(range(len(by_id))):
    raise DataError(f"dataset.json: labels must be ids 0..K-1, got {sorted(by_id)}")
  return [by_id[i] for i in range(len(by_id))]


def read_modalities(meta: dict) -> list[str]:
  """Modality names by channel (MSD `modality`, nnU-Net v2 `channel_names`); [] if absent."""
  table = meta.get("modality") or meta.get("channel_names") or {}
  return [str(table[k]) for k in sorted(table, key=int)]


def canonical_array(path: str) -> tuple[np.ndarray, tuple[float, float, float], Any]:
  """(array in (D, H, W[, C]) = (z, y, x) order of the RAS+ canonical image, its spacing (D, H, W)
  in mm, the nibabel image as loaded)."""
  nib = _nib()
  image = nib.load(path)
  canonical = nib.as_closest_canonical(image)
  data = np.asarray(canonical.dataobj)
  zooms = canonical.header.get_zooms()[:3]
  axes = (2, 1, 0) + tuple(range(3, data.ndim))
  return data.transpose(axes), (float(zooms[2]), float(zooms[1]), float(zooms[0])), image


def case_image_files(root: str, case: str, split_dir: str = "imagesTr") -> list[str]:
  """The image file(s) of a case: CASE.nii(.gz), or CASE_0000, CASE_0001, ... (one per channel)."""
  for ext in (".nii.gz", ".nii"):
    single = os.path.join(root, split_dir, case + ext)
    if os.path.isfile(single):
      return [single]
  return sorted(glob.glob(os.path.join(root, split_dir, f"{glob.escape(case)}_[0-9][0-9][0-9][0-9].nii*")))


def _case_id(entry) -> str:
  path = entry["label"] if isinstance(entry, dict) else entry
  name = os.path.basename(str(path))
  return name[:-len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")


def _label_file(root: str, case: str) -> str | None:
  for ext in (".nii.gz", ".nii"):
    path = os.path.join(root, "labelsTr", case + ext)
    if os.path.isfile(path):
      return path
  return None


def _read_case(root: str, case: str, num_classes: int, channels: int, problems: list[str]):
  """(image [D, H, W, C] float32, label uint8 [D, H, W], spacing) of a case, or None after
  appending its problems."""
  nib = _nib()
  files = case_image_files(root, case)
  label_path = _label_file(root, case)
  if not files:
    problems.append(f"{os.path.join(root, 'imagesTr', case)}.nii.gz: image missing (listed in "
                    "dataset.json or splits_final.json)")
  if label_path is None:
    problems.append(f"{os.path.join(root, 'labelsTr', case)}.nii.gz: label missing (listed)")
  if not files or label_path is None:
    return None
  found = len(problems)
  arrays, affines = [], []
  for path in files:
    try:
      array, spacing, image = canonical_array(path)
      arrays.append(np.asarray(array, np.float32))
      affines.append((image.shape[:3], image.affine))
    except Exception as e:  # nibabel, gzip and zlib raise many types for bad files
      problems.append(f"{path}: unreadable or truncated ({type(e).__name__}: {e})")
  try:
    label, label_spacing, label_image = canonical_array(label_path)
  except Exception as e:
    problems.append(f"{label_path}: unreadable or truncated ({type(e).__name__}: {e})")
    return None
  if len(problems) > found:
    return None
  if label.ndim != 3:
    problems.append(f"{label_path}: label must be 3D, got shape {label_image.shape}")
    return None
  image = np.concatenate([a if a.ndim == 4 else a[..., None] for a in arrays], axis=-1)
  for path, (shape, affine) in zip(files, affines):
    if tuple(shape) != tuple(label_image.shape[:3]):
      problems.append(f"{path}: image shape {tuple(shape)} differs from its label's "
                      f"{tuple(label_image.shape)} ({label_path})")
    elif not np.allclose(affine, label_image.affine, atol=1e-3):
      problems.append(f"{path}: image affine differs from its label's ({label_path})")
  if channels and image.shape[-1] != channels:
    problems.append(f"{files[0]}: {image.shape[-1]} channels, dataset.json declares {channels} "
                    "modalities")
  values = np.unique(label)
  bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < num_classes]
  if bad:
    problems.append(f"{label_path}: label values {bad[:10]} outside the declared labels "
                    f"0..{num_classes - 1}")
  if len(problems) > found:
    return None
  return image, label.astype(np.uint8), label_spacing


# ---------------------------------------------------------------------------- preprocessing

def resample(array: np.ndarray, spacing, target_spacing, *, order: int) -> np.ndarray:
  """[D, H, W(, C)] resampled from `spacing` to `target_spacing` mm (order 1: trilinear, 0:
  nearest). The new shape is round(shape * spacing / target); voxel centres map so the extent
  is kept (scipy's grid_mode), edges repeat (mode 'nearest')."""
  shape = np.asarray(array.shape[:3])
  new_shape = np.maximum(np.round(shape * np.asarray(spacing) / np.asarray(target_spacing)), 1)
  return resize(array, tuple(int(v) for v in new_shape), order=order)


def resize(array: np.ndarray, shape: tuple[int, int, int], *, order: int) -> np.ndarray:
  """[D, H, W(, C)] resampled to `shape` voxels over the same extent (see `resample`)."""
  if tuple(array.shape[:3]) == tuple(shape):
    return array
  factors = [n / o for n, o in zip(shape, array.shape[:3])] + [1] * (array.ndim - 3)
  out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
  return out[tuple(slice(0, n) for n in shape)]


def intensity_statistics(images: list[np.ndarray], labels: list[np.ndarray], channel: int,
                         max_voxels: int = 10_000_000) -> dict[str, float]:
  """nnU-Net's CT statistics of one channel: the 0.5 and 99.5 percentiles, mean and std of the
  foreground voxels of all training cases."""
  voxels = np.concatenate([img[..., channel][lab > 0] for img, lab in zip(images, labels)])
  if len(voxels) > max_voxels:
    voxels = np.random.default_rng(0).choice(voxels, max_voxels, replace=False)
  if not len(voxels):
    voxels = np.concatenate([img[..., channel].ravel() for img in images])
  return {"low": float(np.percentile(voxels, 0.5)), "high": float(np.percentile(voxels, 99.5)),
          "mean": float(voxels.mean()), "std": float(voxels.std())}


def normalize(image: np.ndarray, schemes: list[dict]) -> np.ndarray:
  """Each channel by its scheme: {'kind': 'ct', low, high, mean, std} or {'kind': 'zscore'}."""
  out = np.empty(image.shape, np.float32)
  for c, scheme in enumerate(schemes):
    x = image[..., c].astype(np.float32)
    if scheme["kind"] == "ct":
      x = (np.clip(x, scheme["low"], scheme["high"]) - scheme["mean"]) / max(scheme["std"], 1e-8)
    else:
      x = (x - x.mean()) / max(float(x.std()), 1e-8)
    out[..., c] = x
  return out


# ---------------------------------------------------------------------------- the dataset

def _splits(root: str, cases: list[str], config, problems: list[str]) -> dict[str, list[str]]:
  d = config.dataset
  path = os.path.join(root, "splits_final.json")
  if os.path.isfile(path):
    with open(path) as f:
      folds = json.load(f)
    if not 0 <= d.fold < len(folds):
      problems.append(f"{path}: has {len(folds)} folds, dataset.fold={d.fold}")
      return {"train": [], "validation": []}
    fold = folds[d.fold]
    for case in sorted(set(fold["train"]) | set(fold["val"])):
      if case not in cases:
        problems.append(f"{path}: case {case!r} of fold {d.fold} is not in dataset.json's training list")
    return {"train": list(fold["train"]), "validation": list(fold["val"])}
  order = np.random.default_rng(d.seed).permutation(len(cases))
  n_val = max(1, round(len(cases) * d.validation_fraction)) if d.validation_fraction else 0
  shuffled = [cases[i] for i in order]
  return {"train": sorted(shuffled[n_val:]), "validation": sorted(shuffled[:n_val])}


def _fingerprint(root: str, cases: list[str], config) -> str:
  d = config.dataset
  digest = hashlib.sha256()
  digest.update(json.dumps([CACHE_VERSION, list(d.target_spacing), d.normalization, d.fold,
                            d.seed, d.validation_fraction]).encode())
  for path in sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True)
                     + [f for c in cases for f in case_image_files(root, c)]
                     + [p for c in cases if (p := _label_file(root, c))]):
    stat = os.stat(path)
    digest.update(f"{os.path.relpath(path, root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  return digest.hexdigest()[:16]


def load_meta(root: str) -> dict:
  path = os.path.join(root, "dataset.json")
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing (dataset.root must be a Decathlon folder)")
  with open(path) as f:
    return json.load(f)


def prepare(config, data_dir: str | None) -> tuple[volumes.VolumeSet, list[str]]:
  """The preprocessed cases (from the cache if there), after checking every file."""
  d = config.dataset
  root = os.path.expanduser(d.root)
  meta = load_meta(root)
  class_names = read_labels(meta)
  modalities = read_modalities(meta)
  cases = [_case_id(e) for e in meta.get("training", [])]
  problems: list[str] = []
  splits = _splits(root, cases, config, problems)
  cache_root = os.path.join(os.path.expanduser(data_dir or "~/tensorflow_datasets"),
                            "seg_decathlon")
  cache = os.path.join(cache_root, _fingerprint(root, cases, config))
  if os.path.isfile(os.path.join(cache, "meta.json")) and not problems:
    return _load_cache(cache), class_names

  used = sorted(set(splits["train"]) | set(splits["validation"]))
  raw = {case: _read_case(root, case, len(class_names), len(modalities), problems)
         for case in used}
  if problems:
    raise DataError(f"{len(problems)} problem(s) in {root}:\n" + "\n".join(problems))

  train = [case for case in splits["train"]]
  target = tuple(float(v) for v in d.target_spacing)
  if not all(target):
    median = np.median([raw[c][2] for c in train], axis=0)
    target = tuple(float(m) if not t else t for m, t in zip(median, target))
  resampled = {case: (resample(image, spacing, target, order=1),
                      resample(label, spacing, target, order=0))
               for case, (image, label, spacing) in raw.items()}
  channels = next(iter(resampled.values()))[0].shape[-1]
  schemes = []
  for c in range(channels):
    kind = d.normalization
    if kind == "auto":
      kind = "ct" if c < len(modalities) and modalities[c].upper() == "CT" else "zscore"
    scheme = {"kind": kind}
    if kind == "ct":
      scheme.update(intensity_statistics([resampled[t][0] for t in train],
                                         [resampled[t][1] for t in train], c))
    schemes.append(scheme)
  preprocessing = {"target_spacing": list(target), "normalization": schemes}
  out = {split: [volumes.VolumeCase(case, normalize(resampled[case][0], schemes),
                                    resampled[case][1], target) for case in names]
         for split, names in splits.items()}
  volume_set = volumes.VolumeSet(out, channels=channels, preprocessing=preprocessing)
  _write_cache(cache, volume_set)
  return volume_set, class_names


def _write_cache(cache: str, volume_set: volumes.VolumeSet) -> None:
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  partial = tempfile.mkdtemp(prefix=".partial_", dir=os.path.dirname(cache))
  for split, cases in volume_set.splits.items():
    for case in cases:
      np.savez(os.path.join(partial, f"{split}__{case.id}.npz"), image=case.image, mask=case.mask,
               spacing=np.asarray(case.spacing))
  with open(os.path.join(partial, "meta.json"), "w") as f:
    json.dump({"splits": {s: [c.id for c in cases] for s, cases in volume_set.splits.items()},
               "channels": volume_set.channels, "preprocessing": volume_set.preprocessing}, f)
  try:
    os.rename(partial, cache)
  except OSError:  # another process cached it first
    shutil.rmtree(partial, ignore_errors=True)


def _load_cache(cache: str) -> volumes.VolumeSet:
  with open(os.path.join(cache, "meta.json")) as f:
    meta = json.load(f)
  splits = {}
  for split, names in meta["splits"].items():
    splits[split] = []
    for name in names:
      with np.load(os.path.join(cache, f"{split}__{name}.npz")) as z:
        splits[split].append(volumes.VolumeCase(name, z["image"], z["mask"],
                                                tuple(float(s) for s in z["spacing"])))
  return volumes.VolumeSet(splits, channels=meta["channels"], preprocessing=meta["preprocessing"])


def configure(config) -> None:
  """Sets dataset.num_classes from ROOT/dataset.json's labels (the data decides the count)."""
  config.dataset.num_classes = len(read_labels(load_meta(os.path.expanduser(config.dataset.root))))


def _check(config) -> None:
  d = config.dataset
  volumes.check(config)
  if not d.root:
    registry.fail("dataset.root", d.root, "set it to a Decathlon folder (with dataset.json)")
  registry.check_int("dataset.fold", d.fold, minimum=0)
  registry.check_fraction("dataset.validation_fraction", d.validation_fraction, closed=False)
  registry.check_choice("dataset.normalization", d.normalization, NORMALIZATIONS)
  if len(d.target_spacing) != 3 or any(not isinstance(v, (int, float)) or v < 0
                                       for v in d.target_spacing):
    registry.fail("dataset.target_spacing", d.target_spacing,
                  "must be (D, H, W) mm >= 0 (0 = the training median)")


ENTRY = registry.register_dataset(registry.DatasetEntry(
    name="decathlon", defaults=dict(volumes.DEFAULTS), prepare=prepare, volumetric=True,
    check=_check, configure=configure,
    description="a Medical Segmentation Decathlon folder of NIfTI volumes (CT, MRI)"))
