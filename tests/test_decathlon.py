"""The Decathlon folder dataset: orientation, resampling and normalisation against numpy, and a
bad folder that lists every problem at once and writes nothing."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from seg_jax import config as config_lib
from seg_jax.data import decathlon
from seg_jax.data.errors import DataError

SHAPE_XYZ = (8, 6, 5)
AFFINE = np.diag([-1.5, 1.5, 2.5, 1.0])  # x runs right-to-left: canonical (RAS+) flips it


def _write_case(root, case, *, ramp_offset=0.0, label=None, shape=SHAPE_XYZ, affine=AFFINE):
  z = np.arange(shape[2], dtype=np.float32)
  image = np.broadcast_to(10 * z + 100 + ramp_offset, shape).astype(np.float32)
  if label is None:
    label = np.zeros(shape, np.uint8)
    label[:3, 1:4, 1:4] = 1   # stored x 0..2: after the flip, the last three x (W) columns
    label[5:, :, 4:] = 2
  nib.save(nib.Nifti1Image(image, affine), os.path.join(root, "imagesTr", f"{case}.nii.gz"))
  nib.save(nib.Nifti1Image(label, affine), os.path.join(root, "labelsTr", f"{case}.nii.gz"))


def _folder(root, cases, *, splits=None):
  os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
  os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
  meta = {"name": "test", "labels": {"0": "background", "1": "liver", "2": "tumour"},
          "modality": {"0": "CT"},
          "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                       for c in cases]}
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f)
  if splits is not None:
    with open(os.path.join(root, "splits_final.json"), "w") as f:
      json.dump(splits, f)


def _config(root, data_dir, **dataset):
  c = config_lib.base_config(model="unet3d", dataset="decathlon")
  c.dataset.root, c.dataset.data_dir = str(root), str(data_dir)
  c.dataset.patch_size = (8, 8, 8)
  c.model.depth = 2
  c.dataset.update(dataset)
  config_lib.validate(c)
  decathlon.configure(c)
  return c


def test_cases_are_reoriented_resampled_and_ct_normalised(tmp_path):
  root, cache = tmp_path / "task", tmp_path / "cache"
  cases = ["case_a", "case_b", "case_c"]
  _folder(str(root), cases, splits=[{"train": ["case_a", "case_b"], "val": ["case_c"]}])
  for i, case in enumerate(cases):
    _write_case(str(root), case, ramp_offset=5.0 * i)
  config = _config(root, cache, target_spacing=(1.25, 1.5, 1.5))
  assert config.dataset.num_classes == 3
  volume_set, names = decathlon.prepare(config, str(cache))
  assert names == ["background", "liver", "tumour"]
  assert [c.id for c in volume_set.splits["train"]] == ["case_a", "case_b"]
  assert [c.id for c in volume_set.splits["validation"]] == ["case_c"]

  # Independent expectation: (D, H, W) = (z, y, x), z resampled 2.5 -> 1.25 mm by linear
  # interpolation of a ramp (exact), voxel centres mapped with the extent kept.
  depth = 2 * SHAPE_XYZ[2]
  old_z = np.clip((np.arange(depth) + 0.5) / 2 - 0.5, 0, SHAPE_XYZ[2] - 1)
  raw = {case: np.broadcast_to((10 * old_z + 100 + 5.0 * i)[:, None, None],
                               (depth, SHAPE_XYZ[1], SHAPE_XYZ[0])) for i, case in enumerate(cases)}
  label = np.zeros(SHAPE_XYZ, np.uint8)
  label[:3, 1:4, 1:4] = 1
  label[5:, :, 4:] = 2
  want_mask = label[::-1].transpose(2, 1, 0).repeat(2, axis=0)  # x flipped, z nearest-doubled
  fg = np.concatenate([raw[c][want_mask > 0] for c in ("case_a", "case_b")])
  low, high = np.percentile(fg, 0.5), np.percentile(fg, 99.5)
  for case in volume_set.splits["train"] + volume_set.splits["validation"]:
    assert case.spacing == (1.25, 1.5, 1.5) and case.image.shape == (depth, 6, 8, 1)
    np.testing.assert_array_equal(case.mask, want_mask)
    want = (np.clip(raw[case.id], low, high) - fg.mean()) / fg.std()
    np.testing.assert_allclose(case.image[..., 0], want, rtol=1e-4, atol=1e-4)
  assert volume_set.preprocessing["target_spacing"] == [1.25, 1.5, 1.5]

  # A second prepare reads the fingerprinted cache.
  (cached,) = os.listdir(cache / "seg_decathlon")
  again, _ = decathlon.prepare(config, str(cache))
  np.testing.assert_array_equal(again.splits["train"][0].image, volume_set.splits["train"][0].image)


def test_a_bad_folder_lists_every_problem_and_writes_nothing(tmp_path):
  root, cache = tmp_path / "task", tmp_path / "cache"
  cases = ["good", "truncated", "shape", "affine", "values", "four_d", "missing"]
  _folder(str(root), cases)
  for case in cases[:-1]:
    _write_case(str(root), case)
  path = root / "imagesTr" / "truncated.nii.gz"
  path.write_bytes(path.read_bytes()[:60])
  _write_case(str(root), "shape", label=np.zeros((8, 6, 4), np.uint8))
  nib.save(nib.Nifti1Image(np.zeros(SHAPE_XYZ, np.uint8), np.diag([1.5, 1.5, 2.5, 1.0])),
           str(root / "labelsTr" / "affine.nii.gz"))
  bad_values = np.zeros(SHAPE_XYZ, np.uint8)
  bad_values[0, 0, 0] = 7
  _write_case(str(root), "values", label=bad_values)
  nib.save(nib.Nifti1Image(np.zeros((*SHAPE_XYZ, 2), np.uint8), AFFINE),
           str(root / "labelsTr" / "four_d.nii.gz"))
  config = _config(root, cache, validation_fraction=0.3)
  with pytest.raises(DataError) as error:
    decathlon.prepare(config, str(cache))
  lines = str(error.value).splitlines()
  assert lines[0].startswith("7 problem(s)")  # the missing case: image and label
  expectations = {"truncated.nii.gz": "unreadable or truncated", "shape.nii.gz": "shape",
                  "affine.nii.gz": "affine differs", "values.nii.gz": "[7]",
                  "four_d.nii.gz": "must be 3D", "missing.nii.gz": "missing"}
  for name, why in expectations.items():
    assert any(name in line and why in line for line in lines[1:]), (name, lines)
  assert not os.path.exists(cache / "seg_decathlon") or not os.listdir(cache / "seg_decathlon")


def test_the_example_folder_is_a_sound_decathlon_task(tmp_path):
  """examples/make_decathlon_dataset.py writes what the dataset reads: its labels, its fold,
  its spacing, and labels equal to what was written (read back with nibabel)."""
  from examples import make_decathlon_dataset as example
  root, cache = tmp_path / "task", tmp_path / "cache"
  cases = example.write(str(root), num_cases=4, num_val=1, size=16)
  config = _config(root, cache)
  assert config.dataset.num_classes == 3
  volume_set, names = decathlon.prepare(config, str(cache))
  assert names == ["background", "organ", "lesion"]
  assert [c.id for c in volume_set.splits["train"]] == cases[:3]
  assert [c.id for c in volume_set.splits["validation"]] == cases[3:]
  for case in volume_set.splits["train"]:
    assert case.spacing == (2.5, 1.5, 1.5)  # (D, H, W): the written spacing is the median
    written = nib.load(str(root / "labelsTr" / f"{case.id}.nii.gz")).get_fdata()
    np.testing.assert_array_equal(case.mask, written.transpose(2, 1, 0))
  assert any(case.mask.any() for case in volume_set.splits["train"])
