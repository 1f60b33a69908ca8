r"""Evaluates a trained (or converted) run: on its labelled test split when there is one, and always on
its synthetic validation.

  python -m draem_jax.evaluate --workdir=workdirs/bottle

Writes into ``WORKDIR/eval/`` (a previous ``eval/`` is renamed ``eval.replaced-<time>``, never deleted):

* ``metrics.json`` and ``metrics.md``: threshold-free metrics (image AUROC / AP, pixel AUROC / AP, AUPRO up
  to 30 % FPR); recall, precision and FPR of images and pixels at the **normal-only** thresholds stored
  for the checkpoint (``WORKDIR/thresholds.json``, from held-out good images: the numbers a user without
  labelled defects lives with); the same at the **oracle** F1-max thresholds tuned on the test labels
  (an upper bound, labelled as such); per defect type, image AUROC vs the good images and pixel AP;
* ``report.html``: the page a person looks at (``draem_jax.report``);
* ``overlays/*.png``: labelled panels (image | heatmap | ground truth | prediction), titled.

The metrics are printed before the report is written, so a failing write (full disk, read-only folder)
still shows them. A category with no ``test/`` folder gets one line saying so and the validation report.
A run with held-out images but no thresholds for the evaluated step (e.g. older runs) is calibrated here
and the thresholds are stored.

Protocol (original test script): BatchNorm in eval mode, anomaly map = softmax channel 1 at full
resolution, image score = max of the 21x21 mean-filtered map (zero padding counted), pixel metrics over
every pixel of every test image of the category (good images included).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from draem_jax import checkpointing
from draem_jax import inference
from draem_jax import metrics as metrics_lib
from draem_jax import published
from draem_jax import regions
from draem_jax import report
from draem_jax import rundir
from draem_jax import thresholds as thresholds_lib
from draem_jax import validation
from draem_jax import visualize
from draem_jax import writers
from draem_jax.data import datasets
from draem_jax.data import folder

FLAGS = flags.FLAGS
EVAL_DIR = "eval"


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the library imports cleanly."""
  flags.DEFINE_string("workdir", None, "Work directory of a trained or converted run.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the run's selected model).")
  flags.DEFINE_string("data_dir", None, "Override config.data_dir (data moved since training).")
  flags.DEFINE_integer("num_visualizations", None, "Override config.eval.num_visualizations.")
  flags.mark_flags_as_required(["workdir"])


# Kept for callers of the earlier API: the run directory module owns these now.
RunNotFoundError = rundir.RunError


def load_run_config(workdir) -> ml_collections.ConfigDict:
  """The config a run was trained (or converted) with (``rundir.load_config``)."""
  return rundir.load_config(workdir)


def restore_model(workdir, config, step: int | None = None, sharding=None):
  """``(model, variables, step)`` of the newest intact checkpoint, or ``step`` (``rundir.restore_model``)."""
  return rundir.restore_model(workdir, config, step=step, sharding=sharding)


def has_test_split(config, workdir) -> bool:
  """Whether the category has a labelled ``test/`` split (the tfds builder always has one)."""
  if config.dataset == "tfds":
    return True
  files = folder.scan_category(datasets.data_root(config, str(workdir)), config.category)
  return bool(files.test)


# ----------------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------------

def decision_metrics(prefix: str, labels, scores, masks, maps, image_threshold: float,
                     pixel_threshold: float) -> dict[str, float]:
  """``<prefix>_{image,pixel}_{threshold,recall,precision,fpr,f1}`` of the decisions ``>= threshold``."""
  out = {}
  for level, y, s, t in (("image", labels, scores, image_threshold), ("pixel", masks, maps, pixel_threshold)):
    r = thresholds_lib.rates_at(y, s, t)
    p, rc = r["precision"], r["recall"]
    f1 = 2 * p * rc / (p + rc) if np.isfinite(p) and np.isfinite(rc) and p + rc > 0 else float("nan")
    out.update({f"{prefix}_{level}_threshold": float(t), f"{prefix}_{level}_recall": r["recall"],
                f"{prefix}_{level}_precision": r["precision"], f"{prefix}_{level}_fpr": r["fpr"],
                f"{prefix}_{level}_f1": f1})
  return out


def per_defect_type(test, maps, scores, image_thresholds: dict[str, float]) -> list[dict[str, Any]]:
  """Per defect type: image AUROC of that type vs all good images, pixel AP over good + that type,
  and recall at each given image threshold (``{"normal": t, "oracle": t}``)."""
  types = np.asarray(test.defect_types)
  good = types == folder.GOOD
  out = []
  for t in sorted(set(test.defect_types) - {folder.GOOD}):
    sel = types == t
    both = good | sel
    row = {"defect_type": t, "num_images": int(sel.sum()),
           "image_auroc": metrics_lib.auroc(sel[both], scores[both]) if good.any() else float("nan")}
    try:
      row["pixel_ap"] = metrics_lib.average_precision(test.masks[both], maps[both])
    except ValueError:  # masks of this type are empty at this resolution
      row["pixel_ap"] = float("nan")
    for name, th in image_thresholds.items():
      row[f"{name}_recall"] = float(np.mean(scores[sel] >= th))
    out.append(row)
  return out


def _normal_thresholds(workdir, config, step: int, inf) -> tuple[dict[str, Any] | None, dict[str, float]]:
  """The stored thresholds of ``step``; calibrated now when the run has held-out images but none stored.

  Returns:
    ``(thresholds or None, validation values computed now or {})``.
  """
  th = rundir.read_thresholds(workdir, step)
  if th is not None or validation.read_record(workdir) is None or not validation.enabled(config):
    return th, {}
  logging.info("no thresholds stored for step %d: calibrating on the held-out good images", step)
  split = datasets.load_split(config, str(workdir), "train")
  _, vset = validation.prepare(config, workdir, split, datasets.load_anomaly_sources(config))
  values, _ = validation.run(validation.make_predict(inf, config), vset, config, workdir, step)  # stores
  return rundir.read_thresholds(workdir, step), values


def _history(workdir) -> list[dict[str, float]]:
  file = rundir.path(workdir) / rundir.METRICS_FILE
  if not file.exists():
    return []
  rows = []
  for line in file.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def evaluate_workdir(workdir, config: ml_collections.ConfigDict | None = None, step: int | None = None,
                     num_visualizations: int | None = None, echo=print) -> dict[str, Any]:
  """Evaluates the run in ``workdir``; prints the metrics (``echo``), then writes the report (process 0).

  Returns:
    The metrics (``metrics.json``'s content).
  """
  workdir = rundir.path(workdir)
  config = rundir.load_config(workdir) if config is None else config
  model, variables, step, selected = validation.restore_selected(workdir, config, step=step)
  inf = inference.Inferencer(model, variables, config)
  th, val_now = _normal_thresholds(workdir, config, step, inf)
  history = _history(workdir)
  val_row = next((r for r in reversed(history) if r.get("step") == step and "val_pixel_ap" in r), None)
  val_values = {k: v for k, v in (val_row or val_now).items() if k.startswith("val_")}
  results: dict[str, Any] = {"step": int(step), "category": config.category, "selected": selected,
                             **val_values}
  if th is not None:
    results.update(normal_thresholds=th)
  else:
    results["normal_thresholds_note"] = (
        "No normal-only thresholds: this run has no held-out good images (converted weights, or "
        "config.validation.fraction=0); only the oracle thresholds are shown.")
  num_vis = config.eval.num_visualizations if num_visualizations is None else num_visualizations

  if not has_test_split(config, workdir):
    results["num_test_images"] = 0
    results = _finite_or_none(results)
    echo(f"{config.category}: no labelled test split (no test/ folder): writing the validation report only.")
    echo(markdown_table(results))
    if jax.process_index() == 0:
      write_report(workdir, results, None, None, None, history, num_vis, config)
    return results

  test = datasets.load_test_split(config, str(workdir))
  maps, scores = validation.make_predict(inf, config)(test.images)  # tiled when larger than the model
  free = metrics_lib.compute_all(image_labels=test.labels, image_scores=scores, masks=test.masks,
                                 anomaly_maps=maps, fpr_limit=config.eval.aupro_fpr_limit)
  results.update({k: float(v) for k, v in free.items() if not k.endswith("_threshold")})
  results["num_test_images"] = int(len(scores))
  results.update(_beside_metrics(workdir, config, model, step, test))
  image_thresholds = {"oracle": free["image_threshold"]}
  results.update(decision_metrics("oracle", test.labels, scores, test.masks, maps, free["image_threshold"],
                                  free["pixel_threshold"]))
  if th is not None:
    results.update(decision_metrics("normal", test.labels, scores, test.masks, maps, th["image"],
                                    th["pixel"]))
    image_thresholds = {"normal": th["image"], **image_thresholds}
  results["per_defect_type"] = per_defect_type(test, maps, scores, image_thresholds)
  logging.info("eval %s step %d: %s", config.category, step,
               ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
  results = _finite_or_none(results)
  echo(markdown_table(results))
  if jax.process_index() == 0:
    write_report(workdir, results, test, maps, scores, history, num_vis, config)
  return results


def _beside_metrics(workdir, config, model, step: int, test) -> dict[str, float]:
  """Threshold-free metrics of the run's other weights of checkpoint ``step``, reported beside the model's.

  The model is the raw weights unless ``config.ema_as_model``: then these are the raw weights' metrics
  as ``raw_<metric>``, else the EMA weights' as ``ema_<metric>`` (``config.ema_decay`` > 0). Thresholds,
  the report's maps and model selection stay the model's. Empty when the run has no EMA or checkpoint
  ``step`` lacks the other weights (e.g. a "best" copy whose step was pruned).
  """
  decay = float(config.ema_decay)
  if decay <= 0:
    return {}
  abstract = rundir.abstract_variables(model, config.image_size)
  try:
    if config.get("ema_as_model", False):
      prefix, other = "raw", checkpointing.restore_intact(workdir, abstract, step=step)[1]
    elif checkpointing.has_ema(workdir, step):
      prefix, other = "ema", checkpointing.restore_ema(workdir, step, abstract)
    else:
      return {}
  except checkpointing.NoCheckpointError as e:  # the model's evaluation stands on its own
    logging.warning("no metrics of the other weights: %s", e)
    return {}
  maps, scores = validation.make_predict(inference.Inferencer(model, other, config), config)(test.images)
  free = metrics_lib.compute_all(image_labels=test.labels, image_scores=scores, masks=test.masks,
                                 anomaly_maps=maps, fpr_limit=config.eval.aupro_fpr_limit)
  return {"ema_decay": decay, **{f"{prefix}_{k}": float(v) for k, v in free.items()
                                 if not k.endswith("_threshold")}}


def _finite_or_none(tree):
  """NaN (e.g. precision with nothing flagged) as None: valid JSON, and equal to itself."""
  if isinstance(tree, dict):
    return {k: _finite_or_none(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_finite_or_none(v) for v in tree]
  if isinstance(tree, float) and not np.isfinite(tree):
    return None
  return tree


# ----------------------------------------------------------------------------------------------------
# Report: metrics.json, metrics.md, overlays, report.html.
# ----------------------------------------------------------------------------------------------------

_TABLE_ROWS = (("image_auroc", "image AUROC"), ("image_ap", "image AP"),
               ("image_f1_max", "image F1-max"), ("pixel_auroc", "pixel AUROC"),
               ("pixel_ap", "pixel AP"), ("pixel_f1_max", "pixel F1-max"), ("aupro", "AUPRO (30% FPR)"))


def _pct(v) -> str:
  return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
  """The metrics as Markdown: threshold-free, decisions (normal-only vs oracle), per defect type."""
  paper = published.PAPER.get(results.get("category"))
  paper_values = {"image_auroc": paper[0], "pixel_auroc": paper[1], "pixel_ap": paper[2]} if paper else {}
  lines = [f"# DRAEM evaluation: {results.get('category')} (step {results.get('step')}, "
           f"{results.get('num_test_images')} test images)", ""]
  if "image_auroc" in results:
    lines += ["| metric | draem_jax | paper |", "|---|---|---|"]
    for key, name in _TABLE_ROWS:
      if key in results:
        ref = paper_values.get(key)
        lines.append(f"| {name} | {_pct(results[key])} | {'' if ref is None else f'{ref:.1f}'} |")
    lines += ["", "| thresholds | image thr. | image recall | image precision | image FPR | pixel thr. | "
              "pixel recall | pixel precision | pixel FPR |", "|---|---|---|---|---|---|---|---|---|"]
    for label, p in (("normal-only (held-out good images)", "normal"),
                     ("oracle F1-max (tuned on test labels)", "oracle")):
      if f"{p}_image_threshold" in results:
        r = {k[len(p) + 1:]: v for k, v in results.items() if k.startswith(p + "_")}
        lines.append(f"| {label} | {r['image_threshold']:.4g} | {_pct(r['image_recall'])} | "
                     f"{_pct(r['image_precision'])} | {_pct(r['image_fpr'])} | "
                     f"{r['pixel_threshold']:.4g} | {_pct(r['pixel_recall'])} | "
                     f"{_pct(r['pixel_precision'])} | {_pct(r['pixel_fpr'])} |")
    if results.get("per_defect_type"):
      lines += ["", "| defect type | images | image AUROC vs good | pixel AP |", "|---|---|---|---|"]
      for t in results["per_defect_type"]:
        lines.append(f"| {t['defect_type']} | {t['num_images']} | {_pct(t['image_auroc'])} | "
                     f"{_pct(t['pixel_ap'])} |")
  th = results.get("normal_thresholds")
  if th:
    lines += ["", f"Normal-only thresholds of step {th.get('step')}: image {th['image']:.6g} (target FPR "
              f"{th['image_fpr']:g}, {th.get('achieved_image_fpr', float('nan')):.3g} on {th['num_images']} "
              f"held-out good images), pixel {th['pixel']:.6g} (target pixel FPR {th['pixel_fpr']:g})."]
  elif results.get("normal_thresholds_note"):
    lines += ["", results["normal_thresholds_note"]]
  for prefix, name, model_is in (("ema", "EMA weights", "the raw weights"),
                                 ("raw", "Raw weights", "the EMA weights (config.ema_as_model)")):
    if f"{prefix}_image_auroc" in results:
      auroc, ap, aupro = (_pct(results.get(f"{prefix}_{k}")) for k in ("image_auroc", "pixel_ap", "aupro"))
      lines += ["", f"{name} (EMA decay {results['ema_decay']:g}): image AUROC {auroc}, pixel AP {ap}, "
                f"AUPRO {aupro} (the model above, its thresholds and maps: {model_is})."]
  if "val_pixel_ap" in results:
    lines += ["", f"Synthetic validation at this step: pixel AP {_pct(results['val_pixel_ap'])}, pixel AUROC "
              f"{_pct(results.get('val_pixel_auroc'))}, image AUROC {_pct(results.get('val_image_auroc'))}."]
  return "\n".join(lines) + "\n"


def _set_aside_eval(workdir) -> None:
  """Renames an earlier ``eval/`` to ``eval.replaced-<time>`` (never deleted, never overwritten)."""
  root = rundir.path(workdir)
  current = root / EVAL_DIR
  if not current.exists():
    return
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target, k = root / f"{EVAL_DIR}.replaced-{stamp}", 1
  while target.exists():
    target, k = root / f"{EVAL_DIR}.replaced-{stamp}-{k}", k + 1
  current.rename(target)


def write_report(workdir, results: dict[str, Any], test, maps, scores, history, num_visualizations: int,
                 config) -> None:
  """Writes ``WORKDIR/eval/``: metrics.json, metrics.md, overlays/, report.html."""
  _set_aside_eval(workdir)
  eval_dir = rundir.path(workdir) / EVAL_DIR
  eval_dir.mkdir(parents=True, exist_ok=True)
  rundir.write_json(eval_dir / "metrics.json", results)
  (eval_dir / "metrics.md").write_text(markdown_table(results))
  th = results.get("normal_thresholds")
  min_area = int(config.predict.min_region_area)
  plots: dict[str, str] = {}
  gallery, per_type = [], results.get("per_defect_type", [])
  if test is not None:
    image_t = th["image"] if th else results["oracle_image_threshold"]
    pixel_t = th["pixel"] if th else results["oracle_pixel_threshold"]
    plots.update(report.curve_plots(test.labels, scores, test.masks, maps))
    lines = {"oracle F1-max": results["oracle_image_threshold"]}
    if th:
      lines = {"normal-only": th["image"], **lines}
    plots["histogram"] = report.score_histogram(test.labels, scores, lines)
    gallery = report.gallery_items(test, maps, scores, image_t, pixel_t, max(16, 2 * num_visualizations),
                                   min_area=min_area)
    _write_overlays(eval_dir / "overlays", test, maps, scores, image_t, pixel_t, num_visualizations,
                    min_area, "normal-only" if th else "oracle")
  test_points = {results["step"]: results["pixel_ap"]} if "pixel_ap" in results else {}
  val_plot = report.validation_plot(history, test_points)
  if val_plot:
    plots["validation"] = val_plot
  val_table = {k: v for k, v in results.items() if k.startswith("val_")}
  if th:
    val_table.update({"image threshold": th["image"], "pixel threshold": th["pixel"],
                      "target image FPR": th["image_fpr"], "target pixel FPR": th["pixel_fpr"],
                      "held-out good images": th["num_images"]})
  page = report.render(results, plots=plots, per_type=per_type, gallery=gallery, validation=val_table)
  (eval_dir / "report.html").write_text(page)


def _write_overlays(vis_dir, test, maps, scores, image_t, pixel_t, num, min_area, which) -> None:
  n = len(scores)
  if num <= 0 or n == 0:
    return
  vis_dir.mkdir(parents=True, exist_ok=True)
  # Evenly spaced over the (sorted) test set, so good images and each defect type appear.
  for i in np.unique(np.linspace(0, n - 1, min(num, n)).round().astype(int)):
    flagged, defect = scores[i] >= image_t, bool(test.labels[i])
    mark = ("TP" if flagged else "FN") if defect else ("FP" if flagged else "TN")
    stem = os.path.splitext(os.path.basename(test.paths[i]))[0]
    title = (f"{test.defect_types[i]}/{stem}  score {scores[i]:.3f}  ({which} image threshold "
             f"{image_t:.3g}, pixel {pixel_t:.3g})")
    panel = visualize.labelled_panels(test.images[i], maps[i], test.masks[i],
                                      regions.region_mask(maps[i], pixel_t, min_area), title, mark=mark)
    name = f"{i:04d}_{test.defect_types[i]}_{stem}_score{scores[i]:.3f}.png"
    visualize.save_png(vis_dir / name, panel, title)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  try:
    workdir = rundir.path(FLAGS.workdir)
    config = rundir.load_config(workdir)
    if FLAGS.data_dir is not None:
      config.data_dir = FLAGS.data_dir
    evaluate_workdir(workdir, config, FLAGS.step, FLAGS.num_visualizations)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {writers.one_line(e)}") from None


if __name__ == "__main__":
  define_flags()
  writers.run_program(main)
