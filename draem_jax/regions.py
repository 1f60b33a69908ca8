"""Connected defect regions of a thresholded anomaly map: where, how large, how sure.

A region is an 8-connected component of the pixels at or above the pixel threshold (``scipy.ndimage.label``
with a 3x3 structure, as the MVTec AD evaluation labels its ground truth). Regions smaller than
``min_area`` pixels are dropped: a few isolated pixels above the threshold are noise, not a defect a
person can act on. Everything is measured on the map at the image's original size, so areas and boxes are
in pixels of the original image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.ndimage

# 8-connectivity: diagonal neighbours belong to the same region.
_STRUCTURE = np.ones((3, 3), bool)


def find_regions(amap: np.ndarray, threshold: float, min_area: int = 1) -> list[dict[str, Any]]:
  """The connected regions of ``amap >= threshold``, largest score first.

  Args:
    amap: float (H, W) anomaly map at the image's original size.
    threshold: pixel threshold; a pixel belongs to a region when ``amap >= threshold``.
    min_area: regions with fewer pixels are dropped (>= 1).

  Returns:
    One dict per region, sorted by ``max_score`` (descending, then by position):
    ``area`` (int, pixels), ``bbox`` ([x_min, y_min, x_max, y_max], inclusive pixel coordinates),
    ``max_score`` and ``mean_score`` (float, over the region's pixels).
  """
  amap = np.asarray(amap)
  if amap.ndim != 2:
    raise ValueError(f"find_regions: amap must be (H, W), got shape {amap.shape}")
  if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
    raise ValueError(f"min_region_area={min_area!r} must be an integer >= 1 (pixels of the original image).")
  labels, n = scipy.ndimage.label(amap >= threshold, structure=_STRUCTURE)
  if n == 0:
    return []
  index = np.arange(1, n + 1)
  areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  values = amap.astype(np.float64)
  maxima = scipy.ndimage.maximum(values, labels, index)
  means = scipy.ndimage.mean(values, labels, index)
  out = []
  for i, box in enumerate(scipy.ndimage.find_objects(labels)):
    if areas[i] < min_area:
      continue
    ys, xs = box
    bbox = [int(xs.start), int(ys.start), int(xs.stop - 1), int(ys.stop - 1)]
    out.append({"area": int(areas[i]), "bbox": bbox, "max_score": float(maxima[i]),
                "mean_score": float(means[i])})
  out.sort(key=lambda r: (-r["max_score"], r["bbox"][1], r["bbox"][0]))
  return out


def region_mask(amap: np.ndarray, threshold: float, min_area: int = 1) -> np.ndarray:
  """bool (H, W): the pixels of the regions that ``find_regions`` keeps (small ones removed)."""
  mask = np.asarray(amap) >= threshold
  labels, n = scipy.ndimage.label(mask, structure=_STRUCTURE)
  if n == 0 or min_area <= 1:
    return mask
  areas = np.bincount(labels.ravel(), minlength=n + 1)
  keep = areas >= min_area
  keep[0] = False
  return keep[labels]
