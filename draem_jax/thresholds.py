"""Decision thresholds from good images only: a target false-positive rate on held-out good images.

A factory has good parts and no labelled defects, so the thresholds are set where a chosen share of good
parts would be flagged:

* image threshold: the lowest value at which at most ``image_fpr`` of the held-out good images score at or
  above it (an image is anomalous when ``score >= image threshold``);
* pixel threshold: the same over every pixel of the held-out good images' maps (``pixel_fpr``); a pixel
  belongs to a defect region when ``map >= pixel threshold``.

What a target means with few images. With ``n`` held-out good images the flagged share can only move in
steps of ``1 / n``: the rule allows ``k = floor(fpr * n)`` of them at or above the threshold. Any target
below ``1 / n`` gives the same threshold, just above the largest held-out score (with 20 good images, every
target below 5 % is "just above the maximum score"). On *new* good images from the same process the
expected false-positive rate of the threshold at the k-th largest score is ``k / (n + 1)``, and
``1 / (n + 1)`` for the one just above the maximum (4.8 % with 20 images), not the target: more held-out
images are the only way to reach a small image FPR. Pixels are many (65,536 per 256x256 image) but
strongly correlated within an image, so the pixel FPR on new images scatters more than their number
suggests. ``calibrate`` records the achieved rates and ``n`` beside the target.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def threshold_at_fpr(normal_scores, fpr: float) -> tuple[float, float]:
  """The lowest threshold at which at most ``fpr`` of ``normal_scores`` are ``>=`` it.

  Args:
    normal_scores: any-shape float scores of normal samples (images or pixels).
    fpr: target false-positive rate in [0, 1).

  Returns:
    ``(threshold, achieved_fpr)``: the threshold and the share of ``normal_scores`` at or above it
    (<= ``fpr``). With ``floor(fpr * n) == 0`` the threshold is the next float above the maximum.
  """
  if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 <= fpr < 1.0:
    raise ValueError(f"target false-positive rate {fpr!r} must be a number in [0, 1).")
  s = np.sort(np.asarray(normal_scores, np.float64).ravel())
  n = s.size
  if n == 0:
    raise ValueError("threshold_at_fpr: no normal scores to calibrate on (held-out good images needed).")
  if not np.isfinite(s).all():
    raise ValueError("threshold_at_fpr: the normal scores contain NaN or infinity; fix the model output.")
  allowed = int(math.floor(fpr * n + 1e-9))  # the tolerance keeps e.g. 0.05 * 20 from rounding to 0
  if allowed == 0:
    threshold = float(np.nextafter(s[-1], np.inf))
  else:
    # #(s >= t) for t = s[i] is n - (first index of the value s[i]); take the lowest distinct value with
    # at most ``allowed`` samples at or above it.
    values = np.unique(s)
    at_or_above = n - np.searchsorted(s, values, "left")
    ok = np.flatnonzero(at_or_above <= allowed)
    threshold = float(values[ok[0]]) if ok.size else float(np.nextafter(s[-1], np.inf))
  achieved = float(np.count_nonzero(s >= threshold) / n)
  return threshold, achieved


def calibrate(maps, scores, image_fpr: float, pixel_fpr: float, source: str) -> dict[str, Any]:
  """Image and pixel thresholds from the maps and scores of held-out good images.

  Args:
    maps: float (M, H, W) anomaly maps of the good images (at the resolution predictions use).
    scores: float (M,) their image scores.
    image_fpr: target image false-positive rate.
    pixel_fpr: target pixel false-positive rate.
    source: where the good images came from (recorded), e.g. "validation: 6 held-out train/good images".

  Returns:
    ``{"image", "pixel", "image_fpr", "pixel_fpr", "num_images", "source", "achieved_image_fpr",
    "achieved_pixel_fpr", "num_pixels"}`` (the dict ``rundir.write_thresholds`` stores).
  """
  scores = np.asarray(scores, np.float64).ravel()
  maps = np.asarray(maps)
  if maps.ndim != 3 or maps.shape[0] != scores.size:
    raise ValueError(f"calibrate: maps must be (M, H, W) with M = {scores.size} scores, got {maps.shape}.")
  image, achieved_image = threshold_at_fpr(scores, image_fpr)
  pixel, achieved_pixel = threshold_at_fpr(maps, pixel_fpr)
  return {"image": image, "pixel": pixel, "image_fpr": float(image_fpr), "pixel_fpr": float(pixel_fpr),
          "num_images": int(scores.size), "source": source, "achieved_image_fpr": achieved_image,
          "achieved_pixel_fpr": achieved_pixel, "num_pixels": int(maps.size)}


def rates_at(labels, scores, threshold: float) -> dict[str, float]:
  """Recall, precision, FPR and counts of the decision ``score >= threshold``.

  Args:
    labels: 0/1 or bool, 1 = anomalous (images, or pixels).
    scores: float, same size.
    threshold: the decision threshold.

  Returns:
    ``{"recall", "precision", "fpr", "tp", "fp", "fn", "tn"}``; precision is NaN when nothing is
    flagged, recall NaN without positives, FPR NaN without negatives.
  """
  y = np.asarray(labels).ravel().astype(bool)
  pred = np.asarray(scores).ravel() >= threshold
  tp = int(np.count_nonzero(pred & y))
  fp = int(np.count_nonzero(pred & ~y))
  fn = int(np.count_nonzero(~pred & y))
  tn = int(np.count_nonzero(~pred & ~y))
  div = lambda a, b: a / b if b else float("nan")  # noqa: E731
  return {"recall": div(tp, tp + fn), "precision": div(tp, tp + fp), "fpr": div(fp, fp + tn),
          "tp": tp, "fp": fp, "fn": fn, "tn": tn}
