"""ResNet backbones, DeepLabv3+, the ResNet-encoder U-Net, and model.init_from."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from seg_jax import config as config_lib
from seg_jax import init_from
from seg_jax import train
from seg_jax.models import init_key
from seg_jax.models import layers
from seg_jax import models
from seg_jax.models import resnet
from seg_jax.models.deeplab import DeepLabV3Plus
from seg_jax.models.unet import UNet
from tests.conftest import tiny_config


def _variable_shapes(model, shape):
  return jax.eval_shape(lambda: model.init(init_key(0), jnp.zeros(shape), train=False))


def _output_shapes(model, shape):
  variables = _variable_shapes(model, shape)
  return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                        jax.ShapeDtypeStruct(shape, jnp.float32))


# torchvision.models.resnetN(): parameters listed in its documentation, minus the 1000-class
# classifier (512*1000 + 1000 for the basic-block nets, 2048*1000 + 1000 for the bottleneck ones).
TORCHVISION_PARAMS = {"resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000,
                      "resnet50": 25_557_032 - 2_049_000, "resnet101": 44_549_160 - 2_049_000}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_standard_resnets_have_torchvisions_parameter_count(arch):
  variables = _variable_shapes(resnet.ResNet(arch, 64, 32, "imagenet"), (1, 64, 64, 3))
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == TORCHVISION_PARAMS[arch]


def _numpy_conv(x, kernel, bias, stride, pad):
  """Cross-correlation of x [H, W, C] with kernel [k, k, C, F], zero-padded by `pad` on every
  side (torch.nn.Conv2d(padding=pad)), sampled every `stride` pixels from the first."""
  k = kernel.shape[0]
  padded = np.pad(x.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[0] + 2 * pad - k) // stride + 1
  out_w = (x.shape[1] + 2 * pad - k) // stride + 1
  out = np.zeros((out_h, out_w, kernel.shape[-1]))
  for a in range(k):
    for b in range(k):
      window = padded[a:a + stride * out_h:stride, b:b + stride * out_w:stride]
      out += window @ kernel[a, b].astype(np.float64)
  return out + (0 if bias is None else bias)


def _numpy_max_pool_3x3_stride2(x):
  """torch.nn.MaxPool2d(3, stride=2, padding=1) of x [H, W, C]: the padding never wins (-inf)."""
  padded = np.pad(x.astype(np.float64), ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (x.shape[0] - 1) // 2 + 1, (x.shape[1] - 1) // 2 + 1
  windows = [padded[a:a + 2 * out_h:2, b:b + 2 * out_w:2] for a in range(3) for b in range(3)]
  return np.max(windows, axis=0)


def test_stem_max_pool_pads_as_torchvision():
  """Odd and even sides, values all negative: zero padding would put 0 in every border output,
  XLA's 'SAME' (0 before, 1 after on even sides) would shift the windows."""
  x = -1.0 - np.random.default_rng(0).random((2, 7, 8, 3)).astype(np.float32)
  got = np.asarray(layers.max_pool_3x3_stride2(jnp.asarray(x)))
  want = np.stack([_numpy_max_pool_3x3_stride2(image) for image in x])
  assert got.shape == want.shape == (2, 4, 4, 3)
  assert np.all(got < -1.0)
  np.testing.assert_array_equal(got, want)


def test_strided_resnet_convs_pad_symmetrically_as_torchvision():
  """The 7x7/2 stem conv (padding 3), the stem's 3x3/2 max pool (padding 1), a block's 3x3/2 conv
  (padding 1) and its 1x1/2 projection (padding 0) against numpy convolutions padded as torchvision's are. On an even input, XLA's
  'SAME' would pad 2 before and 3 after for the stem (1 and 2 in the 3x3's case) and so shift
  every output by one tap; the output shapes are the same either way."""
  model = resnet.ResNet("resnet18", 8, 32, "imagenet", norm="none")  # norm none: convs keep a bias
  x = np.random.default_rng(0).normal(size=(1, 30, 34, 3)).astype(np.float32)
  variables = model.init(init_key(0), jnp.asarray(x), train=False)
  features, state = model.apply(variables, jnp.asarray(x), train=False, capture_intermediates=True)
  params, captured = variables["params"], state["intermediates"]

  stem = params["stem_conv"]
  got = np.asarray(captured["stem_conv"]["__call__"][0][0])
  assert got.shape == (15, 17, 8)
  want = _numpy_conv(x[0], np.asarray(stem["kernel"]), np.asarray(stem["bias"]), 2, 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(features["c1"][0]), np.maximum(want, 0), rtol=1e-4,
                             atol=1e-4)

  # The stem's max pool (3x3/2, padding 1) feeds stage 1's first convolution (3x3/1, padding 1).
  pooled = _numpy_max_pool_3x3_stride2(np.asarray(features["c1"][0]))
  assert pooled.shape == (8, 9, 8)
  block = params["stage1_block1"]["Conv_0"]
  got = np.asarray(captured["stage1_block1"]["Conv_0"]["__call__"][0][0])
  want = _numpy_conv(pooled, np.asarray(block["kernel"]), np.asarray(block["bias"]), 1, 1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  block = params["stage2_block1"]
  c2 = np.asarray(features["c2"][0])            # the block's input: 8 x 9 (even and odd sides)
  assert c2.shape == (8, 9, 8)
  for name, pad in (("Conv_0", 1), ("proj", 0)):
    got = np.asarray(captured["stage2_block1"][name]["__call__"][0][0])
    want = _numpy_conv(c2, np.asarray(block[name]["kernel"]), np.asarray(block[name]["bias"]), 2,
                       pad)
    assert got.shape == want.shape == (4, 5, 16), name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("dilated_stages", [0, 1, 2])
@pytest.mark.parametrize("stem,stem_stride", [("imagenet", 4), ("small", 4), ("small_stride2", 2)])
def test_resnet_feature_shapes(arch, dilated_stages, stem, stem_stride):
  output_stride = stem_stride * 8 // 2 ** dilated_stages
  features = _output_shapes(resnet.ResNet(arch, 8, output_stride, stem), (2, 64, 96, 3))
  expansion = 4 if arch == "resnet50" else 1
  expected_strides = {"c1": stem_stride // 2, "c2": stem_stride, "c3": 2 * stem_stride,
                      "c4": min(4 * stem_stride, output_stride), "c5": output_stride}
  expected_channels = {"c1": 8, "c2": 8 * expansion, "c3": 16 * expansion,
                       "c4": 32 * expansion, "c5": 64 * expansion}
  assert resnet.feature_strides(output_stride, stem) == expected_strides
  assert resnet.feature_channels(arch, 8) == expected_channels
  for name, feature in features.items():
    s = expected_strides[name]
    assert feature.shape == (2, 64 // s, 96 // s, expected_channels[name]), name


def test_output_stride_changes_no_parameter_shape():
  """Atrous stages reuse the strided network's weights: the same parameter tree at every stride."""
  shapes = [jax.tree.map(lambda x: x.shape, _variable_shapes(
      resnet.ResNet("resnet18", 8, s, "imagenet"), (1, 64, 64, 3))) for s in (8, 16, 32)]
  assert shapes[0] == shapes[1] == shapes[2]


def test_dilated_conv_matches_numpy():
  """ConvNormAct(dilation=2), used by ASPP, against a direct numpy convolution."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 9, 10, 2)).astype(np.float32)
  conv = layers.ConvNormAct(3, 3, norm=layers.Norm("none"), dilation=2)
  variables = conv.init(jax.random.key(0), jnp.asarray(x), train=False)
  kernel = np.asarray(variables["params"]["Conv_0"]["kernel"])   # [3, 3, 2, 3]
  bias = np.asarray(variables["params"]["Conv_0"]["bias"])
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  expected = np.zeros((1, 9, 10, 3), np.float32)
  for i in range(9):
    for j in range(10):
      for a in range(3):
        for b in range(3):
          expected[0, i, j] += padded[0, i + 2 * a, j + 2 * b] @ kernel[a, b]
  expected = np.maximum(expected + bias, 0)
  np.testing.assert_allclose(conv.apply(variables, jnp.asarray(x), train=False), expected,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("image_pooling", [True, False])
@pytest.mark.parametrize("low_level", ["c1", "c2"])
def test_deeplab_output_shape_and_aspp_branches(output_stride, image_pooling, low_level):
  model = DeepLabV3Plus(5, "resnet18", 8, output_stride, "small", aspp_features=16,
                        aspp_rates=(1, 2, 3), image_pooling=image_pooling, low_level_features=8,
                        low_level=low_level, decoder_features=16, norm="group", norm_groups=4)
  variables = _variable_shapes(model, (1, 64, 96, 3))
  aspp = variables["params"]["aspp"]
  branches = 1 + 3 + int(image_pooling)
  assert {"atrous1", "atrous2", "atrous3"} <= set(aspp) and ("image_pool" in aspp) == image_pooling
  # The projection takes every branch's 16 channels.
  assert aspp["project"]["Conv_0"]["kernel"].shape == (1, 1, 16 * branches, 16)
  # The decoder fuses the ASPP output (16) with 8 low-level channels.
  assert variables["params"]["decoder1"]["Conv_0"]["kernel"].shape == (3, 3, 24, 16)
  out = _output_shapes(model, (2, 64, 96, 3))
  assert out.shape == (2, 64, 96, 5) and out.dtype == jnp.float32
  # The decoder runs at the low-level map's stride (2 for c1, 4 for c2).
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True), variables,
      jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32))
  stride = resnet.feature_strides(output_stride)[low_level]
  assert state["intermediates"]["decoder2"]["__call__"][0].shape == (2, 64 // stride, 96 // stride, 16)


_TINY_HEAD = dict(aspp_features=8, aspp_rates=(1, 2), low_level_features=8, decoder_features=8)


# Receptive-field radius of DeepLabV3Plus("resnet10", 8, output_stride=8, "small", **_TINY_HEAD)
# in input pixels, summed layer by layer as (kernel // 2) * dilation * input stride (a 2x2 pool
# adds its stride once, a 2x bilinear upsampling one source pixel): stem 3x3 (1), pool (1),
# 3x3 at stride 2 (2), pool (2); stage 1: two 3x3 at stride 4 (8); stage 2: 3x3/2 at stride 4
# (4) and 3x3 at stride 8 (8); stage 3: two 3x3 at stride 8 (16); stage 4: two 3x3 dilated 2 at
# stride 8 (32); ASPP rate 2 at stride 8 (16); upsampling stride 8 -> 4 (8); decoder: two 3x3 at
# stride 4 (8); upsampling stride 4 -> 1 (4).
_TINY_RECEPTIVE_RADIUS = 1 + 1 + 2 + 2 + 8 + 4 + 8 + 16 + 32 + 16 + 8 + 8 + 4   # 110


@pytest.mark.parametrize("image_pooling", [True, False])
def test_deeplab_runs_and_its_logits_depend_on_the_whole_image(image_pooling):
  """A real forward pass (batch norm, train and eval) on an image more than twice the backbone's
  receptive field: a patch in the far corner moves every logit with image pooling, and without
  it leaves every logit farther than the receptive field from the patch exactly as it was."""
  size, patch = 256, 32
  assert size - patch > _TINY_RECEPTIVE_RADIUS   # the top-left corner cannot see the patch
  model = DeepLabV3Plus(3, "resnet10", 8, 8, "small", image_pooling=image_pooling, **_TINY_HEAD)
  x = jax.random.normal(jax.random.key(1), (1, size, size, 3))
  variables = jax.jit(lambda x: model.init(init_key(0), x, train=False))(x)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  y = np.asarray(apply(variables, x))
  assert y.shape == (1, size, size, 3) and np.isfinite(y).all()
  # A patch, not one pixel: a strided 1x1 projection sees only every other pixel.
  y2 = np.asarray(apply(variables, x.at[:, -patch:, -patch:].add(10.0)))
  changed = np.abs(y2 - y).max(axis=-1)[0] > 0
  if image_pooling:
    assert changed.all()
  else:
    near = size - patch - _TINY_RECEPTIVE_RADIUS
    rows, cols = np.nonzero(changed)
    assert rows.size and rows.min() >= near and cols.min() >= near, (rows.min(), cols.min())
    np.testing.assert_array_equal(y2[0, :near], y[0, :near])
    np.testing.assert_array_equal(y2[0, :, :near], y[0, :, :near])
  _, updates = model.apply(variables, x[:, :32, :32], train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(2)})
  assert "backbone" in updates["batch_stats"]


def test_unet_with_resnet_encoder():
  model = UNet(4, width=16, backbone="resnet18", stem="imagenet")
  variables = _variable_shapes(model, (1, 64, 64, 3))
  assert "encoder" in variables["params"]
  assert _output_shapes(model, (2, 64, 96, 3)).shape == (2, 64, 96, 4)
  with pytest.raises(ValueError, match="divisible by 32"):
    _output_shapes(model, (1, 48, 48, 3))
  # With the stride-2 stem the encoder bottoms out at stride 16, and every skip is used.
  model = UNet(4, width=16, backbone="resnet18", stem="small_stride2")
  assert _output_shapes(model, (2, 48, 80, 3)).shape == (2, 48, 80, 4)


def _deeplab_config(data_dir):
  c = config_lib.with_model(tiny_config(data_dir), "deeplabv3plus")
  c.model.backbone = "resnet10"
  c.model.stem = "small"
  c.model.output_stride = 8
  c.model.aspp_rates = (1, 2)
  c.model.aspp_features = 8
  c.model.low_level_features = 8
  c.model.decoder_features = 8
  return c


@pytest.mark.parametrize("key,value,message", [
    ("model.backbone", "", "deeplabv3plus needs a ResNet"),
    ("model.backbone", "resnet9", "deeplabv3plus needs a ResNet: one of resnet10"),
    ("model.output_stride", 4, "must be one of 8, 16, 32 with model.stem='small'"),
    ("model.aspp_rates", (2, 0), "integers >= 1"),
    ("model.stem", "tiny", "must be one of imagenet, small"),
    ("dataset.image_size", 36, "divisible by 8 .the input multiple of deeplabv3plus"),
    ("predict.tile_size", 100, "divisible by 8"),
])
def test_bad_deeplab_config_fails_at_start(data_dir, key, value, message):
  c = _deeplab_config(data_dir)
  c.model.stem = "small"
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_output_stride_depends_on_the_stem(data_dir):
  c = _deeplab_config(data_dir)
  c.model.stem = "small_stride2"
  c.model.output_stride = 4
  config_lib.validate(c)
  assert models.input_multiple(c) == 4
  c.model.output_stride = 32
  with pytest.raises(config_lib.ConfigError, match="must be one of 4, 8, 16 with"):
    config_lib.validate(c)


def test_shipped_deeplab_configs_validate_and_build():
  from configs import deeplabv3plus
  for preset in ("", "large"):
    c = deeplabv3plus.get_config(preset)
    config_lib.validate(c)
    assert isinstance(models.build_model(c), DeepLabV3Plus)
  assert models.input_multiple(deeplabv3plus.get_config()) == 8
  assert models.input_multiple(deeplabv3plus.get_config("large")) == 16


# ---------------------------------------------------------------------------- init_from

def _tiny_variables(seed, num_logits=3):
  model = DeepLabV3Plus(num_logits, "resnet10", 8, 8, "small", **_TINY_HEAD)
  return jax.jit(lambda: model.init(init_key(seed), jnp.zeros((1, 32, 32, 3)), train=False))()


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def test_init_from_npz_matches_by_path_and_shape(tmp_path):
  source = {"params": _flat(_tiny_variables(1)["params"], "params/"),
            "batch_stats": _flat(_tiny_variables(1)["batch_stats"], "batch_stats/")}
  arrays = {**source["params"], **source["batch_stats"]}
  # A classifier for another number of classes, a missing array, an extra one, and a name
  # without the 'params/' prefix.
  arrays["params/head/kernel"] = np.ones((1, 1, 8, 7), np.float32)
  del arrays["params/decoder2/Conv_0/kernel"]
  arrays["params/old_head/kernel"] = np.ones((3,), np.float32)
  arrays["aspp/project/Conv_0/kernel"] = arrays.pop("params/aspp/project/Conv_0/kernel")
  path = str(tmp_path / "weights.npz")
  np.savez(path, **arrays)

  target = _tiny_variables(2)
  new, report = init_from.initialize({"params": target["params"],
                                      "batch_stats": target["batch_stats"]}, path)
  new_flat = {**_flat(new["params"], "params/"), **_flat(new["batch_stats"], "batch_stats/")}
  old_flat = {**_flat(target["params"], "params/"), **_flat(target["batch_stats"], "batch_stats/")}
  expected_loaded = {n for n in old_flat
                     if n not in ("params/head/kernel", "params/decoder2/Conv_0/kernel")}
  assert set(report.loaded) == expected_loaded
  assert report.shape_mismatch == [("params/head/kernel", (1, 1, 8, 7), (1, 1, 8, 3))]
  assert report.missing == ["params/decoder2/Conv_0/kernel"]
  assert report.unused == ["params/old_head/kernel"]
  reference = {**source["params"], **source["batch_stats"]}
  for name in expected_loaded:
    np.testing.assert_array_equal(new_flat[name], reference[name], err_msg=name)
  for name in ("params/head/kernel", "params/decoder2/Conv_0/kernel"):
    np.testing.assert_array_equal(new_flat[name], old_flat[name], err_msg=name)
  assert "1 with another shape, 1 not in the source" in report.summary()


def test_init_from_errors(tmp_path):
  variables = _tiny_variables(0)
  with pytest.raises(init_from.InitFromError, match="no such file"):
    init_from.initialize(variables, str(tmp_path / "nothing.npz"))
  np.savez(tmp_path / "other.npz", **{"params/mlp/kernel": np.zeros(3, np.float32)})
  with pytest.raises(init_from.InitFromError, match="none of its 1 arrays matches"):
    init_from.initialize(variables, str(tmp_path / "other.npz"))
  (tmp_path / "garbage.npz").write_bytes(b"not a zip")
  with pytest.raises(init_from.InitFromError, match="not a readable .npz"):
    init_from.initialize(variables, str(tmp_path / "garbage.npz"))
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(init_from.InitFromError, match="no Orbax checkpoint"):
    init_from.initialize(variables, str(tmp_path / "empty_dir"))


@pytest.fixture(scope="module")
def deeplab_run(data_dir, tmp_path_factory):
  """A 4-step DeepLab run with checkpoints at steps 2 and 4, and its config."""
  config = _deeplab_config(data_dir)
  config.num_train_steps = 4
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  config.log_every_steps = 2
  config.num_eval_visuals = 0
  first = str(tmp_path_factory.mktemp("deeplab_first"))
  scalars = train.train_and_evaluate(config, first)
  assert np.isfinite(scalars["eval/dice"])
  assert sorted(os.listdir(os.path.join(first, "checkpoints"))) == ["2", "4"]
  return config, first


def _saved(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))


def _initial_state(config, workdir, init_from_path):
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.init_from = init_from_path
  os.makedirs(workdir, exist_ok=True)
  trainer = train.Trainer(config, workdir)
  try:
    return trainer.initial_state()
  finally:
    trainer.checkpoints.close()


def _assert_variables_equal(state, saved):
  for collection in ("params", "batch_stats"):
    got, want = _flat(jax.device_get(getattr(state, collection))), _flat(saved[collection])
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_train_then_init_from_workdir(deeplab_run, tmp_path):
  """A DeepLab run, then a second run initialised from its workdir: step 0 of the second holds
  the first one's final parameters and batch statistics, as Orbax reads them back."""
  config, first = deeplab_run
  saved = _saved(first, 4)
  second = str(tmp_path / "second")
  state = _initial_state(config, second, first)
  assert int(state.step) == 0
  _assert_variables_equal(state, saved)
  with open(os.path.join(second, "init_from.txt")) as f:
    assert f.readline().startswith(f"init_from {first}: loaded {len(_flat(saved['params'])) + len(_flat(saved['batch_stats']))} arrays; 0 with another shape")


def _zeros_like(saved):
  return {c: jax.tree.map(jnp.zeros_like, saved[c]) for c in ("params", "batch_stats")}


def test_init_from_an_orbax_checkpoint_directory(deeplab_run):
  """The directory holding step directories gives the newest step; a step directory (or its
  item directory) gives that step, not the newest."""
  _, first = deeplab_run
  saved = {step: _saved(first, step) for step in (2, 4)}
  # Not vacuous: steps 2 and 4 differ.
  assert any((_flat(saved[2]["params"])[k] != v).any() for k, v in _flat(saved[4]["params"]).items())
  for where, step in (("checkpoints", 4), ("checkpoints/2", 2), ("checkpoints/2/default", 2)):
    variables, report = init_from.initialize(_zeros_like(saved[4]), os.path.join(first, where))
    assert not (report.shape_mismatch or report.missing or report.unused), where
    for collection in ("params", "batch_stats"):
      got, want = _flat(jax.device_get(variables[collection])), _flat(saved[step][collection])
      assert got.keys() == want.keys(), where
      for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{where}: {name}")


def test_an_existing_checkpoint_wins_over_init_from(deeplab_run, tmp_path):
  """A workdir that has a checkpoint resumes from it, whatever model.init_from says (a source
  that does load, with other values)."""
  config, first = deeplab_run
  saved = _saved(first, 4)
  other = {c: jax.tree.map(lambda x: np.asarray(x) + 1, saved[c]) for c in ("params", "batch_stats")}
  source = str(tmp_path / "other.npz")
  init_from.save_npz(source, other)
  loaded, report = init_from.initialize(_zeros_like(saved), source)
  assert len(report.loaded) == len(_flat(saved["params"])) + len(_flat(saved["batch_stats"]))

  resumed = _initial_state(config, first, source)
  assert int(resumed.step) == 4
  _assert_variables_equal(resumed, saved)
  assert not os.path.exists(os.path.join(first, "init_from.txt"))
