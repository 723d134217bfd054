"""Latency per image of each exported artefact beside --mode=predict; one JSON line.

  python main.py --workdir=runs/unet --mode=export
  python benchmarks/export_latency.py --workdir=runs/unet [--sizes=64,256] [--repeats=20]

For every size S (square uint8 RGB images of embedded-dataset scenes): the median seconds per
image (batch 1, after a warm-up call) of ONNX (onnxruntime), the SavedModel (TF), StableHLO
(`jax.export.deserialize`) and, at their fixed size only, the three TFLite models
(interpreter with as many threads as CPUs); and `predict.run`'s seconds per image on
`repeats` files of that size, reading them and writing label and overlay PNGs (compilation
excluded; tiles of predict.tile_size, so images smaller than a tile are padded to it, in
device calls of predict.batch_size=4 tiles, the default, and of 1). Ratios are predict's time
(batch 4) over the artefact's. Also the
artefacts' sizes in bytes, from export.json.
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

from absl import app
from absl import flags
import numpy as np
from PIL import Image

_WORKDIR = flags.DEFINE_string("workdir", None, "A run exported with --mode=export.",
                               required=True)
_SIZES = flags.DEFINE_list("sizes", ["64", "256"], "Square image sizes (multiples of the "
                           "model's input multiple).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls (and predict files) per size.")


def _median_seconds(fn, image: np.ndarray, repeats: int) -> float:
  fn(image)  # warm-up: compilation, allocation
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn(image)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _runners(out: str) -> dict:
  import jax
  import onnxruntime
  import tensorflow as tf
  session = onnxruntime.InferenceSession(os.path.join(out, "model.onnx"),
                                         providers=["CPUExecutionProvider"])
  serve = tf.saved_model.load(os.path.join(out, "saved_model")).signatures["serving_default"]
  with open(os.path.join(out, "model.stablehlo"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  runners = {
      "onnx": lambda x: session.run(["classes"], {"image": x})[0],
      "saved_model": lambda x: serve(image=tf.constant(x))["classes"].numpy(),
      "stablehlo": lambda x: np.asarray(exported.call(x)[0]),
  }
  for name in ("model.tflite", "model_fp16.tflite", "model_int8.tflite"):
    runner = tf.lite.Interpreter(model_path=os.path.join(out, name),
                                 num_threads=os.cpu_count()).get_signature_runner()
    runners[name] = lambda x, runner=runner: runner(image=x)["classes"]
  return runners


def _predict_seconds(workdir: str, images: list[np.ndarray], batch_size: int) -> float:
  from seg_jax import predict
  from seg_jax import workdir as workdir_lib
  config = workdir_lib.read_config(workdir)
  with tempfile.TemporaryDirectory() as tmp:
    for i, image in enumerate(images):
      Image.fromarray(image).save(os.path.join(tmp, f"{i:03d}.png"))
    config.predict.input = tmp
    config.predict.output = os.path.join(tmp, "out")
    config.predict.batch_size = batch_size
    return predict.run(config, workdir)["seconds_per_image"]


def main(_):
  from seg_jax.data.builders import shapes
  out = os.path.join(_WORKDIR.value, "export")
  with open(os.path.join(out, "export.json")) as f:
    description = json.load(f)
  fixed = description["input"]["tflite_shape"][1]
  runners = _runners(out)
  rng = np.random.default_rng(0)
  result = {"benchmark": "export_latency", "model": description["model"],
            "cpus": os.cpu_count(), "sizes_bytes": {a["file"]: a["bytes"] for a in
                                                     description["artefacts"].values()}}
  for size in map(int, _SIZES.value):
    images = [shapes.generate_scene(rng, size)["image"] for _ in range(_REPEATS.value)]
    seconds = {"predict": _predict_seconds(_WORKDIR.value, images, batch_size=4),
               "predict_batch1": _predict_seconds(_WORKDIR.value, images, batch_size=1)}
    for name, fn in runners.items():
      if name.endswith(".tflite") and size != fixed:
        continue
      seconds[name] = _median_seconds(fn, images[0][None], _REPEATS.value)
    result[f"seconds_per_image_{size}"] = {k: round(v, 5) for k, v in seconds.items()}
    result[f"predict_over_artefact_{size}"] = {
        k: round(seconds["predict"] / v, 2) for k, v in seconds.items() if k != "predict"}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
