"""Row budgets (seg_jax/models/detection/budgets.py): the mask head runs on the smallest static
budget holding the real rows, with the value and gradients of the full budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax.models.detection import budgets

from test_detection_models import _tiny_mask_rcnn, _tiny_scene


def test_row_budgets_ladder():
  assert budgets.row_budgets(128) == (8, 12, 16, 24, 32, 48, 64, 96, 128)
  assert budgets.row_budgets(100) == (8, 12, 16, 24, 32, 48, 64, 96, 100)
  assert budgets.row_budgets(16) == (8, 12, 16)
  assert budgets.row_budgets(5) == (5,)


def _toy_loss(k, params, inputs, constants):
  """Weighted squares of the first k rows that are real; each branch also adds 1e-3 * k times
  `probe` (0 or 1), so that the value tells which budget ran."""
  real, probe = constants
  rows = inputs[:, :k] @ params
  return jnp.sum(jnp.where(real[:, :k, None], rows ** 2, 0.0)) + 1e-3 * k * probe


@pytest.mark.parametrize("count, expected_budget", [(1, 8), (8, 8), (9, 12), (13, 16), (16, 16)])
def test_scalar_loss_runs_the_smallest_budget_with_the_full_value_and_gradient(
    count, expected_budget):
  rng = np.random.default_rng(count)
  params = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
  inputs = jnp.asarray(rng.standard_normal((2, 16, 3)), jnp.float32)
  real = np.zeros((2, 16), bool)
  real[0, :count] = True
  real[1, :max(count - 3, 0)] = True  # the count is the most rows any image needs

  def budgeted(params, inputs, probe):
    return budgets.scalar_loss(jnp.max(jnp.sum(real, axis=1)), 16, _toy_loss, params, inputs,
                               (jnp.asarray(real), probe))

  value = jax.jit(budgeted)(params, inputs, 1.0)
  # The reference: numpy, over every row, padding masked.
  want = np.sum(np.where(real[..., None], (np.asarray(inputs) @ np.asarray(params)) ** 2, 0.0))
  np.testing.assert_allclose(float(value), want + 1e-3 * expected_budget, rtol=1e-5)
  grads = jax.jit(jax.grad(budgeted, argnums=(0, 1)))(params, inputs, 0.0)
  rows = np.asarray(inputs) @ np.asarray(params)
  coefficient = np.where(real[..., None], 2 * rows, 0.0)                   # d loss / d rows
  np.testing.assert_allclose(np.asarray(grads[0]),
                             np.einsum("nri,nro->io", np.asarray(inputs), coefficient), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads[1]), coefficient @ np.asarray(params).T,
                             rtol=1e-5, atol=1e-6)


def test_on_budget_pads_back_to_the_full_rows():
  fn = lambda k, x: jnp.pad(x[:, :k] * 2.0, ((0, 0), (0, 16 - k)))
  x = jnp.arange(32.0).reshape(2, 16)
  out = jax.jit(lambda x, c: budgets.on_budget(c, 16, fn, x))(x, jnp.int32(10))
  want = np.asarray(x) * 2.0
  want[:, 12:] = 0.0  # budget 12 holds the 10 rows; the rest is padding
  np.testing.assert_array_equal(np.asarray(out), want)


def test_mask_rcnn_losses_and_gradients_equal_those_of_the_full_mask_budget(monkeypatch):
  """16 foreground slots per image (budgets 8, 12, 16), against the same model with one
  budget (the mask head on all 16 rows, no switch)."""
  from seg_jax.models.detection import mask_rcnn
  model = _tiny_mask_rcnn(roi_num_samples=64)
  images, targets = _tiny_scene(np.random.default_rng(0))
  variables = jax.jit(lambda: model.init(jax.random.key(0), images, train=False))()

  def losses_and_grads():
    def loss_fn(params):
      losses, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              images, targets, train=True, rngs={"sampling": jax.random.key(3)},
                              mutable=["batch_stats"])
      return mask_rcnn.total_loss(losses), losses
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])

  (_, budgeted), budgeted_grads = losses_and_grads()
  monkeypatch.setattr(budgets, "row_budgets", lambda rows, smallest=8: (rows,))
  (_, full), full_grads = losses_and_grads()
  # Few foreground RoIs (at most 12 per image on average), so a budget below 16 runs.
  assert 0 < float(budgeted["roi_foreground_fraction"]) * 64 <= 12
  for name in mask_rcnn.LOSS_PARTS:
    np.testing.assert_allclose(float(budgeted[name]), float(full[name]), rtol=1e-5, err_msg=name)
  for path, got in jax.tree_util.tree_flatten_with_path(budgeted_grads)[0]:
    want = full_grads
    for key in path:
      want = want[key.key]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                               atol=1e-5 * max(float(np.abs(want).max()), 1e-6),
                               err_msg=jax.tree_util.keystr(path))
