"""Section ``train``: one training step (synthesis, both nets, losses, Adam), draem_jax vs anomalib.

draem_jax: the library's ``steps.create_train_state`` and ``steps.jit_train_step`` (what ``draem_jax.train``
runs), with the training set on the devices. anomalib: ``anomalib_side.Anomalib.train_step``. The two sides
alternate call by call. FLOPs per image come from the traced model's convolutions (3 x forward) and from
XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

from typing import Any

from benchmarks import harness
from benchmarks import jax_side
from benchmarks.report import fmt, ratio_cell


def run(config, ctx) -> dict[str, Any]:
  rows = []
  for size, rw, dw, batch in config.train.rows:
    repeats = config.train.full_width_repeats if rw >= 128 else config.repeats
    devices = ctx.setup.cpu_devices if ctx.backend == "cpu" else 1
    while batch % devices:
      devices -= 1
    bench = jax_side.TrainBench(config, size=size, recon_width=rw, disc_width=dw, batch=batch,
                                num_devices=devices)
    fns = {"draem_jax": bench}
    a = ctx.anomalib
    if a.available:
      fns["anomalib"] = a.train_step(harness.normal_images(batch, size), rw, dw, harness.texture_dir(config))
    t = harness.interleaved(fns, repeats, config.warmup)
    flops = jax_side.train_flops_per_image(bench.model, size)
    xla = bench.xla_flops()
    row = {"setting": f"{size}x{size} widths {rw}/{dw} batch {batch}", "image_size": size,
           "recon_width": rw, "disc_width": dw, "batch": batch, "devices": devices,
           "flops_per_image": flops, "xla_flops_per_image": xla / batch if xla else None}
    for side, stats in t.items():
      ips = batch / stats["median_s"]
      row[side] = {**stats, "images_per_s": ips, "tflops_per_s": flops * ips / 1e12}
    row["draem_jax"].update(compile_s=bench.compile_s, init_s=bench.init_s, **bench.memory_analysis())
    row.update(harness.ratio(row["draem_jax"]["images_per_s"], row.get("anomalib", {}).get("images_per_s"),
                             a.reason))
    rows.append(row)
    del bench
  return {"rows": rows}


def markdown(result: dict[str, Any]) -> list[str]:
  out = ["### Train step (synthesis + both nets + losses + Adam)", "",
         "| setting | draem_jax ms/step (min-max) | img/s | compile s | anomalib ms/step (min-max) | img/s "
         "| ratio (>1: draem_jax faster) |", "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    j, a = r["draem_jax"], r.get("anomalib", {})
    anomalib = (f"{1e3 * a['median_s']:.0f} ({1e3 * a['min_s']:.0f}-{1e3 * a['max_s']:.0f}) | "
                f"{fmt(a['images_per_s'])}" if a else "- | -")
    out.append(f"| {r['setting']}, {r['devices']} device(s) | {1e3 * j['median_s']:.0f} "
               f"({1e3 * j['min_s']:.0f}-{1e3 * j['max_s']:.0f}) | {fmt(j['images_per_s'])} | "
               f"{fmt(j['compile_s'])} | {anomalib} | {ratio_cell(r)} |")
  out += ["", "FLOPs per image (3 x forward conv FLOPs of the traced model; XLA's cost analysis of the "
          "whole step in brackets): " + "; ".join(
              f"{r['setting']}: {r['flops_per_image'] / 1e9:.2f} GFLOP"
              + (f" ({r['xla_flops_per_image'] / 1e9:.2f})" if r.get("xla_flops_per_image") else "")
              for r in result["rows"]), ""]
  return out
