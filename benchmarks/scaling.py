"""Section ``scaling``: train-step images/s on 1..k devices at a fixed per-device batch (weak scaling)."""

from __future__ import annotations

from typing import Any

import jax

from benchmarks import harness
from benchmarks import jax_side
from benchmarks.report import fmt


def run(config, ctx) -> dict[str, Any]:
  del ctx
  size, rw, dw = config.scaling.row
  rows, base = [], None
  for k in config.scaling.devices:
    if k > jax.device_count():
      rows.append({"devices": k, "skipped": f"only {jax.device_count()} devices"})
      continue
    batch = k * config.scaling.per_device_batch
    bench = jax_side.TrainBench(config, size=size, recon_width=rw, disc_width=dw, batch=batch, num_devices=k)
    t = harness.interleaved({"draem_jax": bench}, config.repeats, config.warmup)["draem_jax"]
    ips = batch / t["median_s"]
    base = base or (ips, k)
    rows.append({"devices": k, "global_batch": batch, "draem_jax": {**t, "images_per_s": ips,
                                                                    "compile_s": bench.compile_s},
                 "speedup": ips / base[0], "efficiency": ips / base[0] * base[1] / k})
  return {"setting": f"{size}x{size} widths {rw}/{dw}, {config.scaling.per_device_batch} images per device",
          "rows": rows}


def markdown(result: dict[str, Any]) -> list[str]:
  out = [f"### Scaling ({result['setting']})", "",
         "| devices | global batch | img/s | speedup | efficiency | compile s |", "|---|---|---|---|---|---|"]
  for r in result["rows"]:
    if "skipped" in r:
      out.append(f"| {r['devices']} | - | skipped: {r['skipped']} | | | |")
    else:
      out.append(f"| {r['devices']} | {r['global_batch']} | {fmt(r['draem_jax']['images_per_s'])} | "
                 f"{fmt(r['speedup'])} | {fmt(r['efficiency'])} | {fmt(r['draem_jax']['compile_s'])} |")
  return out + ["", "On a CPU the host devices share the same cores: this shows the partitioning overhead "
                "and the gain from one single-threaded device per core, not multi-accelerator scaling.", ""]
