"""Section ``infer``: inference images/s (both nets in eval mode, anomaly map, image score) and memory."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks import jax_side
from benchmarks.report import fmt, ratio_cell
from draem_jax import models
from draem_jax import parallel
from draem_jax import rundir
from draem_jax import steps


def measure_jax(size: int, rw: int, dw: int, batch: int, devices: int, repeats: int, warmup: int,
                dtype=jnp.float32) -> dict[str, Any]:
  """draem_jax's jitted ``steps.make_infer_fn`` on uint8 images; stats, compile time and host RSS."""
  mesh = jax_side.make_mesh(devices)
  model = models.DRAEM(recon_width=rw, disc_width=dw, dtype=dtype)
  abstract = rundir.abstract_variables(model, size)
  variables = jax.jit(lambda: jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), abstract),
                      out_shardings=parallel.replicated(mesh))()
  images = jax.device_put(harness.normal_images(batch, size), parallel.data_sharding(mesh))
  with harness.PeakRss() as rss:
    t0 = time.perf_counter()
    compiled = jax.jit(steps.make_infer_fn(model)).lower(variables, images).compile()
    compile_s = time.perf_counter() - t0
    t = harness.interleaved({"draem_jax": lambda: jax.block_until_ready(compiled(variables, images))},
                            repeats, warmup)["draem_jax"]
  return {**t, "compile_s": compile_s, "images_per_s": batch / t["median_s"],
          "host_rss_peak_delta_mb": rss.peak_delta_mb, "device_memory": harness.device_memory()}


def _anomalib(a, size: int, rw: int, dw: int, batch: int, repeats: int, warmup: int) -> dict[str, Any]:
  model = a.model(rw, dw).eval()
  x = a.to_torch(harness.normal_images(batch, size))

  def call():
    with a.torch.inference_mode():
      model(x)
  with harness.PeakRss() as rss:
    t = harness.interleaved({"anomalib": call}, repeats, warmup)["anomalib"]
  return {**t, "images_per_s": batch / t["median_s"], "host_rss_peak_delta_mb": rss.peak_delta_mb}


def run(config, ctx) -> dict[str, Any]:
  rows = []
  a = ctx.anomalib
  for size, rw, dw, batch in config.infer.rows:
    devices = ctx.setup.cpu_devices if ctx.backend == "cpu" else 1
    while batch % devices:
      devices -= 1
    j = measure_jax(size, rw, dw, batch, devices, config.repeats, config.warmup)
    row = {"setting": f"{size}x{size} widths {rw}/{dw} batch {batch}", "devices": devices, "draem_jax": j}
    if a.available:
      row["anomalib"] = harness.guard(
          lambda s=size, r=rw, d=dw, b=batch: _anomalib(a, s, r, d, b, config.repeats, config.warmup))
    row.update(harness.ratio(j["images_per_s"], row.get("anomalib", {}).get("images_per_s"),
                             a.reason or row.get("anomalib", {}).get("error", "")))
    rows.append(row)
  return {"rows": rows}


def markdown(result: dict[str, Any]) -> list[str]:
  out = ["### Inference (eval mode, anomaly map + image score)", "",
         "| setting | draem_jax img/s | compile s | host RSS peak +MB | anomalib img/s | anomalib RSS +MB "
         "| ratio |",
         "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    j, a = r["draem_jax"], r.get("anomalib", {})
    out.append(f"| {r['setting']}, {r['devices']} device(s) | {fmt(j['images_per_s'])} | "
               f"{fmt(j['compile_s'])} | "
               f"{fmt(j['host_rss_peak_delta_mb'])} | {fmt(a.get('images_per_s'))} | "
               f"{fmt(a.get('host_rss_peak_delta_mb'))} | {ratio_cell(r)} |")
  memory = "; ".join(str(r["draem_jax"]["device_memory"]) for r in result["rows"][:1])
  return out + ["", "The draem_jax RSS peak includes compiling the inference program (PyTorch compiles "
                f"nothing). Device memory: {memory}", ""]
