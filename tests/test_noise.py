"""Tests for draem_jax.noise: parity with a float64 NumPy transcription, published mask statistics."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draem_jax import noise

POWERS = [1, 2, 4, 8, 16, 32]
RES_PAIRS = np.array(list(itertools.product(POWERS, POWERS)), np.int32)  # all 36 DRAEM resolutions


def perlin_numpy(angles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """The original rand_perlin_2d_np (VitjanZ/DRAEM perlin.py L46-65) in float64 NumPy.

  mgrid grid, np.repeat-tiled corner gradients, quintic fade.
  """
  h, w = shape
  r0, r1 = angles.shape[0] - 1, angles.shape[1] - 1
  cell = (h // r0, w // r1)
  # Fractional position inside the cell, built with a float step r/H as the reference does.
  grid = np.mgrid[0:r0:r0 / h, 0:r1:r1 / w].transpose(1, 2, 0)[:h, :w] % 1.0
  grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

  def tiled(rows, cols):
    return np.repeat(np.repeat(grads[rows, cols], cell[0], axis=0), cell[1], axis=1)[:h, :w]

  def dot(g, shift):
    return (grid[..., 0] + shift[0]) * g[..., 0] + (grid[..., 1] + shift[1]) * g[..., 1]

  lo, hi = slice(0, -1), slice(1, None)
  n00 = dot(tiled(lo, lo), (0, 0))
  n10 = dot(tiled(hi, lo), (-1, 0))
  n01 = dot(tiled(lo, hi), (0, -1))
  n11 = dot(tiled(hi, hi), (-1, -1))
  fade = 6 * grid**5 - 15 * grid**4 + 10 * grid**3

  def lerp(a, b, t):
    return a + t * (b - a)

  return np.sqrt(2) * lerp(lerp(n00, n10, fade[..., 0]), lerp(n01, n11, fade[..., 0]), fade[..., 1])


@pytest.fixture(scope="module")
def angles33():
  return np.random.default_rng(0).uniform(0, 2 * np.pi, (33, 33)).astype(np.float32)


@pytest.mark.numerics
def test_traced_res_matches_numpy_for_all_36_resolutions(angles33):
  # One program, res traced and vmapped: the exact path perlin_mask takes.
  fn = jax.jit(jax.vmap(lambda r: noise.perlin_from_angles(jnp.asarray(angles33), (256, 256), r)))
  out = np.asarray(fn(jnp.asarray(RES_PAIRS)))
  assert out.shape == (36, 256, 256) and out.dtype == np.float32
  for got, (r0, r1) in zip(out, RES_PAIRS):
    want = perlin_numpy(angles33[:r0 + 1, :r1 + 1].astype(np.float64), (256, 256))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"res=({r0}, {r1})")
  assert 0.5 < np.abs(out).max() < 1.0  # roughly [-1, 1], as observed for the reference


@pytest.mark.parametrize("res", [(1, 1), (4, 32), (32, 2), (8, 8)])
def test_static_res_matches_numpy(angles33, res):
  angles = angles33[:res[0] + 1, :res[1] + 1]
  got = jax.jit(noise.perlin_from_angles, static_argnums=1)(jnp.asarray(angles), (256, 256))
  want = perlin_numpy(angles.astype(np.float64), (256, 256))
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_non_power_of_two_shape_is_top_left_crop(angles33):
  # 200 x 300 is padded to the next multiple of 32 (224 x 320), every res divides it, then cropped.
  fn = jax.jit(jax.vmap(lambda r: noise.perlin_from_angles(jnp.asarray(angles33), (200, 300), r)))
  out = np.asarray(fn(jnp.asarray(RES_PAIRS)))
  assert out.shape == (36, 200, 300)
  for got, (r0, r1) in zip(out, RES_PAIRS):
    want = perlin_numpy(angles33[:r0 + 1, :r1 + 1].astype(np.float64), (224, 320))[:200, :300]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"res=({r0}, {r1})")

  masks = jax.jit(lambda k: noise.perlin_masks(k, 16, (200, 300)))(jax.random.key(3))
  assert masks.shape == (16, 200, 300) and masks.dtype == jnp.float32
  assert set(np.unique(np.asarray(masks))) <= {0.0, 1.0}
  assert 0 < float(masks.mean()) < 0.2


def test_perlin_is_zero_on_lattice_points_and_keyed():
  perlin = jax.jit(lambda k: noise.perlin(k, (64, 128), (4, 8)))
  key = jax.random.key(0)
  n = np.asarray(perlin(key))
  assert n.shape == (64, 128) and n.dtype == np.float32
  # Perlin noise vanishes at every lattice corner (offset vector 0); cells are 16 x 16 pixels.
  np.testing.assert_array_equal(n[::16, ::16], 0.0)
  assert np.abs(n).max() > 0.1 and np.abs(n).max() < 1.0
  np.testing.assert_array_equal(n, np.asarray(perlin(key)))
  assert not np.array_equal(n, np.asarray(perlin(jax.random.key(1))))


def test_mask_statistics_match_published_numbers():
  # The original generator's statistics (docs/anomaly_simulation.md), 3,000 draws at 256 x 256 before
  # rotation: 5.4 % mean area (median 5.3 %, 90th percentile 7.8 %) and 4.8 % empty masks.
  coverage_fn = jax.jit(
      lambda k: noise.perlin_masks(k, 500, (256, 256), rotate_degrees=0.0).mean(axis=(1, 2)))
  key = jax.random.key(2021)
  coverage = np.concatenate([np.asarray(coverage_fn(jax.random.fold_in(key, i))) for i in range(6)])
  assert coverage.shape == (3000,)
  assert abs(coverage.mean() - 0.054) <= 0.005, coverage.mean()
  assert abs((coverage == 0).mean() - 0.048) <= 0.015, (coverage == 0).mean()
  assert abs(np.median(coverage) - 0.053) <= 0.005, np.median(coverage)
  assert abs(np.percentile(coverage, 90) - 0.078) <= 0.01, np.percentile(coverage, 90)


def test_rotation_and_threshold_options():
  masks = jax.jit(noise.perlin_masks, static_argnums=(1, 2),
                  static_argnames=("rotate_degrees", "threshold"))
  key = jax.random.key(5)
  plain = masks(key, 8, (64, 64), rotate_degrees=0.0)
  rotated = masks(key, 8, (64, 64))
  assert set(np.unique(np.asarray(rotated))) <= {0.0, 1.0}
  assert not np.array_equal(np.asarray(plain), np.asarray(rotated))
  # Same noise, lower threshold: a superset of the pixels.
  low = masks(key, 8, (64, 64), rotate_degrees=0.0, threshold=0.2)
  assert np.all(np.asarray(low) >= np.asarray(plain)) and float(low.sum()) > float(plain.sum())


def test_batched_sampler_compiles_once():
  sampler = jax.jit(chex.assert_max_traces(lambda k: noise.perlin_masks(k, 8, (64, 64)), n=1))
  coverages = [float(sampler(jax.random.key(seed)).mean()) for seed in range(5)]
  assert len(set(coverages)) == 5  # different keys, different masks, same program


def test_example_keys_make_masks_batch_size_independent():
  key = jax.random.key(11)
  masks = jax.jit(noise.perlin_masks, static_argnums=(1, 2))
  four = masks(key, 4, (64, 64))
  eight = masks(key, 8, (64, 64))
  np.testing.assert_array_equal(np.asarray(four), np.asarray(eight[:4]))


def test_bad_input_raises():
  angles = jnp.zeros((5, 5))
  with pytest.raises(ValueError, match="shape"):
    noise.perlin_from_angles(angles, (0, 64))
  with pytest.raises(ValueError, match="angles"):
    noise.perlin_from_angles(jnp.zeros((5,)), (64, 64))
  with pytest.raises(ValueError, match="divide"):
    noise.perlin_from_angles(angles, (64, 64), (3, 4))
  with pytest.raises(ValueError, match="res"):
    noise.perlin(jax.random.key(0), (64, 64), (0, 2))
  with pytest.raises(ValueError, match="max_log2_res"):
    noise.perlin_mask(jax.random.key(0), (64, 64), max_log2_res=0)
