"""Embedded, offline, procedural scene dataset ("seg_shapes").

Each scene is a square RGB image with a few overlapping geometric objects
painted on a cluttered background. Every object has a class given only by its
*shape*: colour, size, rotation and texture are random and shared across
classes, and the background is a colour gradient with low-frequency noise and
optional stripes, so neither colour nor a global threshold separates the
classes or the foreground.

Classes (`CLASS_NAMES`, index = semantic id)::

    0 background, 1 disc, 2 square, 3 triangle, 4 ring, 5 cross

Conventions (the same ones as the rest of seg_jax):

* Pixel (row i, column j) has its centre at (y, x) = (i + 0.5, j + 0.5).
  Shapes are rasterised by testing pixel centres, with hard edges and no
  anti-aliasing, so a mask is exactly the set of painted pixels.
* Objects are painted in order; later objects occlude earlier ones.
  `instance_masks[k]` is the *visible* part of object k. Instance masks are
  pairwise disjoint and non-empty, and `mask` (semantic ids) is their
  composition: `mask[p] = labels[k]` if `instance_masks[k, p] == 1`, else 0.
  A ring's hole shows whatever lies behind it.
* Boxes are float32 `(y0, x0, y1, x1)` in pixels with `y1`/`x1` exclusive: the
  tight box of the visible instance mask. `y0` is the first row containing the
  mask and `y1` the last such row + 1 (likewise columns for x), so
  `instance_masks[k, y0:y1, x0:x1]` crops exactly the instance and
  `(y1 - y0) * (x1 - x0)` is the box area in pixels.
* Per-pixel Gaussian noise is added to the whole image *after* painting; before
  the noise, mask and image agree exactly.

Two entry points:

* `generate_scene(rng, image_size, ...)`: pure numpy, one scene as a dict.
* `SegShapes` (TFDS name `seg_shapes`): writes a fixed number of scenes per
  split; build it with `shapes_builder(data_dir=...)` and `prepare(builder)`,
  which works fully offline.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from seg_jax import registry

CLASS_NAMES = ('background', 'disc', 'square', 'triangle', 'ring', 'cross')
NUM_CLASSES = len(CLASS_NAMES)

# Object size: radius / half-extent as a fraction of the image size.
MIN_SIZE_FRACTION = 0.08
MAX_SIZE_FRACTION = 0.25
# Placement rejection: an object is retried this often, then skipped.
MAX_PLACEMENT_TRIES = 20
# Every earlier object must keep at least this fraction of its area visible.
MIN_VISIBLE_FRACTION = 0.5
# A new object must cover at least this many pixels.
MIN_VISIBLE_PIXELS = 12

_TEXTURES = ('flat', 'stripes', 'checkerboard', 'noisy')


# ---------------------------------------------------------------------------
# Scene generator (pure numpy).
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (yy, xx) float32 [S, S]: coordinates of the pixel centres."""
  c = np.arange(image_size, dtype=np.float32) + 0.5
  yy, xx = np.meshgrid(c, c, indexing='ij')
  yy.flags.writeable = False  # Cached and shared: guard against mutation.
  xx.flags.writeable = False
  return yy, xx


def _shape_mask(
    class_id: int,
    yy: np.ndarray,
    xx: np.ndarray,
    *,
    cy: float,
    cx: float,
    size: float,
    angle: float,
    ratio: float,
) -> np.ndarray:
  """Rasterises one shape by testing pixel centres; returns bool [S, S].

  `size` is the radius (disc, ring outer edge), 0.9x the half side (square),
  0.8x the circumradius (triangle) or the arm half-length (cross); the factors
  keep the areas of the classes within ~1.6x of each other so that area is a
  weak cue. `ratio` is the inner/outer radius of a ring or the arm
  half-width/half-length of a cross (unused for other classes).
  """
  dy = yy - cy
  dx = xx - cx
  cos, sin = np.cos(angle), np.sin(angle)
  # Object-frame coordinates (rotation by -angle).
  u = dx * cos + dy * sin
  v = -dx * sin + dy * cos
  name = CLASS_NAMES[class_id]
  if name == 'disc':
    return dx * dx + dy * dy <= size * size
  if name == 'square':
    half = 0.9 * size
    return (np.abs(u) <= half) & (np.abs(v) <= half)
  if name == 'triangle':
    # Equilateral triangle = intersection of three half-planes whose normals
    # are 120 degrees apart, each at the inradius (circumradius / 2).
    inradius = 0.5 * 1.25 * size
    inside = np.ones_like(dx, dtype=bool)
    for k in range(3):
      a = angle + 2.0 * np.pi * k / 3.0
      inside &= dx * np.cos(a) + dy * np.sin(a) <= inradius
    return inside
  if name == 'ring':
    # Keep the ring at least 1.5 px thick so it stays a ring at small sizes.
    inner = min(ratio * size, size - 1.5)
    d2 = dx * dx + dy * dy
    return (d2 <= size * size) & (d2 >= inner * inner)
  if name == 'cross':
    half_width = max(ratio * size, 1.0)
    au, av = np.abs(u), np.abs(v)
    return ((au <= size) & (av <= half_width)) | (
        (au <= half_width) & (av <= size)
    )
  raise ValueError(f'No shape for class id {class_id}.')


def _bilinear_upsample(grid: np.ndarray, image_size: int) -> np.ndarray:
  """Upsamples a coarse [g, g, C] grid to [S, S, C] (bilinear, separable)."""
  g = grid.shape[0]
  # Position of each pixel centre in grid coordinates, corners aligned.
  pos = (np.arange(image_size) + 0.5) / image_size * (g - 1)
  lo = np.minimum(np.floor(pos).astype(int), g - 2)
  frac = (pos - lo).astype(np.float32)
  weights = np.zeros((image_size, g), np.float32)
  weights[np.arange(image_size), lo] = 1.0 - frac
  weights[np.arange(image_size), lo + 1] = frac
  # Two small matmuls (an unoptimised 3-operand einsum is ~50x slower here).
  rows = np.tensordot(weights, grid, axes=(1, 0))  # [S, g, C]
  return np.einsum('xj,yjc->yxc', weights, rows, optimize=True)


def _random_background(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
  """Gradient + low-frequency noise + optional stripes; float32 [S, S, 3]."""
  s = yy.shape[0]
  # Linear colour gradient along a random direction.
  c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
  theta = rng.uniform(0, 2 * np.pi)
  t = (yy * np.sin(theta) + xx * np.cos(theta)) / s
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  bg = c0 + (c1 - c0) * t[..., None]
  # Low-frequency colour noise: a coarse random grid, upsampled.
  g = int(rng.integers(3, 8))
  coarse = rng.normal(0, rng.uniform(15, 40), size=(g, g, 3))
  bg = bg + _bilinear_upsample(coarse.astype(np.float32), s)
  # Optional coloured stripes, so edges exist away from the objects too.
  if rng.random() < 0.4:
    phi = rng.uniform(0, np.pi)
    period = max(rng.uniform(6, 20) * s / 64, 3.0)
    wave = np.sin(2 * np.pi * (yy * np.sin(phi) + xx * np.cos(phi)) / period)
    tint = rng.uniform(-1, 1, size=3).astype(np.float32)
    bg = bg + rng.uniform(10, 35) * wave[..., None] * tint
  return np.clip(bg, 0, 255).astype(np.float32)


def _contrasting_colour(
    rng: np.random.Generator, avoid: list[np.ndarray], min_distance: float
) -> np.ndarray:
  """Random integer colour >= min_distance (L-inf) from each of `avoid`.

  Returns float32 [3] with integer values. Falls back to the last draw after
  many tries (only possible when `avoid` is dense, which it never is here).
  """
  for _ in range(100):
    colour = rng.integers(0, 256, size=3).astype(np.float32)
    if all(np.max(np.abs(colour - a)) >= min_distance for a in avoid):
      return colour
  return colour


def _texture_fill(
    rng: np.random.Generator,
    base: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    *,
    angle: float,
    image_size: int,
) -> np.ndarray:
  """Colours for pixels at centres (y, x) (object frame offsets); [P, 3].

  The texture is flat, stripes at a random angle, a checkerboard rotated with
  the object, or per-pixel noise around the base colour.
  """
  texture = _TEXTURES[rng.integers(len(_TEXTURES))]
  scale = image_size / 64
  if texture == 'flat':
    return np.broadcast_to(base, (y.size, 3))
  if texture == 'noisy':
    noise = rng.normal(0, rng.uniform(10, 30), size=(y.size, 3))
    return np.clip(base + noise, 0, 255)
  # Two-colour textures: a second colour offset from the base in each channel.
  offset = rng.uniform(30, 80, size=3) * rng.choice([-1.0, 1.0], size=3)
  second = np.clip(base + offset, 0, 255)
  if texture == 'stripes':
    phi = rng.uniform(0, np.pi)
    period = max(rng.uniform(3, 8) * scale, 2.0)
    phase = (y * np.sin(phi) + x * np.cos(phi)) / (period / 2)
    on = np.floor(phase).astype(np.int64) % 2 == 1
  else:  # checkerboard, aligned with the object.
    cell = max(rng.uniform(2, 5) * scale, 1.5)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    on = (np.floor(u / cell) + np.floor(v / cell)).astype(np.int64) % 2 == 1
  return np.where(on[:, None], second, base)


def generate_scene(
    rng: np.random.Generator,
    image_size: int,
    *,
    min_objects: int = 2,
    max_objects: int = 6,
    clean: bool = False,
) -> dict[str, np.ndarray]:
  """Generates one random scene.

  Args:
    rng: source of randomness; the scene is a deterministic function of its
      state. Two seeds are drawn from it, one for the layout (number, classes,
      sizes, positions, rotations of objects) and one for the appearance, so
      `clean=True` and `clean=False` give the same layout and masks for the
      same rng state.
    image_size: S, the height and width in pixels.
    min_objects: fewest objects attempted (inclusive).
    max_objects: most objects attempted (inclusive). An object whose placement
      fails `MAX_PLACEMENT_TRIES` times is skipped, so N can be below
      `min_objects` (rare at S >= 32).
    clean: flat single-colour background, flat object fills and no noise, with
      object colours different from the background and from each other; for
      checking masks against pixels.

  Returns:
    A dict with
      image: uint8 [S, S, 3].
      mask: uint8 [S, S], semantic class ids, 0 = background.
      instance_masks: uint8 [N, S, S] in {0, 1}, visible part of each object,
        in painting order (bottom first); disjoint, each non-empty.
      boxes: float32 [N, 4], (y0, x0, y1, x1) in pixels, y1/x1 exclusive.
      labels: int64 [N], class ids in 1..NUM_CLASSES-1.
  """
  if image_size < 16:
    raise ValueError(f'image_size must be >= 16, got {image_size}.')
  if not 0 <= min_objects <= max_objects:
    raise ValueError(
        'Need 0 <= min_objects <= max_objects, got'
        f' min_objects={min_objects}, max_objects={max_objects}.'
    )
  s = image_size
  layout_seed, appearance_seed = rng.integers(0, 2**63, size=2)
  layout_rng = np.random.default_rng(layout_seed)
  look_rng = np.random.default_rng(appearance_seed)
  yy, xx = _pixel_centres(s)

  if clean:
    bg_colour = look_rng.integers(0, 256, size=3).astype(np.float32)
    canvas = np.broadcast_to(bg_colour, (s, s, 3)).copy()
    used_colours = [bg_colour]
  else:
    canvas = _random_background(look_rng, yy, xx)

  # owner[p] = index of the object visible at pixel p, or -1 for background.
  owner = np.full((s, s), -1, np.int32)
  full_areas: list[int] = []
  labels: list[int] = []
  num_objects = int(layout_rng.integers(min_objects, max_objects + 1))
  for _ in range(num_objects):
    class_id = int(layout_rng.integers(1, NUM_CLASSES))
    for _ in range(MAX_PLACEMENT_TRIES):
      size = layout_rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) * s
      # Centres keep at least half of the object inside the frame.
      cy, cx = layout_rng.uniform(0.5 * size, s - 0.5 * size, size=2)
      angle = layout_rng.uniform(0, 2 * np.pi)
      # Ring: inner/outer radius. Cross: arm half-width/half-length.
      if CLASS_NAMES[class_id] == 'ring':
        ratio = layout_rng.uniform(0.45, 0.6)
      else:
        ratio = layout_rng.uniform(0.25, 0.35)
      shape = _shape_mask(
          class_id, yy, xx, cy=cy, cx=cx, size=size, angle=angle, ratio=ratio
      )
      area = int(shape.sum())
      if area < MIN_VISIBLE_PIXELS:
        continue
      # Visible pixels each earlier object would keep under the new one.
      kept = np.bincount(
          owner[~shape & (owner >= 0)], minlength=len(full_areas)
      )
      if np.all(kept >= MIN_VISIBLE_FRACTION * np.asarray(full_areas)):
        break
    else:
      continue  # No acceptable placement: skip this object.

    # Paint. Colours are chosen to contrast with what lies underneath (or,
    # in clean mode, with every colour already used) so that no object is
    # invisible; nothing else links colour to class.
    if clean:
      colour = _contrasting_colour(look_rng, used_colours, 40)
      used_colours.append(colour)
      canvas[shape] = colour
    else:
      under = canvas[shape].mean(axis=0)
      colour = _contrasting_colour(look_rng, [under], 48)
      canvas[shape] = _texture_fill(
          look_rng,
          colour,
          yy[shape] - cy,
          xx[shape] - cx,
          angle=angle,
          image_size=s,
      )
    owner[shape] = len(full_areas)
    full_areas.append(area)
    labels.append(class_id)

  if not clean:
    canvas = canvas + look_rng.normal(0, look_rng.uniform(2, 8), canvas.shape)
  image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

  n = len(labels)
  instance_masks = (owner[None] == np.arange(n)[:, None, None]).astype(np.uint8)
  boxes = np.zeros((n, 4), np.float32)
  for k in range(n):
    rows = np.flatnonzero(instance_masks[k].any(axis=1))
    cols = np.flatnonzero(instance_masks[k].any(axis=0))
    boxes[k] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
  labels_arr = np.asarray(labels, np.int64)
  # Semantic ids: look up each pixel's owner (index 0 = background).
  mask = np.concatenate([[0], labels_arr])[owner + 1]
  return {
      'image': image,
      'mask': mask.astype(np.uint8),
      'instance_masks': instance_masks,
      'boxes': boxes,
      'labels': labels_arr,
  }


# ---------------------------------------------------------------------------
# TFDS builder.
# ---------------------------------------------------------------------------

SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Configuration of `SegShapes`.

  `name` is derived from all the other fields (set in `__post_init__`), so
  every distinct configuration is cached in its own directory
  `<data_dir>/seg_shapes/<name>/<version>/`. Do not mutate a config after
  construction; build a new one instead.

  Attributes:
    image_size: S, height and width of every image.
    num_train, num_validation, num_test: examples per split (0 = no split).
    seed: base seed; example i of split k uses
      `np.random.default_rng([seed, k, i])`, k = index in `SPLITS`.
    min_objects, max_objects: objects attempted per scene (inclusive).
  """

  name: str = dataclasses.field(default='', init=False)
  image_size: int = 64
  num_train: int = 2000
  num_validation: int = 200
  num_test: int = 200
  seed: int = 0
  min_objects: int = 2
  max_objects: int = 6

  def __post_init__(self):
    self.name = (
        f'size{self.image_size}_train{self.num_train}_val{self.num_validation}'
        f'_test{self.num_test}_seed{self.seed}'
        f'_objects{self.min_objects}-{self.max_objects}'
    )
    if self.description is None:
      self.description = (
          f'{self.image_size}x{self.image_size} scenes with'
          f' {self.min_objects}-{self.max_objects} objects, seed {self.seed}.'
      )

  @property
  def num_examples(self) -> dict[str, int]:
    """Examples per split name."""
    return dict(
        zip(SPLITS, (self.num_train, self.num_validation, self.num_test))
    )


class SegShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural overlapping shapes for semantic and instance segmentation.

  Features of one example:
    image: uint8 [S, S, 3].
    mask: uint8 [S, S, 1], semantic class ids (0 = background).
    objects: sequence of N objects, each with
      box: float32 [4], (y0, x0, y1, x1) in pixels, y1/x1 exclusive;
      label: class id in 1..5 (ClassLabel over CLASS_NAMES);
      mask: uint8 [S, S, 1] in {0, 1}, visible part of the object.
    id: '<split>_<index>', e.g. 'train_000042' (6 digits).
  Examples are generated locally; nothing is downloaded. TFDS stores (and
  `as_dataset` yields) them in an order permuted by a hash of the key, not by
  index; `id` identifies each one.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [ShapesConfig()]
  # TFDS 4.9.10 derives `code_path` (used to look for a checksums file) via
  # `importlib_resources`, which it only declares as a dependency on Python
  # < 3.9, so `download_and_prepare` fails with ModuleNotFoundError on 3.11.
  # Pointing it at this file skips that lookup; no checksums file exists here,
  # as nothing is downloaded.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Procedurally generated scenes of overlapping discs, squares,'
            ' triangles, rings and crosses with random colours, sizes,'
            ' rotations and textures on a cluttered background. Class is'
            ' given by shape only. Semantic masks, visible instance masks and'
            ' tight boxes (y0, x0, y1, x1; y1/x1 exclusive) are exact.'
        ),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(s, s, 3)),
            'mask': tfds.features.Image(shape=(s, s, 1)),
            'objects': tfds.features.Sequence({
                'box': tfds.features.Tensor(shape=(4,), dtype=np.float32),
                'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                'mask': tfds.features.Image(shape=(s, s, 1)),
            }),
            'id': tfds.features.Text(),
        }),
        homepage=None,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[Any]]:
    """Returns one generator per non-empty split; `dl_manager` is unused."""
    del dl_manager  # Everything is generated locally.
    return {
        split: self._generate_examples(split)
        for split, count in self.builder_config.num_examples.items()
        if count > 0
    }

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    cfg = self.builder_config
    split_index = SPLITS.index(split)
    for i in range(cfg.num_examples[split]):
      scene = generate_scene(
          example_rng(cfg.seed, split_index, i),
          cfg.image_size,
          min_objects=cfg.min_objects,
          max_objects=cfg.max_objects,
      )
      key = f'{split}_{i:06d}'
      yield key, {
          'image': scene['image'],
          'mask': scene['mask'][..., None],
          'objects': {
              'box': scene['boxes'],
              'label': scene['labels'],
              'mask': scene['instance_masks'][..., None],
          },
          'id': key,
      }


def example_rng(seed: int, split_index: int, index: int) -> np.random.Generator:
  """The rng of example `index` of split `SPLITS[split_index]`.

  Seeding per example makes each scene independent of generation order.
  """
  return np.random.default_rng([seed, split_index, index])


# Offline preparation: GCS lookups off (they are disabled by default in
# tfds 4.9.x anyway) and nothing else is downloaded by this builder.
OFFLINE_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)


def shapes_builder(
    *,
    data_dir: str | Any,
    image_size: int = 64,
    num_train: int = 2000,
    num_validation: int = 200,
    num_test: int = 200,
    seed: int = 0,
    min_objects: int = 2,
    max_objects: int = 6,
) -> SegShapes:
  """Returns a `SegShapes` builder for this configuration under `data_dir`.

  Data for a configuration lives in
  `<data_dir>/seg_shapes/<config.name>/1.0.0/`; a builder for a configuration
  that was prepared before finds it there (`builder.is_prepared()`), and
  `prepare` then returns without regenerating. Typical offline use::

      builder = shapes_builder(data_dir='/tmp/tfds', image_size=64)
      prepare(builder)  # = builder.download_and_prepare(
                        #     download_config=OFFLINE_DOWNLOAD_CONFIG)
      ds = builder.as_dataset(split='train')
  """
  config = ShapesConfig(
      image_size=image_size,
      num_train=num_train,
      num_validation=num_validation,
      num_test=num_test,
      seed=seed,
      min_objects=min_objects,
      max_objects=max_objects,
  )
  # TFDS refuses a custom config object that shares its name with one of
  # BUILDER_CONFIGS; the names encode every field, so the registered object is
  # the same configuration and is used instead.
  registered = SegShapes.get_builder_config(config.name)
  return SegShapes(config=registered or config, data_dir=data_dir)


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Generates the data of `builder` offline if it is not prepared yet."""
  builder.download_and_prepare(download_config=OFFLINE_DOWNLOAD_CONFIG)
  return builder


# ---------------------------------------------------------------------------- dataset entry

def _prepare_entry(config, data_dir: str | None):
  d = config.dataset
  builder = shapes_builder(
      data_dir=data_dir, image_size=d.image_size, num_train=d.num_train,
      num_validation=d.num_validation, num_test=d.num_test, seed=d.seed)
  return prepare(builder), list(CLASS_NAMES)


def _check_entry(config) -> None:
  for key in ("num_train", "num_validation", "num_test", "seed"):
    registry.check_int(f"dataset.{key}", config.dataset[key], minimum=0)


ENTRY = registry.register_dataset(registry.DatasetEntry(
    name="shapes",
    defaults={
        "seed": 0,              # which scenes are generated (fixed across training seeds)
        "num_train": 2000,      # examples per split, generated at dataset.image_size
        "num_validation": 200,
        "num_test": 200,
    },
    prepare=_prepare_entry, num_classes=(NUM_CLASSES,), default_num_classes=NUM_CLASSES,
    has_instances=True, check=_check_entry,
    description="procedural scenes of discs, squares, triangles, rings and crosses (offline)"))
