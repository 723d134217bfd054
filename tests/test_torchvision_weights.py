"""torchvision Mask R-CNN checkpoints through model.init_from: every array placed, and each part
(ResNet-FPN, RPN head, box head, mask head) gives torchvision's outputs on the same inputs.

The reference is tests/fixtures/make_torchvision_detector_fixture.py's tiny torchvision
Mask R-CNN and the outputs torchvision computed (no torch needed here).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import init_from
from seg_jax.models.detection import fpn as fpn_ops
from seg_jax.models.detection import mask_rcnn
from seg_jax.models.detection import roi_heads
from seg_jax.models.detection import rpn as rpn_ops

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "torchvision_mask_rcnn_w8")
FPN, HIDDEN, MASK, CLASSES = 16, 32, 16, 3  # object classes: torchvision's 4 less the background


@pytest.fixture(scope="module")
def loaded():
  model = mask_rcnn.MaskRCNN(num_classes=CLASSES, backbone="resnet18", width=8, stem="imagenet",
                             fpn_features=FPN, box_head_hidden=HIDDEN, mask_head_features=MASK)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                               train=False))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  variables, report = init_from.initialize(zeros, FIXTURE + ".safetensors")
  return variables, report, np.load(FIXTURE + "_outputs.npz")


def _close(ours, theirs, what):
  ours = np.asarray(ours)
  assert ours.shape == theirs.shape, what
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(),
                             err_msg=what)


def test_every_array_is_placed(loaded):
  _, report, _ = loaded
  assert report.layout == "torchvision_mask_rcnn" and report.placed_at == ""
  assert not report.missing and not report.shape_mismatch and not report.unused


def test_resnet_fpn_gives_torchvision_pyramid(loaded):
  variables, _, ref = loaded
  net = fpn_ops.ResNetFPN(backbone="resnet18", width=8, stem="imagenet", features=FPN)
  pyramid = net.apply({"params": variables["params"]["backbone"],
                       "batch_stats": variables["batch_stats"]["backbone"]},
                      ref["image"], train=False)
  for ours, theirs in (("p2", "p2"), ("p3", "p3"), ("p4", "p4"), ("p5", "p5"), ("p6", "pool")):
    _close(pyramid[ours], ref[theirs], f"{ours} vs {theirs}")


def test_rpn_head_gives_torchvision_scores_and_deltas_in_seg_jax_order(loaded):
  variables, _, ref = loaded
  levels = [ref[k] for k in ("p2", "p3", "p4", "p5", "pool")]
  logits, deltas = rpn_ops.RPNHead(3).apply({"params": variables["params"]["rpn"]}, levels)
  # torchvision: [1, A, H, W] and [1, A * (dx, dy, dw, dh), H, W]; seg_jax: cell-major, then
  # anchor, with (dy, dx, dh, dw).
  want_logits = np.concatenate([np.transpose(ref[f"objectness_{k}"], (0, 2, 3, 1)).reshape(1, -1)
                                for k in range(5)], axis=1)
  want_deltas = np.concatenate(
      [np.transpose(ref[f"deltas_{k}"].reshape(1, 3, 4, *ref[f"deltas_{k}"].shape[2:]),
                    (0, 3, 4, 1, 2)).reshape(1, -1, 4) for k in range(5)], axis=1)[..., [1, 0, 3, 2]]
  _close(logits, want_logits, "objectness")
  _close(deltas, want_deltas, "deltas")


def test_box_head_gives_torchvision_logits_and_object_class_deltas(loaded):
  variables, _, ref = loaded
  logits, deltas = roi_heads.BoxHead(CLASSES, HIDDEN).apply(
      {"params": variables["params"]["box_head"]}, ref["box_pooled"])
  _close(logits, ref["class_logits"], "class logits (background first in both)")
  want = ref["box_deltas"].reshape(5, CLASSES + 1, 4)[:, 1:, [1, 0, 3, 2]]  # no background box
  _close(deltas, want, "box deltas")


def test_mask_head_gives_torchvision_mask_logits(loaded):
  variables, _, ref = loaded
  logits = roi_heads.MaskHead(CLASSES, MASK).apply({"params": variables["params"]["mask_head"]},
                                                   ref["mask_pooled"])
  want = np.transpose(ref["mask_logits"][:, 1:], (0, 2, 3, 1))  # NHWC, no background channel
  _close(logits, want, "mask logits")
