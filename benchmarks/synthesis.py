"""Section ``synthesis``: anomaly synthesis images/s vs anomalib's PerlinAnomalyGenerator, per augmenter."""

from __future__ import annotations

import time
from typing import Any

import jax

from benchmarks import harness
from benchmarks.report import fmt, ratio_cell
from draem_jax import augment
from draem_jax import geometry
from draem_jax import noise
from draem_jax import synthesis


def _per_part(config, size: int, batch: int = 8) -> list[dict[str, Any]]:
  """ms per image of each augmenter, the Perlin mask, the normal-image rotation and the whole synthesis.

  One example at a time (``lax.map``), as ``synthesize`` runs on CPU. Process CPU time per image, which
  other jobs on a shared machine disturb less than wall time.
  """
  images = jax.random.uniform(jax.random.key(0), (batch, size, size, 3))
  keys = jax.random.split(jax.random.key(1), batch)
  sources = jax.device_put(harness.textures(config, size))
  parts = [(f"augment {i}: {fn.__name__}", lambda k, x, fn=fn: jax.lax.map(lambda a: fn(*a), (k, x)))
           for i, fn in enumerate(augment.AUGMENTERS)]
  parts += [
      ("Perlin mask (incl. its rotation)", lambda k, x: jax.lax.map(
          lambda kk: noise.perlin_mask(kk, (size, size), threshold=0.5, max_log2_res=6,
                                       rotate_degrees=90.0), k)),
      # A traced angle, as in training: a constant one lets XLA fold the sampling coordinates.
      ("normal-image rotation", lambda k, x: jax.lax.map(
          lambda a: geometry.rotate(a[1], jax.random.uniform(a[0], (), minval=-45.0, maxval=45.0)),
          (k, x))),
      ("3 random augmenters", lambda k, x: augment.random_augment(k[0], x, sequential=True)),
      ("whole synthesis (50 % anomalies, 30 % rotated)",
       lambda k, x: synthesis.synthesize(k[0], x, sources)),
  ]
  rows = []
  for name, fn in parts:
    f = jax.jit(fn)
    jax.block_until_ready(f(keys, images))
    t = harness.interleaved({"draem_jax": lambda f=f: jax.block_until_ready(f(keys, images))},
                            config.repeats, 0)["draem_jax"]
    rows.append({"part": name, "ms_per_image_cpu": 1e3 * t["cpu_median_s"] / batch,
                 "ms_per_image_wall": 1e3 * t["median_s"] / batch})
  return rows


def _row(config, ctx, sources, size: int, batch: int) -> dict[str, Any]:
  images = jax.device_put(harness.normal_images(batch, size).astype("float32") / 255.0)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = jax.jit(synthesis.synthesize).lower(key, images, sources).compile()
  compile_s = time.perf_counter() - t0
  counter = iter(range(1 << 30))
  fns = {"draem_jax": lambda: jax.block_until_ready(
      compiled(jax.random.fold_in(key, next(counter)), images, sources))}
  a = ctx.anomalib
  if a.available:
    gen = a.generator(harness.texture_dir(config))
    x = a.to_torch(harness.normal_images(batch, size))

    def anomalib_call():
      with a.torch.no_grad():
        gen(x)
    fns["anomalib"] = anomalib_call
  t = harness.interleaved(fns, config.repeats, config.warmup)
  row = {"setting": f"{size}x{size} batch {batch}", "image_size": size, "batch": batch}
  for side, stats in t.items():
    row[side] = {**stats, "images_per_s": batch / stats["median_s"],
                 "images_per_cpu_s": batch / stats["cpu_median_s"]}
  row["draem_jax"]["compile_s"] = compile_s
  row.update(harness.ratio(row["draem_jax"]["images_per_cpu_s"],
                           row.get("anomalib", {}).get("images_per_cpu_s"), a.reason))
  return row


def run(config, ctx) -> dict[str, Any]:
  size = config.synthesis.image_size
  sources = jax.device_put(harness.textures(config, size))
  out = {"rows": [_row(config, ctx, sources, size, b) for b in config.synthesis.batch_sizes]}
  if config.synthesis.per_augmenter:
    out["parts"] = _per_part(config, size)
  return out


def markdown(result: dict[str, Any]) -> list[str]:
  f = fmt
  out = ["### Anomaly synthesis", "",
         "Per core = images per second of process CPU time (both sides use every core given).", "",
         "| size | batch | draem_jax img/s | per core | compile s | anomalib img/s | per core "
         "| ratio per core |",
         "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    a = r.get("anomalib", {})
    out.append(f"| {r['image_size']} | {r['batch']} | {f(r['draem_jax']['images_per_s'])} | "
               f"{f(r['draem_jax']['images_per_cpu_s'])} | {f(r['draem_jax']['compile_s'])} | "
               f"{f(a.get('images_per_s'))} | {f(a.get('images_per_cpu_s'))} | {ratio_cell(r)} |")
  if result.get("parts"):
    out += ["", "draem_jax per part, ms of CPU per image (one example at a time, as on CPU):", "",
            "| part | ms/image |", "|---|---|"]
    out += [f"| {p['part']} | {p['ms_per_image_cpu']:.2f} |" for p in result["parts"]]
  return out + [""]
