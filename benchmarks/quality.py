"""Section ``quality``: detection quality after the same short budget on a real category, both sides.

draem_jax: ``train.train_and_evaluate`` with the MVTec recipe at the section's size and widths. anomalib:
its generator, DraemModel, DraemLoss and Adam in a hand loop for the same steps, image score = max of the
anomaly map (anomalib's), scored with the same metric code on the same test images. One short run per
side is a sample, not a verdict (different init, SSIM/focal implementations, augmenters, image score).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.report import fmt
from draem_jax import metrics as metrics_lib
from draem_jax import recipes
from draem_jax import steps
from draem_jax import train
from draem_jax.data import datasets

KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def _config(config):
  q = config.quality
  c = recipes.mvtec(q.category)
  c.dataset = "folder"
  c.data_dir = harness.data_dir(config)
  c.anomaly_source_path = harness.texture_dir(config)
  c.max_sources = config.max_textures
  c.image_size = q.image_size
  c.model.recon_width, c.model.disc_width = q.widths
  c.batch_size = q.batch_size
  c.lr_decay_fractions = ()  # constant learning rate over the short budget
  c.log_every_steps = max(q.steps // 4, 1)
  c.checkpoint_every_steps = 10**9  # the final step is saved anyway
  c.eval.num_visualizations = 0
  c.eval.batch_size = q.batch_size
  return c


def run(config, ctx) -> dict[str, Any]:
  c = _config(config)
  with tempfile.TemporaryDirectory(prefix="draem_bench_quality_") as workdir:
    num_train = len(datasets.load_split(c, workdir, "train"))
    spe = steps.steps_per_epoch(num_train, c.batch_size)
    c.num_epochs = max(1, -(-config.quality.steps // spe))
    total = c.num_epochs * spe
    t0 = time.perf_counter()
    results = train.train_and_evaluate(c, workdir)
    wall = time.perf_counter() - t0
  row = {"setting": f"{c.category} {c.image_size}x{c.image_size} widths {c.model.recon_width}/"
                    f"{c.model.disc_width} batch {c.batch_size}, {total} steps",
         "draem_jax": {**{k: results[k] for k in KEYS}, "wall_s": wall}}
  a = ctx.anomalib
  if a.available:
    def anomalib_side():
      torch = a.torch
      t0 = time.perf_counter()
      images = datasets.load_split(c, "", "train").images
      test = datasets.load_test_split(c, "")
      model, step = a.trainer(c.model.recon_width, c.model.disc_width, harness.texture_dir(config),
                              c.learning_rate)
      rng = np.random.default_rng(0)
      for _ in range(total):
        step(a.to_torch(images[rng.choice(len(images), c.batch_size, replace=len(images) < c.batch_size)]))
      model.eval()
      maps, scores = [], []
      with torch.inference_mode():
        for s in range(0, len(test.images), c.batch_size):
          out = model(a.to_torch(test.images[s:s + c.batch_size]))
          maps.append(out.anomaly_map.reshape(-1, *test.images.shape[1:3]).numpy())
          scores.append(out.pred_score.reshape(-1).numpy())
      m = metrics_lib.compute_all(image_labels=test.labels, image_scores=np.concatenate(scores),
                                  masks=test.masks, anomaly_maps=np.concatenate(maps),
                                  fpr_limit=c.eval.aupro_fpr_limit)
      return {**{k: float(m[k]) for k in KEYS}, "wall_s": time.perf_counter() - t0}
    row["anomalib"] = harness.guard(anomalib_side)
  else:
    row["anomalib_reason"] = a.reason
  return {"rows": [row]}


def markdown(result: dict[str, Any]) -> list[str]:
  out = ["### Detection quality after the same short budget", "",
         "| setting | side | image AUROC | pixel AUROC | pixel AP | AUPRO | wall s |",
         "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    for side in ("draem_jax", "anomalib"):
      q = r.get(side)
      if q and "error" not in q:
        out.append(f"| {r['setting']} | {side} | " + " | ".join(fmt(q[k]) for k in KEYS)
                   + f" | {fmt(q['wall_s'])} |")
      elif q:
        out.append(f"| {r['setting']} | {side} | failed: {q['error']} | | | | |")
    if r.get("anomalib_reason"):
      out.append(f"| {r['setting']} | anomalib | - ({r['anomalib_reason']}) | | | | |")
  return out + [""]
