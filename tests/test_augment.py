"""Tests for draem_jax.augment against PIL (uint8), NumPy float64 and colorsys references."""

import colorsys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from draem_jax import augment
from draem_jax import prng

H, W = 32, 48


def _gradient():
  yy, xx = np.mgrid[0:H, 0:W]
  return np.stack([(yy * 255) // (H - 1), (xx * 255) // (W - 1), ((yy + xx) * 255) // (H + W - 2)],
                  axis=-1).astype(np.uint8)


def _test_images():
  """uint8 (H, W, 3) images: full-range and mid-range noise, a smooth gradient and degenerate ones."""
  rng = np.random.default_rng(0)
  two_level = np.where(rng.random((H, W, 3)) < 0.3, 17, 201).astype(np.uint8)
  return {
      "noise": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
      "noise_mid": rng.integers(40, 200, (H, W, 3), dtype=np.uint8),
      "gradient": _gradient(),
      "gradient_low": (60 + _gradient() // 4).astype(np.uint8),
      "two_level": two_level,
      "constant": np.full((H, W, 3), 93, np.uint8),
  }


IMAGES = _test_images()


def _float(a):
  return jnp.asarray(a.astype(np.float32) / 255.0)


def _levels(x):
  return np.round(np.asarray(x, np.float64) * 255.0).astype(np.int64)


def _pil(a):
  return Image.fromarray(a)


# ------------------------------------------------------------------------------ exact PIL parity


def test_posterize_matches_pil():
  fn = jax.jit(augment.posterize_bits)
  for name, a in IMAGES.items():
    for bits in range(1, 9):
      want = np.asarray(ImageOps.posterize(_pil(a), bits))
      np.testing.assert_array_equal(_levels(fn(_float(a), bits)), want, err_msg=f"{name} bits={bits}")


def test_solarize_matches_pil():
  fn = jax.jit(augment.solarize_threshold)
  for name, a in IMAGES.items():
    for threshold in (0, 1, 32, 100, 127, 128, 255, 256):
      want = np.asarray(ImageOps.solarize(_pil(a), threshold))
      np.testing.assert_array_equal(_levels(fn(_float(a), threshold)), want,
                                    err_msg=f"{name} threshold={threshold}")


def test_invert_matches_pil():
  fn = jax.jit(augment.invert_image)
  for name, a in IMAGES.items():
    np.testing.assert_array_equal(_levels(fn(_float(a))), np.asarray(ImageOps.invert(_pil(a))),
                                  err_msg=name)


def test_equalize_matches_pil():
  fn = jax.jit(augment.equalize_image)
  for name, a in IMAGES.items():
    np.testing.assert_array_equal(_levels(fn(_float(a))), np.asarray(ImageOps.equalize(_pil(a))),
                                  err_msg=name)


# ------------------------------------------------------------------ PIL parity within one level


def test_autocontrast_matches_pil_within_one_level():
  # PIL maps v -> int(v * scale + offset) in float64, which can truncate an exact integer one level
  # lower (e.g. the top level to 254); we use the exact integer formula, so allow 1 level.
  fn = jax.jit(augment.autocontrast_cutoff)
  worst_equal = 1.0
  for name, a in IMAGES.items():
    for cutoff in (0, 1, 2, 5, 10, 20):
      diff = np.abs(_levels(fn(_float(a), cutoff)) - np.asarray(ImageOps.autocontrast(_pil(a), cutoff)))
      assert diff.max() <= 1, f"{name} cutoff={cutoff}: max error {diff.max()} levels"
      worst_equal = min(worst_equal, float(np.mean(diff == 0)))
  assert worst_equal >= 0.95
  # Degenerate inputs are left alone, and a float cutoff takes the same path as an integer one.
  np.testing.assert_array_equal(_levels(fn(_float(IMAGES["constant"]), 20)), IMAGES["constant"])
  a = _float(IMAGES["noise_mid"])
  np.testing.assert_array_equal(np.asarray(augment.autocontrast_cutoff(a, 5.0)),
                                np.asarray(fn(a, 5)))


def test_autocontrast_stretches_each_channel():
  # Independent check of PIL's semantics: after cutting, each channel spans exactly 0..255.
  a = IMAGES["noise_mid"]
  out = _levels(augment.autocontrast_cutoff(_float(a), 0))
  for c in range(3):
    lo, hi = int(a[..., c].min()), int(a[..., c].max())
    want = np.floor((a[..., c].astype(np.float64) - lo) * 255.0 / (hi - lo))
    np.testing.assert_array_equal(out[..., c], want)


def test_sharpness_matches_pil():
  fn = jax.jit(augment.sharpness_factor)
  for name, a in IMAGES.items():
    for factor in (0.0, 0.5, 1.0, 2.0):
      got = np.asarray(fn(_float(a), factor), np.float64) * 255.0
      want = np.asarray(ImageEnhance.Sharpness(_pil(a)).enhance(factor), np.float64)
      diff = np.abs(got - want)
      # PIL rounds its smoothed image to uint8; the float version does not.
      assert diff.max() < 1.0, f"{name} factor={factor}: max error {diff.max():.3f} levels"
      np.testing.assert_allclose(got[0], a[0], atol=1e-3)  # the border is never filtered
      np.testing.assert_allclose(got[:, -1], a[:, -1], atol=1e-3)


# ------------------------------------------------------------------------- float references


def test_gamma_matches_numpy():
  a = IMAGES["noise"].astype(np.float64) / 255.0
  gamma = np.array([0.5, 1.0, 2.0])
  got = np.asarray(augment.gamma_power(jnp.asarray(a, jnp.float32), gamma))
  np.testing.assert_allclose(got, a ** gamma.reshape(1, 1, 3), atol=2e-6)
  np.testing.assert_allclose(np.asarray(augment.gamma_power(jnp.asarray(a, jnp.float32), 1.7)),
                             a ** 1.7, atol=2e-6)


def _ycrcb_reference(rgb, mul, add, add_first):
  """Full-range YCrCb round trip in float64 with the luma changed; Cr and Cb kept."""
  forward = np.array([[0.299, 0.587, 0.114],
                      [0.713 * (1 - 0.299), -0.713 * 0.587, -0.713 * 0.114],
                      [-0.564 * 0.299, -0.564 * 0.587, 0.564 * (1 - 0.114)]])
  ycc = rgb @ forward.T
  y = ycc[..., 0]
  if add_first:
    y = np.clip(np.clip(y + add, 0, 1) * mul, 0, 1)
  else:
    y = np.clip(np.clip(y * mul, 0, 1) + add, 0, 1)
  ycc = np.stack([y, ycc[..., 1], ycc[..., 2]], axis=-1)
  return np.clip(ycc @ np.linalg.inv(forward).T, 0, 1)


def test_brightness_matches_ycrcb_reference():
  a = IMAGES["noise"].astype(np.float64) / 255.0
  for mul, add, add_first in [(1.2, 30 / 255, False), (0.8, -30 / 255, True), (1.1, -0.05, False),
                              (0.9, 0.1, True)]:
    got = np.asarray(augment.brightness_mul_add(jnp.asarray(a, jnp.float32), mul, add, add_first))
    np.testing.assert_allclose(got, _ycrcb_reference(a, mul, add, add_first), atol=2e-6,
                               err_msg=f"mul={mul} add={add} add_first={add_first}")


def _colour_probe():
  rng = np.random.default_rng(1)
  special = np.array([[0, 0, 0], [1, 1, 1], [.5, .5, .5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                      [0, 1, 1], [1, 0, 1], [1, 0, 1e-3], [.2, .2, .7], [.7, .7, .2]])
  return np.concatenate([special, rng.random((244, 3))]).reshape(16, 16, 3)


def test_hsv_matches_colorsys():
  rgb = _colour_probe()
  got = np.asarray(augment.rgb_to_hsv(jnp.asarray(rgb, jnp.float32)), np.float64)
  want = np.array([colorsys.rgb_to_hsv(*p) for p in rgb.reshape(-1, 3)]).reshape(rgb.shape)
  hue_err = np.abs((got[..., 0] - want[..., 0] + 0.5) % 1.0 - 0.5)  # hue is circular
  assert hue_err.max() < 1e-5
  np.testing.assert_allclose(got[..., 1:], want[..., 1:], atol=1e-6)
  back = np.asarray(augment.hsv_to_rgb(jnp.asarray(want, jnp.float32)))
  np.testing.assert_allclose(back, rgb, atol=2e-6)


def test_hue_saturation_matches_colorsys():
  rgb = _colour_probe()
  for dh, ds in [(0.0, 0.0), (35 / 180, 50 / 255), (-35 / 180, -50 / 255), (0.9, 0.3), (1.0, 0.0)]:
    got = np.asarray(augment.hue_saturation_shift(jnp.asarray(rgb, jnp.float32), dh, ds))
    want = []
    for p in rgb.reshape(-1, 3):
      h, s, v = colorsys.rgb_to_hsv(*p)
      want.append(colorsys.hsv_to_rgb((h + dh) % 1.0, min(max(s + ds, 0.0), 1.0), v))
    np.testing.assert_allclose(got, np.array(want).reshape(rgb.shape), atol=1e-5,
                               err_msg=f"hue={dh} saturation={ds}")


def test_rotate_zero_and_quarter_turn():
  img = _float(IMAGES["noise"])
  np.testing.assert_allclose(np.asarray(augment.rotate_degrees(img, 0.0)), np.asarray(img), atol=1e-6)
  square = np.asarray(img[:H, :H])
  turned = np.asarray(augment.rotate_degrees(jnp.asarray(square), 90.0))[1:-1, 1:-1]
  errors = [np.abs(turned - np.rot90(square, k, axes=(0, 1))[1:-1, 1:-1]).max() for k in (1, -1)]
  assert min(errors) < 1e-4, errors


# --------------------------------------------------------------------- the random augmenters

NAMES = ("gamma_contrast", "multiply_and_add_to_brightness", "sharpness", "hue_saturation",
         "solarize", "posterize", "invert", "autocontrast", "equalize", "rotate")


# Shared by two tests so that the (largest) single-example program compiles once.
_AUGMENT_ONE = jax.jit(augment.random_augment_one, static_argnames="num_ops")


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def test_augmenters_order_shape_dtype_range():
  assert tuple(f.__name__ for f in augment.AUGMENTERS) == NAMES
  rng = np.random.default_rng(2)
  img = rng.random((24, 20, 3)).astype(np.float32)
  img[0, 0] = 0.0
  img[0, 1] = 1.0
  img = jnp.asarray(img)
  # One program for all ten keeps the compile count (and the test time) down.
  outs = jax.jit(lambda keys, x: [jax.vmap(fn, in_axes=(0, None))(keys, x)
                                  for fn in augment.AUGMENTERS])(_keys(6), img)
  for fn, out in zip(augment.AUGMENTERS, outs):
    assert out.shape == (6, 24, 20, 3) and out.dtype == jnp.float32, fn.__name__
    out = np.asarray(out)
    assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0, fn.__name__


def test_random_parameters_cover_their_ranges():
  n = 256
  keys = _keys(n, seed=3)
  a = IMAGES["noise_mid"]
  img = _float(a)
  # gamma: recover the per-channel exponent from x ** g.
  x = np.asarray(img, np.float64)
  out = np.asarray(jax.jit(jax.vmap(augment.gamma_contrast, in_axes=(0, None)))(keys, img), np.float64)
  gamma = np.median(np.log(out) / np.log(x)[None], axis=(1, 2))  # (n, 3)
  assert gamma.min() >= 0.5 - 1e-3 and gamma.max() <= 2.0 + 1e-3
  assert gamma.min() < 0.6 and gamma.max() > 1.9
  assert np.mean(np.abs(gamma[:, 0] - gamma[:, 1]) > 1e-3) > 0.95  # drawn per channel
  # posterize: every draw is one of bits 1..8, and all of them occur.
  out = _levels(jax.jit(jax.vmap(augment.posterize, in_axes=(0, None)))(keys, img))
  table = np.stack([np.asarray(ImageOps.posterize(_pil(a), b)) for b in range(1, 9)])
  match = np.all(out[:, None] == table[None], axis=(2, 3, 4))  # (n, 8)
  assert match.any(axis=1).all() and match.any(axis=0).all()
  # solarize: p = 0.5, threshold in 32..127.
  out = _levels(jax.jit(jax.vmap(augment.solarize, in_axes=(0, None)))(keys, img))
  table = np.stack([a] + [np.asarray(ImageOps.solarize(_pil(a), t)) for t in range(32, 128)])
  match = np.all(out[:, None] == table[None], axis=(2, 3, 4))
  assert match.any(axis=1).all()
  applied = ~match[:, 0]
  assert 0.4 < applied.mean() < 0.6
  # autocontrast: every draw is a cutoff in 0..20.
  out = _levels(jax.jit(jax.vmap(augment.autocontrast, in_axes=(0, None)))(keys[:64], img))
  table = _levels(jax.vmap(augment.autocontrast_cutoff, in_axes=(None, 0))(img, jnp.arange(21)))
  match = np.all(out[:, None] == table[None], axis=(2, 3, 4))
  assert match.any(axis=1).all() and not match[:, 0].all()


def test_augment_plan_draws_distinct_uniform_indices():
  n = 2000
  indices, keys = jax.jit(jax.vmap(augment.augment_plan))(_keys(n, seed=4))
  indices = np.asarray(indices)
  assert indices.shape == (n, 3) and keys.shape == (n, 3)
  assert all(len(set(row)) == 3 for row in indices.tolist())
  assert indices.min() == 0 and indices.max() == 9
  counts = np.stack([np.bincount(indices[:, j], minlength=10) for j in range(3)])
  assert counts.min() > 140 and counts.max() < 260  # expected 200 per index and position


def test_random_augment_one_applies_the_plan_in_order():
  img = _float(IMAGES["noise_mid"][:16, :16])
  fn = _AUGMENT_ONE
  for seed in range(3):
    key = jax.random.key(seed)
    indices, keys = augment.augment_plan(key)
    want = img
    for index, op_key in zip(np.asarray(indices).tolist(), keys):
      want = jax.jit(augment.AUGMENTERS[index])(op_key, want)
    np.testing.assert_allclose(np.asarray(fn(key, img)), np.asarray(want), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(augment.random_augment_one(key, img, num_ops=0)), img)


def test_random_augment_is_per_example_and_traced_once():
  chex.clear_trace_counter()
  batched = jax.jit(chex.assert_max_traces(augment.random_augment, n=1))
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.random((4, 16, 16, 3)).astype(np.float32))
  key = jax.random.key(7)
  out = batched(key, images)
  batched(jax.random.key(8), images)
  batched(key, images + 0.0)
  assert out.shape == images.shape and out.dtype == jnp.float32
  # Example i depends only on fold_in(key, i), not on the batch size (here 2 against 4), and the
  # sequential lax.map path gives the same images as vmap.
  small = jax.jit(augment.random_augment, static_argnames="sequential")(
      key, images[:2], sequential=True)
  np.testing.assert_allclose(np.asarray(small), np.asarray(out[:2]), atol=1e-5)
  one = _AUGMENT_ONE(prng.example_keys(key, 4)[3], images[3])
  np.testing.assert_allclose(np.asarray(one), np.asarray(out[3]), atol=1e-5)
  assert not np.allclose(np.asarray(out[0]), np.asarray(out[1]))


def test_bad_input_raises():
  img = _float(IMAGES["noise"])
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="float image"):
    augment.invert(key, jnp.asarray(IMAGES["noise"]))
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    augment.equalize(key, img[..., :2])
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    augment.random_augment(key, img)
  with pytest.raises(ValueError, match="bits"):
    augment.posterize_bits(img, 9)
  with pytest.raises(ValueError, match="num_ops"):
    augment.random_augment_one(key, img, num_ops=11)


def test_floor_divide_is_exact_integer_division():
  # Against int64 //. The divisor is broadcast, as in the augmenters: XLA then multiplies by its
  # reciprocal, and a plain floor(a / b) misses 74 of autocontrast's 256 x 255 (offset, span) pairs.
  offset = np.arange(256, dtype=np.int64)[:, None]
  span = np.arange(1, 256, dtype=np.int64)[None, :]
  fn = jax.jit(lambda a, b: augment._floor_divide(a * 255.0, b))
  got = np.asarray(fn(jnp.asarray(offset, jnp.float32), jnp.asarray(span, jnp.float32)))
  np.testing.assert_array_equal(got.astype(np.int64), offset * 255 // span)
  # Equalize-sized numerators (up to a 4096 x 4096 image) over every step such an image can have.
  rng = np.random.default_rng(0)
  num = rng.integers(0, 2**24 - 70000, (4000, 1))
  den = rng.integers(1, 65794, (1, 50))
  got = np.asarray(jax.jit(augment._floor_divide)(jnp.asarray(num, jnp.float32),
                                                  jnp.asarray(den, jnp.float32)))
  np.testing.assert_array_equal(got.astype(np.int64), num // den)
