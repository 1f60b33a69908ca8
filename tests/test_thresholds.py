"""Normal-only thresholds: the target-FPR rule against brute force, its small-sample meaning, the rates."""

import numpy as np
import pytest
import sklearn.metrics

from draem_jax import thresholds


def _brute_force(scores, fpr):
  """The lowest candidate threshold (every score, or just above the max) with share >= t at most fpr."""
  s = np.asarray(scores, np.float64).ravel()
  candidates = np.append(np.unique(s), np.nextafter(s.max(), np.inf))
  for t in candidates:  # ascending
    if np.mean(s >= t) <= fpr + 1e-12:
      return t
  raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5])
def test_threshold_matches_brute_force(seed, fpr):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 60))
  scores = np.round(rng.random(n), 2)  # rounding makes ties
  t, achieved = thresholds.threshold_at_fpr(scores, fpr)
  assert t == _brute_force(scores, fpr)
  assert achieved == np.mean(scores >= t) <= fpr + 1e-12


def test_twenty_images_below_five_percent_is_just_above_the_maximum():
  scores = np.linspace(0.1, 0.9, 20)
  for fpr in (0.0, 0.01, 0.049):
    t, achieved = thresholds.threshold_at_fpr(scores, fpr)
    assert t == np.nextafter(0.9, 1) and achieved == 0.0
  t, achieved = thresholds.threshold_at_fpr(scores, 0.05)  # exactly one image may be flagged
  assert t == pytest.approx(0.9) and achieved == 0.05


def test_expected_fpr_on_new_good_images_is_k_over_n_plus_one():
  """The docstring's claim, by simulation: exchangeable good scores, k = floor(fpr * n) allowed."""
  rng = np.random.default_rng(0)
  n, trials = 20, 4000
  for fpr, k in ((0.01, 0), (0.1, 2)):
    rates = []
    for _ in range(trials):
      held_out = rng.random(n)
      t, _ = thresholds.threshold_at_fpr(held_out, fpr)
      rates.append(np.mean(rng.random(200) >= t))
    expected = max(k, 1) / (n + 1)
    assert abs(np.mean(rates) - expected) < 0.006, (fpr, np.mean(rates), expected)


def test_calibrate_records_targets_and_achieved_rates():
  rng = np.random.default_rng(1)
  maps = rng.random((6, 8, 8)).astype(np.float32)
  scores = rng.random(6).astype(np.float32)
  th = thresholds.calibrate(maps, scores, 0.2, 0.01, "validation: 6 held-out train/good images")
  assert th["num_images"] == 6 and th["num_pixels"] == 384
  assert np.mean(scores >= th["image"]) == th["achieved_image_fpr"] <= 0.2
  assert np.mean(maps >= th["pixel"]) == th["achieved_pixel_fpr"] <= 0.01
  assert th["achieved_pixel_fpr"] > 0.007  # 3 of 384 pixels: the pixel threshold is not just the max
  assert set(th) >= {"image", "pixel", "image_fpr", "pixel_fpr", "num_images", "source"}


def test_rates_match_sklearn():
  rng = np.random.default_rng(2)
  labels = rng.random(200) < 0.3
  scores = rng.random(200) + 0.3 * labels
  r = thresholds.rates_at(labels, scores, 0.7)
  pred = scores >= 0.7
  tn, fp, fn, tp = sklearn.metrics.confusion_matrix(labels, pred).ravel()
  assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (tp, fp, fn, tn)
  assert r["recall"] == pytest.approx(sklearn.metrics.recall_score(labels, pred))
  assert r["precision"] == pytest.approx(sklearn.metrics.precision_score(labels, pred))
  assert r["fpr"] == pytest.approx(fp / (fp + tn))
  assert np.isnan(thresholds.rates_at(labels, scores, 99.0)["precision"])


@pytest.mark.parametrize("fpr", [-0.1, 1.0, float("nan"), True])
def test_bad_target_is_one_line(fpr):
  with pytest.raises(ValueError, match="false-positive rate"):
    thresholds.threshold_at_fpr([0.1, 0.2], fpr)


def test_no_or_nonfinite_scores_are_refused():
  with pytest.raises(ValueError, match="held-out good images"):
    thresholds.threshold_at_fpr([], 0.1)
  with pytest.raises(ValueError, match="NaN"):
    thresholds.threshold_at_fpr([0.1, np.nan], 0.1)
