"""``WORKDIR/eval/report.html``: one self-contained page (no network, no scripts) that a person looks at.

Sections: the metrics (threshold-free; decisions at the normal-only thresholds beside the oracle F1-max
thresholds tuned on the test labels), ROC and PR curves (image and pixel), a histogram of image scores for
good vs defective images with both thresholds, the per-defect-type table, the synthetic validation over
training, and a gallery of test images sorted by score with labelled panels (image, heatmap, ground truth,
prediction), false positives and false negatives marked. Plots are drawn with matplotlib's object API (no
pyplot, no global state) and embedded, like the gallery panels, as base64 PNG.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

from draem_jax import visualize

# Curves are drawn from at most this many points (pixel curves have millions of thresholds).
MAX_CURVE_POINTS = 2000


# ----------------------------------------------------------------------------------------------------
# Curves.
# ----------------------------------------------------------------------------------------------------

def _ranked(labels, scores):
  y = np.asarray(labels).ravel().astype(bool)
  s = np.asarray(scores).ravel()
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last index of each distinct score
  tp = np.cumsum(y)[last]
  fp = (last + 1) - tp
  return tp, fp, int(y.sum()), int((~y).sum()), s[last]


def _thin(*arrays, max_points: int):
  n = len(arrays[0])
  if n <= max_points:
    return arrays
  keep = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
  return tuple(a[keep] for a in arrays)


def roc_curve(labels, scores, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr) at every distinct score (descending), starting at (0, 0); thinned to ``max_points``."""
  tp, fp, p, n, _ = _ranked(labels, scores)
  fpr, tpr = np.append(0.0, fp / max(n, 1)), np.append(0.0, tp / max(p, 1))
  return _thin(fpr, tpr, max_points=max_points)


def pr_curve(labels, scores, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
  """(recall, precision) at every distinct score (descending); thinned to ``max_points``."""
  tp, fp, p, _, _ = _ranked(labels, scores)
  return _thin(tp / max(p, 1), tp / np.maximum(tp + fp, 1), max_points=max_points)


# ----------------------------------------------------------------------------------------------------
# Pictures.
# ----------------------------------------------------------------------------------------------------

def _figure(width=5.0, height=3.6):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _fig_png(fig) -> str:
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png")
  return base64.b64encode(buf.getvalue()).decode("ascii")


def _array_png(pixels: np.ndarray) -> str:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format="PNG", optimize=True)
  return base64.b64encode(buf.getvalue()).decode("ascii")


def curve_plots(labels, scores, masks, maps) -> dict[str, str]:
  """ROC and PR curves of images and pixels, base64 PNG each."""
  out = {}
  for level, y, s in (("image", labels, scores), ("pixel", masks, maps)):
    fpr, tpr = roc_curve(y, s)
    fig = _figure(4.2, 3.6)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=1.6)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"{level} ROC",
           xlim=(0, 1), ylim=(0, 1.01))
    out[f"{level}_roc"] = _fig_png(fig)
    recall, precision = pr_curve(y, s)
    fig = _figure(4.2, 3.6)
    ax = fig.add_subplot()
    ax.plot(recall, precision, lw=1.6, c="tab:green")
    ax.axhline(np.mean(np.asarray(y).astype(bool)), ls=":", c="grey", lw=1)
    ax.set(xlabel="recall", ylabel="precision", title=f"{level} precision-recall", xlim=(0, 1),
           ylim=(0, 1.01))
    out[f"{level}_pr"] = _fig_png(fig)
  return out


def score_histogram(labels, scores, thresholds: dict[str, float]) -> str:
  """Histogram of image scores, good vs defective, with vertical threshold lines."""
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
  fig = _figure(6.0, 3.4)
  ax = fig.add_subplot()
  bins = np.linspace(min(scores.min(), *thresholds.values()), max(scores.max(), *thresholds.values()), 31)
  ax.hist(scores[~labels], bins=bins, alpha=0.6, label=f"good ({(~labels).sum()})", color="tab:blue")
  ax.hist(scores[labels], bins=bins, alpha=0.6, label=f"defective ({labels.sum()})", color="tab:red")
  styles = {"normal-only": ("k", "-"), "oracle F1-max": ("tab:purple", "--")}
  for name, value in thresholds.items():
    colour, ls = styles.get(name, ("grey", ":"))
    ax.axvline(value, c=colour, ls=ls, lw=1.4, label=f"{name} threshold {value:.3g}")
  ax.set(xlabel="image score", ylabel="images", title="image scores")
  ax.legend(fontsize=8)
  return _fig_png(fig)


def validation_plot(history: Sequence[dict[str, float]], test_points: dict[int, float]) -> str | None:
  """Synthetic-validation metrics over training (from metrics.jsonl), test pixel AP points beside them."""
  rows = [r for r in history if "val_pixel_ap" in r]
  if not rows:
    return None
  fig = _figure(6.0, 3.4)
  ax = fig.add_subplot()
  steps = [r["step"] for r in rows]
  for key, label in (("val_pixel_ap", "synthetic-validation pixel AP"),
                     ("val_image_auroc", "synthetic-validation image AUROC")):
    ax.plot(steps, [r.get(key, np.nan) for r in rows], marker="o", ms=3, label=label)
  if test_points:
    ax.plot(list(test_points), list(test_points.values()), "k*", ms=10, label="test pixel AP")
  ax.set(xlabel="step", ylabel="value", ylim=(0, 1.02), title="validation without real defects")
  ax.legend(fontsize=8)
  return _fig_png(fig)


# ----------------------------------------------------------------------------------------------------
# The page.
# ----------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 18px}
td,th{border:1px solid #bbb;padding:3px 9px;text-align:right}
th{background:#eee} td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:90%;max-width:900px}
.plots img{margin:4px;border:1px solid #ddd}
.gallery figure{display:inline-block;margin:4px;vertical-align:top}
.gallery img{border:1px solid #ccc;max-width:100%}
figcaption{font-size:80%;color:#444}
"""


def _fmt(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, (float, np.floating)):
    return "n/a" if not np.isfinite(v) else f"{v:.4f}"
  return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _img(b64: str, alt: str, width: int | None = None) -> str:
  w = f' width="{width}"' if width else ""
  return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"{w}>'


def gallery_items(test, maps, scores, image_threshold: float, pixel_threshold: float,
                  num: int, min_area: int = 1) -> list[dict[str, Any]]:
  """Gallery entries, highest score first: false positives and negatives (at most half of ``num``, the
  highest scoring of each kind first), the rest evenly spaced over the correctly decided images.

  Returns:
    dicts with ``index``, ``score``, ``mark`` ("TP", "FP", "FN", "TN"), ``png`` (base64) and ``caption``.
  """
  from draem_jax import regions  # pylint: disable=g-import-not-at-top
  scores = np.asarray(scores)
  labels = np.asarray(test.labels).astype(bool)
  flagged = scores >= image_threshold
  marks = np.where(labels, np.where(flagged, "TP", "FN"), np.where(flagged, "FP", "TN"))
  order = np.argsort(-scores, kind="stable")
  fps = [i for i in order if marks[i] == "FP"]
  fns = [i for i in order if marks[i] == "FN"]
  half = max(1, num // 2)
  errors = (fps[:max(half // 2, half - len(fns))] + fns[:max(half - half // 2, half - len(fps))])[:half]
  rest = [i for i in order if marks[i] in ("TP", "TN")]
  room = max(0, num - len(errors))
  if rest and room:
    spaced = np.unique(np.linspace(0, len(rest) - 1, min(room, len(rest))).round().astype(int))
    rest = [rest[j] for j in spaced]
  else:
    rest = []
  chosen = sorted(set(errors) | set(rest), key=lambda i: -scores[i])
  items = []
  for i in chosen:
    name = test.filenames[i] if getattr(test, "filenames", None) else str(i)
    title = f"{name}  score {scores[i]:.3f}"
    pred = regions.region_mask(maps[i], pixel_threshold, min_area)
    panel = visualize.labelled_panels(test.images[i], maps[i], test.masks[i], pred, title, mark=str(marks[i]),
                                      min_panel=128)
    items.append({"index": int(i), "score": float(scores[i]), "mark": str(marks[i]), "png": _array_png(panel),
                  "caption": f"{marks[i]} · {test.defect_types[i]} · {name} · score {scores[i]:.4f}"})
  return items


def render(results: dict[str, Any], *, plots: dict[str, str], per_type: Sequence[dict[str, Any]],
           gallery: Sequence[dict[str, Any]], validation: dict[str, Any] | None) -> str:
  """The HTML page (a string) from computed parts; see ``write`` for the parts."""
  cat, step = html.escape(str(results.get("category"))), results.get("step")
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>DRAEM report: {cat} step {step}</title>"
           f"<style>{_CSS}</style></head><body>",
           f"<h1>DRAEM report: {cat}</h1>",
           f"<p>Checkpoint step {step} ({html.escape(str(results.get('selected', 'last')))} model), "
           f"{results.get('num_test_images', 0)} test images.</p>"]
  if "image_auroc" in results:
    parts.append("<h2>Threshold-free metrics</h2>")
    rows = [(name, results[key]) for key, name in (
        ("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("pixel_auroc", "pixel AUROC"),
        ("pixel_ap", "pixel AP"), ("aupro", "AUPRO (30% FPR)")) if key in results]
    parts.append(_table(["metric", "value"], rows))
    parts.append("<h2>Decisions</h2>")
    rows = []
    for label, prefix in (("normal-only (held-out good images)", "normal"),
                          ("oracle F1-max (tuned on the test labels)", "oracle")):
      if f"{prefix}_image_threshold" not in results:
        continue
      rows.append([label, results[f"{prefix}_image_threshold"], results[f"{prefix}_image_recall"],
                   results[f"{prefix}_image_precision"], results[f"{prefix}_image_fpr"],
                   results[f"{prefix}_pixel_threshold"], results[f"{prefix}_pixel_recall"],
                   results[f"{prefix}_pixel_precision"], results[f"{prefix}_pixel_fpr"]])
    parts.append(_table(["thresholds", "image thr.", "image recall", "image precision", "image FPR",
                         "pixel thr.", "pixel recall", "pixel precision", "pixel FPR"], rows))
    note = results.get("normal_thresholds_note")
    if note:
      parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<p class='note'>The normal-only thresholds are what a user without labelled defects "
                 "lives with: set on held-out good training images at a target false-positive rate. The "
                 "oracle thresholds maximise F1 on the test labels themselves and are an upper bound, "
                 "not a deployable setting.</p>")
  if plots:
    parts.append("<h2>Curves and scores</h2><div class='plots'>")
    for key in ("image_roc", "image_pr", "pixel_roc", "pixel_pr", "histogram", "validation"):
      if plots.get(key):
        parts.append(_img(plots[key], key.replace("_", " ")))
    parts.append("</div>")
  if per_type:
    parts.append("<h2>Per defect type</h2>")
    parts.append(_table(["defect type", "images", "image AUROC vs good", "pixel AP", "recall (normal-only)",
                         "recall (oracle)"],
                        [[t["defect_type"], t["num_images"], t["image_auroc"], t["pixel_ap"],
                          t.get("normal_recall", float("nan")), t.get("oracle_recall", float("nan"))]
                         for t in per_type]))
  if validation:
    parts.append("<h2>Synthetic validation (no real defects)</h2>")
    parts.append(_table(["quantity", "value"], [[k, v] for k, v in validation.items()]))
  if gallery:
    parts.append("<h2>Gallery (highest score first; FP and FN at the decision threshold marked)</h2>"
                 "<div class='gallery'>")
    for g in gallery:
      parts.append(f"<figure>{_img(g['png'], g['caption'])}<figcaption>{html.escape(g['caption'])}"
                   "</figcaption></figure>")
    parts.append("</div>")
  parts.append("</body></html>")
  return "\n".join(parts)
