"""Tiles and crops: coverage and stitching by brute force, a pasted defect found at its place in a large
image, a tiled run of a model-size image equal to the plain run, and random crops on device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draem_jax import inference
from draem_jax import recipes
from draem_jax import regions
from draem_jax import scoring
from draem_jax import steps
from draem_jax import tiling


@pytest.mark.parametrize("length,tile,overlap", [(32, 32, 0.25), (100, 32, 0.25), (97, 32, 0.5),
                                                 (64, 32, 0.0), (33, 32, 0.9)])
def test_tile_starts_cover_and_overlap(length, tile, overlap):
  starts = tiling.tile_starts(length, tile, overlap)
  assert starts[0] == 0 and starts[-1] == length - tile and starts == sorted(set(starts))
  covered = np.zeros(length, int)
  for s in starts:
    covered[s:s + tile] += 1
  assert covered.min() >= 1
  gaps = np.diff(starts)
  assert (tile - gaps >= np.floor(overlap * tile) - 1).all()  # neighbours overlap by >= overlap (rounding)


def test_stitch_is_the_mean_over_covering_tiles():
  rng = np.random.default_rng(0)
  h, w, t = 50, 70, 32
  grid = tiling.tile_grid(h, w, t, 0.3)
  tile_maps = rng.random((len(grid), t, t))
  got = tiling.stitch(tile_maps, grid, (h, w))
  want = np.zeros((h, w))
  for i in range(h):  # brute force, pixel by pixel
    for j in range(w):
      vals = [m[i - y, j - x] for m, (y, x) in zip(tile_maps, grid) if y <= i < y + t and x <= j < x + t]
      want[i, j] = np.mean(vals)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Tiles cut from one map stitch back to that map.
  amap = rng.random((h, w)).astype(np.float32)
  np.testing.assert_allclose(tiling.stitch(tiling.extract_tiles(amap, grid, t), grid, (h, w)), amap,
                             rtol=1e-6)


def test_bad_tile_settings_are_one_line():
  with pytest.raises(ValueError, match="overlap"):
    tiling.tile_starts(64, 32, 1.0)
  with pytest.raises(ValueError, match="scale"):
    tiling.scaled_size(64, 64, 0.0, 32)


class _BrightnessModel(nn.Module):
  """A stand-in detector: logit of 'anomalous' rises with brightness, pixel by pixel (no parameters)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    bright = jnp.mean(x, axis=-1, keepdims=True)
    return x, jnp.concatenate([jnp.zeros_like(bright), 40.0 * (bright - 0.5)], axis=-1)


def _config(size=32, filter_size=5):
  c = recipes.tiny()
  c.image_size = size
  c.eval.score_filter_size = filter_size
  c.eval.batch_size = 8
  return c


def test_defect_pasted_into_a_large_image_is_found_at_its_place():
  config = _config()
  inf = inference.Inferencer(_BrightnessModel(), {}, config)
  image = np.full((150, 230, 3), 40, np.uint8)
  image[97:103, 171:179] = 250  # a small bright defect, 6 x 8 pixels
  maps, scores = inf.images([image], tile=True, tile_overlap=0.25)
  amap = maps[0]
  assert amap.shape == (150, 230)
  found = regions.find_regions(amap, 0.5, min_area=4)
  assert len(found) == 1 and found[0]["bbox"] == [171, 97, 178, 102] and found[0]["area"] == 48
  assert scores[0] > 0.5
  # At half the resolution the map is resized back to the image's size: still at the same place.
  half, _ = inf.images([image], tile=True, tile_scale=0.5)
  box = regions.find_regions(half[0], 0.5, min_area=4)[0]["bbox"]
  assert abs(box[0] - 171) <= 2 and abs(box[1] - 97) <= 2 and abs(box[2] - 178) <= 2


def test_tiled_run_of_a_model_size_image_equals_the_plain_run():
  config = _config(filter_size=21)
  model = steps.build_model(config)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
  inf = inference.Inferencer(model, variables, config)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
  tiled_maps, tiled_scores = inf.images(images, tile=True)
  plain_maps, plain_scores = inf.images(images, tile=False)
  for a, b in zip(tiled_maps, plain_maps):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(tiled_scores, plain_scores, rtol=1e-6)
  # The host-side score is the jitted scoring.image_score.
  want = scoring.image_score(jnp.asarray(np.stack(plain_maps)), filter_size=21)
  np.testing.assert_allclose(tiled_scores, np.asarray(want), rtol=1e-6)


def test_random_crops_are_windows_of_the_images_and_independent_of_the_batch():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)
  key = jax.random.key(3)
  crops = np.asarray(jax.jit(tiling.random_crops, static_argnums=2)(key, jnp.asarray(images), 8))
  assert crops.shape == (6, 8, 8, 3) and crops.dtype == np.uint8
  offsets = []
  for im, crop in zip(images, crops):  # brute-force search for the window
    hits = [(y, x) for y in range(13) for x in range(17) if np.array_equal(im[y:y + 8, x:x + 8], crop)]
    assert len(hits) == 1
    offsets.append(hits[0])
  assert len(set(offsets)) > 3  # offsets differ between examples
  # Example i depends only on its own key: the first 4 of a shorter batch are the same crops.
  np.testing.assert_array_equal(np.asarray(tiling.random_crops(key, jnp.asarray(images[:4]), 8)), crops[:4])
  other = np.asarray(tiling.random_crops(jax.random.key(4), jnp.asarray(images), 8))
  assert not np.array_equal(other, crops)
  with pytest.raises(ValueError, match="load_size"):
    tiling.random_crops(key, jnp.asarray(images), 32)
