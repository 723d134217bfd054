"""Static row budgets: run a head on only as many rows as hold real data, without dynamic shapes.

A head that runs on a fixed budget of rows per image (the mask head on the foreground RoIs,
or on the detections) costs what it is given, real rows or padding. When the real rows come
first, the head can run on the first k rows instead, for the smallest k of a short ladder
of static budgets (`row_budgets`) that holds every image's real rows: each k is its own
static shape, compiled once, and `lax.switch` picks one at run time. The result equals the
full budget's, because padding rows contribute nothing.

Differentiating through `lax.switch` would make every branch return the residuals of every
other branch (zeros of the largest budget's activations), which costs more than it saves.
`scalar_loss` therefore computes the value and the gradient together inside the chosen
branch and keeps only the gradient, whose shape is the same for every budget: the loss is
a scalar, so the backward pass only scales it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def row_budgets(rows: int, smallest: int = 8) -> tuple[int, ...]:
  """The static row counts, ascending, ending at `rows`: each power of two p and 3p/2
  from `smallest` up (a head gets at most 1.5x the rows it needs), e.g.
  128 -> (8, 12, 16, 24, 32, 48, 64, 96, 128)."""
  budgets = set()
  p = smallest
  while p < rows:
    budgets.add(p)
    if 3 * p // 2 < rows:
      budgets.add(3 * p // 2)
    p *= 2
  return tuple(sorted(budgets)) + (rows,)


def budget_index(count: jax.Array, budgets: Sequence[int]) -> jax.Array:
  """Index of the smallest budget >= `count` (the last one if none is)."""
  return jnp.sum(count > jnp.asarray(budgets[:-1], jnp.int32)).astype(jnp.int32)


def on_budget(count: jax.Array, rows: int, fn: Callable[..., Any], *args) -> Any:
  """`fn(k, *args)` for the smallest budget k of `row_budgets(rows)` holding `count` rows.
  `fn`'s output must have the same shapes for every k (e.g. padded back to `rows`)."""
  budgets = row_budgets(rows)
  if len(budgets) == 1:
    return fn(rows, *args)
  return lax.switch(budget_index(count, budgets), [lambda *a, k=k: fn(k, *a) for k in budgets],
                    *args)


def scalar_loss(count: jax.Array, rows: int, loss_fn: Callable[..., jax.Array], params: Any,
                inputs: Any, constants: Any) -> jax.Array:
  """`loss_fn(k, params, inputs, constants)`, a scalar, on the smallest budget k holding
  `count` rows, differentiable with respect to `params` and `inputs` (not `constants`)."""
  budgets = row_budgets(rows)
  if len(budgets) == 1:
    return loss_fn(rows, params, inputs, constants)

  @jax.custom_vjp
  def loss(index, params, inputs, constants):
    return lax.switch(index, [lambda p, x, c, k=k: loss_fn(k, p, x, c) for k in budgets],
                      params, inputs, constants)

  def value_and_grads(index, params, inputs, constants):
    branches = [lambda p, x, c, k=k: jax.value_and_grad(
        lambda p, x: loss_fn(k, p, x, c), argnums=(0, 1))(p, x) for k in budgets]
    return lax.switch(index, branches, params, inputs, constants)

  def backward(grads, cotangent):
    scaled = jax.tree.map(lambda g: g * cotangent, grads)
    return (None, *scaled, None)

  loss.defvjp(value_and_grads, backward)
  return loss(budget_index(count, budgets), params, inputs, constants)
