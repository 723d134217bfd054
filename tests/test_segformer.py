"""SegFormer against transformers' SegformerForSemanticSegmentation.

tests/fixtures/segformer_tiny/ was written by tests/fixtures/make_segformer_fixture.py
(transformers 5.23, torch 2.13): a tiny random-weight model in transformers' checkpoint layout
and its logits on a fixed input. These tests need neither torch nor transformers.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from seg_jax import config as config_lib
from seg_jax import init_from
from seg_jax import losses
from seg_jax import torch_checkpoint
from seg_jax.models import segformer
from tests.conftest import tiny_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "segformer_tiny")


@pytest.fixture(scope="module")
def reference():
  tensors, hf_config = torch_checkpoint.read_checkpoint(FIXTURE)
  outputs = dict(np.load(os.path.join(FIXTURE, "outputs.npz")))
  model = segformer.SegFormer(num_logits=hf_config["num_labels"] if "num_labels" in hf_config
                              else len(hf_config["id2label"]),
                              **segformer.model_config_from_transformers(hf_config))
  image = jnp.asarray(outputs["pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  return tensors, hf_config, outputs, model, image


@pytest.fixture(scope="module")
def forward(reference):
  return jax.jit(lambda variables, x: reference[3].apply(variables, x, train=False))


def _nhwc(x):
  return x.transpose(0, 2, 3, 1)


def test_loaded_checkpoint_gives_transformers_logits(reference, forward):
  tensors, hf_config, outputs, _, image = reference
  assert segformer.recognise(tensors)
  variables = segformer.convert_transformers(tensors, hf_config)
  logits = np.asarray(forward(variables, image))
  expected = _nhwc(outputs["upsampled"])
  assert logits.shape == expected.shape == (2, 64, 96, 3)
  assert np.abs(expected).max() > 1.0  # random weights: logits far from zero
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_init_from_a_transformers_directory_loads_every_array(reference, forward):
  """model.init_from=DIR: the layout is recognised from the key names, every array of the model
  is replaced, and the model then gives transformers' logits."""
  _, _, outputs, model, image = reference
  fresh = model.init(jax.random.key(1), image, train=False)
  variables, report = init_from.initialize(fresh, FIXTURE)
  assert report.layout == "transformers_segformer"
  assert not report.missing and not report.shape_mismatch
  assert len(report.loaded) == len(_flat(fresh))
  np.testing.assert_allclose(np.asarray(forward(variables, image)), _nhwc(outputs["upsampled"]),
                             rtol=0, atol=1e-4)


def test_training_loss_and_gradients_are_transformers(reference):
  """Training mode (batch norm on the batch's statistics; stochastic depth and dropout off): the
  trainer's cross-entropy of our upsampled logits is transformers' loss, and its gradient with
  respect to every parameter is torch's (train_gradients.npz), mapped as the weights are."""
  tensors, hf_config, outputs, model, image = reference
  expected = dict(np.load(os.path.join(FIXTURE, "train_gradients.npz")))
  variables = segformer.convert_transformers(tensors, hf_config)
  no_dropout = model.clone(drop_path_rate=0.0, dropout=0.0)

  def loss_fn(params):
    logits, _ = no_dropout.apply({**variables, "params": params}, image, train=True,
                                 mutable=["batch_stats"])
    return losses.softmax_cross_entropy(logits, jnp.asarray(expected["labels"]), ignore_label=255)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  np.testing.assert_allclose(float(loss), float(expected["loss"]), rtol=1e-5)
  torch_grads = segformer.convert_transformers(
      {k.removeprefix("grad/"): v for k, v in expected.items() if k.startswith("grad/")})
  got, want = _flat(jax.device_get(grads)), _flat(torch_grads["params"])
  assert got.keys() == want.keys()
  for key in want:
    # Within 1e-4 of each array's largest gradient; the key biases, and the biases before the
    # decoder's batch norm, have zero gradient in exact arithmetic (~1e-9 here).
    scale = max(np.abs(want[key]).max(), 1e-2)
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-4 * scale, err_msg=key)
  assert np.abs(want["encoder/stage0_patch_embed/kernel"]).max() > 1e-3  # the signal reaches the input


def test_upsampling_is_torch_bilinear_without_corner_alignment(reference):
  outputs = reference[2]
  upsampled = segformer.resize_bilinear(jnp.asarray(_nhwc(outputs["logits"])), 64, 96)
  np.testing.assert_allclose(np.asarray(upsampled), _nhwc(outputs["upsampled"]), rtol=0, atol=1e-5)


def _flat(variables):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(variables).items()}


def test_every_weight_lands_once_in_the_models_own_tree(reference):
  tensors, hf_config, _, model, image = reference
  converted = _flat(segformer.convert_transformers(tensors, hf_config))
  shapes = _flat(jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False)))
  assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in shapes.items()}
  # Every tensor but batch norm's step counter is used.
  assert len(converted) == len(tensors) - 1


def test_transformers5_module_names_convert_the_same(reference):
  """transformers 5 renames the hub's keys in memory (stages.0.blocks.0.attention.q_proj...); a
  state dict saved under those names converts to the same variables."""
  tensors, hf_config, _, _, _ = reference
  with open(os.path.join(FIXTURE, "module_names.json")) as f:
    hub_name_of = json.load(f)
  renamed = {new: tensors[old] for new, old in hub_name_of.items()}
  assert "segformer.stages.0.blocks.0.attention.q_proj.weight" in renamed
  assert segformer.recognise(renamed)
  expected = _flat(segformer.convert_transformers(tensors, hf_config))
  got = _flat(segformer.convert_transformers(renamed, hf_config))
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_encoder_only_checkpoint_gives_the_encoder(reference):
  """nvidia/mit-b* hold the encoder (SegformerModel, no `segformer.` prefix, or with it and an
  ImageNet classifier); the classifier is not ours to load and the decoder is left to train."""
  tensors, hf_config, _, _, _ = reference
  full = _flat(segformer.convert_transformers(tensors, hf_config))
  encoder = {k.removeprefix("segformer."): v for k, v in tensors.items()
             if k.startswith("segformer.")}
  classifier = {"classifier.weight": np.ones((1000, 32), np.float32),
                "classifier.bias": np.ones((1000,), np.float32)}
  for checkpoint in (encoder, {**{"segformer." + k: v for k, v in encoder.items()}, **classifier}):
    assert segformer.recognise(checkpoint)
    got = _flat(segformer.convert_transformers(checkpoint))
    assert got.keys() == {k for k in full if k.startswith("params/encoder/")}
    for key in got:
      np.testing.assert_array_equal(got[key], full[key])
  assert not segformer.recognise({"conv1.weight": np.zeros((64, 3, 7, 7))})  # a torchvision ResNet


def test_config_json_that_disagrees_with_the_weights_is_refused(reference):
  tensors, hf_config, _, _, _ = reference
  wrong = dict(hf_config, hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2])
  with pytest.raises(ValueError, match=r"hidden_sizes=.*weights say \[8, 16, 24, 32\].*depths="):
    segformer.convert_transformers(tensors, wrong)
  assert segformer.model_config_from_transformers(
      dict(hf_config, hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3],
           decoder_hidden_size=768, num_attention_heads=[1, 2, 5, 8])) == {"variant": "b2"}


def test_bfloat16_forward_is_close_to_float32(reference, forward):
  tensors, hf_config, outputs, model, image = reference
  variables = segformer.convert_transformers(tensors, hf_config)
  bf16 = model.clone(dtype=jnp.bfloat16)
  logits = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, image)
  assert logits.dtype == jnp.float32
  expected = _nhwc(outputs["upsampled"])
  # bf16 keeps 8 bits of mantissa: errors of a few parts in a hundred of the logits' scale.
  assert np.abs(np.asarray(logits) - expected).max() < 0.05 * np.abs(expected).max()
  assert np.mean(np.argmax(logits, -1) == np.argmax(expected, -1)) > 0.95


@pytest.mark.parametrize("variant,params", [
    # transformers' SegformerForSemanticSegmentation with nvidia/mit-b* sizes and 150 classes
    # (the ADE20K models): sum(p.numel() for p in model.parameters()).
    ("b0", 3_752_694), ("b2", 27_461_974)])
def test_variants_have_transformers_parameter_counts(variant, params):
  model = segformer.SegFormer(num_logits=150, variant=variant)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])) == params


def _tiny_segformer_config(data_dir):
  config = config_lib.with_model(tiny_config(data_dir), "segformer")
  config.model.hidden_sizes = (8, 16, 24, 32)
  config.model.depths = (1, 1, 1, 1)
  config.model.num_heads = (1, 2, 3, 4)
  config.model.decoder_hidden_size = 16
  config.model.drop_path_rate = 0.5
  return config


@pytest.mark.parametrize("key,value,message", [
    ("variant", "b6", "must be one of b0, b1, b2, b3, b4, b5"),
    ("depths", (1, 1, 1), r"must be \(\) \(the variant's\) or 4 integers"),
    ("num_heads", (3, 2, 3, 4), "stage 0: 3 heads do not divide 8 channels"),
])
def test_bad_segformer_config_fails_at_start(data_dir, key, value, message):
  config = _tiny_segformer_config(data_dir)
  config.model[key] = value
  with pytest.raises(config_lib.ConfigError, match=f"model.{key}=.*{message}"):
    config_lib.validate(config)
