"""3D volumes: the 3D U-Net, the losses on volumes, surface metrics in mm, sliding windows and
patch sampling, each against an independent numpy/scipy computation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from scipy import spatial

from seg_jax import losses
from seg_jax import models
from seg_jax import surface_metrics
from seg_jax import tiling
from seg_jax import visualize
from seg_jax.data import volumes
from seg_jax.models import layers
from seg_jax.models import unet3d
from seg_jax.tasks import volumetric


# ------------------------------------------------------------------------------- model, losses

def test_depth_to_space_3d_against_a_numpy_loop():
  """Channel (i*b1 + j)*b2 + k ... of the factors (1, 2, 3) goes to voxel offset (i, j, k)."""
  rng = np.random.default_rng(0)
  factors = (1, 2, 3)
  x = rng.normal(size=(2, 3, 4, 2, 6 * 5)).astype(np.float32)
  y = np.asarray(layers.depth_to_space(jnp.asarray(x), factors))
  want = np.zeros((2, 3, 8, 6, 5), np.float32)
  for i in range(1):
    for j in range(2):
      for k in range(3):
        block = (i * 2 + j) * 3 + k
        want[:, i::1, j::2, k::3] = x[..., block * 5:(block + 1) * 5]
  np.testing.assert_array_equal(y, want)


def test_unet3d_keeps_the_shape_with_anisotropic_strides():
  """(1, 2, 2) then (2, 2, 2): D must be a multiple of 2 and H, W of 4; logits come back at the
  input's size in float32 (bfloat16 compute too, checked by shape); a bad size is refused."""
  model = unet3d.UNet3D(num_logits=3, width=4, strides=((1, 2, 2), (2, 2, 2)), norm="instance",
                        residual=True)
  x = jnp.ones((1, 2, 8, 4, 1))
  # the rbg key compiles the initialisers several times faster than threefry (models.init_key)
  variables = jax.jit(lambda x: model.init(models.init_key(0), x, train=False))(x)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
  assert logits.shape == (1, 2, 8, 4, 3) and logits.dtype == jnp.float32
  half = unet3d.UNet3D(num_logits=3, width=4, strides=((1, 2, 2), (2, 2, 2)), norm="batch",
                       dtype=jnp.bfloat16)
  out = jax.eval_shape(lambda x: half.init_with_output(jax.random.key(0), x, train=False)[0], x)
  assert out.shape == (1, 2, 8, 4, 3) and out.dtype == jnp.float32
  assert unet3d.input_multiples(2, ((1, 2, 2), (2, 2, 2))) == (2, 4, 4)
  with pytest.raises(ValueError, match=r"multiples of \(2, 4, 4\)"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jnp.ones((1, 2, 6, 4, 1)))


def test_monai_preset_has_monais_levels():
  """configs/unet3d.py:monai is MONAI's UNet(channels=(16, 32, 64, 128), strides=(2, 2, 2),
  num_res_units=2) layout: its units work at 1/2, 1/4, 1/8 and 1/8 of the input (the bottom one
  unstrided) with 16, 32, 64 and 128 channels, and the logits come back at the input's size."""
  from configs import unet3d as unet3d_config
  from seg_jax import config as config_lib
  config = unet3d_config.get_config("monai")
  config.dataset.patch_size = (16, 16, 16)
  config_lib.validate(config)
  model = models.build_model(config)
  x = jnp.ones((1, 16, 16, 16, 1))
  variables = jax.jit(lambda x: model.init(models.init_key(0), x, train=False))(x)
  logits, state = model.apply(variables, x, train=False, capture_intermediates=True)
  assert logits.shape == (1, 16, 16, 16, config.dataset.num_classes)
  shapes = {name: state["intermediates"][name]["__call__"][0].shape
            for name in ("down0", "down1", "down2", "bottom")}
  assert shapes == {"down0": (1, 8, 8, 8, 16), "down1": (1, 4, 4, 4, 32),
                    "down2": (1, 2, 2, 2, 64), "bottom": (1, 2, 2, 2, 128)}
  assert unet3d.input_multiples(3, config.model.strides, config.model.first_strides) == (8, 8, 8)
  config.dataset.patch_size = (16, 16, 12)
  with pytest.raises(config_lib.ConfigError, match="multiples of \\(8, 8, 8\\)"):
    config_lib.validate(config)
  config.dataset.patch_size = (16, 16, 16)
  config.model.first_strides = (2, 0, 2)
  with pytest.raises(config_lib.ConfigError, match="model.first_strides"):
    config_lib.validate(config)


def test_instance_norm_normalises_each_channel_of_each_example():
  x = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 3, 4, 5, 6)).astype(np.float32)
  norm = layers.make_norm("instance", train=True)
  y = np.asarray(norm.apply(norm.init(jax.random.key(0), x), x))
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  std = np.sqrt(x.var(axis=(1, 2, 3), keepdims=True) + 1e-5)
  np.testing.assert_allclose(y, (x - mean) / std, atol=1e-4)


def test_ce_and_soft_dice_on_volumes_match_numpy_with_an_ignore_label():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 3, 4, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 3, 4, 5)).astype(np.int32)
  labels[0, 0] = 255
  counted = labels != 255
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  safe = np.where(counted, labels, 0)
  nll = -np.log(np.take_along_axis(probs, safe[..., None], -1)[..., 0])
  want_ce = nll[counted].mean()
  onehot = np.eye(3)[safe] * counted[..., None]
  p = probs * counted[..., None]
  inter, psum, tsum = (onehot * p).sum((0, 1, 2, 3)), p.sum((0, 1, 2, 3)), onehot.sum((0, 1, 2, 3))
  want_dice = 1 - np.mean((2 * inter + 1.0) / (psum + tsum + 1.0))
  ce = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), ignore_label=255)
  dice = losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels), smooth=1.0,
                               ignore_label=255)
  assert float(ce) == pytest.approx(want_ce, rel=1e-5)
  assert float(dice) == pytest.approx(want_dice, rel=1e-5)


# ------------------------------------------------------------------------------- surface metrics

def _brute_force_surface_distances(a, b, spacing):
  """Directed surface distances by nearest neighbours between voxel-centre coordinates (mm)."""
  def points(mask):
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))
    return np.argwhere(mask & ~eroded) * np.asarray(spacing)
  pa, pb = points(a), points(b)
  return spatial.cKDTree(pb).query(pa)[0], spatial.cKDTree(pa).query(pb)[0]


def _cube(shape, corner, size):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
  return mask


def test_hd95_and_nsd_of_shifted_cubes_in_mm():
  """A 10^3 cube moved 3 voxels along D at 2 mm slices: the faces across D are 6 mm apart, so
  HD95 is 6 mm (brute force agrees); NSD counts the surface within the tolerance."""
  spacing = (2.0, 1.0, 1.0)
  truth = _cube((20, 16, 16), (3, 3, 3), (10, 10, 10))
  pred = _cube((20, 16, 16), (6, 3, 3), (10, 10, 10))
  forward, backward = _brute_force_surface_distances(pred, truth, spacing)
  want = max(np.percentile(forward, 95), np.percentile(backward, 95))
  assert surface_metrics.hd95(pred, truth, spacing) == pytest.approx(want) == pytest.approx(6.0)
  for tolerance in (1.0, 4.0, 6.0):
    want_nsd = ((forward <= tolerance).sum() + (backward <= tolerance).sum()) / (
        len(forward) + len(backward))
    assert surface_metrics.normalized_surface_dice(pred, truth, spacing, tolerance) == (
        pytest.approx(want_nsd))
  assert surface_metrics.normalized_surface_dice(pred, truth, spacing, 6.0) == 1.0


def test_hd95_of_concentric_spheres_is_the_radius_gap():
  """Spheres of radius 6 and 9 voxels at 1.5 mm: HD95 equals the brute-force value and is the
  4.5 mm gap to within a voxel's discretisation."""
  spacing = (1.5, 1.5, 1.5)
  grid = np.indices((25, 25, 25)) - 12
  radius = np.sqrt((grid ** 2).sum(0))
  small, large = radius <= 6, radius <= 9
  forward, backward = _brute_force_surface_distances(small, large, spacing)
  got = surface_metrics.hd95(small, large, spacing)
  assert got == pytest.approx(max(np.percentile(forward, 95), np.percentile(backward, 95)))
  assert abs(got - 4.5) <= 1.5


def test_empty_masks_follow_monai():
  empty, full = np.zeros((4, 4, 4), bool), _cube((4, 4, 4), (1, 1, 1), (2, 2, 2))
  assert np.isnan(surface_metrics.hd95(empty, empty, (1, 1, 1)))
  assert surface_metrics.hd95(full, empty, (1, 1, 1)) == np.inf
  assert surface_metrics.hd95(empty, full, (1, 1, 1)) == np.inf
  assert np.isnan(surface_metrics.normalized_surface_dice(empty, empty, (1, 1, 1), 1.0))
  assert surface_metrics.normalized_surface_dice(full, empty, (1, 1, 1), 1.0) == 0.0
  scores = surface_metrics.case_scores(full.astype(np.uint8), empty.astype(np.uint8),
                                       num_classes=2, spacing=(1, 1, 1), tolerance_mm=1.0)
  assert np.isnan(scores["dice"][1])  # absent from the truth: NaN whatever is predicted


def test_dataset_dice_is_the_mean_over_cases_and_the_pooled_dice():
  truth = np.zeros((2, 6, 6, 6), np.uint8)
  truth[0, :2] = 1
  truth[1, :3] = 1
  pred = np.zeros_like(truth)
  pred[0, :1] = 1    # dice 2*36/(36+72) = 2/3
  pred[1, :3] = 1    # dice 1
  cases = [surface_metrics.case_scores(p, t, num_classes=2, spacing=(1, 1, 1), tolerance_mm=1.0)
           for p, t in zip(pred, truth)]
  scores = surface_metrics.dataset_scores(cases)
  assert scores["dice"][1] == pytest.approx((2 / 3 + 1) / 2)
  assert scores["dice_dataset"][1] == pytest.approx(2 * (36 + 108) / (36 + 72 + 108 + 108))
  assert scores["mean_dice_foreground"] == pytest.approx(scores["dice"][1])


# ------------------------------------------------------------------------------- sliding windows

def test_sliding_window_equals_whole_volume_prediction_of_a_voxelwise_model():
  """A model whose output at a voxel depends on that voxel alone (receptive field 1) predicts
  the same through overlapping, Gaussian-weighted, zero-padded windows as on the whole volume,
  on a volume that is no multiple of the window and smaller than it along one axis."""
  rng = np.random.default_rng(3)
  image = rng.normal(size=(11, 20, 5, 2)).astype(np.float32)
  weights = rng.normal(size=(2, 4)).astype(np.float32)

  def window_fn(windows):
    logits = windows @ weights
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  calls = []
  got = volumetric.segment_volume(image, lambda w: calls.append(w.shape) or window_fn(w),
                                  window=(4, 8, 8), overlap=0.5, batch=3, num_classes=4)
  np.testing.assert_array_equal(got, np.argmax(image @ weights, axis=-1))
  assert set(calls) == {(3, 4, 8, 8, 2)}  # fixed batches of windows, the last one padded


def test_slab_blender_averages_probabilities_and_holds_one_slab():
  """Blended probabilities equal the whole-volume ones where windows agree, and the blender's
  buffers are one window deep whatever the volume's depth."""
  rng = np.random.default_rng(4)
  probs = rng.random(size=(30, 9, 7, 3)).astype(np.float32)
  plan = tiling.plan_windows((30, 9, 7), (6, 4, 4), 0.25)
  blender = tiling.SlabBlender(plan, 3)
  assert blender._sums.shape == (6, 9, 7, 3)
  out = np.full_like(probs, np.nan)
  for corner in plan.positions():
    finished = blender.add(tiling.extract_window(probs, corner, (6, 4, 4)))
    if finished is not None:
      first, slab = finished
      out[first:first + len(slab)] = slab
  np.testing.assert_allclose(out, probs, rtol=1e-6)


def test_gaussian_window_is_nnunets_sigma_and_positive():
  w = tiling.gaussian_window((8, 16, 16))
  centre = np.arange(16) + 0.5 - 8
  profile = np.exp(-0.5 * (centre / 2.0) ** 2)
  np.testing.assert_allclose(w[4, 8] / w[4, 8].max(), profile / profile.max(), rtol=1e-5)
  assert w.min() > 0 and w.max() == 1


# ------------------------------------------------------------------------------- patch sampling

def _config(**overrides):
  d = ml_collections.ConfigDict(dict(volumes.DEFAULTS))
  d.num_classes, d.ignore_label, d.patch_size = 3, 255, (4, 6, 6)
  d.update(overrides)
  return ml_collections.ConfigDict({"seed": 7, "batch_size": 2, "dataset": d})


def _volume_set():
  mask = np.zeros((10, 12, 12), np.uint8)
  mask[8, 1, 10] = 2   # one voxel of class 2, in a corner
  mask[2:4, 5:7, 5:7] = 1
  image = np.random.default_rng(5).normal(size=(10, 12, 12, 1)).astype(np.float32)
  small = volumes.VolumeCase("small", image[:2, :4, :12], mask[:2, :4, :12], (1.0, 1.0, 1.0))
  return volumes.VolumeSet({"train": [volumes.VolumeCase("a", image, mask, (2.0, 1.0, 1.0)),
                                      small]}, channels=1)


def test_patches_are_a_function_of_seed_step_and_row():
  config, data = _config(), _volume_set()
  first = next(volumes.train_batches(config, data, start_step=5))
  again = next(volumes.train_batches(config, data, start_step=5))
  other = next(volumes.train_batches(config, data, start_step=6))
  for key in ("image", "mask"):
    np.testing.assert_array_equal(first[key], again[key])
  assert first["image"].shape == (2, 4, 6, 6, 1) and first["mask"].dtype == np.int32
  assert not np.array_equal(first["image"], other["image"])


def test_foreground_patches_contain_their_class_and_padding_is_ignored():
  """foreground_fraction=1 without augmentation: every patch of the big case holds foreground
  (both classes over many draws, the lone class-2 voxel included); the small case's patches are
  padded past its end with the ignore label and zeros."""
  config = _config(foreground_fraction=1.0, flip=False, rotate90=False, intensity_scale=0.0,
                   intensity_shift=0.0, gamma_probability=0.0)
  data = _volume_set()
  seen = set()
  for step in range(1, 40):
    for row in range(2):
      image, mask = volumes.train_example(data, config, step, row)
      counted = mask[mask != 255]
      if (mask == 255).any():  # the small case: 2 x 4 voxels of 4 x 6 are real
        assert (mask[2:] == 255).all() and (image[2:] == 0).all()
      else:
        assert (counted > 0).any()
        seen |= set(np.unique(counted).tolist())
  assert {1, 2} <= seen


def test_augmentation_moves_image_and_mask_together():
  config = _config(intensity_scale=0.0, intensity_shift=0.0, gamma_probability=0.0)
  image = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6, 1)
  mask = np.arange(4 * 6 * 6).reshape(4, 6, 6) % 251
  for seed in range(8):
    aug_image, aug_mask = volumes.augment(image, mask, np.random.default_rng(seed), config.dataset)
    np.testing.assert_array_equal(aug_image[..., 0].astype(np.int64) % 251, aug_mask)


def test_volume_panels_give_each_view_its_own_height():
  # (D, H, W) = (8, 12, 16) at 3 x 1 x 1 mm: axial 12 x 16, coronal and sagittal 24 (8 slices
  # drawn 3 rows each) x 16 and x 12; every cell has a 1-pixel white frame.
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (8, 12, 16, 1), dtype=np.uint8)
  truth = rng.integers(0, 3, (8, 12, 16))
  grid = visualize.volume_panels(image, truth, truth, 3, spacing=(3.0, 1.0, 1.0))
  assert grid.shape == (14 + 26 + 26, 3 * 18, 3)
  np.testing.assert_array_equal(grid[1:13, 1:17, 0], image[4, :, :, 0])  # axial, no gap below
  np.testing.assert_array_equal(grid[15:39, 1:17, 0], image[:, 6, :, 0].repeat(3, axis=0))
  np.testing.assert_array_equal(grid[41:65, 1:13, 0], image[:, :, 8, 0].repeat(3, axis=0))
  assert (grid[40:, 3 * 14:] == 255).all()  # the narrower sagittal row padded on the right
