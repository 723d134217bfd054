"""A folder of the user's own images and label masks as a cached TFDS dataset ("seg_folder").

Layout of `root` (the folder layout)::

    root/images/<stem>.<png|jpg|jpeg|tif|tiff|bmp>   8- or 16-bit, grey, RGB, RGBA, palette
    root/masks/<stem>.<png|tif|tiff>                  class ids: grey, 16-bit or palette PNG, TIFF
    root/splits/{train,validation,test}.txt           optional: one stem per line ('#' comments)
    root/classes.txt                                  optional: one class name per line

Images and masks are paired by file stem. Without `splits/`, the paired stems
are split by a seeded shuffle (`split_seed`, `validation_fraction`,
`test_fraction`); with it, the files name the stems of each split (train.txt
required) and stems listed nowhere are left out.

Before anything is written, `scan_folder` reads every file and collects
*every* problem (missing partner, unreadable file, size mismatch, label outside
`[0, num_classes)` other than the ignore label, inconsistent channels, bad
split files, empty folder, classes.txt of the wrong length); if there is any,
it raises one `DataError` whose first line is a summary and whose other lines
name each file and what is wrong.

Channels (`channels`): 0 = as in the files (all images must agree, after an
alpha channel is dropped and palettes are expanded to RGB); 3 = grey images
are promoted to RGB (replicated); 1 = RGB images are converted to grey
(ITU-R 601-2 luma, as PIL's mode 'L'); any other count must match exactly
(multi-band TIFF). Bit depth: if any image is 16-bit, all are stored as uint16
and 8-bit ones are scaled by 257, which maps 255 to 65535 exactly, so
`to_unit_range` gives the same values for both.

Caching: the dataset is written once under
`<data_dir>/seg_folder/<name>/1.0.0/`, where `name` holds a fingerprint of
the relative path, size and modification time of every file under root and of
the options that change the stored data. Changing, adding or removing any file
gives a new name, so a stale cache is never read (old ones may be deleted by
hand). What the checks need later (per-image size and label values) is stored
in the dataset's metadata, so a cached dataset is re-checked against a new
`num_classes`/`ignore_label` without reading the images again.

`layout='ade20k'` reads the extracted ADEChallengeData2016 folder instead
(`images/{training,validation}/*.jpg`, `annotations/{training,validation}/*.png`)
into splits train and validation; its raw labels 0..150 are checked here and
mapped to classes in the input pipeline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from seg_jax import registry
from seg_jax.data import image_io
from seg_jax.data.errors import DataError

SPLITS = ("train", "validation", "test")
LAYOUTS = ("folder", "ade20k")
# Bump when the stored representation changes: it is part of every cache name.
FORMAT_VERSION = 1
# At most this many problem lines in one error message (then a count of the rest).
MAX_LISTED_PROBLEMS = 1000
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
_ADE_SPLITS = {"train": "training", "validation": "validation"}


@dataclasses.dataclass(frozen=True)
class Example:
  """One image and its mask; `stem` is the example id."""
  stem: str
  image: str
  mask: str


@dataclasses.dataclass
class FolderScan:
  """Everything `scan_folder` learned: what to write and what later checks need."""
  root: str
  channels: int                       # stored channels
  image_dtype: str                    # 'uint8' | 'uint16'
  mask_dtype: str
  splits: dict[str, list[Example]]    # split -> examples, in stem order
  class_names: list[str]
  sizes: dict[str, tuple[int, int]]   # stem -> (height, width)
  labels: dict[str, list[int]]        # stem -> label values present in its mask

  def metadata(self) -> dict[str, Any]:
    """JSON-able summary stored with the dataset (see `check_cached`)."""
    return {"format": FORMAT_VERSION, "root": self.root, "channels": self.channels,
            "image_dtype": self.image_dtype, "class_names": self.class_names,
            "splits": {s: [e.stem for e in ex] for s, ex in self.splits.items()},
            "masks": {e.stem: os.path.relpath(e.mask, self.root)
                      for ex in self.splits.values() for e in ex},
            "sizes": {k: list(v) for k, v in self.sizes.items()}, "labels": self.labels}


# ---------------------------------------------------------------------------- listing

def _image_files(directory: str, extensions: tuple[str, ...], problems: list[str],
                 what: str) -> dict[str, str]:
  """stem -> path of the files in `directory` with one of `extensions`.

  Hidden files are skipped; other extensions are skipped with a log line (a
  README in images/ is no reason to stop); two files with one stem are a problem.
  """
  by_stem: dict[str, list[str]] = {}
  skipped = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.startswith(".") or not os.path.isfile(path):
      continue
    stem, ext = os.path.splitext(name)
    if ext.lower() not in extensions:
      skipped.append(name)
      continue
    by_stem.setdefault(stem, []).append(path)
  if skipped:
    logging.warning("%s: skipped %d files that are not %s (%s)", directory, len(skipped), what,
                    ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
  for stem, paths in by_stem.items():
    if len(paths) > 1:
      problems.append(f"{', '.join(paths)}: several {what} share the stem {stem!r}")
  # A stem with several files is left out of the pairing: it is reported once, above.
  return {stem: paths[0] if len(paths) == 1 else None for stem, paths in by_stem.items()}


def _read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    lines = [line.split("#", 1)[0].strip() for line in f]
  return [line for line in lines if line]


def _pair(images: dict[str, str | None], masks: dict[str, str | None],
          problems: list[str]) -> dict[str, Example]:
  """Examples of the stems with one image and one mask; a missing partner is a problem.

  None marks a stem with several files (already reported).
  """
  for stem in sorted(images.keys() - masks.keys()):
    if images[stem]:
      problems.append(f"{images[stem]}: no mask with stem {stem!r}")
  for stem in sorted(masks.keys() - images.keys()):
    if masks[stem]:
      problems.append(f"{masks[stem]}: no image with stem {stem!r}")
  return {s: Example(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())
          if images[s] and masks[s]}


def _split_by_files(root: str, pairs: dict[str, Example], problems: list[str]) -> dict[str, list[str]]:
  split_dir = os.path.join(root, "splits")
  known = {f"{s}.txt" for s in SPLITS}
  for name in sorted(os.listdir(split_dir)):
    if name not in known and not name.startswith("."):
      problems.append(f"{os.path.join(split_dir, name)}: unknown split file (expected "
                      f"{', '.join(sorted(known))})")
  splits: dict[str, list[str]] = {}
  seen: dict[str, str] = {}
  for split in SPLITS:
    path = os.path.join(split_dir, f"{split}.txt")
    if not os.path.isfile(path):
      continue
    stems = _read_lines(path)
    unknown = [s for s in stems if s not in pairs]
    if unknown:
      problems.append(f"{path}: {len(unknown)} stems without an image/mask pair: "
                      f"{', '.join(unknown[:20])}{', ...' if len(unknown) > 20 else ''}")
    for stem in stems:
      if stem in seen:
        problems.append(f"{path}: {stem!r} is also listed in {seen[stem]}")
      seen.setdefault(stem, path)
    splits[split] = sorted({s for s in stems if s in pairs})
  if not splits.get("train"):
    problems.append(f"{os.path.join(split_dir, 'train.txt')}: missing or empty (with splits/, "
                    "train.txt names the training images)")
  unused = len(pairs.keys() - seen.keys())
  if unused:
    logging.info("%s: %d image/mask pairs are in no split file and are not used", split_dir, unused)
  return splits


def split_by_fraction(stems: list[str], *, seed: int, validation_fraction: float,
                      test_fraction: float) -> dict[str, list[str]]:
  """Seeded shuffle of the sorted stems into train/validation/test.

  Each split with a non-zero fraction gets round(n * fraction) stems, at least
  one; the rest is train. Depends only on the set of stems and the arguments.
  """
  order = np.random.default_rng(seed).permutation(len(stems))
  shuffled = [sorted(stems)[i] for i in order]
  counts = {}
  for split, fraction in (("validation", validation_fraction), ("test", test_fraction)):
    counts[split] = max(1, round(len(stems) * fraction)) if fraction > 0 else 0
  n_val, n_test = counts["validation"], counts["test"]
  splits = {"validation": shuffled[:n_val], "test": shuffled[n_val:n_val + n_test],
            "train": shuffled[n_val + n_test:]}
  return {k: sorted(v) for k, v in splits.items() if v}


def _list_folder_layout(root: str, problems: list[str], *, split_seed: int,
                        validation_fraction: float, test_fraction: float):
  image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
  for d in (image_dir, mask_dir):
    if not os.path.isdir(d):
      problems.append(f"{d}: missing folder (expected {root}/images/ and {root}/masks/)")
  if problems:
    return {}, None, {}
  images = _image_files(image_dir, image_io.IMAGE_EXTENSIONS, problems, "images")
  masks = _image_files(mask_dir, MASK_EXTENSIONS, problems, "masks")
  if not images and not masks:
    problems.append(f"{root}: empty dataset (no image files in images/ or masks/)")
  pairs = _pair(images, masks, problems)
  if os.path.isdir(os.path.join(root, "splits")):
    stems = _split_by_files(root, pairs, problems)
  else:
    stems = split_by_fraction(list(pairs), seed=split_seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction)
    if pairs and not stems.get("train"):
      problems.append(f"{root}: {len(pairs)} pairs leave no training images after the validation "
                      f"and test fractions")
  splits = {s: [pairs[stem] for stem in v] for s, v in stems.items()}
  classes_path = os.path.join(root, "classes.txt")
  names = _read_lines(classes_path) if os.path.isfile(classes_path) else None
  return splits, names, pairs


def _list_ade20k_layout(root: str, problems: list[str]):
  splits = {}
  for split, sub in _ADE_SPLITS.items():
    image_dir = os.path.join(root, "images", sub)
    mask_dir = os.path.join(root, "annotations", sub)
    if not (os.path.isdir(image_dir) and os.path.isdir(mask_dir)):
      problems.append(f"{root}: expected images/{sub}/ and annotations/{sub}/ (the extracted "
                      "ADEChallengeData2016.zip)")
      continue
    images = _image_files(image_dir, image_io.IMAGE_EXTENSIONS, problems, "images")
    masks = _image_files(mask_dir, MASK_EXTENSIONS, problems, "masks")
    splits[split] = list(_pair(images, masks, problems).values())
    if not splits[split]:
      problems.append(f"{image_dir}: no image/annotation pairs")
  return splits, None, {e.stem: e for examples in splits.values() for e in examples}


# ---------------------------------------------------------------------------- reading

def _convertible(have: int, want: int) -> bool:
  return want in (0, have) or (have, want) in ((1, 3), (3, 1))


def to_stored_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
  """uint8 -> uint16 by x * 257 (255 -> 65535), so `to_unit_range` is unchanged."""
  if dtype == "uint16" and image.dtype == np.uint8:
    return image.astype(np.uint16) * 257
  return image


@dataclasses.dataclass
class _FileReport:
  problems: list[str]
  size: tuple[int, int] | None = None
  channels: int | None = None
  dtype: str | None = None
  labels: list[int] | None = None


def _check_pair(example: Example) -> _FileReport:
  """Reads one image and its mask; reports what the checks need, or the problems."""
  report = _FileReport(problems=[])
  image = mask = None
  try:
    image = image_io.read_image(example.image)
  except image_io.ImageError as e:
    report.problems.append(str(e))
  try:
    mask = image_io.read_label(example.mask)
  except image_io.ImageError as e:
    report.problems.append(str(e))
  if image is not None:
    report.channels, report.dtype = image.shape[-1], str(image.dtype)
  if mask is not None:
    report.labels = np.unique(mask).tolist()
  if image is not None and mask is not None:
    if image.shape[:2] != mask.shape:
      report.problems.append(f"{example.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                             f"{example.image} is {image.shape[1]}x{image.shape[0]} (width x height)")
    else:
      report.size = mask.shape
  return report


def label_problems(labels: dict[str, list[int]], masks: dict[str, str], *, num_classes: int,
                   ignore_label: int | None) -> list[str]:
  """One line per mask holding a value outside [0, num_classes) other than ignore_label."""
  problems = []
  for stem in sorted(labels):
    bad = [v for v in labels[stem] if not 0 <= v < num_classes and v != ignore_label]
    if bad:
      allowed = f"[0, {num_classes})" + (f" or ignore_label={ignore_label}"
                                         if ignore_label is not None else "")
      problems.append(f"{masks.get(stem, stem)}: label values {bad[:10]}"
                      f"{' ...' if len(bad) > 10 else ''} outside {allowed}")
  return problems


def _channel_problems(reports: dict[str, tuple[Example, _FileReport]], channels: int) -> tuple[list[str], int]:
  """Problems with the images' channel counts, and the channel count to store."""
  by_count: dict[int, list[str]] = {}
  for example, report in reports.values():
    if report.channels is not None:
      by_count.setdefault(report.channels, []).append(example.image)
  if not by_count:
    return [], channels or 3
  if channels == 0:
    if len(by_count) == 1:
      return [], next(iter(by_count))
    common = max(by_count, key=lambda c: len(by_count[c]))
    problems = [f"{path}: {count} channels, but most images have {common} (set "
                f"dataset.channels=3 to promote grey images to RGB, or 1 for grey)"
                for count, paths in sorted(by_count.items()) if count != common for path in paths]
    return problems, common
  problems = [f"{path}: {count} channels cannot be converted to dataset.channels={channels}"
              for count, paths in sorted(by_count.items()) if not _convertible(count, channels)
              for path in paths]
  return problems, channels


def _raise(problems: list[str], what: str) -> None:
  files = {p.split(": ", 1)[0] for p in problems}
  listed = problems[:MAX_LISTED_PROBLEMS]
  more = len(problems) - len(listed)
  raise DataError(f"{what}: {len(problems)} problems in {len(files)} files or folders; nothing "
                  "was built. Fix them and start again:\n" + "\n".join(f"  {p}" for p in listed)
                  + (f"\n  ... and {more} more" if more else ""))


def scan_folder(root: str, *, num_classes: int, ignore_label: int, channels: int = 0,
                split_seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.0,
                layout: str = "folder", raw_num_classes: int | None = None,
                workers: int | None = None) -> FolderScan:
  """Reads and checks every image and mask under `root`; raises one DataError listing all problems.

  `raw_num_classes` (ade20k) checks the stored values against [0, raw) with no
  ignore label instead of [0, num_classes) + ignore_label.
  """
  root = os.path.abspath(os.path.expanduser(root))
  problems: list[str] = []
  if not os.path.isdir(root):
    _raise([f"{root}: no such folder"], f"dataset folder {root}")
  if layout == "ade20k":
    splits, names, pairs = _list_ade20k_layout(root, problems)
  else:
    splits, names, pairs = _list_folder_layout(
        root, problems, split_seed=split_seed, validation_fraction=validation_fraction,
        test_fraction=test_fraction)
  if names is not None and len(names) != num_classes:
    problems.append(f"{os.path.join(root, 'classes.txt')}: {len(names)} class names but "
                    f"dataset.num_classes={num_classes}")
  # Every pair is checked, also those that no split file names. Decoding releases the GIL.
  with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
    reports = dict(zip(pairs, zip(pairs.values(), pool.map(_check_pair, pairs.values()))))
  for _, report in reports.values():
    problems.extend(report.problems)
  labels = {stem: r.labels for stem, (_, r) in reports.items() if r.labels is not None}
  masks = {stem: e.mask for stem, e in pairs.items()}
  if raw_num_classes is not None:
    problems.extend(label_problems(labels, masks, num_classes=raw_num_classes, ignore_label=None))
  else:
    problems.extend(label_problems(labels, masks, num_classes=num_classes,
                                   ignore_label=ignore_label))
  channel_problems, stored_channels = _channel_problems(reports, channels)
  problems.extend(channel_problems)
  if problems:
    _raise(problems, f"dataset folder {root}")
  dtypes = {r.dtype for _, r in reports.values()}
  top_label = max([max(v) for v in labels.values() if v] + [ignore_label or 0])
  return FolderScan(
      root=root, channels=stored_channels,
      image_dtype="uint16" if "uint16" in dtypes else "uint8",
      mask_dtype="uint8" if top_label <= 255 else "uint16",
      splits=splits, class_names=names or [f"class_{i}" for i in range(num_classes)],
      sizes={stem: tuple(r.size) for stem, (_, r) in reports.items()}, labels=labels)


# ---------------------------------------------------------------------------- fingerprint

# What a dataset is made of, per layout: only these paths under root enter the fingerprint,
# so other files there (notes, predictions written later) do not invalidate the cache.
_CONTENT = {"folder": ("images", "masks", "splits", "classes.txt"),
            "ade20k": ("images", "annotations")}


def fingerprint(root: str, options: dict[str, Any]) -> str:
  """sha256 of (relative path, size, mtime) of every dataset file under root, and of `options`."""
  root = os.path.abspath(os.path.expanduser(root))
  digest = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **options}, sort_keys=True).encode())

  def add(path):
    stat = os.stat(path)
    digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())

  for part in _CONTENT[options.get("layout", "folder")]:
    top = os.path.join(root, part)
    if os.path.isfile(top):
      add(top)
    for directory, subdirs, files in os.walk(top):
      subdirs.sort()
      for name in sorted(files):
        add(os.path.join(directory, name))
  return digest.hexdigest()


def cache_name(root: str, options: dict[str, Any]) -> str:
  """`<folder name>-<fingerprint>`: readable, and new whenever a file or option changes."""
  base = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(os.path.abspath(root))).strip("_")
  return f"{base[:40] or 'folder'}-{fingerprint(root, options)[:20]}"


# ---------------------------------------------------------------------------- TFDS builder

@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """What `SegFolder` writes: the checked examples of each split and how to store them."""
  scan: FolderScan | None = dataclasses.field(default=None, repr=False)  # TFDS logs the repr


class SegFolder(tfds.core.GeneratorBasedBuilder):
  """The checked image/mask pairs of one folder.

  Features of one example:
    image: uint8 or uint16 [H, W, C] (H, W vary between examples).
    mask: uint8 or uint16 [H, W, 1], the label values as in the file.
    id: the file stem.
  Metadata: `FolderScan.metadata()` (sizes, label values, splits, class names).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # See shapes.SegShapes.code_path: avoids a lookup that fails on Python >= 3.9.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    scan = self.builder_config.scan
    c = scan.channels
    image_dtype = np.dtype(scan.image_dtype)
    if c in (1, 3):
      image = tfds.features.Image(shape=(None, None, c), dtype=image_dtype)
    else:  # PNG holds at most 4 channels; multi-band images are stored zlib-compressed
      image = tfds.features.Tensor(shape=(None, None, c), dtype=image_dtype,
                                   encoding=tfds.features.Encoding.ZLIB)
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Images and masks of {scan.root}.",
        features=tfds.features.FeaturesDict({
            "image": image,
            "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.dtype(scan.mask_dtype)),
            "id": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(scan.metadata()),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[Any]]:
    del dl_manager  # the files are local
    return {split: self._generate_examples(examples)
            for split, examples in self.builder_config.scan.splits.items() if examples}

  def _generate_examples(self, examples: list[Example]) -> Iterator[tuple[str, dict]]:
    scan = self.builder_config.scan
    for example in examples:
      image = image_io.convert_channels(image_io.read_image(example.image), scan.channels,
                                       path=example.image)
      mask = image_io.read_label(example.mask).astype(scan.mask_dtype)
      yield example.stem, {"image": to_stored_dtype(image, scan.image_dtype),
                           "mask": mask[..., None], "id": example.stem}


OFFLINE_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)


def prepare_folder(root: str, *, data_dir: str | None, num_classes: int, ignore_label: int,
                   channels: int = 0, split_seed: int = 0, validation_fraction: float = 0.1,
                   test_fraction: float = 0.0, layout: str = "folder",
                   raw_num_classes: int | None = None) -> tuple[tfds.core.DatasetBuilder, list[str]]:
  """(prepared builder, class names) of the folder: read from cache, or checked and written.

  A cached dataset is re-checked against `num_classes`/`ignore_label` from its
  metadata (no image is read); an uncached one is fully scanned first, and
  nothing is written unless every file is sound.
  """
  from tensorflow_datasets.core import constants
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    _raise([f"{root}: no such folder"], f"dataset folder {root}")
  data_dir = data_dir or constants.DATA_DIR
  options = {"layout": layout, "channels": channels}
  if layout == "folder" and not os.path.isdir(os.path.join(root, "splits")):
    options.update(split_seed=split_seed, validation_fraction=validation_fraction,
                   test_fraction=test_fraction)
  name = cache_name(root, options)
  cached = epath.Path(data_dir) / "seg_folder" / name / str(SegFolder.VERSION)
  if (cached / "dataset_info.json").exists():
    builder = tfds.builder_from_directory(cached)
    meta = builder.info.metadata
    masks = {stem: os.path.join(root, path) for stem, path in meta["masks"].items()}
    problems = label_problems(
        meta["labels"], masks, num_classes=raw_num_classes or num_classes,
        ignore_label=None if raw_num_classes else ignore_label)
    if layout == "folder" and os.path.isfile(os.path.join(root, "classes.txt")) \
        and len(meta["class_names"]) != num_classes:
      problems.append(f"{os.path.join(root, 'classes.txt')}: {len(meta['class_names'])} class "
                      f"names but dataset.num_classes={num_classes}")
    if problems:
      _raise(problems, f"dataset folder {root} (cached in {cached})")
    names = meta["class_names"]
    return builder, names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]
  logging.info("Checking every image and mask in %s before building the dataset", root)
  scan = scan_folder(root, num_classes=num_classes, ignore_label=ignore_label, channels=channels,
                     split_seed=split_seed, validation_fraction=validation_fraction,
                     test_fraction=test_fraction, layout=layout, raw_num_classes=raw_num_classes)
  builder = SegFolder(config=FolderConfig(name=name, scan=scan), data_dir=data_dir)
  builder.download_and_prepare(download_config=OFFLINE_DOWNLOAD_CONFIG)
  logging.info("Built %s: %s", builder.data_dir,
               ", ".join(f"{s} {len(e)}" for s, e in scan.splits.items()))
  return builder, scan.class_names


# ---------------------------------------------------------------------------- dataset entry

def _prepare_entry(config, data_dir: str | None):
  d = config.dataset
  return prepare_folder(
      d.root, data_dir=data_dir, num_classes=d.num_classes, ignore_label=d.ignore_label,
      channels=d.channels, split_seed=d.split_seed, validation_fraction=d.validation_fraction,
      test_fraction=d.test_fraction)


def _check_entry(config) -> None:
  d = config.dataset
  if not d.root:
    registry.fail("dataset.root", d.root, "dataset.name='folder' needs the data folder")
  for key in ("channels", "split_seed"):
    registry.check_int(f"dataset.{key}", d[key], minimum=0)
  fractions = (d.validation_fraction, d.test_fraction)
  if (any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1
          for f in fractions) or sum(fractions) >= 1):
    registry.fail("dataset.validation_fraction", d.validation_fraction,
                  f"validation_fraction and test_fraction={d.test_fraction} must be in [0, 1) "
                  "with a sum < 1")


ENTRY = registry.register_dataset(registry.DatasetEntry(
    name="folder",
    defaults={
        "root": "",               # DIR with images/ and masks/ (paired by file stem), optional
                                  # splits/ and classes.txt
        "channels": 0,            # input channels; 0 = infer (all images must agree),
                                  # 3 = grey promoted to RGB, 1 = RGB converted to grey
        "split_seed": 0,          # without splits/: seed of the split by fraction
        "validation_fraction": 0.1,  # without splits/: share of images per split
        "test_fraction": 0.0,
    },
    prepare=_prepare_entry, check=_check_entry,
    description="your images and masks in a folder (see the module docstring for the layout)"))
