"""`--mode=predict` for volumetric models: NIfTI scans in, `<case>.nii.gz` labels out.

Each scan is prepared as the training cases were (`seg_jax/data/decathlon.py`): canonical
orientation, resampled to the training target spacing, normalised with the training statistics
(both recorded in WORKDIR/model.json; a model trained on the synthetic volumes z-scores each
scan at its own spacing). It is segmented by sliding windows (`predict.overlap`,
`predict.batch_size` windows per device call, flip TTA unless `predict.tta=none`, windows of
`dataset.patch_size`), and the labels go back to the scan's own grid: resampled (nearest) to the
canonical shape, then reoriented, so `<case>.nii.gz` has the input's shape and affine exactly.
`<case>_overlay.png` shows the axial, coronal and sagittal mid-slices with the labels.

Inputs: `predict.input` is a file, a directory or a glob of .nii / .nii.gz files; nnU-Net's
per-modality files CASE_0000.nii.gz, CASE_0001.nii.gz, ... are read as one case's channels.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import time

import jax
import ml_collections
import numpy as np

from seg_jax import config as config_lib
from seg_jax import parallel
from seg_jax import visualize
from seg_jax import workdir as workdir_lib
from seg_jax.data import decathlon
from seg_jax.data.errors import DataError
from seg_jax.tasks import volumetric

_MODALITY = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _stem(path: str) -> str:
  name = os.path.basename(path)
  return name[:-len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")


def find_cases(pattern: str) -> dict[str, list[str]]:
  """{case: its file(s), channel order} of the NIfTI files a file, directory or glob names."""
  path = os.path.expanduser(pattern)
  if os.path.isfile(path):
    files = [path]
  elif os.path.isdir(path):
    files = [os.path.join(path, n) for n in os.listdir(path)]
  else:
    files = glob.glob(path, recursive=True)
  files = sorted(f for f in files if f.endswith((".nii", ".nii.gz")) and os.path.isfile(f))
  if not files:
    raise FileNotFoundError(f"config.predict.input={pattern!r} names no .nii or .nii.gz file")
  cases: dict[str, list[str]] = collections.defaultdict(list)
  for f in files:
    match = _MODALITY.match(_stem(f))
    cases[match["case"] if match else _stem(f)].append(f)
  return dict(cases)


def read_scan(files: list[str]):
  """(canonical [D, H, W, C] float32, spacing, the first file's nibabel image)."""
  arrays, spacing, first = [], None, None
  for path in files:
    try:
      array, spacing_i, image = decathlon.canonical_array(path)
    except Exception as e:  # nibabel, gzip and zlib raise many types for bad files
      raise DataError(f"{path}: unreadable or truncated ({type(e).__name__}: {e})") from None
    arrays.append(np.asarray(array, np.float32))
    if first is None:
      spacing, first = spacing_i, image
  image = np.concatenate([a if a.ndim == 4 else a[..., None] for a in arrays], axis=-1)
  return image, spacing, first


def to_original_grid(labels: np.ndarray, original) -> np.ndarray:
  """Labels [D, H, W] of the canonical (z, y, x) grid resampled to the canonical shape and
  reoriented to the scan's own voxel axes: an array of the original image's shape."""
  nib = decathlon._nib()  # pylint: disable=protected-access
  canonical = nib.as_closest_canonical(original)
  x, y, z = canonical.shape[:3]
  resized = decathlon.resize(labels, (z, y, x), order=0).transpose(2, 1, 0)
  transform = nib.orientations.ornt_transform(nib.io_orientation(canonical.affine),
                                              nib.io_orientation(original.affine))
  return np.ascontiguousarray(nib.orientations.apply_orientation(resized, transform))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Segments every scan of config.predict.input (predict.run has checked it); returns {'predicted', 'output', 'step',
  'seconds_per_case'}."""
  from seg_jax import train  # imports TensorFlow; keep this module light without it
  nib = decathlon._nib()  # pylint: disable=protected-access
  p, d = config.predict, config.dataset
  if p.batch_size % jax.device_count():
    raise config_lib.ConfigError(f"config.predict.batch_size={p.batch_size}: must be a multiple "
                                 f"of the number of devices ({jax.device_count()})")
  cases = find_cases(p.input)
  out_dir = os.path.expanduser(p.output) if p.output else os.path.join(workdir, "predictions")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.MODEL_FILE)) as f:
    preprocessing = json.load(f).get("volume_preprocessing")

  trainer, variables, step = train.restore_for_inference(config, workdir)
  window_step = trainer.task.window_step(trainer.model, trainer.mesh, tta=p.tta != "none")
  window_fn = lambda windows: window_step(variables, parallel.host_batch_to_global(
      {"image": windows}, trainer.mesh)["image"])

  predicted = []
  t0 = time.perf_counter()
  for case, files in cases.items():
    image, spacing, original = read_scan(files)
    if image.shape[-1] != trainer.channels:
      raise DataError(f"{files[0]}: {image.shape[-1]} channels; the model takes {trainer.channels}")
    if preprocessing:
      target = tuple(preprocessing["target_spacing"])
      image = decathlon.normalize(decathlon.resample(image, spacing, target, order=1),
                                  preprocessing["normalization"])
    else:
      target = spacing
      image = decathlon.normalize(image, [{"kind": "zscore"}] * image.shape[-1])
    labels = volumetric.segment_volume(image, window_fn, window=tuple(d.patch_size),
                                       overlap=p.overlap, batch=p.batch_size,
                                       num_classes=max(d.num_classes, 2))
    out = to_original_grid(labels, original)
    header = original.header.copy()
    header.set_data_dtype(np.uint8)
    path = os.path.join(out_dir, f"{case}.nii.gz")
    nib.save(nib.Nifti1Image(out.astype(np.uint8), original.affine, header), path)
    picture = visualize.volume_panels(visualize.window_intensities(image[..., :1]), None, labels,
                                      d.num_classes, spacing=target,
                                      class_names=trainer.class_names)
    visualize.write_png(os.path.join(out_dir, f"{case}_overlay.png"), picture)
    predicted.append(path)
  per_case = (time.perf_counter() - t0) / max(len(predicted), 1)
  print(f"predicted {len(predicted)} scans with the step-{step} checkpoint of {workdir} "
        f"({per_case:.1f} s/scan); outputs in {out_dir}")
  return {"predicted": predicted, "output": out_dir, "step": step, "seconds_per_case": per_case}
