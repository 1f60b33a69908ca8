"""Exact, host-side (NumPy) evaluation metrics: AUROC, AP, F1-max and the MVTec AD AUPRO.

No binning: every distinct score is a threshold, as in scikit-learn and the MVTec AD evaluation code.
Pixel metrics concatenate every pixel of every test image of a category (1e7 - 1e8 scores), so nothing
here loops in Python or argsorts the whole array: normal and anomalous scores are sorted separately
(a plain sort is ~4x faster than an argsort) and all curve points come from ``searchsorted`` of the
distinct anomalous scores into the sorted normal scores. Only the anomalous scores, usually a few
percent, are argsorted (for the per-region weights of AUPRO).
"""

from typing import NamedTuple

import numpy as np
import scipy.ndimage

# 8-connectivity inside each image and none across images: labelling an (N, H, W) stack with this
# 3-D structure labels every image separately (MVTec AD's reference uses a 3x3 all-ones structure).
_REGION_STRUCTURE = np.zeros((3, 3, 3), bool)
_REGION_STRUCTURE[1] = True


class _Ranked(NamedTuple):
  """Counts at each distinct anomalous (positive) score ``v``, ascending in ``v``."""
  values: np.ndarray  # (K,) distinct positive scores.
  starts: np.ndarray  # (K,) index of each value's first occurrence in the sorted positives.
  pos_eq: np.ndarray  # (K,) int64, #positives == v.
  pos_ge: np.ndarray  # (K,) int64, #positives >= v (true positives at threshold v).
  neg_lt: np.ndarray  # (K,) int64, #negatives < v.
  neg_le: np.ndarray  # (K,) int64, #negatives <= v.
  n_pos: int
  n_neg: int


def _binary(labels, what: str, name: str) -> np.ndarray:
  """Flattened bool view of a 0/1 (or bool) array; raises a ValueError naming ``what`` otherwise."""
  a = np.asarray(labels)
  if a.dtype == np.bool_:
    return a.ravel()
  if not np.issubdtype(a.dtype, np.number):
    raise ValueError(f"{what}: {name} must be numeric 0/1 or bool, got dtype {a.dtype}.")
  a = a.ravel()
  bad = (a != 0) & (a != 1)
  if bad.any():
    raise ValueError(
        f"{what}: {name} must be binary (0/1 or bool); found e.g. {np.unique(a[bad])[:3]}. Binarise "
        f"first (DRAEM keeps a resized mask pixel only where it is exactly 1, i.e. .astype(np.uint8)).")
  return a == 1


def _scores(scores, what: str, name: str, size: int) -> np.ndarray:
  """Flattened float scores of the given size (the dtype is kept: float32 sorts faster)."""
  s = np.asarray(scores)
  if not np.issubdtype(s.dtype, np.floating):
    if not np.issubdtype(s.dtype, np.number) and s.dtype != np.bool_:
      raise ValueError(f"{what}: {name} must be numeric, got dtype {s.dtype}.")
    s = s.astype(np.float64)
  if s.size != size:
    raise ValueError(f"{what}: {name} has {s.size} values but the labels have {size}; they must match "
                     "one to one.")
  return s.ravel()


def _sorted(x: np.ndarray, what: str, name: str) -> np.ndarray:
  """Sorted copy; NaN sorts last, so checking the last element finds any NaN."""
  x = np.sort(x)
  if x.size and np.isnan(x[-1]):
    raise ValueError(f"{what}: {name} contain NaN; fix the model output before computing metrics.")
  return x


def _split(labels: np.ndarray, scores: np.ndarray, what: str, name: str):
  """(positive scores unsorted, sorted negative scores); both classes must be present."""
  n_pos = int(np.count_nonzero(labels))
  if n_pos == 0 or n_pos == labels.size:
    only = "anomalous (1)" if n_pos else "normal (0)"
    raise ValueError(f"{what}: {name} contain only {only} samples ({labels.size} in all); the metric "
                     "needs both normal and anomalous samples.")
  return scores[labels], _sorted(scores[~labels], what, "scores")


def _rank(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> _Ranked:
  """Counts at each distinct positive score from the sorted positive and negative scores."""
  n_pos = pos_sorted.size
  new = np.empty(n_pos, bool)
  new[0] = True
  np.not_equal(pos_sorted[1:], pos_sorted[:-1], out=new[1:])
  starts = np.flatnonzero(new)
  values = pos_sorted[starts]
  pos_eq = np.diff(np.append(starts, n_pos)).astype(np.int64)
  return _Ranked(
      values=values, starts=starts, pos_eq=pos_eq, pos_ge=(n_pos - starts).astype(np.int64),
      neg_lt=np.searchsorted(neg_sorted, values, "left").astype(np.int64),
      neg_le=np.searchsorted(neg_sorted, values, "right").astype(np.int64),
      n_pos=n_pos, n_neg=neg_sorted.size)


def _ranked(labels, scores, what: str, name: str = "labels") -> _Ranked:
  y = _binary(labels, what, name)
  pos, neg = _split(y, _scores(scores, what, "scores", y.size), what, name)
  return _rank(_sorted(pos, what, "scores"), neg)


def _auroc(r: _Ranked) -> float:
  # Mann-Whitney: P(score_pos > score_neg) + 1/2 P(equal); integer sums are exact (< 2^63).
  below = int(np.dot(r.pos_eq, r.neg_lt))
  ties = int(np.dot(r.pos_eq, r.neg_le - r.neg_lt))
  return (2 * below + ties) / (2.0 * r.n_pos * r.n_neg)


def _average_precision(r: _Ranked) -> float:
  # Recall only steps at positive scores: AP = sum_v (#pos == v / P) * precision(threshold v).
  fp = r.n_neg - r.neg_lt
  return float(np.sum(r.pos_eq / r.n_pos * (r.pos_ge / (r.pos_ge + fp))))


def _f1_max(r: _Ranked) -> tuple[float, float]:
  # At a threshold between positive scores F1 only loses (same TP, more FP), so the best threshold is
  # a positive score. F1 = 2 TP / (TP + FP + P).
  f1 = 2.0 * r.pos_ge / (r.pos_ge + (r.n_neg - r.neg_lt) + r.n_pos)
  best = int(np.argmax(f1))
  return float(f1[best]), float(r.values[best])


def auroc(labels, scores) -> float:
  """Area under the ROC curve, exact with ties (equals sklearn's ``roc_auc_score``).

  Args:
    labels: any-shape 0/1 or bool array, 1 = anomalous.
    scores: float array with as many elements; higher = more anomalous.

  Returns:
    AUROC in [0, 1].
  """
  return _auroc(_ranked(labels, scores, "auroc"))


def average_precision(labels, scores) -> float:
  """Average precision sum_n (R_n - R_{n-1}) P_n over all thresholds (sklearn's
  ``average_precision_score``: no interpolation). Arguments as :func:`auroc`."""
  return _average_precision(_ranked(labels, scores, "average_precision"))


def f1_max(labels, scores) -> tuple[float, float]:
  """Best F1 over all thresholds and the threshold reaching it.

  A sample is predicted anomalous when ``score >= threshold``. Among thresholds with equal F1 the
  lowest is returned (``argmax`` over sklearn's ascending ``precision_recall_curve`` thresholds).
  Arguments as :func:`auroc`.

  Returns:
    (f1, threshold) as Python floats.
  """
  return _f1_max(_ranked(labels, scores, "f1_max"))


def _check_maps(masks, anomaly_maps, what: str) -> tuple[np.ndarray, np.ndarray]:
  m, a = np.asarray(masks), np.asarray(anomaly_maps)
  if m.ndim != 3 or m.shape != a.shape:
    raise ValueError(f"{what}: masks and anomaly_maps must both be (N, H, W) of the same shape, got "
                     f"{m.shape} and {a.shape} (squeeze a channel axis, add a batch axis).")
  return m, a


def _region_weights(masks_bool: np.ndarray, what: str) -> tuple[np.ndarray, int]:
  """Per anomalous pixel (in ``masks_bool[masks_bool]`` order) 1 / size of its region, and #regions."""
  labeled, n_regions = scipy.ndimage.label(masks_bool, structure=_REGION_STRUCTURE)
  if n_regions == 0:
    raise ValueError(f"{what}: masks contain no anomalous pixel, so there is no region to overlap.")
  region = labeled[masks_bool]
  return 1.0 / np.bincount(region, minlength=n_regions + 1)[region], n_regions


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
  """Integral of the piecewise-linear y(x) (x non-decreasing) from x[0] to ``limit``."""
  x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
  x_end = np.minimum(x1, limit)
  width = np.maximum(x_end - x0, 0.0)
  frac = np.divide(x_end - x0, x1 - x0, out=np.zeros_like(x0), where=x1 > x0)
  y_end = y0 + (y1 - y0) * frac  # y at x_end (linear interpolation at the limit).
  return float(np.sum(width * (y0 + y_end) / 2.0))


def _aupro(r: _Ranked, weights_sorted: np.ndarray, n_regions: int, fpr_limit: float) -> float:
  """Normalised area under PRO(FPR) up to ``fpr_limit``.

  The MVTec curve has a point at every distinct score t (descending): FPR(t) = #normal >= t / #normal,
  PRO(t) = mean over regions of the region's fraction >= t. Between two distinct anomalous scores only
  FPR moves (a horizontal, collinear run), so the curve is exactly described by two points per
  distinct anomalous score v: just above v ("> v") and at v (">= v"), plus (0, 0) and (1, 1).
  """
  # Weight of anomalous pixels with score >= sorted position i (suffix sums avoid cancellation).
  suffix = np.append(np.cumsum(weights_sorted[::-1])[::-1], 0.0)
  ends = np.append(r.starts[1:], r.n_pos)
  pro_ge, pro_gt = suffix[r.starts] / n_regions, suffix[ends] / n_regions
  fpr_ge, fpr_gt = (r.n_neg - r.neg_lt) / r.n_neg, (r.n_neg - r.neg_le) / r.n_neg
  # Interleave (> v, >= v) and order by descending threshold, i.e. ascending FPR.
  fpr = np.concatenate([[0.0], np.stack([fpr_gt, fpr_ge], 1)[::-1].ravel(), [1.0]])
  pro = np.concatenate([[0.0], np.stack([pro_gt, pro_ge], 1)[::-1].ravel(), [1.0]])
  return _area_to(fpr, np.minimum(pro, 1.0), fpr_limit) / fpr_limit


def _pixel_ranked(masks, anomaly_maps, what: str):
  """Pixel _Ranked plus the region weights of the sorted anomalous pixels and the region count."""
  m, a = _check_maps(masks, anomaly_maps, what)
  y = _binary(m, what, "masks").reshape(m.shape)
  s = _scores(a, what, "anomaly_maps", y.size)
  pos, neg = _split(y.ravel(), s, what, "masks")
  weights, n_regions = _region_weights(y, what)
  order = np.argsort(pos)
  pos_sorted = pos[order]
  if np.isnan(pos_sorted[-1]):
    raise ValueError(f"{what}: anomaly_maps contain NaN; fix the model output before computing metrics.")
  return _rank(pos_sorted, neg), weights[order], n_regions


def _check_limit(fpr_limit: float) -> None:
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit!r} (MVTec AD uses 0.3).")


def aupro(masks, anomaly_maps, fpr_limit: float = 0.3) -> float:
  """Area under the per-region-overlap curve (MVTec AD protocol), normalised by ``fpr_limit``.

  Regions are the 8-connected components of each image's ground truth. For each threshold t (every
  distinct score), PRO(t) = mean over all regions of all images of the fraction of the region's pixels
  with score >= t, and FPR(t) = fraction of all normal pixels (all images) with score >= t. The curve,
  from (0, 0) to (1, 1), is integrated with the trapezoid rule from FPR 0 to ``fpr_limit``
  (interpolating linearly at the limit) and divided by ``fpr_limit``.

  Args:
    masks: (N, H, W) 0/1 or bool ground truth.
    anomaly_maps: (N, H, W) float scores.
    fpr_limit: upper FPR integration limit in (0, 1].

  Returns:
    AUPRO in [0, 1].
  """
  _check_limit(fpr_limit)
  r, weights, n_regions = _pixel_ranked(masks, anomaly_maps, "aupro")
  return _aupro(r, weights, n_regions, fpr_limit)


def compute_all(*, image_labels, image_scores, masks, anomaly_maps,
                fpr_limit: float = 0.3) -> dict[str, float]:
  """Every image and pixel metric of one category.

  Pixel metrics pool all pixels of all images (good ones included), as in DRAEM's ``test_DRAEM.py``;
  the pixel sort is shared by pixel AUROC/AP/F1 and AUPRO.

  Args:
    image_labels: (N,) 0/1 or bool, 1 = anomalous image.
    image_scores: (N,) float image scores.
    masks: (N, H, W) 0/1 or bool ground-truth masks (all zero for good images).
    anomaly_maps: (N, H, W) float pixel scores.
    fpr_limit: AUPRO integration limit.

  Returns:
    Dict of Python floats: image_auroc, image_ap, image_f1_max, image_threshold, pixel_auroc, pixel_ap,
    pixel_f1_max, pixel_threshold, aupro (all but the thresholds are fractions in [0, 1]).

  Raises:
    ValueError: naming the metrics that cannot be computed, e.g. when only one class is present.
  """
  _check_limit(fpr_limit)
  n_images = np.asarray(image_labels).size
  if np.asarray(masks).shape[:1] != (n_images,):
    raise ValueError(f"compute_all: masks {np.asarray(masks).shape} must be (N, H, W) with N = "
                     f"{n_images} images as in image_labels.")
  img = _ranked(image_labels, image_scores, "image metrics (image_auroc, image_ap, image_f1_max)",
                "image_labels")
  pix, weights, n_regions = _pixel_ranked(
      masks, anomaly_maps, "pixel metrics (pixel_auroc, pixel_ap, pixel_f1_max, aupro)")
  image_f1, image_threshold = _f1_max(img)
  pixel_f1, pixel_threshold = _f1_max(pix)
  return {
      "image_auroc": _auroc(img),
      "image_ap": _average_precision(img),
      "image_f1_max": image_f1,
      "image_threshold": image_threshold,
      "pixel_auroc": _auroc(pix),
      "pixel_ap": _average_precision(pix),
      "pixel_f1_max": pixel_f1,
      "pixel_threshold": pixel_threshold,
      "aupro": _aupro(pix, weights, n_regions, fpr_limit),
  }
