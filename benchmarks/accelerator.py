"""Section ``accelerator``: full DRAEM (256x256, widths 128/64) on a GPU/TPU in float32 and bfloat16.

Per dtype: the train step at each configured batch and at the largest batch that fits (predicted from
the compiled steps' memory analysis at two batch sizes, then run; an out-of-memory run backs off by 1/8),
MFU against the device's dense bf16 peak, the share of the step spent in anomaly synthesis (synthesis
alone, timed at the same batch), device memory (``memory_stats``), inference images/s; then the step on
one device vs all local devices at the same per-device batch. Stops starting new measurements when
``time_budget_s`` is spent (the rest is reported as skipped). The preset ``accelerator`` runs only this;
the ``tiny`` preset runs it on a CPU at toy sizes (the test suite).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks import infer
from benchmarks import jax_side
from benchmarks.report import fmt
from draem_jax import synthesis


def _is_oom(e: Exception) -> bool:
  text = f"{type(e).__name__}: {e}"
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _train_row(config, a, dtype: str, batch: int, devices: int = 1) -> dict[str, Any]:
  size, (rw, dw) = a.image_size, a.widths
  bench = jax_side.TrainBench(config, size=size, recon_width=rw, disc_width=dw, batch=batch,
                              num_devices=devices, dtype=dtype)
  t = harness.interleaved({"draem_jax": bench}, a.repeats, 1)["draem_jax"]
  flops = jax_side.train_flops_per_image(bench.model, size)
  ips = batch / t["median_s"]
  peak, peak_source = jax_side.peak_tflops(a.peak_tflops)
  row = {"dtype": dtype, "batch": batch, "devices": devices, **t, "images_per_s": ips,
         "compile_s": bench.compile_s, "tflops_per_s": flops * ips / 1e12, "flops_per_image": flops,
         "mfu": flops * ips / 1e12 / (peak * devices) if peak else None, "peak_source": peak_source,
         "device_memory": harness.device_memory(), **bench.memory_analysis()}
  # Synthesis alone on the same batch (vmap on accelerators, as inside the step).
  images = jax.device_put(harness.normal_images(batch, size).astype("float32") / 255.0)
  synth = jax.jit(synthesis.synthesize)
  key = jax.random.key(0)
  s = harness.interleaved({"s": lambda: jax.block_until_ready(synth(key, images, bench.sources))},
                          a.repeats, 1)["s"]
  row["synthesis_s"] = s["median_s"]
  row["synthesis_share"] = s["median_s"] / t["median_s"]
  return row


def _temp_mb(config, a, dtype: str, batch: int) -> float | None:
  bench = jax_side.TrainBench(config, size=a.image_size, recon_width=a.widths[0], disc_width=a.widths[1],
                              batch=batch, num_devices=1, dtype=dtype)
  return bench.memory_analysis().get("temp_mb")


def _largest_batch(config, a, dtype: str, deadline: float) -> dict[str, Any]:
  """Predicts the largest batch from memory analysis at two sizes, then runs it (backing off on OOM)."""
  mem = harness.device_memory()
  limit_mb = mem.get("mb_limit")
  if limit_mb is None:
    batch = a.max_batch_limit
    note = f"no device memory limit known ({mem.get('reason', 'memory_stats without bytes_limit')}): " \
           f"max_batch_limit {batch} used"
  else:
    t8, t16 = _temp_mb(config, a, dtype, 8), _temp_mb(config, a, dtype, 16)
    slope = max((t16 - t8) / 8, 1e-3)
    batch = int(min(a.max_batch_limit, (0.92 * limit_mb - (t8 - 8 * slope)) // slope))
    batch = max(8, batch // 8 * 8)
    note = f"predicted from temp memory {t8:.0f} MB at 8, {t16:.0f} MB at 16, limit {limit_mb:.0f} MB"
  while time.perf_counter() < deadline:
    try:
      return {**_train_row(config, a, dtype, batch), "largest": True, "note": note}
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e) or batch <= 8:
        raise
      note += f"; batch {batch} ran out of memory"
      batch = max(8, (batch - batch // 8) // 8 * 8)
  return {"dtype": dtype, "skipped": "time budget spent before the largest batch ran", "note": note}


def run(config, ctx) -> dict[str, Any]:
  del ctx
  a = config.accelerator
  start = time.perf_counter()
  deadline = start + a.time_budget_s
  rows, infer_rows, skipped = [], [], []
  for dtype in a.dtypes:
    for batch in a.batch_sizes:
      if time.perf_counter() > deadline:
        skipped.append(f"train {dtype} batch {batch}")
        continue
      rows.append(_train_row(config, a, dtype, batch))
    if a.max_batch:
      if time.perf_counter() > deadline:
        skipped.append(f"largest batch {dtype}")
      else:
        rows.append(_largest_batch(config, a, dtype, deadline))
    if time.perf_counter() > deadline:
      skipped.append(f"inference {dtype}")
      continue
    j = infer.measure_jax(a.image_size, *a.widths, a.infer_batch, 1, a.repeats, 1,
                          dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    infer_rows.append({"dtype": dtype, "batch": a.infer_batch, **j})
  scaling = []
  n = min(a.scaling_devices or jax.local_device_count(), jax.local_device_count())
  if n > 1 and time.perf_counter() < deadline:
    per_device = a.batch_sizes[0]
    for k in (1, n):
      scaling.append(_train_row(config, a, a.dtypes[-1], per_device * k, devices=k))
  elif n == 1:
    skipped.append("scaling: one local device only")
  else:
    skipped.append("scaling (time budget)")
  return {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "setting": f"{a.image_size}x{a.image_size} widths {a.widths[0]}/{a.widths[1]}", "rows": rows,
          "infer": infer_rows, "scaling": scaling, "skipped": skipped,
          "wall_s": time.perf_counter() - start}


def json_line(result: dict[str, Any]) -> str:
  keep = ("dtype", "batch", "devices", "images_per_s", "mfu", "synthesis_share", "compile_s", "temp_mb")
  return json.dumps({"section": "accelerator", "device": result["device_kind"], "setting": result["setting"],
                     "train": [{k: r.get(k) for k in keep} for r in result["rows"]],
                     "infer": [{k: r.get(k) for k in ("dtype", "batch", "images_per_s")}
                               for r in result["infer"]],
                     "scaling": [{k: r.get(k) for k in ("devices", "batch", "images_per_s")}
                                 for r in result["scaling"]],
                     "skipped": result["skipped"]}, default=float)


def markdown(result: dict[str, Any]) -> list[str]:
  out = [f"### Accelerator: {result['device_kind']} ({result['backend']}), {result['setting']}", "",
         "| dtype | batch | devices | ms/step | img/s | TFLOP/s | MFU | synthesis share | temp MB "
         "| compile s |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"] + result["scaling"]:
    if "skipped" in r:
      out.append(f"| {r['dtype']} | largest | - | skipped: {r['skipped']} | | | | | | |")
      continue
    label = f"{r['batch']} (largest)" if r.get("largest") else str(r["batch"])
    out.append(f"| {r['dtype']} | {label} | {r['devices']} | {1e3 * r['median_s']:.1f} | "
               f"{fmt(r['images_per_s'])} | {fmt(r['tflops_per_s'])} | {fmt(r['mfu'])} | "
               f"{fmt(r['synthesis_share'])} | {fmt(r.get('temp_mb'))} | {fmt(r['compile_s'])} |")
  notes = [r["note"] for r in result["rows"] if r.get("note")]
  out += ["", "MFU against: " + (result["rows"][0]["peak_source"] if result["rows"] else "-") + "."]
  out += [f"Largest batch: {n}." for n in notes]
  out += ["", "| inference dtype | batch | img/s | compile s | device memory |", "|---|---|---|---|---|"]
  out += [f"| {r['dtype']} | {r['batch']} | {fmt(r['images_per_s'])} | {fmt(r['compile_s'])} | "
          f"{r['device_memory']} |" for r in result["infer"]]
  if result["skipped"]:
    out += ["", "Skipped: " + "; ".join(result["skipped"]) + "."]
  return out + [""]
