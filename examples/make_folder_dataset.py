"""Writes a folder dataset of synthetic fluorescence-microscopy images, as a user would bring their own.

  python examples/make_folder_dataset.py --out /tmp/cells [--num_images 100] [--seed 0]

Layout written (what `--config.dataset.name=folder` reads)::

    OUT/images/cells_0000.png ...   RGB, 100-200 px per side, every image a different size
    OUT/masks/cells_0000.png ...    grey PNG of class ids: 0 background, 1 cell, 2 nucleus, 3 debris
    OUT/splits/{train,validation,test}.txt
    OUT/classes.txt
    OUT/predict/large_0000.png      one 1200 x 900 image for --mode=predict (not part of the
    OUT/predict/large_0000_mask.png dataset), and its true mask for comparison

What makes it more than a threshold: cells are irregular, overlapping, with
textured cytoplasm of varying brightness; nuclei are bright blue blobs inside
cells; debris are small specks that can be as bright as nuclei but are
yellow-ish and lie anywhere; illumination is uneven and the images are
blurred and noisy.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image
from scipy import ndimage

CLASSES = ("background", "cell", "nucleus", "debris")


def _blob(height, width, cy, cx, radius, rng, *, wobble=0.25, aspect=1.0, angle=0.0):
  """(window slices, boolean mask in the window) of an irregular closed shape.

  An ellipse whose radius varies smoothly with the angle; computed only in its
  bounding window, so that large images stay fast.
  """
  reach = int(np.ceil(radius * (1 + wobble) * max(aspect, 1.0))) + 1
  y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, height)
  x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, width)
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  dy, dx = yy - cy, xx - cx
  cos, sin = np.cos(angle), np.sin(angle)
  u, v = dx * cos + dy * sin, (-dx * sin + dy * cos) * aspect
  theta = np.arctan2(v, u)
  r = np.full_like(theta, radius)
  for k in (2, 3, 5):
    r = r * (1 + wobble / k * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
  return (slice(y0, y1), slice(x0, x1)), u * u + v * v <= r * r


def _texture(rng, shape, sigma):
  """Smooth random texture in about [-1, 1]."""
  noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
  return noise / (noise.std() + 1e-6) / 3


def make_image(rng: np.random.Generator, height: int, width: int, *, cell_density: float = 1.0):
  """One (image uint8 [H, W, 3], mask uint8 [H, W]) pair; sizes in pixels do not scale with the image."""
  mask = np.zeros((height, width), np.uint8)
  signal = np.zeros((height, width, 3), np.float32)
  speckle = 1 + 0.5 * _texture(rng, (height, width), 1.5)    # cytoplasm texture
  chromatin = 1 + 0.4 * _texture(rng, (height, width), 1.0)  # nucleus texture

  num_cells = max(1, int(rng.poisson(cell_density * height * width / 2500)))
  for _ in range(num_cells):
    radius = rng.uniform(9, 20)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    angle = rng.uniform(0, np.pi)
    window, cell = _blob(height, width, cy, cx, radius, rng, wobble=0.35,
                         aspect=rng.uniform(1.0, 1.8), angle=angle)
    brightness = rng.uniform(0.25, 0.7)
    local, texture, labels = signal[window], speckle[window], mask[window]
    local[cell] = 0
    local[cell, 1] = brightness * texture[cell]                      # green cytoplasm
    local[cell, 0] = 0.25 * brightness * texture[cell]
    labels[cell] = 1
    # The nucleus: inside the cell, off centre.
    off = rng.uniform(-0.3, 0.3, 2) * radius
    nwindow, nucleus = _blob(height, width, cy + off[0], cx + off[1], radius * rng.uniform(0.3, 0.5),
                             rng, wobble=0.15, aspect=rng.uniform(1.0, 1.4), angle=angle)
    nucleus &= mask[nwindow] == 1
    nlocal = signal[nwindow]
    nlocal[nucleus, 2] = rng.uniform(0.55, 1.0) * chromatin[nwindow][nucleus]  # blue nucleus
    nlocal[nucleus, 1] *= 0.5
    mask[nwindow][nucleus] = 2

  for _ in range(int(rng.poisson(height * width / 4000)) + 1):        # debris specks
    window, speck = _blob(height, width, rng.uniform(0, height), rng.uniform(0, width),
                          rng.uniform(1.5, 4.5), rng, wobble=0.6)
    level = rng.uniform(0.5, 1.0)
    signal[window][speck] = (level, 0.8 * level, 0.35 * level)
    mask[window][speck] = 3

  # Optics and camera: blur, uneven illumination, background haze, shot and read noise.
  signal = ndimage.gaussian_filter(signal, (1.0, 1.0, 0))
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  gy, gx = rng.uniform(-0.4, 0.4, 2)
  light = 1 + gy * (yy / height - 0.5) + gx * (xx / width - 0.5)
  haze = 0.06 + 0.04 * _texture(rng, (height, width), 12)[..., None]
  image = (signal + haze) * light[..., None]
  image = rng.poisson(np.clip(image, 0, None) * 200) / 200 + rng.normal(0, 0.02, image.shape)
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8), mask


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder to write (created)")
  parser.add_argument("--num_images", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_size", type=int, default=100)
  parser.add_argument("--max_size", type=int, default=200)
  args = parser.parse_args()

  rng = np.random.default_rng(args.seed)
  for sub in ("images", "masks", "splits", "predict"):
    os.makedirs(os.path.join(args.out, sub), exist_ok=True)
  stems = []
  for i in range(args.num_images):
    h, w = rng.integers(args.min_size, args.max_size + 1, 2)
    image, mask = make_image(rng, int(h), int(w))
    stem = f"cells_{i:04d}"
    Image.fromarray(image).save(os.path.join(args.out, "images", f"{stem}.png"))
    Image.fromarray(mask).save(os.path.join(args.out, "masks", f"{stem}.png"))
    stems.append(stem)

  order = rng.permutation(len(stems))
  n_val, n_test = round(0.2 * len(stems)), round(0.1 * len(stems))
  parts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test],
           "train": order[n_val + n_test:]}
  for split, indices in parts.items():
    with open(os.path.join(args.out, "splits", f"{split}.txt"), "w") as f:
      f.write("".join(f"{stems[i]}\n" for i in sorted(indices)))
  with open(os.path.join(args.out, "classes.txt"), "w") as f:
    f.write("".join(f"{name}\n" for name in CLASSES))

  image, mask = make_image(rng, 900, 1200)
  Image.fromarray(image).save(os.path.join(args.out, "predict", "large_0000.png"))
  Image.fromarray(mask).save(os.path.join(args.out, "predict", "large_0000_mask.png"))
  counts = np.bincount(mask.ravel(), minlength=len(CLASSES)) / mask.size
  print(f"wrote {len(stems)} image/mask pairs ({', '.join(f'{k} {len(v)}' for k, v in parts.items())}) "
        f"and predict/large_0000.png (1200x900) to {args.out}")
  print("class shares in the large image: " +
        ", ".join(f"{name} {share:.1%}" for name, share in zip(CLASSES, counts)))


if __name__ == "__main__":
  main()
