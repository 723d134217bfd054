"""`train.make_schedule` / `train.make_optimizer` against the formulas, written out in numpy.

Each optimiser runs a few steps on a tiny parameter pytree (a conv kernel and bias, a norm scale,
a dense kernel) with fixed random gradients; a numpy re-implementation of the README's promise
(schedule, SGD / Nesterov / Adam / AdamW, weight decay on kernels only, global-norm clipping)
must give the same parameters after every step.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seg_jax import config as config_lib
from seg_jax import train

NUM_STEPS = 10   # config.num_train_steps: the schedules reach their end within the test
SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
          "norm": {"scale": (4,)},
          "dense": {"kernel": (4, 3), "bias": (3,)}}
KERNELS = ("conv/kernel", "dense/kernel")   # ndim > 1: decayed; the rest (1-D) never is


def _config(**optimizer):
  c = config_lib.base_config()
  c.num_train_steps = NUM_STEPS
  for key, value in optimizer.items():
    c.optimizer[key] = value
  config_lib.validate(c)  # every key the test sets is a real, valid one
  return c


def _flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): np.asarray(v, np.float64) for path, v in leaves}


def _params_and_grads(num_steps, grad_scale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  params = {f"{m}/{p}": rng.normal(size=s) for m, d in SHAPES.items() for p, s in d.items()}
  grads = [{k: grad_scale * rng.normal(size=v.shape) for k, v in params.items()}
           for _ in range(num_steps)]
  return params, grads


def _tree(flat: dict[str, np.ndarray]):
  out = {}
  for key, value in flat.items():
    module, name = key.split("/")
    out.setdefault(module, {})[name] = jnp.asarray(value, jnp.float32)
  return out


def _run_optax(config, params, grads):
  """The parameters after each step of make_optimizer(config)."""
  tx, _ = train.make_optimizer(config)
  p = _tree(params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  history = []
  for g in grads:
    updates, state = update(_tree(g), state, p)
    p = optax.apply_updates(p, updates)
    history.append(_flat(p))
  return history


# ---------------------------------------------------------------------------- numpy reference

def np_lr(o, t: int) -> float:
  """The learning rate at step count t (0 = the first update), from the formulas."""
  peak, warmup, end = o.learning_rate, o.warmup_steps, o.learning_rate * o.end_learning_rate_factor
  if warmup and t < warmup:
    return peak * t / warmup
  if o.schedule == "constant":
    return peak
  decay_steps = NUM_STEPS - warmup
  frac = min(t - warmup, decay_steps) / decay_steps
  if o.schedule == "warmup_cosine":
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
  if o.schedule == "polynomial":
    return end + (peak - end) * (1 - frac) ** o.power
  raise ValueError(o.schedule)


def np_optimizer(config, params, grads):
  """SGD (heavy-ball or Nesterov momentum), Adam, AdamW, L2/decoupled decay, clipping."""
  o = config.optimizer
  p = {k: v.copy() for k, v in params.items()}
  mask = {k: float(k in KERNELS) for k in p}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  history = []
  for t, g in enumerate(grads):
    g = dict(g)
    if o.grad_clip_norm:
      norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
      if norm > o.grad_clip_norm:
        g = {k: x * o.grad_clip_norm / norm for k, x in g.items()}
    lr = np_lr(o, t)
    for k in p:
      gk = g[k]
      if o.name in ("sgd", "adam"):  # classic L2: added to the gradient
        gk = gk + o.weight_decay * mask[k] * p[k]
      if o.name == "sgd":
        if o.momentum:
          m[k] = gk + o.momentum * m[k]
          direction = gk + o.momentum * m[k] if o.nesterov else m[k]
        else:
          direction = gk
      else:
        m[k] = o.b1 * m[k] + (1 - o.b1) * gk
        v2[k] = o.b2 * v2[k] + (1 - o.b2) * gk * gk
        m_hat = m[k] / (1 - o.b1 ** (t + 1))
        v_hat = v2[k] / (1 - o.b2 ** (t + 1))
        direction = m_hat / (np.sqrt(v_hat) + 1e-8)
        if o.name == "adamw":  # decoupled: scaled by the lr, not by Adam's normaliser
          direction = direction + o.weight_decay * mask[k] * p[k]
      p[k] = p[k] - lr * direction
    history.append({k: v.copy() for k, v in p.items()})
  return history


def _assert_same(got, want, rtol=2e-5, atol=2e-6):
  assert len(got) == len(want)
  for step, (g, w) in enumerate(zip(got, want)):
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=atol,
                                 err_msg=f"step {step}, {key}")


# ---------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("schedule,warmup", [("warmup_cosine", 3), ("warmup_cosine", 0),
                                             ("polynomial", 3), ("polynomial", 0),
                                             ("constant", 4)])
def test_schedule_matches_formula(schedule, warmup):
  c = _config(schedule=schedule, warmup_steps=warmup, learning_rate=0.1,
              end_learning_rate_factor=0.05, power=0.9)
  sched = train.make_schedule(c)
  got = np.array([float(sched(t)) for t in range(NUM_STEPS + 3)])
  want = np.array([np_lr(c.optimizer, t) for t in range(NUM_STEPS + 3)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # What the formulas mean, stated plainly as well.
  if warmup:
    assert got[0] == 0.0
    np.testing.assert_allclose(got[warmup], 0.1, rtol=1e-6)  # the peak right after warm-up
    assert np.all(np.diff(got[:warmup + 1]) > 0)
  if schedule != "constant":
    np.testing.assert_allclose(got[NUM_STEPS:], 0.1 * 0.05, rtol=1e-5)  # ends at end factor
    assert np.all(np.diff(got[warmup:NUM_STEPS + 1]) < 0)


# ---------------------------------------------------------------------------- optimisers

OPTIMIZERS = {
    "sgd_momentum": dict(name="sgd", momentum=0.9, nesterov=False),
    "sgd_nesterov": dict(name="sgd", momentum=0.9, nesterov=True),
    "sgd_plain": dict(name="sgd", momentum=0.0),
    "adam": dict(name="adam", b1=0.8, b2=0.95),
    "adamw": dict(name="adamw", b1=0.8, b2=0.95),
}


@pytest.mark.parametrize("schedule,warmup", [("warmup_cosine", 2), ("polynomial", 2),
                                             ("constant", 0)])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_optimizer_matches_numpy(opt, schedule, warmup):
  c = _config(**OPTIMIZERS[opt], schedule=schedule, warmup_steps=warmup, learning_rate=0.05,
              end_learning_rate_factor=0.1, weight_decay=0.1)
  params, grads = _params_and_grads(6)
  _assert_same(_run_optax(c, params, grads), np_optimizer(c, params, grads))


def test_nesterov_differs_from_heavy_ball():
  """The two SGD variants must not collapse into one (the reference tests could then agree
  with either); from the second step on Nesterov's look-ahead moves the parameters differently."""
  params, grads = _params_and_grads(3)
  kw = dict(name="sgd", momentum=0.9, schedule="constant", learning_rate=0.05)
  heavy = _run_optax(_config(**kw, nesterov=False), params, grads)
  nesterov = _run_optax(_config(**kw, nesterov=True), params, grads)
  assert not np.allclose(heavy[1]["conv/kernel"], nesterov[1]["conv/kernel"])


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam", "adamw"])
def test_weight_decay_on_kernels_only(opt):
  """With zero gradients only the decay moves parameters: every kernel entry moves towards zero
  (as the formula says), biases and norm scales (1-D) stay put bit for bit."""
  c = _config(**OPTIMIZERS[opt], schedule="constant", warmup_steps=0, learning_rate=0.1,
              weight_decay=0.5)
  params, _ = _params_and_grads(0)
  zeros = [{k: np.zeros_like(v) for k, v in params.items()}] * 3
  got = _run_optax(c, params, zeros)
  _assert_same(got, np_optimizer(c, params, zeros))
  for key in params:
    if key in KERNELS:
      assert np.all((got[0][key] - params[key]) * params[key] < 0), key
    else:
      np.testing.assert_array_equal(got[-1][key], params[key].astype(np.float32), err_msg=key)
  if opt == "adamw":  # decoupled decay: p <- p (1 - lr wd) per step, independent of Adam
    np.testing.assert_allclose(got[-1]["conv/kernel"], params["conv/kernel"] * (1 - 0.1 * 0.5) ** 3,
                               rtol=1e-5)


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam", "adamw"])
def test_grad_clipping_by_global_norm(opt):
  """Gradients of global norm ~30-40 clipped to 1 (and one step of norm < 1, left alone)."""
  c = _config(**OPTIMIZERS[opt], schedule="constant", learning_rate=0.05, weight_decay=0.1,
              grad_clip_norm=1.0)
  params, grads = _params_and_grads(4, grad_scale=5.0)
  norms = [math.sqrt(sum(float(np.sum(x * x)) for x in g.values())) for g in grads]
  grads[2] = {k: x * 0.5 / norms[2] for k, x in grads[2].items()}  # norm 0.5: not clipped
  got = _run_optax(c, params, grads)
  _assert_same(got, np_optimizer(c, params, grads))
  # Clipping changes the result: the unclipped run ends elsewhere (for Adam too, since the
  # clipping factor differs between steps and the L2 / decoupled decay is not rescaled).
  c.optimizer.grad_clip_norm = 0.0
  unclipped = _run_optax(c, params, grads)
  assert not np.allclose(got[-1]["conv/kernel"], unclipped[-1]["conv/kernel"], rtol=1e-3)


# ---------------------------------------------------------------------------- accumulation

def test_accumulation_with_skip_mode_drops_a_nonfinite_micro_batch_alone():
  """SGD, accumulate_steps=2, on_nonfinite=skip: the gradients g0, NaN, g1, g2, g3 give two
  updates, -lr (g0 + g1) / 2 after the third call and -lr (g2 + g3) / 2 after the fifth; the
  NaN micro-batch neither poisons the mean nor counts as one of the two."""
  config = _config(name="sgd", momentum=0.0, schedule="constant", learning_rate=0.1,
                   accumulate_steps=2)
  config.on_nonfinite = "skip"
  config_lib.validate(config)
  params, grads = _params_and_grads(4)
  nan = {k: np.full_like(v, np.nan) for k, v in grads[0].items()}
  history = _run_optax(config, params, [grads[0], nan, grads[1], grads[2], grads[3]])
  first = {k: params[k] - 0.1 * (grads[0][k] + grads[1][k]) / 2 for k in params}
  second = {k: first[k] - 0.1 * (grads[2][k] + grads[3][k]) / 2 for k in params}
  _assert_same(history, [params, params, first, first, second])

# ---------------------------------------------------------------------------- backbone group

FROZEN = 3
MULTIPLIER = 0.1
GROUP_SHAPES = {"backbone/conv/kernel": (3, 3, 2, 4), "backbone/norm/scale": (4,),
                "head/kernel": (4, 3), "head/bias": (3,)}


def _nested(flat):
  out = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = out
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = jnp.asarray(value, jnp.float32)
  return out


def test_backbone_multiplier_and_frozen_steps_match_formula():
  """AdamW with decay and clipping; the backbone (DeepLabv3+'s `backbone` subtree): no change
  for FROZEN steps, then Adam from fresh moments at MULTIPLIER x the head's learning rate at
  the same step; the clipping norm is over both groups' gradients throughout."""
  c = config_lib.base_config("deeplabv3plus")
  c.num_train_steps = NUM_STEPS
  c.optimizer.update(name="adamw", weight_decay=0.05, grad_clip_norm=2.0, warmup_steps=2,
                     backbone_learning_rate_multiplier=MULTIPLIER, backbone_frozen_steps=FROZEN)
  config_lib.validate(c)
  o = c.optimizer
  rng = np.random.default_rng(3)
  params = {k: rng.normal(size=s) for k, s in GROUP_SHAPES.items()}
  grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(NUM_STEPS)]

  tx, _ = train.make_optimizer(c)
  p = _nested(params)
  state = tx.init(p)
  got = []
  for g in grads:
    updates, state = jax.jit(tx.update)(_nested(g), state, p)
    p = optax.apply_updates(p, updates)
    got.append(_flat(p))

  want, p = [], {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, g in enumerate(grads):
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    scale = min(1.0, o.grad_clip_norm / norm)
    for k in p:
      backbone = k.startswith("backbone/")
      if backbone and t < FROZEN:
        continue
      count = t - FROZEN + 1 if backbone else t + 1   # the group's own Adam step
      lr = np_lr(o, t) * (MULTIPLIER if backbone else 1.0)
      gk = g[k] * scale
      m[k] = o.b1 * m[k] + (1 - o.b1) * gk
      v2[k] = o.b2 * v2[k] + (1 - o.b2) * gk * gk
      direction = (m[k] / (1 - o.b1 ** count)) / (np.sqrt(v2[k] / (1 - o.b2 ** count)) + 1e-8)
      direction = direction + o.weight_decay * (p[k].ndim > 1) * p[k]
      p[k] = p[k] - lr * direction
    want.append({k: v.copy() for k, v in p.items()})
  _assert_same(got, want)
  for step in range(FROZEN):  # bit-identical, not merely close
    np.testing.assert_array_equal(got[step]["backbone/conv/kernel"],
                                  params["backbone/conv/kernel"].astype(np.float32))
  assert not np.array_equal(got[FROZEN]["backbone/conv/kernel"], got[FROZEN - 1]["backbone/conv/kernel"])
  groups = train.describe_parameter_groups(c, _nested(params)).splitlines()
  assert groups[1].startswith("  backbone (params/backbone): 76 parameters (2 arrays): 0.1 x")
  assert "(peak 0.0001); unchanged for the first 3 steps" in groups[1]
  assert groups[2] == "  head (the rest): 15 parameters (2 arrays): warmup_cosine schedule, peak 0.001"


def test_backbone_keys_need_a_backbone():
  c = config_lib.base_config("unet")  # the classic encoder: nothing pretrained to treat apart
  c.optimizer.backbone_frozen_steps = 10
  with pytest.raises(config_lib.ConfigError, match="backbone_frozen_steps=10.*no pretrained backbone"):
    config_lib.validate(c)
  c.model.backbone = "resnet18"
  config_lib.validate(c)
  assert train.backbone_path(c) == "encoder"
  c.model.update(norm="group", frozen_backbone_norm=True)  # FrozenBN needs batch norms
  with pytest.raises(config_lib.ConfigError, match="frozen_backbone_norm=True.*'group'"):
    config_lib.validate(c)


def test_train_step_leaves_a_frozen_backbone_bit_identical_then_trains_it():
  """DeepLabv3+ through train.train_step: backbone_frozen_steps=2 with frozen_backbone_norm.
  The ResNet's parameters and statistics stay bit-identical for steps 1-2 while the head
  trains; at step 3 its parameters move; its (frozen) statistics never do."""
  from seg_jax import models
  c = config_lib.base_config("deeplabv3plus")
  c.model.update(backbone="resnet10", width=4, stem="small", output_stride=8,
                 aspp_features=8, aspp_rates=(1, 2), low_level_features=8, decoder_features=8,
                 frozen_backbone_norm=True)
  c.dataset.image_size = 32
  c.num_train_steps = 3
  c.optimizer.update(name="sgd", learning_rate=0.1, schedule="constant",
                     backbone_frozen_steps=2, backbone_learning_rate_multiplier=0.5)
  c.conv_backend = "xla"
  config_lib.validate(c)
  model = models.build_model(c)
  tx, schedule = train.make_optimizer(c)
  # Random variables of the model's shapes (traced, not compiled: only the step compiles)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32),
                        abstract["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var"
                                  else rng.normal(size=s.shape) * 0.1, jnp.float32),
      abstract["batch_stats"])
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=tx.init(params))
  batch = {"image": jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),
           "mask": jnp.asarray(rng.integers(0, 2, size=(2, 32, 32)), jnp.int32)}
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                   config=c))
  before = jax.device_get(state)
  for i in range(1, 4):
    state, _ = step(state, batch)
    now = jax.device_get(state)
    backbone_same = jax.tree.leaves(jax.tree.map(np.array_equal, before.params["backbone"],
                                                 now.params["backbone"]))
    assert all(backbone_same) == (i <= 2), f"step {i}"
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before.batch_stats["backbone"],
                                            now.batch_stats["backbone"])))
  assert not np.array_equal(before.params["head"]["kernel"], now.params["head"]["kernel"])
  assert not np.array_equal(before.batch_stats["aspp"]["conv1x1"]["BatchNorm_0"]["mean"],
                            now.batch_stats["aspp"]["conv1x1"]["BatchNorm_0"]["mean"])
