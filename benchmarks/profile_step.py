"""Where a jitted step's time goes: a `jax.profiler` trace summed per model part.

  python benchmarks/profile_step.py --config=configs/mask_rcnn.py [--config.key=value ...] \
      [--step=train|eval] [--steps=3] [--trace_dir=DIR]

Traces `--steps` runs of the compiled step (after one warm-up), takes every XLA
operation's time from the trace (exclusive of the operations nested in it, e.g. a
while loop's body), and attributes each operation to a part of the model by the
name scope XLA keeps in its metadata: the flax module path (`backbone/backbone`,
`backbone/fpn`, `rpn`, `box_head`, ...) or a `jax.named_scope` of the model code
(`proposals`, `roi_sampling`, `box_roi_align`, ...); operations of no module are
the optimizer and the step's bookkeeping. Forward and gradient are counted apart
(an operation under `transpose(...)` is a gradient).

The times are thread time summed over XLA's worker threads, so on a machine with
several cores their total can exceed the wall time of the step. Prints a table on
stderr and one JSON line on stdout.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from seg_jax import xla_flags  # SEG_JAX_PLAIN_XLA=1 for plain XLA

xla_flags.set_default_xla_flags()

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import harness

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mask_rcnn.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps after one warm-up step.")
_STEP = flags.DEFINE_enum("step", "train", ["train", "eval"], "Which jitted step to profile.")
_GROUP = flags.DEFINE_enum("group_by", "part", ["part", "kind"],
                           "Sum times per model part (flax module), or per kind of operation "
                           "(convolutions by direction, norm, loss, optimizer, ...).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/seg_jax_profile", "Where the trace goes.")

# Module paths split one level deeper: a detector's `backbone` holds the ResNet and the FPN.
_SPLIT_DEEPER = ("backbone",)
# Scopes that control flow adds (lax.cond/switch, while loops), not parts of the model.
_CONTROL_FLOW = ("cond", "switch", "while", "body", "cond_fun", "body_fun")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
_CUSTOM_CALL = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*custom_call_target=\"([^\"]*)\"")


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the op_name of its metadata, for every instruction of the module."""
  names = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      names[match.group(1)] = match.group(2)
  return names


def custom_call_targets(hlo_text: str) -> dict[str, str]:
  """Instruction name -> custom call target, for the module's custom calls."""
  return {m.group(1): m.group(2) for m in map(_CUSTOM_CALL.match, hlo_text.splitlines()) if m}


def kind_of(op_name: str, target: str | None) -> str:
  """What an operation computes, across the model's parts: a oneDNN convolution by direction,
  XLA's convolutions, normalisation, depth-to-space, or the rest by the primitive that made it."""
  gradient = "transpose(" in op_name
  if target and target.startswith("seg_jax_onednn_conv_"):
    return "oneDNN conv " + target.removeprefix("seg_jax_onednn_conv_").replace("_", "-")
  direction = "gradient" if gradient else "forward"
  if "conv_general_dilated" in op_name:
    return f"XLA conv {direction}"
  if "Norm_" in op_name:
    return f"norm {direction}"
  if "upsample" in op_name:
    return f"upsample (depth-to-space) {direction}"
  if "loss" in op_name.lower():
    return f"loss {direction}"
  primitive = op_name.rsplit("/", 1)[-1]
  return f"other: {primitive} {direction}"


def part_of(op_name: str, root: str) -> tuple[str, bool]:
  """(model part, is_gradient) of an operation from its op_name, e.g.
  'jit(f)/transpose(jvp(MaskRCNN))/backbone/fpn/conv' -> ('backbone/fpn', True)."""
  gradient = "transpose(" in op_name
  segments = op_name.split("/")
  inside = [i for i, s in enumerate(segments) if re.search(rf"\b{re.escape(root)}\)*$", s)]
  if not inside:
    return "optimizer and step", gradient
  path = [s for s in segments[inside[0] + 1:-1]
          if not ("(" in s or "." in s or s in _CONTROL_FLOW or s.startswith("branch_"))]
  if not path:
    return "model (unscoped)", gradient
  depth = 2 if path[0] in _SPLIT_DEEPER and len(path) > 1 else 1
  return "/".join(path[:depth]), gradient


def exclusive_times(events: list[dict]) -> list[tuple[str, float]]:
  """(hlo_op, exclusive microseconds) of the trace's XLA operation events: each event's time
  less that of the events nested in it on the same thread."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
      by_thread[(e["pid"], e["tid"])].append(e)
  out = []
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [event, child time]
    for e in thread_events:
      while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
        done, child = stack.pop()
        out.append((done["args"]["hlo_op"], done["dur"] - child))
      if stack:
        stack[-1][1] += e["dur"]
      stack.append([e, 0.0])
    out += [(done["args"]["hlo_op"], done["dur"] - child) for done, child in stack]
  return out


def main(_):
  config = _CONFIG.value
  step = harness.synthetic_step(config, _STEP.value)
  state = step.state

  def run():
    nonlocal state
    if _STEP.value == "train":
      state, out = step.compiled(state, step.batch)
    else:
      out = step.compiled(state, step.batch)
    jax.block_until_ready(out)

  run()
  for old in glob.glob(os.path.join(_TRACE_DIR.value, "**", "*.trace.json.gz"), recursive=True):
    os.remove(old)
  walls = []
  with jax.profiler.trace(_TRACE_DIR.value, create_perfetto_trace=True):
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      run()
      walls.append(time.perf_counter() - t0)
  trace_file, = glob.glob(os.path.join(_TRACE_DIR.value, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(trace_file) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  hlo_text = step.compiled.as_text()
  with open(os.path.join(_TRACE_DIR.value, "step.hlo.txt"), "w") as f:
    f.write(hlo_text)  # to look operations up by name
  names = op_names(hlo_text)
  targets = custom_call_targets(hlo_text)
  root = type(harness.build(config).model).__name__
  totals = collections.defaultdict(float)
  unknown = 0.0
  for hlo_op, micros in exclusive_times(events):
    if hlo_op not in names:
      unknown += micros
      continue
    if _GROUP.value == "kind":
      part, _ = part_of(names[hlo_op], root)
      kind = ("optimizer and step" if part == "optimizer and step" and "loss" not in
              names[hlo_op].lower() else kind_of(names[hlo_op], targets.get(hlo_op)))
      totals[kind] += micros
    else:
      part, gradient = part_of(names[hlo_op], root)
      totals[f"{part} {'gradient' if gradient else 'forward'}"] += micros
  steps = _STEPS.value
  per_step = {name: round(us / steps / 1e3, 1)
              for name, us in sorted(totals.items(), key=lambda kv: -kv[1])}
  total_ms = sum(totals.values()) / steps / 1e3
  wall_ms = 1e3 * sum(walls) / steps
  width = max(len(k) for k in per_step)
  print(f"{'part':<{width}}  {'ms/step':>9}  {'share':>6}", file=sys.stderr)
  for name, ms in per_step.items():
    print(f"{name:<{width}}  {ms:>9.1f}  {ms / total_ms:>6.1%}", file=sys.stderr)
  print(f"{'all operations (thread time)':<{width}}  {total_ms:>9.1f}\n"
        f"{'wall time of the step':<{width}}  {wall_ms:>9.1f}", file=sys.stderr)
  print(json.dumps({
      "benchmark": f"profile_{_STEP.value}_step", "model": config.model.name,
      "batch_size": config.batch_size, "input": list(step.batch["image"].shape[1:]),
      "group_by": _GROUP.value,
      "wall_ms": round(wall_ms, 1), "op_thread_ms": round(total_ms, 1),
      "unattributed_ms": round(unknown / steps / 1e3, 1), "parts_ms": per_step,
      "trace": trace_file, "device": jax.devices()[0].device_kind, "jax": jax.__version__}))


if __name__ == "__main__":
  app.run(main)
