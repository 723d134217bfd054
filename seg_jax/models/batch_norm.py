"""Batch norm over the channel (last) axis, optionally fused with the ReLU after it.

`BatchNorm` computes what `flax.linen.BatchNorm(...)` (followed by `nn.relu` when `relu=True`)
computes, with the same variables (`params/scale`, `params/bias`, `batch_stats/mean`,
`batch_stats/var`), so checkpoints are interchangeable, but in training mode its gradient is
written out by hand (`batch_norm_train`). Differentiated by JAX, flax's version makes XLA write
`x - mean` out as an extra full-size tensor and spend more passes over the activation on the
chain rule through the statistics. The written-out gradient keeps only x, recomputes the ReLU's
mask from it, and gets the input's gradient from two per-channel sums and one elementwise pass.
On a 2-core Xeon (XLA:CPU, float32) a [8, 128, 128, 32] batch norm + ReLU, forward and backward,
took 24.5 ms instead of 33 ms, and the U-Net train step 6 % less time (benchmarks in the README).

The statistics are flax's: the biased batch variance from E[x^2] - E[x]^2 (flax's default
`use_fast_variance`), in float32 whatever the input's dtype. Under `jax.jit` with the batch
sharded over a mesh the reductions are over the global batch, as with flax's.

The backward pass is itself differentiable, so reverse-mode derivatives of any order (a grad of
a grad, `jax.hessian`) work; forward mode (`jax.jvp`) of the training-mode function does not,
as with any `jax.custom_vjp`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _channel_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean, variance) per channel, in float32."""
  axes = tuple(range(x.ndim - 1))
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axes)
  # The clip guards against rounding below 0; the gradient treats it as the identity.
  return mean, jnp.maximum(jnp.mean(x * x, axes) - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     relu: bool, out_dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, batch mean, batch variance): y = [relu](scale * (x - mean) / sqrt(var + epsilon) + bias),
  normalised over every axis but the last, with the statistics of this batch.

  Differentiable in `x`, `scale` and `bias`, through y and through the returned statistics.
  """
  return _train_forward(x, scale, bias, epsilon, relu, out_dtype)[0]


def _affine(mean, var, scale, bias, epsilon):
  """Per-channel (a, b, 1/std) with scale * (x - mean) / std + bias = a * x + b."""
  inv_std = lax.rsqrt(var + epsilon)
  a = scale.astype(jnp.float32) * inv_std
  return a, bias.astype(jnp.float32) - mean * a, inv_std


def _train_forward(x, scale, bias, epsilon, relu, out_dtype):
  mean, var = _channel_stats(x)
  a, b, _ = _affine(mean, var, scale, bias, epsilon)
  z = x.astype(jnp.float32) * a + b
  y = (jnp.maximum(z, 0.0) if relu else z).astype(out_dtype)
  # Only x is kept at full size: the backward pass recomputes the ReLU's mask from it, as it
  # reads x anyway.
  return (y, mean, var), (x, scale, bias, mean, var)


def _train_backward(epsilon, relu, out_dtype, residuals, cotangents):
  del out_dtype
  x, scale, bias, mean, var = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xf = x.astype(jnp.float32)
  a, b, inv_std = _affine(mean, var, scale, bias, epsilon)
  g = dy.astype(jnp.float32)
  if relu:
    g = jnp.where(xf * a + b > 0, g, 0.0)
  sum_g = jnp.sum(g, axes)
  sum_g_centered = jnp.sum(g * (xf - mean), axes)
  # d/dx of the mean is 1/n, of the variance 2 (x - mean) / n. The variance reaches y through
  # inv_std, whose derivative is -inv_std^3 / 2.
  dvar_total = dvar - 0.5 * scale * sum_g_centered * inv_std ** 3
  # dx = a g + c1 (x - mean) + c0, written with x rather than x - mean so that XLA does not
  # write x - mean out for this and the sum above to share (24.5 against 33 ms).
  c1 = (2.0 / n) * dvar_total
  dx = a * g + c1 * xf + ((dmean - a * sum_g) / n - c1 * mean)
  dscale = (sum_g_centered * inv_std).astype(scale.dtype)
  return dx.astype(x.dtype), dscale, sum_g.astype(scale.dtype)


batch_norm_train.defvjp(_train_forward, _train_backward)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis, with ReLU fused in when `relu` is set.

  Attributes as flax's: `use_running_average` (eval mode: normalise with the running
  statistics), `momentum` of the running averages, `epsilon`, and `dtype` of the output
  (default: that of x and the float32 parameters). `frozen` is detectron2's FrozenBN: the
  running statistics in training too, and no gradient for scale and bias, so that a pretrained
  backbone's normalisation stays as loaded when batches are too small for batch statistics.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  relu: bool = False
  frozen: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    out_dtype = jnp.dtype(self.dtype) if self.dtype is not None else jnp.result_type(x, scale)
    if self.frozen:
      scale, bias = lax.stop_gradient(scale), lax.stop_gradient(bias)
    if self.use_running_average or self.frozen:
      a, b, _ = _affine(ra_mean.value, ra_var.value, scale, bias, self.epsilon)
      z = x.astype(jnp.float32) * a + b
      return (jnp.maximum(z, 0.0) if self.relu else z).astype(out_dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.relu, out_dtype)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
