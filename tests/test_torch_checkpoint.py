"""PyTorch checkpoints in by file (seg_jax/torch_checkpoint.py, the layouts of seg_jax/init_from.py).

The fixtures are torchvision's own ResNet-50 and ResNet-18 at 1/8 width with random weights and
running statistics, and their layer1..layer4 outputs in eval mode, written by torch and
torchvision (tests/fixtures/make_torch_fixtures.py); these tests do not need torch.
"""

import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import init_from
from seg_jax import torch_checkpoint
from seg_jax.models import deeplab
from seg_jax.models import resnet
from seg_jax.models import unet
from seg_jax.models.detection import mask_rcnn

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
R50 = os.path.join(FIXTURES, "torchvision_resnet50_w8")
R18 = os.path.join(FIXTURES, "torchvision_resnet18_w8")
WIDTH = 8


def _collections(variables):
  return {k: v for k, v in variables.items() if k in init_from.COLLECTIONS}


def _zeros_like_init(model, shape):
  """The model's variables as zeros, from its abstract init (traced, never compiled)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return _collections(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract))


@pytest.mark.parametrize("arch, weights", [("resnet50", R50 + ".pth"),
                                           ("resnet18", R18 + ".safetensors")])
def test_resnet_from_torchvision_gives_its_stage_outputs(arch, weights):
  reference = np.load(os.path.join(FIXTURES, os.path.basename(weights).rsplit(".", 1)[0]
                                   + "_outputs.npz"))
  model = resnet.ResNet(arch=arch, width=WIDTH, stem="imagenet", output_stride=32)
  variables, report = init_from.initialize(
      _zeros_like_init(model, reference["input"].shape), weights)
  assert report.layout == "torchvision_resnet" and report.placed_at == ""
  assert not report.missing and not report.shape_mismatch
  assert report.unused == ["params/fc/bias", "params/fc/kernel"]  # the ImageNet classifier
  features = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, reference["input"])
  for stage in range(1, 5):
    ours, theirs = np.asarray(features[f"c{stage + 1}"]), reference[f"layer{stage}"]
    assert ours.shape == theirs.shape
    # float32 through 16-50 layers: within 1e-4 of the stage's largest magnitude
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(),
                               err_msg=f"c{stage + 1} vs layer{stage}")


def test_pth_and_safetensors_hold_the_same_tensors():
  from_pth = torch_checkpoint.read_tensors(R50 + ".pth")
  from_safetensors = torch_checkpoint.read_tensors(R50 + ".safetensors")
  assert sorted(from_pth) == sorted(from_safetensors)
  for name, array in from_pth.items():
    assert array.dtype == from_safetensors[name].dtype, name
    np.testing.assert_array_equal(array, from_safetensors[name], err_msg=name)
  assert from_pth["conv1.weight"].shape == (WIDTH, 3, 7, 7)  # torch's [out, in, kh, kw]


_DEEPLAB = deeplab.DeepLabV3Plus(num_logits=3, backbone="resnet50", width=WIDTH, aspp_features=8,
                                 low_level_features=8, decoder_features=8)


@pytest.mark.parametrize("model, prefix, suffix", [
    (_DEEPLAB, "backbone", ".pth"),
    (_DEEPLAB, "backbone", ".safetensors"),
    (mask_rcnn.MaskRCNN(num_classes=2, backbone="resnet50", width=WIDTH, fpn_features=8,
                        box_head_hidden=8, mask_head_features=8, rpn_pre_nms_topk=16,
                        rpn_post_nms_topk=8, roi_num_samples=8, detections_per_image=4),
     "backbone/backbone", ".safetensors"),
    (unet.UNet(num_logits=3, backbone="resnet50", width=WIDTH), "encoder", ".pth"),
], ids=["deeplabv3plus-pth", "deeplabv3plus-safetensors", "mask_rcnn-safetensors", "unet-pth"])
def test_every_backbone_array_is_loaded_where_the_resnet_sits(model, prefix, suffix):
  variables = _zeros_like_init(model, (1, 64, 64, 3))
  new, report = init_from.initialize(variables, R50 + suffix)
  assert report.placed_at == prefix
  flat = init_from.flatten(variables)
  backbone = sorted(n for n in flat if n.split("/", 1)[1].startswith(prefix + "/"))
  assert len(backbone) == 265  # ResNet-50: 53 convs, 53 norms x (scale, bias, mean, var)
  assert sorted(n for n in report.loaded) == backbone
  assert report.unused == [f"params/{prefix}/fc/bias", f"params/{prefix}/fc/kernel"]
  # A converted array, independently: torch's bn1.running_var, and layer3.1.conv2's kernel
  # transposed from [out, in, kh, kw] to [kh, kw, in, out].
  tensors = torch_checkpoint.read_tensors(R50 + suffix)
  new_flat = init_from.flatten(new)
  np.testing.assert_array_equal(new_flat[f"batch_stats/{prefix}/BatchNorm_0/var"],
                                tensors["bn1.running_var"])
  np.testing.assert_array_equal(new_flat[f"params/{prefix}/stage3_block2/Conv_1/kernel"],
                                tensors["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(new_flat[f"params/{prefix}/stage2_block1/BatchNorm_3/scale"],
                                tensors["layer2.0.downsample.1.weight"])


class _Payload:
  """Unpickling this runs os.system(command): what a malicious checkpoint would do."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _torch_like_zip(path, index_bytes):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", index_bytes)
    archive.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("kind", ["zip_index", "bare_pickle", "in_a_state_dict"])
def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, kind):
  marker = tmp_path / "pwned"
  payload = _Payload(f"touch {marker}")
  path = str(tmp_path / "evil.pth")
  if kind == "bare_pickle":  # a legacy, non-zip torch file is a plain pickle
    with open(path, "wb") as f:
      pickle.dump({"conv1.weight": payload}, f)
  else:
    obj = payload if kind == "zip_index" else {"conv1.weight": payload}
    _torch_like_zip(path, pickle.dumps(obj, protocol=2))
  with pytest.raises(torch_checkpoint.CheckpointError) as error:
    torch_checkpoint.read_tensors(path)
  message = str(error.value)
  assert "\n" not in message and path in message
  assert ("refused" in message and "system" in message) or "not a zip" in message
  assert not marker.exists()
  # The same through model.init_from, as a user meets it
  with pytest.raises(init_from.InitFromError, match="evil.pth"):
    init_from.initialize({"params": {"w": jnp.zeros(2)}}, path)
  assert not marker.exists()


def test_unrecognised_layouts_and_hugging_face_directories(tmp_path):
  from safetensors.numpy import save_file
  path = str(tmp_path / "other.safetensors")
  save_file({"encoder.block.0.weight": np.ones((2, 2), np.float32)}, path)
  with pytest.raises(init_from.InitFromError, match="no known layout.*torchvision_resnet"):
    init_from.initialize({"params": {"w": jnp.zeros(2)}}, path)

  hf = tmp_path / "hf_model"
  hf.mkdir()
  save_file({"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)},
            str(hf / "model.safetensors"))
  (hf / "config.json").write_text(json.dumps({"model_type": "segformer", "num_labels": 3}))
  tensors, config = torch_checkpoint.read_checkpoint(str(hf))
  assert config == {"model_type": "segformer", "num_labels": 3}
  np.testing.assert_array_equal(tensors["a.weight"], np.arange(6).reshape(2, 3))
  with pytest.raises(torch_checkpoint.CheckpointError, match="without model.safetensors"):
    torch_checkpoint.read_checkpoint(str(tmp_path))


def test_shared_strided_and_typed_storages_read_as_torch_reads_them():
  """torch.save's storages at offsets with strides, shared between tensors, in several dtypes,
  against the values torch gave (fixture written by torch)."""
  import ml_dtypes
  tensors = torch_checkpoint.read_tensors(os.path.join(FIXTURES, "torch_storage_cases.pth"))
  expected = np.load(os.path.join(FIXTURES, "torch_storage_cases.npz"))
  assert sorted(tensors) == sorted(expected.files)
  for name in expected.files:
    want = expected[name]
    got = tensors[name]
    assert got.shape == want.shape, name
    if name == "bfloat16":
      assert got.dtype == ml_dtypes.bfloat16
      got = got.astype(np.float32)
    else:
      assert got.dtype == want.dtype, name
    np.testing.assert_array_equal(got, want, err_msg=name)
  tensors["tied"][0, 0] = -1.0  # each tensor is its own copy, not a view of a shared buffer
  assert tensors["transposed"][0, 0] != -1.0
