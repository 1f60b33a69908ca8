"""Section ``train_cli``: images/s through ``train.train_and_evaluate`` on the demo recipe (what a user gets).

The whole training path (step loop, metric checks and logging, checkpoints, validation) on the demo data,
rates from the run's own ``metrics.jsonl`` (images/s since the first logged step, so compilation is
excluded); then anomalib's bare step at the same size, widths and batch for the same number of steps.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from benchmarks import harness
from benchmarks.report import fmt, ratio_cell
from draem_jax import recipes
from draem_jax import train


def run(config, ctx) -> dict[str, Any]:
  c = recipes.demo()
  spe = -(-64 // c.batch_size)  # the demo's 64 training images (less the held-out ones)
  c.num_epochs = max(2, -(-config.train_cli.steps // spe))
  c.log_every_steps = max(1, min(c.log_every_steps, config.train_cli.steps // 4))
  c.eval.num_visualizations = 0
  if config.preset == "tiny":
    tiny = recipes.tiny()
    c.image_size, c.model.recon_width, c.model.disc_width = tiny.image_size, 4, 4
  with tempfile.TemporaryDirectory(prefix="draem_bench_cli_") as workdir:
    t0 = time.perf_counter()
    results = train.train_and_evaluate(c, workdir)
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f if line.strip()]
  rated = [r for r in records if "images_per_sec" in r]
  steps = max(r["step"] for r in records)
  j = {"images_per_s": rated[-1]["images_per_sec"] if rated else None, "steps": steps, "wall_s": wall,
       "image_auroc": results.get("image_auroc")}
  row = {"setting": f"demo recipe {c.image_size}x{c.image_size} widths {c.model.recon_width}/"
                    f"{c.model.disc_width} batch {c.batch_size}", "draem_jax": j}
  a = ctx.anomalib
  if a.available:
    step = a.train_step(harness.normal_images(c.batch_size, c.image_size), c.model.recon_width,
                        c.model.disc_width, harness.texture_dir(config))
    t = harness.interleaved({"anomalib": step}, max(steps // 2, 1), 2)["anomalib"]
    row["anomalib"] = {**t, "images_per_s": c.batch_size / t["median_s"]}
  row.update(harness.ratio(j["images_per_s"], row.get("anomalib", {}).get("images_per_s"), a.reason))
  return {"rows": [row]}


def markdown(result: dict[str, Any]) -> list[str]:
  r = result["rows"][0]
  j, a = r["draem_jax"], r.get("anomalib", {})
  return ["### Training through the library's train loop (train.train_and_evaluate)", "",
          "| setting | draem_jax img/s (steps, wall incl. compile and eval) | anomalib bare step img/s "
          "| ratio |",
          "|---|---|---|---|",
          f"| {r['setting']} | {fmt(j['images_per_s'])} ({j['steps']} steps, {fmt(j['wall_s'])} s) | "
          f"{fmt(a.get('images_per_s'))} | {ratio_cell(r)} |", ""]
