"""Tests for draem_jax.metrics against scikit-learn, scikit-image labelling and brute-force loops."""

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from draem_jax import metrics


def _random_case(rng, n, levels, p_pos, dtype):
  """Labels with prevalence ~p_pos; scores quantised to 1/levels, so ties within and across classes."""
  y = rng.random(n) < p_pos
  y[:2] = [True, False]
  s = np.floor((rng.random(n) + 0.3 * y * rng.random(n)) * levels) / levels
  return y, s.astype(dtype)


CASES = [(40, 4, 0.5, np.float32), (1000, 25, 0.1, np.float32), (3000, 2000, 0.7, np.float64),
         (500, 10**9, 0.3, np.float64), (20000, 64, 0.02, np.float32)]


@pytest.mark.parametrize("n,levels,p_pos,dtype", CASES)
def test_auroc_and_ap_match_sklearn(n, levels, p_pos, dtype):
  rng = np.random.default_rng(n)
  y, s = _random_case(rng, n, levels, p_pos, dtype)
  assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
  assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-9)
  # Integer labels and any shape work the same.
  y2, s2 = y.astype(np.int64).reshape(2, -1), s.reshape(2, -1)
  assert metrics.auroc(y2, s2) == metrics.auroc(y, s)


def test_auroc_known_values():
  assert metrics.auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert metrics.auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
  assert metrics.average_precision([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2]) == 1.0
  # F1 ties (2/3 at 0.9 and at 0.6): the lowest threshold wins, as argmax over sklearn's thresholds.
  assert metrics.f1_max([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]) == pytest.approx((2 / 3, 0.6))


@pytest.mark.parametrize("n,levels,p_pos,dtype", CASES)
def test_f1_max_matches_precision_recall_curve(n, levels, p_pos, dtype):
  rng = np.random.default_rng(n + 1)
  y, s = _random_case(rng, n, levels, p_pos, dtype)
  precision, recall, thresholds = precision_recall_curve(y, s)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)[:-1]
  best, threshold = metrics.f1_max(y, s)
  assert best == pytest.approx(f1.max(), abs=1e-9)
  # The threshold reaches that F1 (predict anomalous where score >= threshold) and is a score.
  tp = np.sum(y & (s >= threshold))
  fp = np.sum(~y & (s >= threshold))
  assert 2 * tp / (tp + fp + y.sum()) == pytest.approx(best, abs=1e-12)
  assert threshold == pytest.approx(float(thresholds[np.argmax(f1)]), abs=0)


def _aupro_brute(masks, maps, fpr_limit):
  """MVTec AD PRO protocol by direct counting at every distinct threshold, then explicit integration."""
  labelled = [sk_label(m.astype(np.uint8), connectivity=2, background=0) for m in masks]  # 8-conn.
  normal = maps[masks == 0]
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    fprs.append(np.mean(normal >= t))
    pros.append(np.mean([np.mean(maps[i][lab == k] >= t)
                         for i, lab in enumerate(labelled) for k in range(1, lab.max() + 1)]))
  fprs.append(1.0)
  pros.append(1.0)
  area = 0.0
  for i in range(len(fprs) - 1):
    x0, x1, y0, y1 = fprs[i], fprs[i + 1], pros[i], pros[i + 1]
    if x0 >= fpr_limit:
      break
    if x1 <= fpr_limit:
      area += (x1 - x0) * (y0 + y1) / 2
    else:
      y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
      area += (fpr_limit - x0) * (y0 + y_lim) / 2
  return area / fpr_limit


def _blob_masks(rng, n, h, w):
  masks = np.zeros((n, h, w), np.uint8)
  for i in range(n - 1):  # The last image stays good.
    masks[i] = rng.random((h, w)) < 0.12  # Many small 4- and 8-connected blobs.
    masks[i, 2:5, 3:7] = 1
  return masks


@pytest.mark.parametrize("fpr_limit", [0.3, 1.0, 0.05, 0.5])
@pytest.mark.parametrize("levels", [12, 10**6])
def test_aupro_matches_brute_force(fpr_limit, levels):
  rng = np.random.default_rng(levels)
  masks = _blob_masks(rng, 3, 10, 12)
  # Quantised after the anomalous offset: anomalous and normal pixels share scores.
  maps = np.floor((rng.random(masks.shape) + 0.3 * masks * rng.random(masks.shape)) * levels) / levels
  maps = maps.astype(np.float32)
  want = _aupro_brute(masks, maps, fpr_limit)
  assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(want, abs=1e-9)


def test_aupro_uses_8_connectivity_and_known_values():
  masks = np.zeros((2, 6, 6), bool)
  masks[0, 1, 1] = masks[0, 2, 2] = True  # One diagonal (8-connected) region of 2 pixels.
  masks[1, 4, 4] = True  # A second region.
  maps = np.full(masks.shape, 0.1, np.float32)
  maps[0, 1, 1] = maps[1, 4, 4] = 0.9
  maps[0, 2, 2] = 0.05  # Below every normal pixel.
  # Thresholds 0.9 -> (FPR 0, PRO (1/2 + 1)/2 = 0.75); 0.1 -> (1, 0.75); 0.05 -> (1, 1).
  # 4-connectivity would give PRO (1 + 0 + 1)/3 instead.
  assert metrics.aupro(masks, maps, 0.3) == pytest.approx(0.75)
  perfect = masks.astype(np.float32)
  assert metrics.aupro(masks, perfect, 0.3) == pytest.approx(1.0)
  assert metrics.aupro(masks, 1.0 - perfect, 1.0) == pytest.approx(0.0)


def test_compute_all_matches_individual_metrics():
  rng = np.random.default_rng(5)
  masks = _blob_masks(rng, 6, 16, 16)
  masks[4] = 0
  maps = (rng.random(masks.shape) * 0.6 + 0.4 * masks).astype(np.float32)
  labels = masks.any(axis=(1, 2))
  scores = maps.max(axis=(1, 2)) + 0.1 * rng.random(6)
  out = metrics.compute_all(image_labels=labels, image_scores=scores, masks=masks, anomaly_maps=maps)
  assert set(out) == {"image_auroc", "image_ap", "image_f1_max", "image_threshold", "pixel_auroc",
                      "pixel_ap", "pixel_f1_max", "pixel_threshold", "aupro"}
  assert all(isinstance(v, float) for v in out.values())
  assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
  assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
  assert (out["image_f1_max"], out["image_threshold"]) == metrics.f1_max(labels, scores)
  assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
  assert out["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()),
                                          abs=1e-12)
  assert (out["pixel_f1_max"], out["pixel_threshold"]) == metrics.f1_max(masks, maps)
  assert out["aupro"] == metrics.aupro(masks, maps)
  assert all(0.0 <= out[k] <= 1.0 for k in out if not k.endswith("threshold"))


def test_single_class_errors_name_the_metric():
  masks = np.zeros((3, 4, 4), np.uint8)
  maps = np.zeros((3, 4, 4), np.float32)
  with pytest.raises(ValueError, match=r"image metrics \(image_auroc.*only normal"):
    metrics.compute_all(image_labels=[0, 0, 0], image_scores=[0.1, 0.2, 0.3], masks=masks,
                        anomaly_maps=maps)
  with pytest.raises(ValueError, match=r"pixel metrics \(pixel_auroc.*only normal"):
    metrics.compute_all(image_labels=[0, 1, 1], image_scores=[0.1, 0.2, 0.3], masks=masks,
                        anomaly_maps=maps)
  with pytest.raises(ValueError, match=r"^auroc: labels contain only anomalous"):
    metrics.auroc([1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match="^aupro: masks contain only normal"):
    metrics.aupro(masks, maps)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="binary"):
    metrics.auroc([0, 0.5, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="NaN"):
    metrics.auroc([0, 1, 1], [0.1, np.nan, 0.3])
  with pytest.raises(ValueError, match="NaN"):
    metrics.aupro(np.eye(3)[None], np.full((1, 3, 3), np.nan))
  with pytest.raises(ValueError, match="must match"):
    metrics.average_precision([0, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match=r"\(N, H, W\)"):
    metrics.aupro(np.zeros((4, 4)), np.zeros((4, 4)))
  with pytest.raises(ValueError, match="fpr_limit"):
    metrics.aupro(np.eye(3)[None], np.eye(3)[None], fpr_limit=0.0)
  with pytest.raises(ValueError, match="N = 2"):
    metrics.compute_all(image_labels=[0, 1], image_scores=[0.1, 0.2], masks=np.zeros((3, 4, 4)),
                        anomaly_maps=np.zeros((3, 4, 4)))
