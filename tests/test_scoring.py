"""Tests for draem_jax.scoring against NumPy float64 brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draem_jax import scoring


def _box_np(m, size):
  """Brute-force mean over size x size windows with zero padding, divided by size**2 (float64)."""
  m = np.asarray(m, np.float64)
  r = size // 2
  h, w = m.shape[-2:]
  padded = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(r, r), (r, r)])
  out = np.zeros_like(m)
  for dy in range(size):
    for dx in range(size):
      out += padded[..., dy:dy + h, dx:dx + w]
  return out / size**2


def test_anomaly_map_is_softmax_channel_one():
  rng = np.random.default_rng(0)
  logits = 4.0 * rng.standard_normal((2, 6, 7, 2))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  want = (e / e.sum(-1, keepdims=True))[..., 1]
  got = scoring.anomaly_map(jnp.asarray(logits, jnp.float32))
  assert got.shape == (2, 6, 7) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="C >= 2"):
    scoring.anomaly_map(jnp.zeros((1, 4, 4, 1)))


@pytest.mark.parametrize("size,shape", [(21, (2, 30, 26)), (1, (1, 5, 6)), (3, (3, 7, 9)),
                                        (7, (2, 12, 8)), (21, (1, 8, 8))])
@pytest.mark.numerics
def test_box_filter_matches_brute_force(size, shape):
  rng = np.random.default_rng(size)
  m = rng.random(shape)
  got = scoring.box_filter(jnp.asarray(m, jnp.float32), size)
  assert got.shape == shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _box_np(m, size), rtol=0, atol=2e-7)


def test_box_filter_divides_by_full_window_at_border():
  # count_include_pad=True: a constant map is attenuated at the border, corner = (r+1)^2 / size^2.
  got = np.asarray(scoring.box_filter(jnp.ones((1, 40, 40)), 21))
  assert got[0, 20, 20] == pytest.approx(1.0, abs=1e-6)
  assert got[0, 0, 0] == pytest.approx(121 / 441, abs=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("size", [21, 5])
def test_image_score_matches_brute_force(size):
  rng = np.random.default_rng(1)
  m = rng.random((4, 24, 32)) ** 4  # Peaky maps so the filtered and raw maxima differ.
  m[1, 2, 3] = 1.0
  got = scoring.image_score(jnp.asarray(m, jnp.float32), filter_size=size)
  assert got.shape == (4,) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _box_np(m, size).max(axis=(1, 2)), rtol=0, atol=2e-7)
  raw = scoring.image_score(jnp.asarray(m, jnp.float32), reduction="max")
  np.testing.assert_allclose(np.asarray(raw), m.max(axis=(1, 2)).astype(np.float32), rtol=0, atol=0)
  assert np.all(np.asarray(raw) > np.asarray(got))


def test_scoring_under_jit_and_vmap_without_retracing():
  rng = np.random.default_rng(2)
  traces = []

  def score(logits):
    traces.append(None)
    return scoring.image_score(scoring.anomaly_map(logits))

  jitted = jax.jit(score)
  batches = [jnp.asarray(rng.standard_normal((3, 16, 20, 2)), jnp.float32) for _ in range(3)]
  for b in batches:
    eager = np.asarray(scoring.image_score(scoring.anomaly_map(b)))
    np.testing.assert_allclose(np.asarray(jitted(b)), eager, rtol=1e-6, atol=1e-7)
  assert len(traces) == 1
  # vmap over an extra leading axis equals the per-slice results.
  stacked = jnp.stack(batches)
  got = jax.vmap(score)(stacked)
  want = np.stack([np.asarray(jitted(b)) for b in batches])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  # box_filter itself takes any leading axes.
  maps = jax.vmap(scoring.anomaly_map)(stacked)
  np.testing.assert_allclose(np.asarray(scoring.box_filter(maps, 5)), _box_np(np.asarray(maps), 5),
                             rtol=0, atol=2e-7)


def test_image_score_is_differentiable():
  m = jnp.asarray(np.random.default_rng(3).random((2, 10, 10)), jnp.float32)
  g = jax.grad(lambda x: scoring.image_score(x, filter_size=3).sum())(m)
  # The gradient of a max of a 3x3 mean is 1/9 on the 3x3 window of the arg-max pixel.
  np.testing.assert_allclose(np.asarray(g).sum(axis=(1, 2)), 1.0, rtol=1e-6)
  assert np.count_nonzero(np.asarray(g[0])) <= 9


@pytest.mark.parametrize("size", [0, 4, 21.0, True, -3])
def test_bad_filter_size_raises(size):
  with pytest.raises(ValueError, match="odd positive int"):
    scoring.image_score(jnp.zeros((1, 8, 8)), filter_size=size)


def test_bad_reduction_and_shape_raise():
  with pytest.raises(ValueError, match="reduction"):
    scoring.image_score(jnp.zeros((1, 8, 8)), reduction="mean")
  with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
    scoring.box_filter(jnp.zeros((8,)), 3)

