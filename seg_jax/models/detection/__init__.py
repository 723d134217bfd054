"""Detection building blocks with static shapes: boxes, anchors, NMS, RoIAlign.

One home for every box convention: boxes are (y0, x0, y1, x1) in input-image
pixels (see `boxes`). Everything here runs under `jit`, `vmap` and `grad`; the
Faster/Mask R-CNN models build on these ops.
"""
