"""Writes a small synthetic COCO-JSON instance dataset: touching "nuclei" on grey tiles.

  python examples/make_coco_dataset.py --out=/tmp/cells [--num_train=12 --num_eval=4 --size=128]

Layout written (what `dataset.name=coco_json` reads; see README "Your own instance data")::

    OUT/images/train_000.png ...      8-bit grey tiles
    OUT/images/eval_000.png ...
    OUT/annotations/instances_train.json   masks as polygons
    OUT/annotations/instances_val.json     masks as compressed RLE (one uncompressed per image)

Objects are ellipses packed on a jittered grid so that neighbours touch, of two
categories with non-contiguous ids: 7 "nucleus" (bright) and 3 "mitosis"
(darker, smaller). Each eval image also has one `iscrowd=1` region (a clump
marked as crowd, as COCO does for groups). The pictures are drawn from the
annotation masks themselves, so annotations and pixels agree exactly.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_api

CATEGORIES = [{"id": 3, "name": "mitosis"}, {"id": 7, "name": "nucleus"}]


def ellipse_polygon(cy, cx, ry, rx, angle, points=16) -> list[float]:
  """[x0, y0, x1, y1, ...] of an ellipse (COCO polygon order: x before y)."""
  t = np.linspace(0, 2 * np.pi, points, endpoint=False)
  y = cy + ry * np.sin(t) * np.cos(angle) + rx * np.cos(t) * np.sin(angle)
  x = cx + rx * np.cos(t) * np.cos(angle) - ry * np.sin(t) * np.sin(angle)
  return np.round(np.stack([x, y], 1).ravel(), 2).tolist()


def make_tile(rng: np.random.Generator, size: int, *, spacing: float):
  """(grey image uint8 [size, size], objects [(category id, polygon)])."""
  objects = []
  for gy in np.arange(spacing / 2, size - spacing / 3, spacing):
    for gx in np.arange(spacing / 2, size - spacing / 3, spacing):
      if rng.random() < 0.15:
        continue
      mitosis = rng.random() < 0.25
      r = spacing * (0.38 if mitosis else 0.55) * rng.uniform(0.9, 1.1)
      cy, cx = np.clip([gy + rng.normal(0, spacing * 0.08), gx + rng.normal(0, spacing * 0.08)],
                       r * 0.7, size - 1 - r * 0.7)
      polygon = ellipse_polygon(cy, cx, r * rng.uniform(0.75, 1.0), r, rng.uniform(0, np.pi))
      polygon = np.clip(polygon, 0, size - 0.01).round(2).tolist()
      objects.append((3 if mitosis else 7, polygon))
  image = rng.normal(40, 8, (size, size))
  for category, polygon in objects:
    mask = mask_api.decode(mask_api.merge(mask_api.frPyObjects([polygon], size, size))) > 0
    level = rng.uniform(90, 120) if category == 3 else rng.uniform(150, 210)
    image[mask] = level + rng.normal(0, 10, mask.sum())
    # A dark rim marks the border between touching objects, as stained membranes do.
    edge = mask & ~np.pad(mask, 1)[2:, 1:-1] | mask & ~np.pad(mask, 1)[:-2, 1:-1] \
        | mask & ~np.pad(mask, 1)[1:-1, 2:] | mask & ~np.pad(mask, 1)[1:-1, :-2]
    image[edge] *= 0.6
  return np.clip(image, 0, 255).astype(np.uint8), objects


def write_split(out: str, split: str, count: int, *, size: int, spacing: float, seed: int,
                rle: bool) -> str:
  rng = np.random.default_rng(seed)
  images, annotations = [], []
  for i in range(count):
    image, objects = make_tile(rng, size, spacing=spacing)
    name = f"{split}_{i:03d}.png"
    Image.fromarray(image).save(os.path.join(out, "images", name))
    image_id = 1000 + 10 * i + (0 if split == "train" else 5)   # ids need not be 1..N
    images.append({"id": image_id, "file_name": name, "height": size, "width": size})
    for k, (category, polygon) in enumerate(objects):
      encoded = mask_api.merge(mask_api.frPyObjects([polygon], size, size))
      box = mask_api.toBbox(encoded).tolist()
      annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                    "bbox": box, "area": float(mask_api.area(encoded)), "iscrowd": 0}
      if not rle:
        annotation["segmentation"] = [polygon]
      elif k == 0:                      # one uncompressed RLE per image: counts as a list
        binary = mask_api.decode(encoded)
        runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(binary.ravel(order="F"))) + 1,
                                       [binary.size]]))
        counts = runs.tolist() if binary.ravel(order="F")[0] == 0 else [0] + runs.tolist()
        annotation["segmentation"] = {"size": [size, size], "counts": counts}
      else:
        annotation["segmentation"] = {"size": [size, size],
                                      "counts": encoded["counts"].decode("ascii")}
      annotations.append(annotation)
    if rle:   # a clump marked as crowd: COCOeval ignores detections on it
      crowd = np.zeros((size, size), np.uint8, order="F")
      crowd[: size // 8, : size // 8] = 1
      encoded = mask_api.encode(np.asfortranarray(crowd))
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 7,
                          "bbox": mask_api.toBbox(encoded).tolist(),
                          "area": float(mask_api.area(encoded)), "iscrowd": 1,
                          "segmentation": {"size": [size, size],
                                           "counts": encoded["counts"].decode("ascii")}})
  path = os.path.join(out, "annotations", f"instances_{split}.json")
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_train", type=int, default=12)
  parser.add_argument("--num_eval", type=int, default=4)
  parser.add_argument("--size", type=int, default=128, help="tile side, pixels")
  parser.add_argument("--spacing", type=float, default=16.0, help="grid step of the objects")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
  os.makedirs(os.path.join(args.out, "annotations"), exist_ok=True)
  train = write_split(args.out, "train", args.num_train, size=args.size, spacing=args.spacing,
                      seed=args.seed, rle=False)
  val = write_split(args.out, "val", args.num_eval, size=args.size, spacing=args.spacing,
                    seed=args.seed + 1, rle=True)
  print(f"wrote {args.num_train} training and {args.num_eval} eval images to {args.out}:\n"
        f"  {train}\n  {val}")


if __name__ == "__main__":
  main()
