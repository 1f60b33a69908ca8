r"""Evaluates a trained (or converted) run on its category's test split.

  python -m draem_jax.evaluate --workdir=workdirs/bottle

Writes ``WORKDIR/eval/metrics.json`` (image AUROC / AP / F1-max, pixel AUROC / AP / F1-max, AUPRO up to 30%
FPR, and the F1-optimal thresholds that ``draem_jax.predict`` uses), ``WORKDIR/eval/metrics.md`` (a table,
beside the paper's numbers for MVTec AD categories) and PNG overlays (image | heatmap | ground truth |
prediction at the pixel F1 threshold) in ``WORKDIR/eval/overlays``.

Protocol (original test script): BatchNorm in eval mode, anomaly map = softmax channel 1 at full
resolution, image score = max of the 21x21 mean-filtered map (zero padding counted), pixel metrics over
every pixel of every test image of the category (good images included).
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from draem_jax import checkpointing
from draem_jax import metrics as metrics_lib
from draem_jax import parallel
from draem_jax import published
from draem_jax import steps
from draem_jax import writers
from draem_jax.data import datasets
from draem_jax.data import pipeline

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the library imports cleanly."""
  flags.DEFINE_string("workdir", None, "Work directory of a trained or converted run.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
  flags.DEFINE_string("data_dir", None, "Override config.data_dir (data moved since training).")
  flags.DEFINE_integer("num_visualizations", None, "Override config.eval.num_visualizations.")
  flags.mark_flags_as_required(["workdir"])


class RunNotFoundError(FileNotFoundError):
  """The work directory holds no run that can be evaluated."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained (or converted) with, from ``WORKDIR/config.json``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunNotFoundError(
        f"{path} not found: {workdir} is not a draem_jax run. Train one with "
        "`python -m draem_jax.train --config=... --workdir=...` or convert released weights with "
        "`python -m draem_jax.convert`.")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_model(workdir: str, config, step: int | None = None, sharding=None):
  """Restores ``{"params", "batch_stats"}`` of a run; returns (model, variables, step)."""
  latest = checkpointing.latest_step(workdir)
  if latest is None:
    raise RunNotFoundError(
        f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}: train the run first (or it was "
        "stopped before its first checkpoint).")
  step = latest if step is None else step
  model = steps.build_model(config)
  size = (config.image_size, config.image_size)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), np.zeros((1, *size, 3), np.float32), train=False))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          dict(abstract))
  with checkpointing.manager(workdir, read_only=True) as mngr:
    if step not in mngr.all_steps():
      raise RunNotFoundError(f"checkpoint step {step} not in {workdir}; available: {mngr.all_steps()}")
    variables, _ = checkpointing.restore(mngr, step, abstract)
  return model, variables, step


def predict_maps(model, variables, images: np.ndarray, *, batch_size: int, channel_order: str = "rgb",
                 filter_size: int = 21, mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """Anomaly maps and image scores of a set of images, batched, padded and sharded over the mesh.

  Args:
    model: DRAEM module.
    variables: its ``{"params", "batch_stats"}``.
    images: (N, H, W, 3) uint8 (or float in [0, 1]) at the model's resolution, RGB.
    batch_size: global batch, a multiple of the device count.
    channel_order: "rgb", or "bgr" for weights trained on OpenCV images (the released checkpoints).
    filter_size: mean-filter size of the image score.
    mesh: device mesh (default: all devices).

  Returns:
    maps float32 (N, H, W) in [0, 1] and scores float32 (N,).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  repl, data_sh = parallel.replicated(mesh), parallel.data_sharding(mesh)
  batch_size = max(batch_size, 1)
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  infer = steps.make_infer_fn(model, filter_size=filter_size, bgr=(channel_order == "bgr"))
  infer = jax.jit(infer, in_shardings=(repl, data_sh), out_shardings=(data_sh, data_sh, data_sh))
  variables = jax.device_put(variables, repl)
  n = len(images)
  dummy_masks = np.zeros(images.shape[:3], bool)
  maps = np.zeros(images.shape[:3], np.float32)
  scores = np.zeros((n,), np.float32)
  for batch in pipeline.eval_batches(images, dummy_masks, np.zeros((n,), np.int32), batch_size,
                                     sharding=data_sh):
    m, s, _ = infer(variables, batch["image"])
    m, s, index, valid = parallel.gather_to_host((m, s, batch["index"], batch["valid"]))
    maps[index[valid]] = m[valid]
    scores[index[valid]] = s[valid]
  return maps, scores


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                     step: int | None = None, num_visualizations: int | None = None) -> dict[str, Any]:
  """Evaluates the run in ``workdir``; writes the report (process 0) and returns the metrics."""
  workdir = os.path.abspath(workdir)
  config = load_run_config(workdir) if config is None else config
  model, variables, step = restore_model(workdir, config, step)
  test = datasets.load_test_split(config, workdir)
  maps, scores = predict_maps(model, variables, test.images, batch_size=config.eval.batch_size,
                              channel_order=config.get("channel_order", "rgb"),
                              filter_size=config.eval.score_filter_size)
  results = metrics_lib.compute_all(image_labels=test.labels, image_scores=scores, masks=test.masks,
                                    anomaly_maps=maps, fpr_limit=config.eval.aupro_fpr_limit)
  results = {k: float(v) for k, v in results.items()}
  results.update(step=int(step), category=config.category, num_test_images=int(len(scores)))
  if jax.process_index() == 0:
    write_report(os.path.join(workdir, "eval"), results, test, maps, scores,
                 config.eval.num_visualizations if num_visualizations is None else num_visualizations)
  logging.info("eval %s step %d: %s", config.category, step,
               ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
  return results


# ----------------------------------------------------------------------------------------------------
# Report: metrics.json, metrics.md, overlays.
# ----------------------------------------------------------------------------------------------------

_TABLE_ROWS = (("image_auroc", "image AUROC"), ("image_ap", "image AP"),
               ("image_f1_max", "image F1-max"), ("pixel_auroc", "pixel AUROC"),
               ("pixel_ap", "pixel AP"), ("pixel_f1_max", "pixel F1-max"), ("aupro", "AUPRO (30% FPR)"))


def markdown_table(results: dict[str, Any]) -> str:
  paper = published.PAPER.get(results.get("category"))
  paper_values = {"image_auroc": paper[0], "pixel_auroc": paper[1], "pixel_ap": paper[2]} if paper else {}
  lines = [f"# DRAEM evaluation: {results.get('category')} (step {results.get('step')}, "
           f"{results.get('num_test_images')} test images)", "",
           "| metric | draem_jax | paper |", "|---|---|---|"]
  for key, name in _TABLE_ROWS:
    if key in results:
      ref = paper_values.get(key)
      lines.append(f"| {name} | {100 * results[key]:.2f} | {'' if ref is None else f'{ref:.1f}'} |")
  lines += ["", f"Image threshold (F1-max): {results.get('image_threshold', float('nan')):.6f}; "
            f"pixel threshold (F1-max): {results.get('pixel_threshold', float('nan')):.6f}."]
  return "\n".join(lines) + "\n"


def heat_colormap(values: np.ndarray) -> np.ndarray:
  """A jet-like colormap: float (H, W) in [0, 1] -> uint8 (H, W, 3) (no matplotlib dependency)."""
  v = np.clip(values, 0.0, 1.0)[..., None]
  r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
  g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
  b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
  return (255 * np.concatenate([r, g, b], -1) + 0.5).astype(np.uint8)


def overlay_panel(image: np.ndarray, amap: np.ndarray, gt: np.ndarray | None,
                  threshold: float) -> np.ndarray:
  """image | heatmap over image | ground truth | prediction, uint8 (H, 4W (3W without gt), 3)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
  heat = (0.5 * image + 0.5 * heat_colormap(amap)).astype(np.uint8)
  pred = np.repeat(((amap >= threshold) * 255).astype(np.uint8)[..., None], 3, -1)
  panels = [image, heat]
  if gt is not None:
    panels.append(np.repeat((np.asarray(gt) > 0).astype(np.uint8)[..., None] * 255, 3, -1))
  panels.append(pred)
  return np.concatenate(panels, axis=1)


def write_report(eval_dir: str, results: dict[str, Any], test, maps: np.ndarray, scores: np.ndarray,
                 num_visualizations: int) -> None:
  os.makedirs(eval_dir, exist_ok=True)
  tmp = os.path.join(eval_dir, "metrics.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(eval_dir, "metrics.json"))
  with open(os.path.join(eval_dir, "metrics.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(results))
  n = len(scores)
  if num_visualizations <= 0 or n == 0:
    return
  vis_dir = os.path.join(eval_dir, "overlays")
  os.makedirs(vis_dir, exist_ok=True)
  # Evenly spaced over the (sorted) test set, so good images and each defect type appear.
  for i in np.unique(np.linspace(0, n - 1, min(num_visualizations, n)).round().astype(int)):
    panel = overlay_panel(test.images[i], maps[i], test.masks[i], results["pixel_threshold"])
    stem = os.path.splitext(os.path.basename(test.paths[i]))[0]
    name = f"{i:04d}_{test.defect_types[i]}_{stem}_score{scores[i]:.3f}.png"
    Image.fromarray(panel).save(os.path.join(vis_dir, name))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  try:
    workdir = os.path.abspath(FLAGS.workdir)
    config = load_run_config(workdir)
    if FLAGS.data_dir is not None:
      config.data_dir = FLAGS.data_dir
    results = evaluate_workdir(workdir, config, FLAGS.step, FLAGS.num_visualizations)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(markdown_table(results))


if __name__ == "__main__":
  define_flags()
  app.run(main)
