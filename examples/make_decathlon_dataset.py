"""Writes a small Medical Segmentation Decathlon folder of synthetic CT-like scans (NIfTI).

  python examples/make_decathlon_dataset.py --out=/tmp/task [--num_cases=24 --num_val=6 --size=64]

Layout written (what `dataset.name=decathlon` reads; see README "3D volumes")::

    OUT/dataset.json                 modality CT; labels background, organ, lesion
    OUT/imagesTr/ct_000.nii.gz ...   float32 Hounsfield-like units, (x, y, z) at 1.5 x 1.5 x 2.5 mm
    OUT/labelsTr/ct_000.nii.gz ...   uint8 labels 0, 1, 2
    OUT/imagesTs/                    empty
    OUT/splits_final.json            nnU-Net's format: one fold, the last num_val cases validate

The scans are the embedded shapes3d volumes (seg_jax/data/builders/shapes3d.py) with its organ
and lesion classes kept (vessels become background), scaled to Hounsfield-like values: 64^3 cases
at 1.5 x 1.5 x 2.5 mm with two foreground classes, 18 training and 6 validation cases by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # seg_jax
from seg_jax.data.builders import shapes3d  # pylint: disable=wrong-import-position

SPACING_XYZ = (1.5, 1.5, 2.5)
LABELS = {"0": "background", "1": "organ", "2": "lesion"}


def write(out: str, *, num_cases: int = 24, num_val: int = 6, size: int = 64, seed: int = 42
          ) -> list[str]:
  """Writes the folder; returns the case ids."""
  for sub in ("imagesTr", "labelsTr", "imagesTs"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  cases = [f"ct_{i:03d}" for i in range(num_cases)]
  affine = np.diag([*SPACING_XYZ, 1.0])
  organ, lesion = shapes3d.CLASS_NAMES.index("organ"), shapes3d.CLASS_NAMES.index("lesion")
  for i, case in enumerate(cases):
    image, mask = shapes3d.generate_case(np.random.default_rng([seed, i]), (size,) * 3,
                                         SPACING_XYZ[::-1])  # (D, H, W) = (z, y, x)
    label = np.where(mask == lesion, 2, np.where(mask == organ, 1, 0)).astype(np.uint8)
    hounsfield = (image * 80 + 40).astype(np.float32)
    for folder, volume in (("imagesTr", hounsfield), ("labelsTr", label)):
      nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), affine),  # NIfTI holds (x, y, z)
               os.path.join(out, folder, f"{case}.nii.gz"))
  with open(os.path.join(out, "dataset.json"), "w") as f:
    json.dump({"name": "synthetic CT", "modality": {"0": "CT"}, "labels": LABELS,
               "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                            for c in cases], "test": []}, f, indent=1)
  with open(os.path.join(out, "splits_final.json"), "w") as f:
    json.dump([{"train": cases[:num_cases - num_val], "val": cases[num_cases - num_val:]}], f)
  return cases


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_cases", type=int, default=24)
  parser.add_argument("--num_val", type=int, default=6)
  parser.add_argument("--size", type=int, default=64)
  args = parser.parse_args()
  cases = write(args.out, num_cases=args.num_cases, num_val=args.num_val, size=args.size)
  print(f"wrote {len(cases)} cases ({len(cases) - args.num_val} train, {args.num_val} val) "
        f"to {args.out}")


if __name__ == "__main__":
  main()
