"""--mode=predict: tiling and blending, flip TTA, odd sizes, memory, files end to end; palettes and legends.

Reference numbers come from plain numpy in this file: full-image model
outputs, a whole-image blend with a Hann window written here, flipped views
averaged here.
"""

import json
import os
import subprocess
import sys
import tracemalloc

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image
import tifffile

from seg_jax import config as config_lib
from seg_jax import parallel
from seg_jax import predict
from seg_jax import tiling
from seg_jax import train
from seg_jax import visualize
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 32
RADIUS = 2  # receptive-field radius of ConvNet: two 3x3 convs


class TraceLog:
  """Records the input shape of every trace of a model (a Python side effect, so traces only)."""

  def __init__(self):
    self.shapes = []


class ConvNet(nn.Module):
  """Two 3x3 convs: output at a pixel depends on inputs within RADIUS pixels; not flip-equivariant."""
  num_logits: int = 3
  traces: TraceLog | None = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.traces is not None:
      self.traces.shapes.append(x.shape)
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Conv(self.num_logits, (3, 3))(x)


class PointwiseNet(nn.Module):
  """1x1 convs only: commutes with every flip."""
  num_logits: int = 3

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.relu(nn.Conv(8, (1, 1))(x))
    return nn.Conv(self.num_logits, (1, 1))(x)


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _hann(size):
  profile = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
  return np.outer(profile, profile)


def _apply(model, variables, image_uint8):
  """Full-image probabilities [H, W, K] computed directly (no tiling)."""
  x = image_uint8.astype(np.float32)[None] / 127.5 - 1
  return _softmax(np.asarray(model.apply(variables, x, train=False), np.float64)[0])


def _variables(model, channels=3, seed=0):
  return model.init(jax.random.key(seed), np.zeros((1, TILE, TILE, channels), np.float32),
                    train=False)


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope="module")
def conv_net():
  model = ConvNet()
  return model, _variables(model)


def _tile_fn(model, variables, mesh, tta="none", batch_size=4, channels=3):
  return predict.make_tile_function(model, variables, tta=tta, batch_size=batch_size,
                                    tile_size=TILE, channels=channels, mesh=mesh)


def _predict(image, tile_fn, num_classes=3, overlap=0.5, batch_size=4):
  bands = list(predict.predict_image(image, tile_fn, num_classes=num_classes, tile_size=TILE,
                                     overlap=overlap, batch_size=batch_size))
  firsts = [first for first, _ in bands]
  assert firsts == sorted(firsts) and firsts[0] == 0
  assert all(a + len(b) == c for (a, b), c in zip(bands, firsts[1:]))  # no gap, no overlap
  return np.concatenate([band for _, band in bands])


def _random_image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------- tiling

def test_tile_plan_covers_the_image_with_the_requested_overlap():
  for length in (32, 33, 70, 90, 517, 4000):
    starts = tiling.tile_starts(length, TILE, 0.25)
    assert starts[0] == 0 and starts[-1] + TILE == length or (length < TILE)
    gaps = np.diff(starts)
    assert (gaps <= TILE - 8).all() and (gaps > 0).all(), (length, starts)  # >= 8 px shared
  assert tiling.tile_starts(20, TILE, 0.5) == (0,)


def test_tiled_equals_full_image_away_from_tile_edges_and_numpy_blend_everywhere(conv_net, mesh):
  model, variables = conv_net
  image = _random_image((70, 90, 3))
  tiled = _predict(image, _tile_fn(model, variables, mesh), overlap=0.5)
  assert tiled.shape == (70, 90, 3)

  # Independent blend: the model on each tile alone, Hann-weighted average over the whole image.
  plan = tiling.plan_tiles(70, 90, TILE, 0.5)
  sums, weights = np.zeros((70, 90, 3)), np.zeros((70, 90, 1))
  contaminated = np.zeros((70, 90), bool)  # within RADIUS of a tile edge inside the image
  for y in plan.ys:
    for x in plan.xs:
      probs = _apply(model, variables, image[y:y + TILE, x:x + TILE])
      sums[y:y + TILE, x:x + TILE] += probs * _hann(TILE)[..., None]
      weights[y:y + TILE, x:x + TILE] += _hann(TILE)[..., None]
      if y > 0:
        contaminated[y:y + RADIUS, x:x + TILE] = True
      if y + TILE < 70:
        contaminated[y + TILE - RADIUS:y + TILE, x:x + TILE] = True
      if x > 0:
        contaminated[y:y + TILE, x:x + RADIUS] = True
      if x + TILE < 90:
        contaminated[y:y + TILE, x + TILE - RADIUS:x + TILE] = True
  np.testing.assert_allclose(tiled, sums / weights, atol=2e-6)

  full = _apply(model, variables, image)
  clean = ~contaminated
  assert clean.mean() > 0.5
  np.testing.assert_allclose(tiled[clean], full[clean], atol=2e-6)
  # The comparison is not vacuous: near interior tile edges tiles do differ from the full image.
  assert np.abs(tiled - full)[contaminated].max() > 1e-3


def test_row_band_accumulation_equals_whole_image_accumulation():
  rng = np.random.default_rng(1)
  for height, width, overlap in ((100, 75, 0.3), (20, 75, 0.25), (77, 20, 0.6), (32, 32, 0.0)):
    plan = tiling.plan_tiles(height, width, TILE, overlap)
    tiles = rng.random((plan.num_tiles, TILE, TILE, 5)).astype(np.float32)
    sums, weights = np.zeros((height, width, 5)), np.zeros((height, width, 1))
    for tile, (y, x) in zip(tiles, plan.positions()):
      h, w = min(TILE, height - y), min(TILE, width - x)
      sums[y:y + h, x:x + w] += tile[:h, :w] * _hann(TILE)[:h, :w, None]
      weights[y:y + h, x:x + w] += _hann(TILE)[:h, :w, None]
    blender = tiling.RowBandBlender(plan, 5)
    bands = [blender.add(tile) for tile in tiles]
    rows = np.concatenate([band for _, band in filter(None, bands)])
    np.testing.assert_allclose(rows, sums / weights, rtol=1e-5)


def test_row_band_memory_does_not_grow_with_image_height():
  height, width, classes = 1600, 64, 8
  plan = tiling.plan_tiles(height, width, TILE, 0.25)
  tile = np.full((TILE, TILE, classes), 1 / classes, np.float32)
  tracemalloc.start()
  try:
    blender = tiling.RowBandBlender(plan, classes)
    for _ in range(plan.num_tiles):
      blender.add(tile)  # finished bands are dropped at once
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  whole_image = height * width * classes * 4
  band = TILE * width * classes * 4
  assert peak < 6 * band < whole_image / 5, (peak, band, whole_image)


def test_compiled_once_for_images_of_every_size(mesh):
  traces = TraceLog()
  model = ConvNet(traces=traces)
  variables = _variables(model)
  traces.shapes.clear()  # forget init
  tile_fn = _tile_fn(model, variables, mesh)
  assert traces.shapes == [(4, TILE, TILE, 3)]
  for shape in ((70, 90, 3), (20, 15, 3), (100, 33, 3)):
    probs = _predict(_random_image(shape), tile_fn)
    assert probs.shape == shape[:2] + (3,)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
  assert traces.shapes == [(4, TILE, TILE, 3)]


def test_image_smaller_than_a_tile_is_reflect_padded(conv_net, mesh):
  model, variables = conv_net
  image = _random_image((20, 15, 3), seed=3)
  probs = _predict(image, _tile_fn(model, variables, mesh))
  padded = np.pad(image, ((0, TILE - 20), (0, TILE - 15), (0, 0)), mode="reflect")
  np.testing.assert_allclose(probs, _apply(model, variables, padded)[:20, :15], atol=2e-6)


# ---------------------------------------------------------------------------- TTA

def test_flip_tta_leaves_a_flip_equivariant_model_unchanged(mesh):
  model = PointwiseNet()
  variables = _variables(model)
  image = _random_image((50, 41, 3), seed=4)
  plain = _predict(image, _tile_fn(model, variables, mesh, tta="none"))
  for tta in ("hflip", "hvflip"):
    np.testing.assert_allclose(_predict(image, _tile_fn(model, variables, mesh, tta=tta)), plain,
                               atol=1e-6)


def test_flip_tta_averages_flipped_views_of_other_models(conv_net, mesh):
  model, variables = conv_net
  image = _random_image((TILE, TILE, 3), seed=5)  # one tile: no blending involved
  f = lambda im: _apply(model, variables, im)
  plain = f(image)
  hflip = (plain + f(image[:, ::-1])[:, ::-1]) / 2
  hvflip = (plain + f(image[:, ::-1])[:, ::-1] + f(image[::-1])[::-1] + f(image[::-1, ::-1])[::-1, ::-1]) / 4
  got_h = _predict(image, _tile_fn(model, variables, mesh, tta="hflip"))
  got_hv = _predict(image, _tile_fn(model, variables, mesh, tta="hvflip"))
  assert np.abs(got_h - plain).max() > 1e-3  # TTA changes this model's output...
  np.testing.assert_allclose(got_h, hflip, atol=2e-6)  # ...to the average of the flipped views
  np.testing.assert_allclose(got_hv, hvflip, atol=2e-6)


def test_binary_bce_model_gives_two_class_probabilities(mesh):
  model = PointwiseNet(num_logits=1)
  variables = _variables(model)
  image = _random_image((45, 38, 3), seed=6)
  probs = _predict(image, _tile_fn(model, variables, mesh), num_classes=2)
  logits = np.asarray(model.apply(variables, image[None] / 127.5 - 1, train=False))[0, ..., 0]
  np.testing.assert_allclose(probs[..., 1], 1 / (1 + np.exp(-logits)), atol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-6)


# ---------------------------------------------------------------------------- files

def test_find_inputs_takes_a_file_a_directory_or_a_glob(tmp_path):
  for name in ("b.png", "a.JPG", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "c.tif").write_bytes(b"x")
  d = str(tmp_path)
  assert predict.find_inputs(d) == [f"{d}/a.JPG", f"{d}/b.png"]
  assert predict.find_inputs(f"{d}/**/*.tif") == [f"{d}/sub/c.tif"]
  assert predict.find_inputs(f"{d}/notes.txt") == [f"{d}/notes.txt"]  # named explicitly
  with pytest.raises(FileNotFoundError, match=r"nothing"):
    predict.find_inputs(f"{d}/*.bmp")
  with pytest.raises(FileNotFoundError, match=r"1 files, none with an image extension"):
    predict.find_inputs(f"{d}/*.txt")


def test_predict_config_values_are_validated():
  for key, value, why in (("overlap", 1.0, "in \\[0, 1\\)"), ("tile_size", 100, "divisible by 16 \\(2\\*\\*model.depth=16\\)"),
                          ("tta", "vflip", "one of none, hflip, hvflip"),
                          ("batch_size", 0, "positive integer")):
    config = config_lib.base_config()
    config.predict[key] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.predict.{key}=.*{why}"):
      config_lib.validate(config)


def test_inputs_with_the_same_stem_are_refused_before_anything_runs(tmp_path, data_dir):
  for folder, name in (("a", "scan.png"), ("b", "scan.tif"), ("b", "other.png")):
    (tmp_path / folder).mkdir(exist_ok=True)
    Image.fromarray(_random_image((8, 8, 3))).save(tmp_path / folder / name)
  first, second = str(tmp_path / "a" / "scan.png"), str(tmp_path / "b" / "scan.tif")
  with pytest.raises(predict.DataError) as refused:
    predict._check_unique_stems([first, str(tmp_path / "b" / "other.png"), second])
  assert f"{first} and {second} would both write scan_label.png" in str(refused.value)
  predict._check_unique_stems([first, str(tmp_path / "b" / "other.png")])  # distinct: accepted
  # Through run: refused before the workdir (which has no checkpoint) or the output is touched.
  config = tiny_config(data_dir)
  config.predict.input = str(tmp_path / "*" / "*")
  config.predict.output = str(tmp_path / "out")
  with pytest.raises(predict.DataError, match="would both write scan_label.png"):
    predict.run(config, str(tmp_path / "no_run"))
  assert not (tmp_path / "out").exists() and not (tmp_path / "no_run").exists()


def _bands(probabilities, rows_per_band):
  for first in range(0, len(probabilities), rows_per_band):
    yield first, probabilities[first:first + rows_per_band]


@pytest.mark.parametrize("num_classes, mode, dtype", [(256, "L", np.uint8), (300, "I;16", np.uint16)])
def test_label_png_is_16_bit_above_256_classes(tmp_path, num_classes, mode, dtype):
  """Class ids up to num_classes - 1 survive the label PNG: 8-bit up to 256 classes, 16-bit
  above (ids 256..299 would wrap in 8 bits)."""
  height, width = 10, 13
  rng = np.random.default_rng(num_classes)
  ids = rng.integers(0, num_classes, (height, width))
  ids[0, :3] = (0, 255, num_classes - 1)
  probabilities = np.full((height, width, num_classes), 0.1 / num_classes, np.float32)
  np.put_along_axis(probabilities, ids[..., None], 0.9, axis=-1)
  image = _random_image((height, width, 3), seed=1)
  counts = predict.write_outputs(image, _bands(probabilities, 4), out_dir=str(tmp_path),
                                 stem="x", num_classes=num_classes, class_names=None,
                                 ignore_label=255, save_probabilities=False)
  np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=num_classes))
  label = Image.open(tmp_path / "x_label.png")
  assert label.mode == mode and label.size == (width, height)
  stored = np.asarray(label)
  assert stored.dtype == dtype
  np.testing.assert_array_equal(stored, ids)
  assert sorted(os.listdir(tmp_path)) == ["x_label.png", "x_overlay.png"]


def test_channel_counts_are_matched_or_refused_naming_the_file():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
  rgb = predict.match_channels(grey, 3, "grey.png")
  assert rgb.shape == (3, 4, 3)
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], grey[..., 0])
  same = np.zeros((3, 4, 3), np.uint16)
  assert predict.match_channels(same, 3, "rgb.png") is same
  bands = np.zeros((3, 4, 5), np.uint8)
  with pytest.raises(predict.DataError,
                     match=r"^/data/bands\.tif: the image has 5 channels, the model takes 3$"):
    predict.match_channels(bands, 3, "/data/bands.tif")
  with pytest.raises(predict.DataError, match=r"scan\.png: the image has 3 channels, the model takes 1"):
    predict.match_channels(same, 1, "scan.png")


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, data_dir):
  """A checkpoint of a tiny U-Net after 2 steps, and the config file that describes it."""
  workdir = tmp_path_factory.mktemp("predict_run")
  config_file = workdir / "tiny.py"
  config_file.write_text(
      "from tests.conftest import tiny_config\n"
      "def get_config():\n"
      f"  c = tiny_config({data_dir!r})\n"
      "  c.num_train_steps = c.checkpoint_every_steps = c.eval_every_steps = 2\n"
      "  c.log_every_steps = 1\n"
      "  return c\n")
  config = tiny_config(data_dir)
  config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 2
  config.log_every_steps = 1
  train.train_and_evaluate(config, str(workdir / "run"))
  return config, str(config_file), str(workdir / "run")


def test_main_predict_writes_labels_overlays_and_probabilities(trained_workdir, tmp_path):
  _, config_file, workdir = trained_workdir
  inputs = tmp_path / "in"
  inputs.mkdir()
  odd = _random_image((389, 517, 3), seed=7)
  Image.fromarray(odd).save(inputs / "odd.png")
  grey16 = np.random.default_rng(8).integers(0, 65536, (24, 40), dtype=np.uint16)
  Image.fromarray(grey16).save(inputs / "grey16.png")
  good = (inputs / "odd.png").read_bytes()
  (inputs / "broken.png").write_bytes(good[:len(good) // 3])  # truncated
  tifffile.imwrite(inputs / "bands.tif", np.zeros((16, 16, 5), np.uint8),  # 5 bands: no RGB
                   photometric="minisblack", planarconfig="contig")
  out = tmp_path / "out"

  result = subprocess.run(
      [sys.executable, "main.py", f"--config={config_file}", f"--workdir={workdir}",
       "--mode=predict", f"--config.predict.input={inputs}/*", f"--config.predict.output={out}",
       "--config.predict.tile_size=64", "--config.predict.tta=hflip",
       "--config.predict.save_probabilities=True"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)
  # Bad files are skipped, the others predicted, and the exit status says something failed.
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  bands_message = f"{inputs / 'bands.tif'}: the image has 5 channels, the model takes 3"
  assert last == (f"error: 2 of 4 input images skipped: {bands_message} (and 1 more, listed "
                  "above)"), last
  assert f"warning: skipped {bands_message}\n" in result.stderr
  assert "Traceback" not in result.stderr
  assert "predicted 2 of 4 images with the step-2 checkpoint" in result.stdout
  skipped = result.stdout.split("skipped 2:\n")[1].splitlines()
  assert skipped[0] == f"  {bands_message}" and skipped[1].startswith(f"  {inputs / 'broken.png'}: ")
  assert sorted(os.listdir(out)) == sorted(f"{stem}_{kind}" for stem in ("odd", "grey16")
                                           for kind in ("label.png", "overlay.png", "probs.npy"))

  label = Image.open(out / "odd_label.png")
  assert label.size == (517, 389) and label.mode == "L"
  label = np.asarray(label)
  assert label.max() < 6
  probs = np.load(out / "odd_probs.npy", mmap_mode="r")
  assert probs.shape == (389, 517, 6) and probs.dtype == np.float16
  np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1, atol=5e-3)
  top_two = np.sort(probs.astype(np.float32), axis=-1)[..., -2:]
  clear = top_two[..., 1] - top_two[..., 0] > 2e-3  # float16 rounding may tie closer classes
  assert clear.mean() > 0.5
  np.testing.assert_array_equal(probs.argmax(-1)[clear], label[clear])

  overlay = np.asarray(Image.open(out / "odd_overlay.png"))
  assert overlay.shape[1] == 517 and overlay.shape[0] > 389  # legend below
  background = label == 0
  assert 0 < background.mean() < 1
  np.testing.assert_array_equal(overlay[:389][background], odd[background])
  assert (overlay[:389][~background] != odd[~background]).any(axis=-1).mean() > 0.9

  grey_label = Image.open(out / "grey16_label.png")
  assert grey_label.size == (40, 24)
  assert np.load(out / "grey16_probs.npy").shape == (24, 40, 6)


def _contaminated(plan, radius):
  """Pixels within `radius` of an edge, inside the image, of any tile that covers them."""
  mask = np.zeros((plan.height, plan.width), bool)
  t = plan.tile_size
  for y, x in plan.positions():
    if y > 0:
      mask[y:y + radius, x:x + t] = True
    if y + t < plan.height:
      mask[y + t - radius:y + t, x:x + t] = True
    if x > 0:
      mask[y:y + t, x:x + radius] = True
    if x + t < plan.width:
      mask[y:y + t, x + t - radius:x + t] = True
  return mask


# Receptive-field radius of tiny_config's U-Net (depth 2), summed as (kernel // 2) * input
# stride: two 3x3 convs at stride 1 (2), a 2x2 pool (1), two at stride 2 (4), a pool (2), two at
# stride 4 (8), then after each 1x1 + depth-to-space upsampling two at stride 2 (4) and at 1 (2).
UNET_RADIUS = 2 + 1 + 4 + 2 + 8 + 4 + 2   # 23


def test_tiled_prediction_of_a_trained_unet_equals_the_whole_image_away_from_tile_edges(
    trained_workdir):
  """The trained U-Net (batch-norm statistics, pooling, learned upsampling, skips) through
  make_tile_function and predict_image, against flax's apply on the whole image at once."""
  config, _, workdir = trained_workdir
  trainer = train.Trainer(config, workdir, with_data=False)
  try:
    state = trainer.latest_checkpoint_state()
  finally:
    trainer.checkpoints.close()
  assert int(state.step) == 2
  variables = train.model_variables(state)
  tile, overlap, height, width = 96, 0.25, 168, 240
  plan = tiling.plan_tiles(height, width, tile, overlap)
  # Tiles start on the 4-pixel grid of the U-Net's two poolings, as the whole image does, so
  # that away from tile edges a tile sees exactly what the whole image sees.
  assert plan.ys == (0, 72) and plan.xs == (0, 72, 144)
  image = _random_image((height, width, 3), seed=3)
  mesh = parallel.make_mesh()
  tile_fn = predict.make_tile_function(trainer.model, variables, tta="none", batch_size=2,
                                       tile_size=tile, channels=3, mesh=mesh)
  bands = list(predict.predict_image(image, tile_fn, num_classes=6, tile_size=tile,
                                     overlap=overlap, batch_size=2))
  tiled = np.concatenate([band for _, band in bands])
  assert tiled.shape == (height, width, 6)

  full = _apply(trainer.model, variables, image)
  contaminated = _contaminated(plan, UNET_RADIUS)
  clean = ~contaminated
  assert clean.mean() > 0.6
  np.testing.assert_allclose(tiled[clean], full[clean], atol=1e-5)
  # Not vacuous: near interior tile edges the tiles' zero padding does change the output.
  assert np.abs(tiled - full)[contaminated].max() > 1e-3
  assert (tiled.argmax(-1) == full.argmax(-1))[clean].all()


def test_eval_mode_prints_the_per_class_table_of_the_training_runs_evaluation(trained_workdir,
                                                                             capsys):
  """--mode=eval's train.evaluate on the step-2 checkpoint prints, class by class, the Dice and
  IoU the training run's own step-2 evaluation wrote to metrics.jsonl (NaN there is null)."""
  config, _, workdir = trained_workdir
  train.evaluate(config, workdir)
  printed = capsys.readouterr().out.splitlines()
  assert any(line.endswith("at step 2:") for line in printed), printed
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    written = [r for r in map(json.loads, f) if "eval/dice" in r]
  assert [r["step"] for r in written] == [2]
  written = {k: np.nan if v is None else v for k, v in written[0].items()}
  rows = {line.split()[0]: line.split()[1:] for line in printed if len(line.split()) == 3}
  names = ("background", "disc", "square", "triangle", "ring", "cross")
  for name in names:
    for printed_value, key in zip(rows[name], (f"eval/dice/{name}", f"eval/iou/{name}")):
      want = written[key]
      assert (printed_value == "nan") if np.isnan(want) else (
          float(printed_value) == pytest.approx(want, abs=5e-5)), (name, key, printed_value, want)
  assert [float(v) for v in rows["mean"]] == pytest.approx(
      [written["eval/dice"], written["eval/jaccard"]], abs=5e-5)
  pixel = next(line for line in printed if line.startswith("pixel accuracy"))
  assert float(pixel.split()[-1]) == pytest.approx(written["eval/pixel_accuracy"], abs=5e-5)


# ---------------------------------------------------------------------------- palette, legend

def test_palette_has_distinct_colours_for_150_classes_and_a_neutral_ignore():
  colors = visualize.palette(150, ignore_label=255).astype(np.int64)
  classes = colors[:150]
  distance = np.sqrt(((classes[:, None] - classes[None]) ** 2).sum(-1))
  np.fill_diagonal(distance, np.inf)
  assert distance.min() > 20  # of 441 in RGB; every pair clearly apart
  assert classes[0].tolist() == [0, 0, 0]  # dark background
  ignore = colors[255]
  assert ignore[0] == ignore[1] == ignore[2]  # neutral grey
  assert np.sqrt(((classes - ignore) ** 2).sum(-1)).min() > 20
  # A class keeps its colour whatever the number of classes.
  np.testing.assert_array_equal(visualize.palette(6)[:6], colors[:6])


def test_legend_shows_every_swatch_colour():
  names = [f"class{i}" for i in range(150)]
  entries = visualize.legend_entries(list(range(150)) + [255], names, 150, ignore_label=255)
  picture = visualize.legend(entries, 800, font_size=12)
  assert picture.dtype == np.uint8 and picture.shape[1] == 800
  pixels = picture.reshape(-1, 3)
  for text, color in entries:
    count = (pixels == np.array(color, np.uint8)).all(-1).sum()
    assert count >= 14 * 14, (text, color, count)  # the swatch interior (16 px, bordered)
  assert entries[-1][0] == "ignore" and entries[3][0] == "3 class3"


def test_eval_panels_carry_a_legend_of_the_classes_shown():
  images = np.zeros((2, 16, 16, 3), np.uint8)
  truths = np.zeros((2, 16, 16), np.int32)
  truths[0, :4] = 2
  truths[1, :2] = 255
  predictions = np.full((2, 16, 16), 4, np.int32)
  grid = visualize.panels(images, truths, predictions, 6, scale=2,
                          class_names=["bg", "a", "b", "c", "d", "e"])
  assert grid.shape[1] >= 3 * 18 * 2
  assert grid.shape[0] > 2 * 18 * 2
  legend_part = grid[2 * 18 * 2:].reshape(-1, 3)
  palette = visualize.palette(6)
  for c in (0, 2, 4, 255):
    assert (legend_part == palette[c]).all(-1).any(), c
  for c in (1, 3, 5):  # classes not shown get no swatch
    assert not (legend_part == palette[c]).all(-1).any(), c
