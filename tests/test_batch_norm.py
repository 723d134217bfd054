"""seg_jax/models/batch_norm.py against flax's BatchNorm (+ ReLU) and a float64 numpy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax.models import batch_norm
from seg_jax.models import layers

SHAPE = (3, 5, 6, 4)  # N, H, W, C
MOMENTUM, EPSILON = 0.9, 1e-5


def _inputs(seed=0, constant_channel=True):
  rng = np.random.default_rng(seed)
  # Channel means far from 0 exercise the centring; channel 3 is constant (zero variance)
  # unless `constant_channel` is False.
  spread = np.float32([1.0, 0.5, 3.0, 0.0 if constant_channel else 2.0])
  x = rng.standard_normal(SHAPE).astype(np.float32) * spread
  x += np.float32([0.3, -2.0, 5.0, 1.5])
  params = {"scale": rng.uniform(0.5, 1.5, SHAPE[-1]).astype(np.float32),
            "bias": rng.standard_normal(SHAPE[-1]).astype(np.float32)}
  stats = {"mean": rng.standard_normal(SHAPE[-1]).astype(np.float32),
           "var": rng.uniform(0.5, 2.0, SHAPE[-1]).astype(np.float32)}
  weights = rng.standard_normal(SHAPE).astype(np.float32)
  return x, params, stats, weights


def _flax_bn(relu, train, dtype=None):
  """The reference: flax's BatchNorm, then nn.relu."""
  class FlaxBatchNormRelu(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON,
                       dtype=dtype, name="bn")(x)
      return nn.relu(y) if relu else y
  return FlaxBatchNormRelu()


def _ours(relu, train, dtype=None):
  class Wrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return batch_norm.BatchNorm(use_running_average=not train, momentum=MOMENTUM,
                                  epsilon=EPSILON, dtype=dtype, relu=relu, name="bn")(x)
  return Wrapped()


def _loss_and_grads(module, x, params, stats, weights):
  """A loss of the output and of the updated running statistics, so that the gradient flows
  through y and through the batch mean and variance; its value, aux and gradients."""
  def loss(params, x):
    y, updated = module.apply({"params": {"bn": params}, "batch_stats": {"bn": stats}}, x,
                              mutable=["batch_stats"])
    new = updated["batch_stats"]["bn"]
    value = jnp.sum(y.astype(jnp.float32) * weights) + jnp.sum(new["mean"] * jnp.arange(4.0))
    value += jnp.sum(new["var"] * jnp.float32([1.0, -2.0, 0.5, 3.0]))
    return value, (y, new)
  (value, (y, new)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
  return value, y, new, grads


@pytest.mark.parametrize("relu", [False, True])
def test_training_forward_matches_float64_numpy(relu):
  x, params, stats, weights = _inputs()
  _, y, new, _ = _loss_and_grads(_ours(relu, train=True), x, params, stats, weights)
  x64 = x.astype(np.float64)
  mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  expected = (x64 - mean) / np.sqrt(var + EPSILON) * params["scale"] + params["bias"]
  if relu:
    expected = np.maximum(expected, 0.0)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new["mean"], MOMENTUM * stats["mean"] + (1 - MOMENTUM) * mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], MOMENTUM * stats["var"] + (1 - MOMENTUM) * var,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_training_gradients_match_flax(relu):
  x, params, stats, weights = _inputs()
  ref_value, ref_y, ref_new, ref_grads = _loss_and_grads(_flax_bn(relu, True), x, params, stats,
                                                         weights)
  value, y, new, grads = _loss_and_grads(_ours(relu, True), x, params, stats, weights)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(new[key], ref_new[key], rtol=1e-6, atol=1e-6)
  (ref_dparams, ref_dx), (dparams, dx) = ref_grads, grads
  for key in ("scale", "bias"):
    np.testing.assert_allclose(dparams[key], ref_dparams[key], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(dx)).max() > 0.1  # the comparison is not between zeros


@pytest.mark.parametrize("relu", [False, True])
def test_eval_mode_matches_flax(relu):
  x, params, stats, weights = _inputs(1)
  ref_value, ref_y, ref_new, ref_grads = _loss_and_grads(_flax_bn(relu, False), x, params, stats,
                                                         weights)
  value, y, new, grads = _loss_and_grads(_ours(relu, False), x, params, stats, weights)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  for key in ("mean", "var"):  # eval mode leaves the running statistics as they were
    np.testing.assert_array_equal(new[key], stats[key])
  np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-5, atol=1e-5)


def test_second_derivative_matches_flax():
  """The hand-written backward is differentiable: a gradient of a gradient agrees with flax's."""
  x, params, stats, weights = _inputs(3, constant_channel=False)

  def grad_norm(module):
    def loss(x):
      y, _ = module.apply({"params": {"bn": params}, "batch_stats": {"bn": stats}}, x,
                          mutable=["batch_stats"])
      return jnp.sum(y * weights) + jnp.sum(y ** 2)
    return jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2)))(x)

  ours, ref = grad_norm(_ours(True, True)), grad_norm(_flax_bn(True, True))
  np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  assert np.abs(ref).max() > 0.1


def test_bfloat16_computes_in_float32_and_returns_bfloat16():
  # No constant channel: its 1/sqrt(epsilon) gain would magnify bf16's rounding differences.
  x, params, stats, weights = _inputs(2, constant_channel=False)
  x = x.astype(jnp.bfloat16)
  _, ref_y, _, ref_grads = _loss_and_grads(_flax_bn(True, True, jnp.bfloat16), x, params, stats,
                                           weights)
  _, y, _, grads = _loss_and_grads(_ours(True, True, jnp.bfloat16), x, params, stats, weights)
  assert y.dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  assert grads[0]["scale"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref_y, np.float32),
                             rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(grads[1], np.float32), np.asarray(ref_grads[1], np.float32),
                             rtol=5e-2, atol=5e-2)


def test_variables_are_flaxs():
  """Same names, shapes, dtypes and initial values, so checkpoints load either way."""
  x = jnp.ones(SHAPE)
  ours = batch_norm.BatchNorm(relu=True).init(jax.random.PRNGKey(0), x)
  theirs = nn.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_conv_norm_act_keeps_its_variable_names():
  variables = layers.ConvNormAct(8).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 3)),
                                         train=False)
  assert set(variables["params"]) == {"Conv_0", "BatchNorm_0"}
  assert set(variables["params"]["BatchNorm_0"]) == {"scale", "bias"}
  assert set(variables["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}
  with pytest.raises(ValueError, match="only batch norm"):
    layers.make_norm("group", train=True, relu=True)


def test_frozen_batch_norm_in_training_is_the_eval_function_without_parameter_gradients():
  """detectron2's FrozenBN (layers.FROZEN_BATCH): in training it normalises with the running
  statistics (flax's eval mode), keeps them, and gives scale and bias no gradient."""
  x, params, stats, weights = _inputs(2)
  _, ref_y, _, ref_grads = _loss_and_grads(_flax_bn(True, False), x, params, stats, weights)

  class Frozen(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.Norm(kind=layers.FROZEN_BATCH)(x, train=True, relu=True)

  def loss(params, x):
    y, updated = Frozen().apply({"params": {"BatchNorm_0": params},
                                 "batch_stats": {"BatchNorm_0": stats}}, x, mutable=["batch_stats"])
    return jnp.sum(y * weights), (y, updated["batch_stats"]["BatchNorm_0"])
  (_, (y, new)), (dparams, dx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, ref_grads[1], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(dx)).max() > 0.1
  for key in ("mean", "var"):
    np.testing.assert_array_equal(new[key], stats[key])
  for key in ("scale", "bias"):
    np.testing.assert_array_equal(dparams[key], np.zeros_like(params[key]))
