"""Tests for draem_jax.losses against scikit-image, SciPy and NumPy float64 transcriptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from skimage.metrics import structural_similarity

from draem_jax import losses

BORDER = 5  # skimage reflects at the border, DRAEM zero-pads: compare only pixels >= 5 from the edge.


def _skimage_map(x, y, data_range):
  """Per-example skimage SSIM maps, float64, (N, H, W, C)."""
  return np.stack([
      structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                            data_range=data_range, channel_axis=-1, full=True)[1]
      for a, b in zip(x, y)])


def _zero_padded_map(x, y, data_range):
  """Float64 transcription of the original SSIM: zero-padded Gaussian window, E[x^2] - mu^2."""
  k = np.arange(11) - 5.0
  g = np.exp(-k**2 / (2 * 1.5**2))
  g /= g.sum()

  def blur(a):
    a = scipy.ndimage.correlate1d(a, g, axis=1, mode="constant", cval=0.0)
    return scipy.ndimage.correlate1d(a, g, axis=2, mode="constant", cval=0.0)

  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _structured_pair():
  """Ramps, sinusoids, step edges, flat patches and a checkerboard: low-variance regions where a naive
  float32 E[x^2] - mu^2 loses ~1e-4 of SSIM."""
  yy, xx = np.mgrid[:32, :40] / 40.0
  checker = ((np.mgrid[:32, :40] // 4).sum(0) % 2).astype(float)
  a = np.stack([np.sin(6 * xx) * 0.5 + 0.5, (xx > 0.5).astype(float), np.full_like(xx, 0.3)], -1)
  b = np.stack([np.cos(5 * yy) * 0.5 + 0.5, 0.9 * (yy > 0.4), np.full_like(xx, 0.31)], -1)
  c = np.stack([xx, checker, 1.0 - yy], -1)
  d = np.stack([xx * 0.8 + 0.1, checker * 0.7 + 0.2, np.ones_like(xx)], -1)
  return np.stack([a, c, a]), np.stack([b, d, a])


def _f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.numerics
def test_ssim_map_matches_skimage_random():
  rng = np.random.default_rng(0)
  x = rng.random((3, 24, 30, 3))
  y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0.0, 1.0)
  y[2] = rng.random(y[2].shape)  # An unrelated pair too (SSIM near 0).
  got = np.asarray(losses.ssim_map(*_f32(x, y)))
  assert got.shape == x.shape and got.dtype == np.float32
  want = _skimage_map(x, y, 1.0)
  np.testing.assert_allclose(got[:, BORDER:-BORDER, BORDER:-BORDER],
                             want[:, BORDER:-BORDER, BORDER:-BORDER], rtol=0, atol=1e-5)


@pytest.mark.numerics
def test_ssim_map_matches_skimage_structured():
  x, y = _structured_pair()
  got = np.asarray(losses.ssim_map(*_f32(x, y)))
  want = _skimage_map(x, y, 1.0)
  np.testing.assert_allclose(got[:, BORDER:-BORDER, BORDER:-BORDER],
                             want[:, BORDER:-BORDER, BORDER:-BORDER], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(got[2], 1.0)  # Identical images: exactly 1 (border included).


@pytest.mark.numerics
def test_ssim_map_zero_padded_border_matches_float64():
  rng = np.random.default_rng(1)
  x, y = _structured_pair()
  x = np.concatenate([x, rng.random((1,) + x.shape[1:])])
  y = np.concatenate([y, rng.random((1,) + y.shape[1:])])
  got = np.asarray(losses.ssim_map(*_f32(x, y)))
  np.testing.assert_allclose(got, _zero_padded_map(x, y, 1.0), rtol=0, atol=1e-5)


def _naive_ssim_map_jax(x, y, data_range):
  """Float64 JAX transcription of the original (E[x^2] - mu^2, shifted-slice blur), for autodiff."""
  k = np.arange(11) - 5.0
  g = np.exp(-k**2 / (2 * 1.5**2))
  g /= g.sum()

  def blur(a):
    h, w = a.shape[1:3]
    a = jnp.pad(a, ((0, 0), (5, 5), (5, 5), (0, 0)))
    a = sum(g[i] * a[:, i:i + h] for i in range(11))
    return sum(g[i] * a[:, :, i:i + w] for i in range(11))

  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


@pytest.mark.numerics
@pytest.mark.parametrize("case", ["random", "similar", "flat"])
def test_ssim_gradients_match_float64_autodiff(case):
  # ssim_map has a hand-written reverse rule: its gradients in x, y and an array data_range must equal
  # autodiff of the textbook formula in float64.
  rng = np.random.default_rng(5)
  x = rng.random((2, 24, 20, 3))
  y = rng.random(x.shape) if case == "random" else np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
  if case == "flat":  # Low-variance patches, where SSIM is most sensitive.
    x[:, 4:18, 3:15], y[:, 4:18, 3:15] = 0.3, 0.31
  weights = rng.standard_normal(x.shape)
  data_range = 1.5

  def f32(a, b, big_l):
    return jnp.sum(losses.ssim_map(a, b, data_range=big_l) * jnp.asarray(weights, jnp.float32))

  got = jax.grad(f32, (0, 1, 2))(*_f32(x, y), jnp.float32(data_range))
  with jax.enable_x64(True):
    want = jax.grad(lambda a, b, big_l: jnp.sum(_naive_ssim_map_jax(a, b, big_l) * weights), (0, 1, 2))(
        jnp.asarray(x), jnp.asarray(y), jnp.float64(data_range))
    want = [np.asarray(w) for w in want]
  for g, w in zip(got, want):
    g = np.asarray(g, np.float64)
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * np.abs(w).max())
  # With data_range=None the range comes from comparisons on x: no gradient through it.
  g_default = jax.grad(lambda a: jnp.sum(losses.ssim_map(a, _f32(y)[0]) * jnp.float32(weights)))(_f32(x)[0])
  with jax.enable_x64(True):
    w_default = np.asarray(jax.grad(lambda a: jnp.sum(_naive_ssim_map_jax(a, jnp.asarray(y), 1.0) * weights))(
        jnp.asarray(x)))
  np.testing.assert_allclose(np.asarray(g_default, np.float64), w_default, rtol=0,
                             atol=2e-5 * np.abs(w_default).max())


@pytest.mark.parametrize("scale,offset,data_range", [
    (255.0, 0.0, 255.0),  # max > 128: max_val 255, min_val 0.
    (2.0, -1.0, 2.0),  # min < -0.5: max_val 1, min_val -1.
    (256.0, -0.75, 256.0),  # both: 255 - (-1).
])
def test_ssim_dynamic_range_rule(scale, offset, data_range):
  rng = np.random.default_rng(2)
  x = rng.random((2, 20, 22, 3)) * scale + offset
  y = np.clip(x + 0.05 * scale * rng.standard_normal(x.shape), offset, offset + scale)
  got = np.asarray(losses.ssim_map(*_f32(x, y)))
  np.testing.assert_allclose(got, _zero_padded_map(x, y, data_range), rtol=0, atol=2e-5)
  b = slice(BORDER, -BORDER)
  np.testing.assert_allclose(got[:, b, b], _skimage_map(x, y, data_range)[:, b, b], rtol=0, atol=2e-5)


def test_ssim_dynamic_range_uses_whole_batch_of_first_argument():
  rng = np.random.default_rng(3)
  x = rng.random((2, 16, 16, 1))
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
  x_big = x.copy()
  x_big[1, 0, 0, 0] = 200.0  # One pixel of the *other* example switches L to 255 for the batch.
  got = np.asarray(losses.ssim_map(*_f32(x_big, y)))
  np.testing.assert_allclose(got[0], _zero_padded_map(x, y, 255.0)[0], rtol=0, atol=1e-5)
  # The second argument never sets the range; thresholds are strict.
  y_big = y.copy()
  y_big[0, 0, 0, 0] = 200.0
  np.testing.assert_allclose(np.asarray(losses.ssim_map(*_f32(x, y_big))),
                             _zero_padded_map(x, y_big, 1.0), rtol=0, atol=1e-5)
  x_edge = x.copy()
  x_edge[0, 0, 0, 0], x_edge[0, 0, 1, 0] = 128.0, -0.5
  np.testing.assert_allclose(np.asarray(losses.ssim_map(*_f32(x_edge, y))),
                             _zero_padded_map(x_edge, y, 1.0), rtol=0, atol=1e-5)
  # An explicit data_range overrides the rule.
  np.testing.assert_allclose(np.asarray(losses.ssim_map(*_f32(x_big, y), data_range=1.0)),
                             _zero_padded_map(x_big, y, 1.0), rtol=0, atol=1e-5)


def test_ssim_and_ssim_loss_are_means_of_the_map():
  rng = np.random.default_rng(4)
  x, y = _f32(rng.random((2, 16, 18, 3)), rng.random((2, 16, 18, 3)))
  want = _zero_padded_map(np.asarray(x, np.float64), np.asarray(y, np.float64), 1.0).mean()
  np.testing.assert_allclose(float(losses.ssim(x, y)), want, atol=1e-6)
  np.testing.assert_allclose(float(losses.ssim_loss(x, y)), 1.0 - want, atol=1e-6)
  assert float(losses.ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-7)


def test_ssim_rejects_bad_shapes():
  with pytest.raises(ValueError, match="NHWC"):
    losses.ssim_map(jnp.zeros((16, 16, 3)), jnp.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match="same shape"):
    losses.ssim_map(jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 1)))


def test_l2_loss_matches_numpy():
  rng = np.random.default_rng(5)
  x, y = rng.standard_normal((2, 2, 8, 9, 3))
  np.testing.assert_allclose(float(losses.l2_loss(*_f32(x, y))), np.mean((x - y)**2), rtol=1e-6)
  with pytest.raises(ValueError, match="shapes differ"):
    losses.l2_loss(jnp.zeros((1, 2)), jnp.zeros((2, 1)))


def _focal_np(logits, mask, gamma=2.0, alpha=1.0, smooth=1e-5, normal_weight=1.0):
  """Float64 transcription of DRAEM's focal loss (softmax input, clamped one-hot, + smooth); the terms of
  class-0 pixels times ``normal_weight`` (1 in DRAEM)."""
  logits = np.asarray(logits, np.float64)
  c = logits.shape[-1]
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = (e / e.sum(-1, keepdims=True)).reshape(-1, c)
  idx = np.asarray(mask).reshape(-1).astype(np.int64)
  onehot = np.zeros_like(p)
  onehot[np.arange(len(idx)), idx] = 1.0
  onehot = np.clip(onehot, smooth / (c - 1), 1.0 - smooth)
  pt = (onehot * p).sum(1) + smooth
  return np.mean(np.where(idx == 0, normal_weight, 1.0) * -alpha * (1.0 - pt)**gamma * np.log(pt))


@pytest.mark.numerics
@pytest.mark.parametrize("scale", [1.0, 5.0, 30.0])
def test_focal_loss_matches_float64_transcription(scale):
  rng = np.random.default_rng(6)
  logits = scale * rng.standard_normal((2, 8, 10, 2))
  mask = (rng.random((2, 8, 10, 1)) < 0.3).astype(np.float32)
  got = float(losses.focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(mask)))
  np.testing.assert_allclose(got, _focal_np(np.float32(logits), mask), rtol=2e-6, atol=1e-9)
  # (N, H, W) masks are accepted too.
  got3 = float(losses.focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(mask[..., 0])))
  assert got3 == got


def test_focal_loss_other_parameters_and_classes():
  rng = np.random.default_rng(7)
  logits = 3.0 * rng.standard_normal((1, 6, 7, 3))
  mask = rng.integers(0, 2, (1, 6, 7, 1))
  for gamma, alpha, smooth in [(0.0, 1.0, 1e-5), (1.5, 0.25, 1e-3), (3.0, 2.0, 0.0)]:
    got = float(losses.focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(mask), gamma=gamma,
                                  alpha=alpha, smooth=smooth))
    np.testing.assert_allclose(got, _focal_np(np.float32(logits), mask, gamma, alpha, smooth),
                               rtol=5e-6)


def test_focal_normal_weight_scales_only_the_normal_pixels_terms():
  rng = np.random.default_rng(17)
  logits = 2.0 * rng.standard_normal((2, 6, 7, 2))
  mask = (rng.random((2, 6, 7, 1)) < 0.3).astype(np.float32)
  lg, m = jnp.asarray(logits, jnp.float32), jnp.asarray(mask)
  for w in (0.0, 0.1, 0.5, 2.0):
    np.testing.assert_allclose(float(losses.focal_loss(lg, m, normal_weight=w)),
                               _focal_np(np.float32(logits), mask, normal_weight=w), rtol=5e-6)
  assert float(losses.focal_loss(lg, m, normal_weight=1.0)) == float(losses.focal_loss(lg, m))
  # Weight 0: normal pixels get no gradient at all, anomalous ones the unweighted one.
  grad = np.asarray(jax.grad(losses.focal_loss)(lg, m, normal_weight=0.0))
  full = np.asarray(jax.grad(losses.focal_loss)(lg, m))
  normal = mask[..., 0] == 0
  assert np.all(grad[normal] == 0) and np.abs(full[normal]).sum() > 0
  np.testing.assert_allclose(grad[~normal], full[~normal], rtol=1e-6)
  # The same through draem_loss and LossConfig (what the train step passes).
  rec = img = jnp.full((2, 6, 7, 3), 0.5)
  _, terms = losses.draem_loss(rec, img, lg, m, focal_normal_weight=0.25)
  np.testing.assert_allclose(float(terms["focal"]), _focal_np(np.float32(logits), mask, normal_weight=0.25),
                             rtol=5e-6)
  assert losses.ORIGINAL_LOSS == losses.LossConfig((1.0, 1.0, 1.0), 1.0)


def test_focal_loss_gradients_finite_when_saturated():
  # p -> 1 and p -> 0 for both targets; softmax underflows to exactly 0 / 1 at +-1e4.
  big = np.array([0.0, 20.0, 50.0, 100.0, 1e4], np.float32)
  # Row i, magnitude b: pixels (b, -b) and (-b, b), each with target 0 and 1 -> (1, 5, 4, 2).
  pair = np.stack([big, -big], -1)[:, None, :]
  logits = np.concatenate([pair, pair, pair[..., ::-1], pair[..., ::-1]], 1)[None]
  mask = np.tile(np.array([0, 1, 0, 1], np.float32), (1, 5, 1))[..., None]
  loss, grad = jax.value_and_grad(losses.focal_loss)(jnp.asarray(logits), jnp.asarray(mask))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
  finite = np.abs(logits).max(axis=(0, 2, 3)) <= 50  # Where float64 softmax stays representable.
  np.testing.assert_allclose(
      float(losses.focal_loss(jnp.asarray(logits[:, finite]), jnp.asarray(mask[:, finite]))),
      _focal_np(logits[:, finite], mask[:, finite]), rtol=1e-5)


@pytest.mark.numerics
def test_focal_loss_gradient_matches_naive_formula():
  rng = np.random.default_rng(8)
  logits = jnp.asarray(2.0 * rng.standard_normal((1, 5, 6, 2)), jnp.float32)
  mask = jnp.asarray(rng.random((1, 5, 6, 1)) < 0.5, jnp.float32)

  @jax.jit
  def naive(lg):
    p = jax.nn.softmax(lg, -1)
    onehot = jnp.clip(jnp.concatenate([1 - mask, mask], -1), 1e-5, 1 - 1e-5)
    pt = jnp.sum(onehot * p, -1) + 1e-5
    return jnp.mean(-(1 - pt)**2 * jnp.log(pt))

  np.testing.assert_allclose(np.asarray(jax.grad(losses.focal_loss)(logits, mask)),
                             np.asarray(jax.grad(naive)(logits)), rtol=1e-4, atol=1e-9)


def test_focal_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match="C >= 2"):
    losses.focal_loss(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match="does not match"):
    losses.focal_loss(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 5, 1)))


def test_draem_loss_total_terms_jit_and_grad():
  rng = np.random.default_rng(9)
  rec, img = _f32(rng.random((2, 16, 16, 3)), rng.random((2, 16, 16, 3)))
  logits = jnp.asarray(rng.standard_normal((2, 16, 16, 2)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 16, 16, 1)) < 0.2, jnp.float32)
  total, terms = losses.draem_loss(rec, img, logits, mask)
  assert set(terms) == {"l2", "ssim", "focal"}
  np.testing.assert_allclose(float(terms["l2"]), float(losses.l2_loss(rec, img)), rtol=1e-6)
  np.testing.assert_allclose(float(terms["ssim"]), float(losses.ssim_loss(rec, img)), rtol=1e-6)
  np.testing.assert_allclose(float(terms["focal"]), float(losses.focal_loss(logits, mask)), rtol=1e-6)
  np.testing.assert_allclose(float(total), sum(float(v) for v in terms.values()), rtol=1e-6)
  weighted, _ = losses.draem_loss(rec, img, logits, mask, weights=(2.0, 0.5, 0.0))
  np.testing.assert_allclose(float(weighted), 2 * float(terms["l2"]) + 0.5 * float(terms["ssim"]),
                             rtol=1e-6)

  step = jax.jit(jax.value_and_grad(lambda r, lg: losses.draem_loss(r, img, lg, mask)[0],
                                    argnums=(0, 1)))
  value, (g_rec, g_logits) = step(rec, logits)
  np.testing.assert_allclose(float(value), float(total), rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(g_rec))) and np.all(np.isfinite(np.asarray(g_logits)))
  assert float(jnp.abs(g_rec).sum()) > 0 and float(jnp.abs(g_logits).sum()) > 0

