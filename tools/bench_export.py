r"""Throughput of an exported run on this machine: onnxruntime vs the StableHLO file vs predict's JAX path.

  python tools/bench_export.py --workdir=workdirs/bottle --stem=deploy/bottle [--batch=8 --repeats=5]

Expects ``STEM.stablehlo`` and ``STEM.onnx`` from ``python -m draem_jax.export --format=all
--output=STEM`` (a missing one is left out). Every path gets the same uint8 batch at the model's resolution
(random pixels: the cost does not depend on them). "load" is the time from nothing to the first result
minus one batch (reading the file or checkpoint, building the session or compiling); "img/s" is the
median of ``--repeats`` batches after the first. Prints a Markdown table (for BENCHMARKS.md) and the
largest difference between the paths' maps.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

flags.DEFINE_string("workdir", None, "The exported run (for predict's path).")
flags.DEFINE_string("stem", None, "Exported files without suffix.")
flags.DEFINE_integer("batch", 8, "Images per call.")
flags.DEFINE_integer("repeats", 5, "Timed calls after the first.")
FLAGS = flags.FLAGS


def _time(fn, x, repeats):
  t0 = time.perf_counter()
  first = fn(x)
  load = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn(x)
    times.append(time.perf_counter() - t0)
  batch = statistics.median(times)
  return first, load - batch, len(x) / batch


def main(argv):
  del argv
  from draem_jax import export  # pylint: disable=g-import-not-at-top
  from draem_jax import inference
  from draem_jax import rundir
  from draem_jax import validation
  from draem_jax import writers

  writers.quiet_library_logs()
  logging.set_verbosity(logging.WARNING)

  rows, maps = [], {}
  config = rundir.load_config(FLAGS.workdir)
  s = int(config.image_size)
  x = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, s, s, 3), dtype=np.uint8)

  state = {}

  def predict_path(images):  # restores and compiles on the first call, so that is timed as its load
    if not state:
      model, variables, _, _ = validation.restore_selected(FLAGS.workdir, config)
      state["inf"] = inference.Inferencer(model, variables, config, batch_size=len(images))
    return {"anomaly_map": state["inf"].model_size(images)[0]}

  paths = [("predict (JAX, checkpoint)", None, predict_path)]
  for fmt in ("stablehlo", "onnx"):
    path = FLAGS.stem + export.SUFFIXES[fmt]
    if os.path.exists(path):
      holder = {}

      def run(images, path=path, holder=holder):
        if not holder:
          holder["fn"] = export.load(path)
        return holder["fn"](images)

      name = "onnxruntime (ONNX file)" if fmt == "onnx" else "jax (StableHLO file)"
      paths.append((name, path, run))
  for name, path, fn in paths:
    out, load, ips = _time(fn, x, FLAGS.repeats)
    maps[name] = out["anomaly_map"]
    size = f"{os.path.getsize(path) / 2**20:.1f} MiB" if path else "checkpoint"
    rows.append(f"| {name} | {size} | {load:.1f} s | {ips:.2f} |")
  print(f"batch {FLAGS.batch} x {s}x{s}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  print("| path | file | load | img/s |\n|---|---|---|---|")
  print("\n".join(rows))
  ref = maps[paths[0][0]]
  for name, m in maps.items():
    print(f"max |map - predict| {name}: {float(np.max(np.abs(m - ref))):.2e}")
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "stem"])
  sys.exit(app.run(main))
