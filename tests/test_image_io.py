"""Tests for draem_jax.data.image_io: decoding, OpenCV-exact bilinear resize, mask binarisation.

References: an exact-rational per-pixel transcription of the INTER_LINEAR formula, SHA-256 digests of
``cv2.resize`` outputs (opencv-python-headless 4.14.0 and 5.0.0 gave identical bytes), PIL.
"""

import hashlib
import io
import math
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from draem_jax.data import image_io


def pattern(shape, salt):
  """Deterministic pseudo-random uint8 array (integer arithmetic only, platform independent)."""
  i = np.arange(int(np.prod(shape)), dtype=np.int64)
  return ((i * i * 31 + i * 17 + (i // 977) * 13 + salt) % 251).astype(np.uint8).reshape(shape)


def blob(h, w):
  """A 0/255 ellipse plus a diagonal dot lattice: many boundary pixels, integer arithmetic only."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.int64)
  inside = ((yy - h // 2) ** 2 * (w // 3) ** 2 + (xx - w // 2) ** 2 * (h // 4) ** 2
            < (h // 4) ** 2 * (w // 3) ** 2)
  return np.where(inside | ((xx // 7 + yy // 5) % 9 == 0), 255, 0).astype(np.uint8)


def digest(a):
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]


def brute_force_bilinear(img, size):
  """Per-pixel INTER_LINEAR in exact rationals: half-pixel centres, clamped taps, round half up."""
  src_h, src_w = img.shape[:2]
  h, w = size
  flat = img.reshape(src_h, src_w, -1).astype(np.int64)
  out = np.zeros((h, w, flat.shape[2]), np.uint8)

  def px(y, x, c):
    return int(flat[min(max(y, 0), src_h - 1), min(max(x, 0), src_w - 1), c])

  for y in range(h):
    fy = Fraction(2 * y + 1, 2) * Fraction(src_h, h) - Fraction(1, 2)
    y0 = math.floor(fy)
    ty = fy - y0
    for x in range(w):
      fx = Fraction(2 * x + 1, 2) * Fraction(src_w, w) - Fraction(1, 2)
      x0 = math.floor(fx)
      tx = fx - x0
      for c in range(flat.shape[2]):
        v = ((1 - ty) * ((1 - tx) * px(y0, x0, c) + tx * px(y0, x0 + 1, c))
             + ty * ((1 - tx) * px(y0 + 1, x0, c) + tx * px(y0 + 1, x0 + 1, c)))
        out[y, x, c] = math.floor(v + Fraction(1, 2))
  return out.reshape((h, w) + img.shape[2:])


# (input shape, output size, sha256[:32] of cv2.resize(pattern(shape, case_index), INTER_LINEAR)).
CV2_GOLDEN = [
    ((1024, 1024, 3), (256, 256), "5bca8eca1073f757ff81bf14294ff9d4"),
    ((127, 128, 3), (256, 256), "c5b0c5e1ddf40e5f02edc536801fa5e1"),
    ((900, 700, 3), (256, 256), "9223cbfd55b6bc837208ebab815a6409"),
    ((37, 53), (19, 101), "5af937ced55ac2af0c5869125848bae2"),
    ((480, 640, 3), (300, 257), "65f8a6aa8c5aa9c82626481b3d9d2520"),
    ((5, 3, 4), (9, 2), "3416b2fcf88e625ea7b05212637d41d8"),
]


@pytest.mark.parametrize("case", range(len(CV2_GOLDEN)))
def test_resize_bit_exact_with_opencv_digests(case):
  shape, size, expected = CV2_GOLDEN[case]
  out = image_io.resize_bilinear(pattern(shape, case), size)
  assert out.shape == size + shape[2:] and out.dtype == np.uint8
  assert digest(out) == expected


def test_resize_matches_installed_opencv():
  cv2 = pytest.importorskip("cv2", reason="OpenCV is optional; the digests above cover it")
  rng = np.random.default_rng(0)
  for shape, size in [((61, 47, 3), (256, 256)), ((300, 211), (128, 97)), ((8, 8, 3), (3, 29))]:
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    ref = cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(image_io.resize_bilinear(img, size), ref)


@pytest.mark.parametrize("shape,size", [((37, 53, 3), (19, 23)), ((6, 5), (17, 13)),
                                        ((40, 12, 2), (11, 30)), ((1, 1, 3), (3, 4)),
                                        ((9, 9), (9, 9)), ((64, 64, 3), (16, 16))])
def test_resize_exact_matches_brute_force(shape, size):
  img = pattern(shape, 7)
  ref = brute_force_bilinear(img, size)
  np.testing.assert_array_equal(image_io.resize_bilinear(img, size, arithmetic="exact"), ref)
  # OpenCV's 11-bit fixed point differs from exact rounding by at most one grey level.
  diff = np.abs(image_io.resize_bilinear(img, size).astype(int) - ref)
  assert diff.max() <= 1


def test_resize_has_no_antialias():
  # Columns repeat [0, 100, 200, 40]: a 4x reduction samples midway between the two middle pixels.
  row = np.tile(np.array([0, 100, 200, 40], np.uint8), 16)
  img = np.repeat(row[None, :], 8, axis=0)
  out = image_io.resize_bilinear(img, (2, 16))
  assert np.all(out == 150)  # An antialiasing (box/triangle) filter would mix in 0 and 40.


def test_resize_identity_and_edges():
  img = pattern((7, 5, 3), 1)
  same = image_io.resize_bilinear(img, (7, 5))
  np.testing.assert_array_equal(same, img)
  assert same is not img
  up = image_io.resize_bilinear(img, (28, 20))
  # Edge clamp: the outer quarter-pixel band copies the corner pixels exactly.
  np.testing.assert_array_equal(up[0, 0], img[0, 0])
  np.testing.assert_array_equal(up[-1, -1], img[-1, -1])


def test_resize_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    image_io.resize_bilinear(np.zeros((4, 4), np.float32), (2, 2))
  with pytest.raises(ValueError, match="positive"):
    image_io.resize_bilinear(np.zeros((4, 4), np.uint8), (0, 2))
  with pytest.raises(ValueError, match="arithmetic"):
    image_io.resize_bilinear(np.zeros((4, 4), np.uint8), (2, 2), arithmetic="cubic")


# --- load_rgb ---------------------------------------------------------------------------------------


def save(path, array_or_image, **kwargs):
  im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  im.save(path, **kwargs)
  return path


def test_load_rgb_modes(tmp_path):
  rgb = pattern((6, 9, 3), 3)
  np.testing.assert_array_equal(image_io.load_rgb(save(tmp_path / "a.png", rgb)), rgb)
  np.testing.assert_array_equal(image_io.load_rgb(save(tmp_path / "a.BMP", rgb)), rgb)
  np.testing.assert_array_equal(image_io.load_rgb(save(tmp_path / "a.tif", rgb)), rgb)

  grey = pattern((6, 9), 4)
  out = image_io.load_rgb(save(tmp_path / "g.png", grey))
  assert out.shape == (6, 9, 3) and out.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], grey)

  # RGBA: alpha dropped, colour of transparent pixels kept (like cv2.imread).
  rgba = np.concatenate([rgb, np.zeros((6, 9, 1), np.uint8)], axis=-1)
  np.testing.assert_array_equal(image_io.load_rgb(save(tmp_path / "t.png", rgba)), rgb)

  # Grey + alpha.
  la = Image.fromarray(np.stack([grey, grey], -1), mode="LA")
  np.testing.assert_array_equal(image_io.load_rgb(save(tmp_path / "la.png", la))[..., 1], grey)

  # Palette: same as PIL's own RGB conversion.
  pal = Image.fromarray(rgb).quantize(colors=16)
  np.testing.assert_array_equal(image_io.load_rgb(save(tmp_path / "p.png", pal)),
                                np.asarray(pal.convert("RGB")))

  # 1-bit.
  bits = Image.fromarray(grey > 128).convert("1")
  np.testing.assert_array_equal(image_io.load_rgb(save(tmp_path / "b.png", bits))[..., 0],
                                np.where(grey > 128, 255, 0))


def test_load_rgb_16_bit(tmp_path):
  values = (pattern((5, 7), 9).astype(np.int64) * 257 + 3).clip(0, 65535)
  im = Image.fromarray(values.astype(np.uint16))  # mode I;16
  out = image_io.load_rgb(save(tmp_path / "d.png", im))
  np.testing.assert_array_equal(out[..., 2], (values >> 8).astype(np.uint8))


def test_load_rgb_jpeg_matches_pil_and_exif(tmp_path):
  rgb = pattern((16, 24, 3), 5)
  path = save(tmp_path / "x.JPEG", rgb, quality=90)
  np.testing.assert_array_equal(image_io.load_rgb(path), np.asarray(Image.open(path).convert("RGB")))
  # EXIF orientation 6 (rotate 90 degrees clockwise) is applied, as cv2.imread does.
  exif = Image.Exif()
  exif[0x0112] = 6
  rotated = save(tmp_path / "r.jpg", rgb, exif=exif)
  assert image_io.load_rgb(rotated).shape == (24, 16, 3)


def test_load_rgb_errors(tmp_path):
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"this is not a png")
  with pytest.raises(ValueError, match="broken.png"):
    image_io.load_rgb(bad)
  truncated = tmp_path / "cut.png"
  buf = io.BytesIO()
  Image.fromarray(pattern((64, 64, 3), 2)).save(buf, format="PNG")
  truncated.write_bytes(buf.getvalue()[:300])
  with pytest.raises(ValueError, match="cut.png"):
    image_io.load_rgb(truncated)
  with pytest.raises(FileNotFoundError, match="missing.png"):
    image_io.load_rgb(tmp_path / "missing.png")
  f32 = Image.fromarray(np.zeros((3, 3), np.float32))
  with pytest.raises(ValueError, match="floating-point"):
    image_io.load_rgb(save(tmp_path / "f.tif", f32))


def test_is_image_file():
  assert image_io.is_image_file("a/B.PNG") and image_io.is_image_file("x.tiff")
  assert not image_io.is_image_file("notes.txt") and not image_io.is_image_file("x.png.bak")


# --- masks ------------------------------------------------------------------------------------------

# (mask shape, output size, number of positives, sha256[:32] of np.packbits((cv2.resize(blob) / 255)
# .astype(uint8) == 1)): the reference's pixel ground truth.
MASK_GOLDEN = [
    ((300, 400), (256, 256), 20652, "3ba8ea349f5a3fb6864a4985e557ea65"),
    ((97, 61), (40, 50), 601, "8788385ea0e28a1ccef09368408e4efb"),
]


@pytest.mark.parametrize("case", range(len(MASK_GOLDEN)))
def test_mask_reference_rule_matches_opencv_digest(tmp_path, case):
  shape, size, count, expected = MASK_GOLDEN[case]
  path = save(tmp_path / "m.png", blob(*shape))
  m = image_io.load_mask(path, size)
  assert m.dtype == bool and m.shape == size
  assert int(m.sum()) == count
  assert hashlib.sha256(np.packbits(m).tobytes()).hexdigest()[:32] == expected


def test_mask_reference_rule_drops_boundary_pixels(tmp_path):
  src = blob(97, 61)
  m = image_io.load_mask(save(tmp_path / "m.png", src), (40, 50))
  exact = brute_force_bilinear(src, (40, 50)).astype(np.float64)
  # Independent exact-arithmetic view: full-strength pixels are positive, clearly mixed ones are not.
  assert np.all(m[exact == 255])
  assert not np.any(m[exact < 254])
  # Strictly fewer positives than a 50 % threshold would give (anti-aliased edges become negatives).
  assert m.sum() < (exact >= 128).sum()


def test_mask_nearest_rule_matches_pil(tmp_path):
  src = blob(97, 61)
  path = save(tmp_path / "m.png", src)
  ref = np.asarray(Image.fromarray(src).resize((50, 40), Image.Resampling.NEAREST)) > 0
  np.testing.assert_array_equal(image_io.load_mask(path, (40, 50), rule="nearest"), ref)


def test_mask_threshold_and_channels(tmp_path):
  values = np.array([[0, 127, 128, 255]], np.uint8)
  np.testing.assert_array_equal(image_io.load_mask(save(tmp_path / "t.png", values), (1, 4)),
                                [[False, False, True, True]])
  grey_rgb = np.repeat(blob(20, 30)[..., None], 3, axis=-1)
  np.testing.assert_array_equal(image_io.load_mask(save(tmp_path / "rgb.png", grey_rgb), (20, 30)),
                                blob(20, 30) > 0)
  coloured = grey_rgb.copy()
  coloured[3, 4] = (255, 0, 0)
  with pytest.raises(ValueError, match=r"colour\.png.*colour image"):
    image_io.load_mask(save(tmp_path / "colour.png", coloured), (20, 30))
  with pytest.raises(ValueError, match="rule"):
    image_io.load_mask(tmp_path / "t.png", (1, 4), rule="bilinear")


def test_resize_mask_accepts_bool():
  src = blob(30, 20)
  np.testing.assert_array_equal(image_io.resize_mask(src > 0, (12, 9)),
                                image_io.resize_mask(src, (12, 9)))


def test_parallel_map_keeps_order_uses_threads_and_raises():
  import threading
  import time

  seen = set()

  def slow_square(x):
    seen.add(threading.get_ident())
    time.sleep(0.01)
    return x * x

  assert image_io.parallel_map(slow_square, range(16), num_workers=4) == [x * x for x in range(16)]
  assert len(seen) > 1  # really on a pool
  seen.clear()
  assert image_io.parallel_map(slow_square, [3, 4], num_workers=1) == [9, 16]
  assert seen == {threading.get_ident()}  # one worker runs inline

  def fail_on_five(x):
    if x == 5:
      raise ValueError("item 5 is bad")
    return x

  with pytest.raises(ValueError, match="item 5 is bad"):
    image_io.parallel_map(fail_on_five, range(10), num_workers=3)


def test_decompression_bomb_is_one_line_naming_the_file_and_the_setting(tmp_path, monkeypatch):
  path = tmp_path / "huge.png"
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000: PIL's bomb error
  with pytest.raises(ValueError) as e:
    image_io.load_rgb(path)
  text = str(e.value)
  assert str(path) in text and image_io.MAX_PIXELS_ENV in text and "\n" not in text
