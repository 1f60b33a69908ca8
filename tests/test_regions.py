"""Connected defect regions against scikit-image's labelling and region properties."""

import numpy as np
import pytest
import skimage.measure
import skimage.morphology

from draem_jax import regions


def _random_map(seed, shape=(48, 64)):
  rng = np.random.default_rng(seed)
  amap = rng.random(shape).astype(np.float32) ** 3
  for _ in range(4):  # a few blobs so there are large and small regions
    y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
    amap[max(0, y - 4):y + 4, max(0, x - 6):x + 6] += 0.7
  return amap


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_area", [1, 5])
def test_regions_match_skimage(seed, min_area):
  amap = _random_map(seed)
  threshold = 0.6
  got = regions.find_regions(amap, threshold, min_area=min_area)
  labels = skimage.measure.label(amap >= threshold, connectivity=2)  # 8-connectivity
  want = []
  for p in skimage.measure.regionprops(labels, intensity_image=amap.astype(np.float64)):
    if p.area < min_area:
      continue
    r0, c0, r1, c1 = p.bbox
    want.append({"area": int(p.area), "bbox": [c0, r0, c1 - 1, r1 - 1],
                 "max_score": float(p.intensity_max), "mean_score": float(p.intensity_mean)})
  assert len(want) > 2
  key = lambda r: tuple(r["bbox"])  # noqa: E731
  got_sorted, want_sorted = sorted(got, key=key), sorted(want, key=key)
  assert [r["area"] for r in got_sorted] == [r["area"] for r in want_sorted]
  assert [r["bbox"] for r in got_sorted] == [r["bbox"] for r in want_sorted]
  np.testing.assert_allclose([r["max_score"] for r in got_sorted], [r["max_score"] for r in want_sorted])
  np.testing.assert_allclose([r["mean_score"] for r in got_sorted], [r["mean_score"] for r in want_sorted],
                             rtol=1e-12)
  # Sorted by max score, highest first.
  assert [r["max_score"] for r in got] == sorted((r["max_score"] for r in got), reverse=True)


def test_diagonal_pixels_are_one_region_and_threshold_is_inclusive():
  amap = np.zeros((5, 5), np.float32)
  amap[0, 0] = amap[1, 1] = amap[2, 2] = 0.5
  got = regions.find_regions(amap, 0.5)
  assert len(got) == 1 and got[0]["area"] == 3 and got[0]["bbox"] == [0, 0, 2, 2]
  assert regions.find_regions(amap, np.nextafter(np.float32(0.5), 1)) == []


@pytest.mark.parametrize("seed", [0, 3])
def test_region_mask_matches_remove_small_objects(seed):
  amap = _random_map(seed)
  mask = amap >= 0.6
  try:  # scikit-image >= 0.26 names the largest removed size; older versions the smallest kept one
    want = skimage.morphology.remove_small_objects(mask, max_size=5, connectivity=2)
  except TypeError:
    want = skimage.morphology.remove_small_objects(mask, min_size=6, connectivity=2)
  np.testing.assert_array_equal(regions.region_mask(amap, 0.6, min_area=6), want)


def test_bad_min_area_is_one_line():
  with pytest.raises(ValueError, match="min_region_area"):
    regions.find_regions(np.zeros((4, 4)), 0.5, min_area=0)
