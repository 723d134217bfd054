import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax.models import init_key
from seg_jax.models import layers
from seg_jax import models
from seg_jax.models.unet import DoubleConv, UNet
from tests.conftest import tiny_config


def test_learned_upsample_equals_transposed_conv():
  """1x1 conv to 4C + depth-to-space is the same function as a 2x2/2 ConvTranspose."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  transposed = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
  variables = transposed.init(jax.random.key(1), x)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]  # [2, 2, C, O]
  # lax.conv_transpose flips the kernel spatially; output offset (a, b) of input pixel (i, j)
  # uses kernel[1 - a, 1 - b]. Depth-to-space takes channel (a*2 + b)*O + o to offset (a, b).
  one_by_one = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(1, 1, 3, 16)
  upsample = layers.LearnedUpsample2x(4)
  y = upsample.apply({"params": {"conv": {"kernel": one_by_one, "bias": jnp.tile(bias, 4)}}}, x)
  np.testing.assert_allclose(y, transposed.apply(variables, x), atol=1e-5)
  # And its gradients agree too (the reason for the rewrite is the backward pass).
  g1 = jax.grad(lambda k: jnp.sum(upsample.apply(
      {"params": {"conv": {"kernel": k, "bias": jnp.tile(bias, 4)}}}, x) ** 2))(one_by_one)
  g2 = jax.grad(lambda k: jnp.sum(transposed.apply(
      {"params": {"kernel": k, "bias": bias}}, x) ** 2))(kernel)
  np.testing.assert_allclose(g1, jnp.transpose(g2[::-1, ::-1], (2, 0, 1, 3)).reshape(1, 1, 3, 16),
                             rtol=1e-5, atol=1e-4)


def test_depth_to_space_against_numpy_loop():
  x = np.arange(2 * 3 * 4 * 8, dtype=np.float32).reshape(2, 3, 4, 8)
  y = np.asarray(layers.depth_to_space(jnp.asarray(x), 2))
  expected = np.zeros((2, 6, 8, 2), np.float32)
  for i in range(3):
    for j in range(4):
      for a in range(2):
        for b in range(2):
          expected[:, 2 * i + a, 2 * j + b] = x[:, i, j, (a * 2 + b) * 2:(a * 2 + b + 1) * 2]
  np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("factors", [(4, 4), (1, 3, 2)])
def test_upsample_bilinear_equals_jax_image_resize(factors):
  """DeepLabv3+'s resizes (half-pixel centres, edges clamped), rewritten for ONNX export, give
  jax.image.resize's bilinear result; volumes too."""
  shape = (2, *[5, 3, 4][:len(factors)], 3)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  out_shape = (2, *[n * f for n, f in zip(shape[1:-1], factors)], 3)
  np.testing.assert_allclose(layers.upsample_bilinear(jnp.asarray(x), factors),
                             jax.image.resize(x, out_shape, "bilinear"), rtol=0, atol=2e-6)


@pytest.mark.parametrize("norm,upsample", [("batch", "transpose"), ("group", "resize"),
                                           ("none", "transpose")])
def test_unet_shapes_and_skips(norm, upsample):
  model = UNet(num_logits=5, width=8, depth=3, norm=norm, upsample=upsample, dropout=0.1)
  x = jnp.ones((2, 32, 48, 3))
  variables = jax.jit(lambda x: model.init(init_key(0), x, train=False))(x)
  y = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert y.shape == (2, 32, 48, 5) and y.dtype == jnp.float32
  assert ("batch_stats" in variables) == (norm == "batch")
  # Channels of the first decoder block's input = skip (8) + upsampled (8): the skip is concatenated.
  first_conv = variables["params"]["up0"]["conv1"]["Conv_0"]["kernel"]
  assert first_conv.shape[2] == 16
  # Blocks are named by their place in the network, not by creation order (init_from matches
  # parameters by path).
  assert set(variables["params"]) == {"down0", "down1", "down2", "bottom", "upsample0",
                                      "upsample1", "upsample2", "up0", "up1", "up2", "head"}


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_unet_output_depends_on_skip_path(upsample):
  """Each decoder block's input starts with its level's encoder output (the skip), and zeroing
  just those channels, one level at a time, changes the logits. Fails if a skip is dropped,
  replaced, or concatenated but unused."""
  depth = 2
  model = UNet(num_logits=3, width=4, depth=depth, norm="none", upsample=upsample)
  x = jax.random.normal(jax.random.key(2), (1, 16, 16, 3))
  variables = model.init(init_key(0), x, train=False)

  def run(zero_levels):
    encoder_out, seen = {}, []

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if not isinstance(module, DoubleConv) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      place, level = module.name.rstrip("0123456789"), module.name[len("down"):]
      if place == "down":  # encoder levels down0..down{depth-1}
        encoder_out[int(level)] = out = next_fun(*args, **kwargs)
        return out
      if module.name == "bottom":
        return next_fun(*args, **kwargs)
      assert place == "up", module.name  # decoder blocks up{depth-1}..up0
      level = int(module.name[len("up"):])
      inputs, skip = args[0], encoder_out[level]
      channels = skip.shape[-1]
      assert inputs.shape[-1] == 2 * channels, (level, inputs.shape, skip.shape)
      np.testing.assert_array_equal(inputs[..., :channels], skip, err_msg=f"level {level}")
      seen.append(level)
      if level in zero_levels:
        inputs = inputs.at[..., :channels].set(0.0)
      return next_fun(inputs, *args[1:], **kwargs)

    with nn.intercept_methods(interceptor):
      logits = model.apply(variables, x, train=False)
    assert sorted(seen) == list(range(depth))
    return np.asarray(logits)

  base = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_array_equal(run(()), base)  # the interception itself changes nothing
  for levels in [(0,), (1,), (0, 1)]:
    diff = np.abs(run(levels) - base)
    assert diff.max() > 1e-3 * np.abs(base).max(), (levels, diff.max())


def test_unet_rejects_indivisible_size():
  model = UNet(num_logits=2, width=4, depth=3)
  with pytest.raises(ValueError, match="divisible by 8"):
    model.init(jax.random.key(0), jnp.ones((1, 20, 20, 3)), train=False)


def test_registry_binary_model_has_one_logit(tmp_path):
  config = tiny_config(str(tmp_path))
  config.dataset.num_classes = 2
  config.loss.name = "bce+dice"
  model = models.build_model(config)
  y = model.init_with_output(init_key(0), jnp.ones((1, 32, 32, 3)), train=False)[0]
  assert y.shape == (1, 32, 32, 1)


def test_max_pool_2x2_equals_flax_max_pool():
  x = jax.random.normal(jax.random.key(3), (2, 8, 6, 5))  # continuous values: no ties
  np.testing.assert_array_equal(layers.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  g1 = jax.grad(lambda x: jnp.sum(jnp.sin(layers.max_pool_2x2(x))))(x)
  g2 = jax.grad(lambda x: jnp.sum(jnp.sin(nn.max_pool(x, (2, 2), strides=(2, 2)))))(x)
  np.testing.assert_allclose(g1, g2, rtol=1e-6)
