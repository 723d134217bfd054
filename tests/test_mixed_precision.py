"""config.dtype=bfloat16: bf16 compute, float32 parameters and loss, metrics as in float32; and
config.matmul_precision reaches the compiled steps.

Tolerances (README, Performance): the same trained weights evaluated in bf16 give Dice, IoU and
pixel accuracy within 0.01 of float32; bf16 training reaches a Dice within 0.05 of float32
training from the same seed (bf16's 8-bit mantissa changes each step's rounding, so the two
runs drift apart like two seeds).

Both comparisons need models that have learnt, or they compare noise: a barely-trained model's
scores move with the CPU's kernels (an AMD EPYC and a Xeon disagreed by 0.05 after 200 steps on
48 scenes). So the runs here fit 16 scenes without augmentation and are scored on those scenes:
float32 reaches a foreground Dice of 0.99 in 300 steps, and both precisions must get there.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import parallel
from seg_jax import train
from tests.conftest import tiny_config

SCALARS = ("eval/dice", "eval/jaccard", "eval/pixel_accuracy")
LEARNT_FOREGROUND_DICE = 0.9   # both runs fit the 16 scenes to ~0.99


def _config(data_dir, dtype):
  """A U-Net fitting 16 scenes (scored on the same scenes): it learns fast and reproducibly."""
  config = tiny_config(data_dir)
  config.dtype = dtype
  config.model.width = 16
  config.dataset.num_train = 16
  config.dataset.shuffle_buffer = 16
  config.dataset.eval_split = "train"
  augment = config.dataset.augment
  augment.hflip = augment.vflip = False
  augment.min_scale = augment.max_scale = 1.0
  augment.brightness = augment.contrast = augment.saturation = augment.hue = 0.0
  config.optimizer.learning_rate = 5e-3
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 20
  config.num_train_steps = 300
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 300
  config.num_eval_visuals = 0
  return config


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("f32"))
  return workdir, train.train_and_evaluate(_config(data_dir, "float32"), workdir)


def _random_batch(trainer):
  rng = np.random.default_rng(0)
  return parallel.host_batch_to_global(
      {"image": rng.standard_normal((8, 32, 32, 3)).astype(np.float32),
       "mask": rng.integers(0, trainer.config.dataset.num_classes, (8, 32, 32)).astype(np.int32),
       "valid": np.ones((8,), bool)}, trainer.mesh)


def test_bfloat16_computes_in_bf16_with_float32_parameters_and_loss(data_dir, tmp_path):
  trainer = train.Trainer(_config(data_dir, "bfloat16"), str(tmp_path))
  state = trainer.initial_state()
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  batch = _random_batch(trainer)
  hlo = trainer.train_step.lower(state, batch).as_text()
  convs = re.findall(r"stablehlo\.convolution.*?-> tensor<([^>]*)>", hlo)
  assert convs and all(c.endswith("bf16") for c in convs), convs
  new_state, metrics = trainer.train_step(state, batch)
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
  assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(new_state.batch_stats)} == {jnp.dtype(jnp.float32)}
  # The optimiser state stays float32 too: AdamW's moments have the parameters' tree, shapes and
  # dtype, and after one step from zero mu = (1 - b1) g and nu = (1 - b2) g^2, so
  # nu = (1 - b2) / (1 - b1)^2 * mu^2 to float32 rounding (bf16 moments would miss by ~1e-2).
  floats = [x for x in jax.tree.leaves(new_state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  adam = [x for x in jax.tree.leaves(new_state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(x, "mu")]
  assert len(adam) == 1, adam
  o = trainer.config.optimizer
  params_structure = jax.tree.structure(new_state.params)
  for name in ("mu", "nu"):
    moment = getattr(adam[0], name)
    assert jax.tree.structure(moment) == params_structure, name
    assert {x.dtype for x in jax.tree.leaves(moment)} == {jnp.dtype(jnp.float32)}, name
  mu = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(adam[0].mu)])
  nu = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(adam[0].nu)])
  assert np.abs(mu).max() > 0
  np.testing.assert_allclose(nu, (1 - o.b2) / (1 - o.b1) ** 2 * mu ** 2, rtol=1e-5, atol=1e-30)


def test_bfloat16_eval_of_float32_weights_matches_float32(float32_run, data_dir):
  workdir, final = float32_run
  # A model that has learnt the foreground, so that the comparison covers foreground decisions.
  assert final["eval/dice_foreground"] >= LEARNT_FOREGROUND_DICE
  bf16 = train.evaluate(_config(data_dir, "bfloat16"), workdir)
  f32 = train.evaluate(_config(data_dir, "float32"), workdir)
  for key in SCALARS:
    assert f32[key] == pytest.approx(final[key], abs=1e-6)
    assert abs(bf16[key] - f32[key]) <= 0.01, (key, bf16[key], f32[key])


def test_bfloat16_training_reaches_float32_metrics(float32_run, data_dir, tmp_path):
  _, f32 = float32_run
  bf16 = train.train_and_evaluate(_config(data_dir, "bfloat16"), str(tmp_path))
  assert f32["eval/dice_foreground"] >= LEARNT_FOREGROUND_DICE
  assert bf16["eval/dice_foreground"] >= LEARNT_FOREGROUND_DICE
  for key in SCALARS:
    assert abs(bf16[key] - f32[key]) <= 0.05, (key, bf16[key], f32[key])


@pytest.mark.parametrize("precision,hlo_precision", [("default", "DEFAULT"), ("highest", "HIGHEST")])
def test_matmul_precision_reaches_the_train_and_eval_steps(data_dir, tmp_path, precision,
                                                           hlo_precision):
  config = tiny_config(data_dir)
  config.matmul_precision = precision
  config.conv_backend = "xla"  # the precision is XLA's; oneDNN computes float32 on the CPU anyway
  trainer = train.Trainer(config, str(tmp_path))
  state, batch = trainer.initial_state(), _random_batch(trainer)
  for name, step, first in (("train", trainer.train_step, state),
                            ("eval", trainer.eval_step, train.model_variables(state))):
    convs = re.findall(r"stablehlo\.convolution.*", step.lower(first, batch).as_text())
    assert convs, name
    for conv in convs:
      assert set(re.findall(r"stablehlo<precision (\w+)>", conv)) <= {hlo_precision}, (name, conv)
      if precision != "default":  # DEFAULT may be written out or left implicit
        assert f"precision {hlo_precision}>" in conv, (name, conv)


@pytest.mark.parametrize("precision,hlo_precision", [("default", "DEFAULT"), ("highest", "HIGHEST")])
def test_matmul_precision_reaches_predict(float32_run, data_dir, tmp_path, monkeypatch, precision,
                                          hlo_precision):
  """--mode=predict (predict.run on the trained workdir) compiles its tile function with the
  config's matmul_precision: the lowering it compiles is captured and its StableHLO read."""
  from PIL import Image
  from seg_jax import predict
  workdir, _ = float32_run
  config = _config(data_dir, "float32")
  config.matmul_precision = precision
  config.conv_backend = "xla"  # the precision is XLA's; oneDNN computes float32 on the CPU anyway
  config.predict.tile_size = 32
  config.predict.input = str(tmp_path / "scene.png")
  config.predict.output = str(tmp_path / "out")
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(config.predict.input)
  lowered = []
  real_jit = jax.jit

  def recording_jit(*args, **kwargs):
    jitted = real_jit(*args, **kwargs)

    class Recording:
      def __call__(self, *a, **k):
        return jitted(*a, **k)

      def lower(self, *a, **k):
        lowered.append(jitted.lower(*a, **k))
        return lowered[-1]
    return Recording()

  monkeypatch.setattr(jax, "jit", recording_jit)
  result = predict.run(config, workdir)
  monkeypatch.undo()
  assert len(result["predicted"]) == 1
  tile_functions = [l for l in lowered if "stablehlo.convolution" in l.as_text()]
  assert len(tile_functions) == 1, len(lowered)
  convs = re.findall(r"stablehlo\.convolution.*", tile_functions[0].as_text())
  assert len(convs) == 2 * 5 + 2 + 1, convs   # 5 double convs, 2 learned upsamplings, the head
  for conv in convs:
    assert set(re.findall(r"stablehlo<precision (\w+)>", conv)) <= {hlo_precision}, conv
    if precision != "default":  # DEFAULT may be written out or left implicit
      assert f"precision {hlo_precision}>" in conv, conv
