"""torchvision's Mask R-CNN / Faster R-CNN state dicts as `MaskRCNN` variables (`model.init_from`).

  python main.py --config=configs/mask_rcnn.py ... \
      --config.model.init_from=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth

A checkpoint of `torchvision.models.detection.maskrcnn_resnet50_fpn` (or `fasterrcnn_*`,
`_v1` key names and the older ones alike) maps onto `MaskRCNN` with `backbone=resnet50`,
`width=64`, `stem=imagenet`, `fpn_features=256`, `box_head_hidden=1024`,
`mask_head_features=256` and `model.input_normalization=imagenet`:

- `backbone.body.*`: the ResNet (`init_from.convert_torchvision_resnet`); torchvision's
  pretrained detectors use frozen batch norm, so set `model.frozen_backbone_norm=True`;
- `backbone.fpn.inner_blocks.i` / `layer_blocks.i`: `backbone/fpn/lateral{i+2}` / `output{i+2}`;
- `rpn.head.conv`, `cls_logits`, `bbox_pred`: `rpn/conv`, `objectness`, `deltas` (the anchor
  order per cell, aspect ratio first, is the same; the deltas go from torchvision's
  (dx, dy, dw, dh) to seg_jax's (dy, dx, dh, dw));
- `roi_heads.box_head.fc6/fc7`: `box_head/fc1/fc2` (fc6's input from torchvision's
  channel-first flattening of the 7x7 pooled map to seg_jax's channel-last one);
- `roi_heads.box_predictor`: `box_head/cls` and `box_head/box` (torchvision also regresses a
  box for the background class, which seg_jax does not have: dropped);
- `roi_heads.mask_head` (4 convs), `mask_predictor.conv5_mask` (the 2x2 stride-2 transposed
  conv, as `LearnedUpsample2x`'s 1x1 conv to 4 C channels) and `mask_fcn_logits` (its
  background channel dropped): `mask_head/...`.

A checkpoint trained on another number of classes (COCO's 91) loads everything but the
class-dependent layers (`box_head/cls`, `box_head/box`, `mask_head/predictor`), which stay at
their initial values and are listed in the report: the usual start for fine-tuning.
What does not carry over: torchvision's anchors sit at cell corners rounded to whole pixels,
seg_jax's at cell centres (`anchors.py`), so proposals shift by half a stride until fine-tuned.
"""

from __future__ import annotations

import re

import numpy as np

from seg_jax import init_from

_BODY = "backbone.body."
_FPN = re.compile(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)(?:\.0)?\.(weight|bias)")
_RPN = re.compile(r"rpn\.head\.(conv|cls_logits|bbox_pred)(?:\.0\.0)?\.(weight|bias)")
_MASK_CONV = re.compile(r"roi_heads\.mask_head\.(?:(\d)\.0|mask_fcn(\d))\.(weight|bias)")
_LEAF = {"weight": "kernel", "bias": "bias"}
# torchvision's deltas (dx, dy, dw, dh) in seg_jax's order (dy, dx, dh, dw).
_YX_ORDER = np.array([1, 0, 3, 2])


def recognise(tensors: init_from.Tensors) -> bool:
  return "rpn.head.cls_logits.weight" in tensors and (
      "roi_heads.box_predictor.cls_score.weight" in tensors)


def _yx_rows(array: np.ndarray) -> np.ndarray:
  """Rows in groups of 4 deltas, each group reordered from (dx, dy, dw, dh) to (dy, dx, dh, dw)."""
  groups = array.reshape((-1, 4) + array.shape[1:])
  return groups[:, _YX_ORDER].reshape(array.shape)


def _conv(out: dict, module: str, leaf: str, value: np.ndarray) -> None:
  init_from.set_path(out, f"params/{module}/{_LEAF[leaf]}",
                     init_from.conv_kernel(value) if leaf == "weight" else value)


def _dense(out: dict, module: str, leaf: str, value: np.ndarray) -> None:
  init_from.set_path(out, f"params/{module}/{_LEAF[leaf]}",
                     init_from.dense_kernel(value) if leaf == "weight" else value)


def convert(tensors: init_from.Tensors, hf_config: dict | None = None) -> dict:
  """The variables of `MaskRCNN` (module docstring), nested as flax names them."""
  del hf_config
  out: dict = {}
  body = {name[len(_BODY):]: value for name, value in tensors.items() if name.startswith(_BODY)}
  for collection, tree in init_from.convert_torchvision_resnet(body).items():
    out.setdefault(collection, {})["backbone"] = {"backbone": tree}
  for name, value in tensors.items():
    value = np.asarray(value)
    if name.startswith(_BODY) or name.endswith("num_batches_tracked"):
      continue
    if m := _FPN.fullmatch(name):
      kind, index, leaf = m.groups()
      _conv(out, f"backbone/fpn/{'lateral' if kind == 'inner' else 'output'}{int(index) + 2}",
            leaf, value)
    elif m := _RPN.fullmatch(name):
      part, leaf = m.groups()
      if part == "bbox_pred":
        value = _yx_rows(value)
      _conv(out, "rpn/" + {"conv": "conv", "cls_logits": "objectness", "bbox_pred": "deltas"}[part],
            leaf, value)
    elif name == "roi_heads.box_head.fc6.weight":
      hidden, inputs = value.shape
      channels = inputs // 49  # the 7x7 RoIAlign output, flattened channel-first
      kernel = value.reshape(hidden, channels, 7, 7).transpose(2, 3, 1, 0).reshape(inputs, hidden)
      init_from.set_path(out, "params/box_head/fc1/kernel", np.ascontiguousarray(kernel))
    elif name in ("roi_heads.box_head.fc6.bias", "roi_heads.box_head.fc7.bias",
                  "roi_heads.box_head.fc7.weight"):
      _dense(out, f"box_head/{'fc1' if '.fc6.' in name else 'fc2'}", name.rsplit(".", 1)[1], value)
    elif name.startswith("roi_heads.box_predictor.cls_score."):
      _dense(out, "box_head/cls", name.rsplit(".", 1)[1], value)
    elif name.startswith("roi_heads.box_predictor.bbox_pred."):
      _dense(out, "box_head/box", name.rsplit(".", 1)[1], _yx_rows(value[4:]))  # no background box
    elif m := _MASK_CONV.fullmatch(name):
      new_index, old_index, leaf = m.groups()
      number = int(new_index) + 1 if new_index is not None else int(old_index)
      _conv(out, f"mask_head/conv{number}", leaf, value)
    elif name == "roi_heads.mask_predictor.conv5_mask.weight":
      # [in, out, 2, 2]: output pixel (2i + a, 2j + b) gets channel (a * 2 + b) * out + o of
      # the 1x1 conv before depth-to-space (layers.depth_to_space).
      c_in, c_out = value.shape[:2]
      kernel = value.transpose(0, 2, 3, 1).reshape(1, 1, c_in, 4 * c_out)
      init_from.set_path(out, "params/mask_head/upsample/conv/kernel", np.ascontiguousarray(kernel))
    elif name == "roi_heads.mask_predictor.conv5_mask.bias":
      init_from.set_path(out, "params/mask_head/upsample/conv/bias", np.tile(value, 4))
    elif name.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
      _conv(out, "mask_head/predictor", name.rsplit(".", 1)[1], value[1:])  # no background
    else:
      init_from.set_path(out, f"params/unrecognised/{name.replace('.', '/')}", value)
  return out


init_from.register_layout("torchvision_mask_rcnn", recognise, convert)
