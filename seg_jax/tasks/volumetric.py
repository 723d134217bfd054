"""Volumetric segmentation (CT, MRI): patch losses in training, sliding windows over whole cases
in evaluation, scored per case in mm (Dice, HD95, NSD; `seg_jax/surface_metrics.py`).

Training is the semantic task's: the same losses (rank-agnostic) on [B, d, h, w] patches.
Evaluation does not go through the per-batch eval step: each validation case is segmented
whole by `segment_volume` (windows of `dataset.patch_size`, overlapping by
`dataset.eval_overlap`, Gaussian-weighted, optionally averaged over flips, in batches of
`dataset.eval_window_batch` windows per device call), then scored on the host.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seg_jax import parallel
from seg_jax import surface_metrics
from seg_jax import tiling
from seg_jax import visualize
from seg_jax.ops import conv as conv_ops
from seg_jax.tasks.semantic import SemanticTask

# The 8 combinations of flips of the three spatial axes of [B, D, H, W, C] (TTA).
FLIPS = tuple(axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r))


def window_probabilities(model, variables, windows: jax.Array, *, tta: bool) -> jax.Array:
  """Class probabilities [B, d, h, w, K] of windows [B, d, h, w, C]; with `tta`, the mean over
  the 8 axis flips (each flipped back). One binary logit x gives [1 - sigmoid x, sigmoid x]."""
  def probabilities(x):
    logits = model.apply(variables, x, train=False)
    if logits.shape[-1] == 1:
      p = jax.nn.sigmoid(logits)
      return jnp.concatenate([1 - p, p], axis=-1)
    return jax.nn.softmax(logits, axis=-1)

  if not tta:
    return probabilities(windows)
  total = 0.0
  for axes in FLIPS:
    flipped = jnp.flip(windows, axes) if axes else windows
    out = probabilities(flipped)
    total = total + (jnp.flip(out, axes) if axes else out)
  return total / len(FLIPS)


def segment_volume(image: np.ndarray, window_fn: Callable[[np.ndarray], np.ndarray], *,
                   window: tuple[int, int, int], overlap: float, batch: int, num_classes: int
                   ) -> np.ndarray:
  """uint8 [D, H, W] class ids of a whole volume [D, H, W, C] by sliding windows.

  `window_fn` maps windows [batch, *window, C] to probabilities [batch, *window, K]. Windows
  follow `tiling.plan_windows` (row-major), zero-padded past the volume where it is smaller
  than a window; the last batch is padded with repeats of its first window (ignored). Host
  memory: one slab of window-deep sums ([window[0], H, W, K]) and one batch of windows.
  """
  plan = tiling.plan_windows(image.shape[:3], window, overlap)
  blender = tiling.SlabBlender(plan, num_classes)
  labels = np.zeros(image.shape[:3], np.uint8)
  positions = list(plan.positions())
  for start in range(0, len(positions), batch):
    corners = positions[start:start + batch]
    windows = np.stack([tiling.extract_window(image, c, window) for c in corners])
    if len(windows) < batch:
      windows = np.concatenate([windows, np.repeat(windows[:1], batch - len(windows), axis=0)])
    probabilities = np.asarray(window_fn(windows))
    for i in range(len(corners)):
      finished = blender.add(probabilities[i])
      if finished is not None:
        first, slab = finished
        labels[first:first + len(slab)] = np.argmax(slab, axis=-1)
  return labels


class VolumetricTask(SemanticTask):
  """The semantic task's loss on patches; sliding-window evaluation of whole cases."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self._window_steps = {}

  def window_step(self, model, mesh, *, tta: bool | None = None):
    """The jitted windows -> probabilities function (built once per `tta`; default
    dataset.eval_tta), windows sharded on `data`."""
    c = self.config
    tta = c.dataset.eval_tta if tta is None else tta
    if tta not in self._window_steps:

      def step(variables, windows):
        with jax.default_matmul_precision(c.matmul_precision), conv_ops.backend(c.conv_backend):
          return window_probabilities(model, variables, windows, tta=tta)

      self._window_steps[tta] = jax.jit(step, in_shardings=(parallel.replicated(mesh),
                                                            parallel.batch_sharding(mesh)),
                                        out_shardings=parallel.replicated(mesh))
    return self._window_steps[tta]

  def evaluate_cases(self, model, variables, mesh, cases, class_names: list[str]
                     ) -> tuple[dict, dict | None]:
    """Scores of whole `cases` (`volumes.VolumeCase`) and the first case's arrays for pictures."""
    d = self.config.dataset
    if jax.process_count() > 1 or d.eval_window_batch % jax.device_count():
      # Every process would hold every window; multi-host volume eval is not built yet.
      raise ValueError(f"volumetric evaluation runs in one process with dataset.eval_window_batch"
                       f" a multiple of the {jax.device_count()} devices; got "
                       f"{jax.process_count()} processes, eval_window_batch={d.eval_window_batch}")
    step = self.window_step(model, mesh)
    window_fn = lambda windows: step(variables, parallel.host_batch_to_global(
        {"image": windows}, mesh)["image"])
    per_case, visuals = [], None
    for case in cases:
      labels = segment_volume(case.image, window_fn, window=tuple(d.patch_size),
                              overlap=d.eval_overlap, batch=d.eval_window_batch,
                              num_classes=max(d.num_classes, 2))
      per_case.append(surface_metrics.case_scores(
          labels, case.mask, num_classes=d.num_classes, spacing=case.spacing,
          tolerance_mm=d.nsd_tolerance_mm, ignore_label=d.ignore_label))
      if visuals is None:
        visuals = {"image": case.image, "mask": case.mask, "prediction": labels,
                   "spacing": case.spacing}
    return surface_metrics.dataset_scores(per_case), visuals

  # -------------------------------------------------------------- host

  def scalars(self, scores: dict, class_names: list[str]) -> dict[str, float]:
    """eval/dice/<class> (mean over cases), eval/dice_dataset/<class> (voxels summed over
    cases), eval/hd95/<class> and eval/nsd/<class> (foreground), eval/dice_foreground."""
    out = {"eval/dice_foreground": scores["mean_dice_foreground"]}
    for c, name in enumerate(class_names):
      out[f"eval/dice/{name}"] = scores["dice"][c]
      out[f"eval/dice_dataset/{name}"] = scores["dice_dataset"][c]
      if c:
        out[f"eval/hd95/{name}"] = scores["hd95"][c]
        out[f"eval/nsd/{name}"] = scores["nsd"][c]
    return {k: float(v) for k, v in out.items()}

  def headline(self, scores: dict) -> str:
    return (f"foreground dice {scores['mean_dice_foreground']:.4f} over "
            f"{scores['num_cases']} cases")

  def table(self, scores: dict, class_names: list[str]) -> str:
    lines = [f"{'class':<16}{'dice':>8}{'dice(ds)':>10}{'hd95 mm':>9}{'nsd':>8}"]
    for c, name in enumerate(class_names):
      lines.append(f"{name:<16}{scores['dice'][c]:>8.4f}{scores['dice_dataset'][c]:>10.4f}"
                   f"{scores['hd95'][c]:>9.2f}{scores['nsd'][c]:>8.4f}")
    lines.append(f"foreground dice (mean over classes of the mean over cases) "
                 f"{scores['mean_dice_foreground']:.4f}")
    return "\n".join(lines)

  def picture(self, visuals: dict, class_names: list[str]) -> np.ndarray:
    """Mid-slices (axial, coronal, sagittal) of the first case: image | truth | prediction."""
    c = self.config.dataset
    image = visualize.window_intensities(visuals["image"][..., :1])
    return visualize.volume_panels(image, visuals["mask"], visuals["prediction"], c.num_classes,
                                   spacing=visuals["spacing"], ignore_label=c.ignore_label,
                                   class_names=class_names)
