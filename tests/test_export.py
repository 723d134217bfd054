"""--mode=export: every artefact, run by its own runtime, against the JAX model.

References are computed here: images mirrored by numpy's pad(mode='reflect') to
predict's tile size (256), the model applied to them normalised in numpy
(x / 255 * 2 - 1), cropped, softmax and argmax in numpy; and --mode=predict's
label PNGs. One export of a tiny trained U-Net is shared by the tests.
"""

import copy
import functools
import json
import os
import socket

import jax
import numpy as np
import pytest

from seg_jax import config as config_lib
from seg_jax import export
from seg_jax import train
from tests.conftest import tiny_config

SIZES = ((32, 32), (29, 37))  # the TFLite size (dataset.image_size); odd sizes, padded in the graph
TILE = 256  # predict.tile_size: the exported graphs mirror smaller images up to it


def _softmax_reference(logits):
  """(class ids, probabilities) of logits, in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities = e / e.sum(-1, keepdims=True)
  return probabilities.argmax(-1), probabilities


def _mirrored_reference(apply, images, padded_size):
  """(class ids, probabilities) from `apply`'s logits on the images mirrored by numpy (mode
  'reflect') up to padded_size(n) per side and normalised as x / 255 * 2 - 1, cropped back."""
  height, width = images.shape[1:3]
  pads = [(0, padded_size(n) - n) for n in (height, width)]
  padded = np.pad(images, [(0, 0), *pads, (0, 0)], mode="reflect")
  return _softmax_reference(
      np.asarray(apply(padded.astype(np.float32) / 255 * 2 - 1))[:, :height, :width])


def _reference(model, variables, images):
  """The exported U-Net's reference: mirrored up to predict's tile size."""
  return _mirrored_reference(lambda x: model.apply(variables, x, train=False), images,
                             lambda n: TILE)


def _images(n, height, width, seed):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (n, -(-height // 4), -(-width // 4), 3))
  return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :height, :width].astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir):
  """(config, workdir, export dir, model, variables) after 3 training steps and an export run
  with every socket connection refused."""
  workdir = str(tmp_path_factory.mktemp("export_run") / "run")
  config = tiny_config(data_dir)
  config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 3
  config.log_every_steps = 1
  train.train_and_evaluate(config, workdir)

  def refuse(*args, **kwargs):
    raise OSError("the export tried to reach the network")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, "connect", refuse)
    export.run(config, workdir)
  trainer = train.Trainer(config, workdir, with_data=False)
  try:
    variables = jax.device_get(train.inference_variables(trainer.latest_checkpoint_state()))
  finally:
    trainer.close()
  return config, workdir, os.path.join(workdir, "export"), trainer.model, variables


def test_export_writes_every_artefact_and_describes_it(exported):
  _, workdir, out, _, _ = exported
  assert sorted(os.listdir(out)) == ["export.json", "model.onnx", "model.stablehlo",
                                     "model.tflite", "model_fp16.tflite", "model_int8.tflite",
                                     "saved_model"]
  assert not [n for n in os.listdir(workdir) if n.startswith("export.")]  # no partial left
  with open(os.path.join(out, "export.json")) as f:
    description = json.load(f)
  assert description["step"] == 3 and description["num_classes"] == 6
  assert description["class_names"][0] == "background"
  assert description["input"]["model_multiple"] == 4 and description["input"]["min_size"] == TILE
  assert description["input"]["tflite_shape"] == [1, 32, 32, 3]
  assert description["normalization"]["formula"] == "x / dtype_max * 2 - 1"
  for name, artefact in description["artefacts"].items():
    assert os.path.getsize(os.path.join(out, artefact["file"])) if artefact["file"] != \
        "saved_model" else os.path.isdir(os.path.join(out, "saved_model"))
    for check in artefact["checks"]:
      assert 0 <= check["agreement"] <= 1 and 0 <= check["undecided_fraction"] < 0.1  # a 3-step model
      if name != "tflite_int8":
        assert check["decided_agreement"] >= 0.999, (name, check)
        assert check["agreement"] >= 0.99, (name, check)
  # The dynamic artefacts were checked on both probe sizes, TFLite on its fixed one.
  assert [c["size"] for c in description["artefacts"]["onnx"]["checks"]] == [[32, 32], [29, 37]]
  assert [c["size"] for c in description["artefacts"]["tflite_fp16"]["checks"]] == [[32, 32]]


def _assert_agrees(name, classes, probabilities, reference, *, atol):
  ref_classes, ref_probabilities = reference
  assert classes.shape == ref_classes.shape and probabilities.shape == ref_probabilities.shape
  # Pixels the reference decides by a margin of at least 1e-3 (computed here, not by export.py)
  top_two = np.sort(ref_probabilities, axis=-1)[..., -2:]
  decided = top_two[..., 1] - top_two[..., 0] >= 1e-3
  assert decided.mean() > 0.9, name  # a 3-step model has near-ties
  assert np.mean(classes[decided] == ref_classes[decided]) >= 0.999, name
  np.testing.assert_allclose(probabilities, ref_probabilities, atol=atol, err_msg=name)


def test_onnx_saved_model_and_stablehlo_agree_with_jax_on_two_sizes(exported):
  import onnxruntime
  import tensorflow as tf
  _, _, out, model, variables = exported
  session = onnxruntime.InferenceSession(os.path.join(out, "model.onnx"),
                                         providers=["CPUExecutionProvider"])
  serve = tf.saved_model.load(os.path.join(out, "saved_model")).signatures["serving_default"]
  with open(os.path.join(out, "model.stablehlo"), "rb") as f:
    stablehlo = jax.export.deserialize(bytearray(f.read()))
  for n, (height, width) in zip((2, 1), SIZES):
    images = _images(n, height, width, seed=height)
    reference = _reference(model, variables, images)
    classes, probabilities = session.run(["classes", "probabilities"], {"image": images})
    assert classes.dtype == np.int32
    _assert_agrees("onnx", classes, probabilities, reference, atol=1e-4)
    result = serve(image=tf.constant(images))
    _assert_agrees("saved_model", result["classes"].numpy(), result["probabilities"].numpy(),
                   reference, atol=1e-4)
    classes, probabilities = stablehlo.call(images)
    _assert_agrees("stablehlo", np.asarray(classes), np.asarray(probabilities), reference,
                   atol=1e-4)


def test_tflite_float32_and_fp16_agree_with_jax(exported):
  import tensorflow as tf
  _, _, out, model, variables = exported
  images = _images(2, *SIZES[0], seed=5)
  reference = _reference(model, variables, images)
  for filename, atol in (("model.tflite", 1e-4), ("model_fp16.tflite", 2e-2)):
    runner = tf.lite.Interpreter(model_path=os.path.join(out, filename)).get_signature_runner()
    results = [runner(image=image[None]) for image in images]
    _assert_agrees(filename, np.concatenate([r["classes"] for r in results]),
                   np.concatenate([r["probabilities"] for r in results]), reference, atol=atol)


def test_onnx_and_tflite_class_ids_equal_predicts_label_png(exported, tmp_path):
  import onnxruntime
  import tensorflow as tf
  from PIL import Image
  from seg_jax import predict
  config, workdir, out, _, _ = exported
  image = _images(1, *SIZES[0], seed=11)[0]
  Image.fromarray(image).save(tmp_path / "scan.png")
  predict_config = tiny_config(config.dataset.data_dir)
  predict_config.predict.input = str(tmp_path / "scan.png")
  predict_config.predict.output = str(tmp_path / "out")
  predict.run(predict_config, workdir)
  label = np.asarray(Image.open(tmp_path / "out" / "scan_label.png"))
  session = onnxruntime.InferenceSession(os.path.join(out, "model.onnx"),
                                         providers=["CPUExecutionProvider"])
  onnx_classes = session.run(["classes"], {"image": image[None]})[0][0]
  runner = tf.lite.Interpreter(model_path=os.path.join(out, "model.tflite")).get_signature_runner()
  tflite_classes = runner(image=image[None])["classes"][0]
  assert np.mean(onnx_classes == label) >= 0.999
  assert np.mean(tflite_classes == label) >= 0.999


def test_an_export_size_the_model_cannot_take_is_a_one_line_error(exported):
  config = exported[0]
  bad = tiny_config(config.dataset.data_dir)
  bad.export.image_size = 30
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(bad)
  assert str(error.value).startswith("config.export.image_size=30: must be divisible by 4")
  assert "\n" not in str(error.value)


def test_workdir_without_checkpoint_is_a_one_line_error(exported, tmp_path):
  config = exported[0]
  workdir = tmp_path / "empty"
  workdir.mkdir()
  (workdir / "model.json").write_text(json.dumps({"class_names": ["a"] * 6, "input_channels": 3}))
  with pytest.raises(FileNotFoundError) as error:
    export.run(config, str(workdir))
  assert "no checkpoint in" in str(error.value) and "\n" not in str(error.value)
  assert not os.path.exists(workdir / "export")


def test_failed_check_names_the_artefact_and_keeps_the_previous_export(exported, monkeypatch):
  config, workdir, out, _, _ = exported
  before = sorted(os.listdir(out))
  monkeypatch.setattr(export, "MIN_AGREEMENT", 1.01)  # no artefact can pass
  with pytest.raises(export.ExportError, match=r"^model\.stablehlo: class ids agree with the JAX "
                                               r"model on 100\.0000% of the decided pixels of a "
                                               r"32x32 probe \(needs 101\.0%; all pixels: 100\.0000%\)"):
    export.run(config, workdir)
  assert sorted(os.listdir(out)) == before
  assert not [n for n in os.listdir(workdir) if n.startswith("export.")]


def test_detectors_are_refused_in_one_line(data_dir, tmp_path):
  from tests.conftest import tiny_detector_config
  with pytest.raises(config_lib.ConfigError) as error:
    export.run(tiny_detector_config(data_dir), str(tmp_path))
  assert str(error.value).startswith("--mode=export writes semantic models only; "
                                     "model.name='mask_rcnn' is a detector")
  assert "\n" not in str(error.value) and not os.listdir(tmp_path)


def test_export_step_restores_that_checkpoint_or_names_the_saved_steps(exported):
  config, workdir, _, _, variables = exported
  config = copy.deepcopy(config)
  with config.unlocked():
    config.export.step = 3
  _, restored, step = train.restore_for_inference(export.with_export_step(config), workdir)
  assert step == 3
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(variables),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  config.export.step = 2
  with pytest.raises(FileNotFoundError,
                     match=r"checkpoint.use=2: no checkpoint at that step in .*; steps there: 3$"):
    train.restore_for_inference(export.with_export_step(config), workdir)


def test_the_graph_normalises_as_the_model_was_trained(exported):
  """An ImageNet-normalised model (model.input_normalization='imagenet') gets ImageNet's mean and
  std inside the exported function, computed here from the formula in numpy."""
  _, _, _, model, variables = exported
  images = _images(2, 32, 32, seed=5)
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  for name, x in (("imagenet", (images / np.float32(255) - mean) / std),
                  ("minus_one_to_one", images / np.float32(255) * 2 - 1)):
    got = np.asarray(export.serving_probabilities(variables, images, model=model,
                                                  normalization=name))
    _, probabilities = _softmax_reference(model.apply(variables, x.astype(np.float32),
                                                      train=False))
    np.testing.assert_allclose(got, probabilities, rtol=0, atol=1e-5)


def _dice(classes, labels, num_classes):
  """Mean Dice over the classes present in truth or prediction, label 255 not counted."""
  counted = labels != 255
  scores = []
  for k in range(num_classes):
    truth, predicted = (labels == k) & counted, (classes == k) & counted
    if truth.sum() + predicted.sum():
      scores.append(2 * np.sum(truth & predicted) / (truth.sum() + predicted.sum()))
  return float(np.mean(scores))


def test_int8_validation_dice_is_recorded_beside_the_jax_models(exported):
  """export.json's int8 Dice equals this test's Dice of the int8 model's class ids on the
  validation images (all 12 are 32x32), and the JAX model's Dice on them is beside it."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from seg_jax.data import pipeline
  config, _, out, model, variables = exported
  with open(os.path.join(out, "export.json")) as f:
    validation = json.load(f)["artefacts"]["tflite_int8"]["validation"]
  builder, _ = pipeline.prepare_dataset(config)
  examples = list(tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False)))
  images = np.stack([e["image"] for e in examples])
  labels = np.stack([e["mask"][..., 0] for e in examples])
  assert validation["images"] == len(images) == 12
  runner = tf.lite.Interpreter(
      model_path=os.path.join(out, "model_int8.tflite")).get_signature_runner()
  int8 = np.concatenate([runner(image=image[None])["classes"] for image in images])
  jax_classes = _reference(model, variables, images)[0]
  assert validation["int8"]["dice"] == pytest.approx(_dice(int8, labels, 6), abs=1e-9)
  assert validation["jax"]["dice"] == pytest.approx(_dice(jax_classes, labels, 6), abs=1e-9)
  assert validation["agreement"] == pytest.approx(np.mean(int8 == jax_classes))


def _tiny_deeplab():
  c = config_lib.with_model(config_lib.base_config(), "deeplabv3plus")
  c.model.backbone, c.model.width, c.model.stem = "resnet10", 8, "small"
  c.model.aspp_features, c.model.aspp_rates = 8, (1, 2)
  c.model.low_level_features, c.model.decoder_features = 8, 8
  return c


def test_deeplab_exports_to_onnx_and_agrees_with_jax_on_two_sizes(tmp_path):
  """Its bilinear resizes reach onnxruntime intact (they once failed in tf2onnx); references
  from the model's logits on numpy-mirrored images."""
  import onnxruntime
  from seg_jax import models
  config = _tiny_deeplab()
  model = models.build_model(config)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  apply = jax.jit(functools.partial(model.apply, train=False))
  serving = export.ServingInput(channels=3, multiples=(16, 16), fixed_size=(32, 32),
                                min_size=32)
  probabilities_fn = lambda images: export.serving_probabilities(variables, images, model=model)
  module, _ = export.tf_functions(probabilities_fn, serving)
  export.write_onnx(module, str(tmp_path / "model.onnx"))
  session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"),
                                         providers=["CPUExecutionProvider"])
  for height, width in ((32, 32), (29, 30)):
    images = _images(2, height, width, seed=height)
    # Mirrored up to 32 (min_size) and a multiple of 16: both run the model at 32x32 (one
    # compiled reference).
    reference = _mirrored_reference(functools.partial(apply, variables), images,
                                    lambda n: max(n, 32) + -max(n, 32) % 16)
    classes, onnx_probabilities = session.run(["classes", "probabilities"], {"image": images})
    _assert_agrees("onnx", classes, onnx_probabilities, reference, atol=1e-4)


def test_a_tiny_3d_unet_exports_saved_model_and_stablehlo_and_says_what_it_leaves_out(tmp_path):
  """float32 volumes [N, D, H, W, C] in, zero-padded to the model's multiples in the graph;
  the references pad with numpy and apply the model to the volumes as given (normalised
  outside the graph, as predict prepares scans)."""
  import tensorflow as tf
  from seg_jax import models
  config = config_lib.base_config(model="unet3d", dataset="shapes3d")
  config.dataset.patch_size = (8, 8, 8)
  config.model.width, config.model.depth, config.model.max_width = 4, 1, 8
  model = models.build_model(config)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 8, 1), np.float32),
                         train=False)
  serving = export.serving_input(config, channels=1, normalization="minus_one_to_one")
  assert serving.volumes and serving.multiples == (2, 2, 2)
  description = export.export_variables(model, variables, str(tmp_path), serving,
                                        info={"num_classes": config.dataset.num_classes})
  assert description["input"]["dtype"] == "float32" and description["input"]["layout"] == "NDHWC"
  assert description["normalization"]["inside_the_graph"] is False
  for filename in ("model.tflite", "model_fp16.tflite", "model_int8.tflite", "model.onnx"):
    written = any(a["file"] == filename for a in description["artefacts"].values())
    reason = description["not_exported"].get(filename)
    assert written != bool(reason) and os.path.exists(tmp_path / filename) == written
    assert reason is None or "\n" not in reason
  serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
  with open(tmp_path / "model.stablehlo", "rb") as f:
    stablehlo = jax.export.deserialize(bytearray(f.read()))
  rng = np.random.default_rng(0)
  for shape in ((2, 8, 8, 8, 1), (1, 5, 7, 9, 1)):
    volumes = rng.normal(size=shape).astype(np.float32)
    pads = [(0, 0)] + [(0, -n % 2) for n in shape[1:4]] + [(0, 0)]
    logits = model.apply(variables, np.pad(volumes, pads), train=False)
    reference = _softmax_reference(np.asarray(logits)[:, :shape[1], :shape[2], :shape[3]])
    result = serve(image=tf.constant(volumes))
    _assert_agrees("saved_model", result["classes"].numpy(), result["probabilities"].numpy(),
                   reference, atol=1e-4)
    classes, probabilities = stablehlo.call(volumes)
    _assert_agrees("stablehlo", np.asarray(classes), np.asarray(probabilities), reference,
                   atol=1e-4)


def test_a_tiny_segformer_exports_all_but_onnx_and_agrees_with_jax(tmp_path):
  """SegFormer (stride-4 logits upsampled in the graph, attention, depth-wise convs): SavedModel,
  StableHLO and the three TFLite models are written and pass their checks against the JAX model
  (export_variables raises otherwise); the SavedModel is also compared here with numpy
  references on two sizes. ONNX is left to export.onnx=False (README: tf2onnx mistranslates the
  attention's dynamic-shape matmuls)."""
  import tensorflow as tf
  from seg_jax import models
  config = config_lib.with_model(config_lib.base_config(), "segformer")
  config.model.hidden_sizes, config.model.depths = (8, 8, 16, 16), (1, 1, 1, 1)
  config.model.num_heads, config.model.decoder_hidden_size = (1, 1, 2, 2), 16
  config_lib.validate(config)
  multiple = models.input_multiple(config)
  model = models.build_model(config)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), np.zeros((1, multiple, multiple, 3), np.float32))
  # The classifier starts at std 0.01 (near-uniform probabilities): scaled up, most pixels
  # are decided by a margin, so class ids can be compared.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 300 if "classifier" in jax.tree_util.keystr(path) else v, variables)
  serving = export.ServingInput(channels=3, multiples=(multiple, multiple),
                                fixed_size=(multiple, multiple), min_size=multiple)
  info = {"model": "segformer", "num_classes": config.dataset.num_classes,
          "class_names": [str(k) for k in range(config.dataset.num_classes)]}
  record = export.export_variables(model, variables, str(tmp_path), serving, info=info,
                                   with_onnx=False)
  assert set(record["artefacts"]) == {"saved_model", "stablehlo", "tflite_float32",
                                      "tflite_fp16", "tflite_int8"}
  apply = jax.jit(functools.partial(model.apply, train=False))
  serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
  for height, width in ((multiple, multiple), (multiple - 3, multiple + 5)):
    images = _images(2, height, width, seed=height)
    reference = _mirrored_reference(functools.partial(apply, variables), images,
                                    lambda n: n + -n % multiple)
    result = serve(image=tf.constant(images))
    _assert_agrees("saved_model", result["classes"].numpy(), result["probabilities"].numpy(),
                   reference, atol=1e-4)
