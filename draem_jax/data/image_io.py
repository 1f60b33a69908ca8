"""Host-side image decoding and OpenCV-compatible bilinear resizing (NumPy + PIL, no OpenCV needed).

The reference DRAEM reads every image with ``cv2.imread`` and shrinks it with ``cv2.resize(...,
INTER_LINEAR)``, and its pixel ground truth is "bilinearly resized mask == 255" (REFERENCE.md 3.1, 6).
This module reproduces both on the host:

* ``load_rgb``: any PIL-readable file -> uint8 RGB. Note the channel order: RGB, where the reference
  works in BGR (cv2); callers that want the reference's order flip the last axis.
* ``resize_bilinear``: OpenCV's INTER_LINEAR for uint8 (half-pixel centres, edge clamp, no antialias
  when shrinking). The default ``arithmetic="opencv"`` repeats OpenCV's 11-bit fixed-point arithmetic
  and is bit-exact with ``cv2.resize`` (checked against opencv 4.14 and 5.0); ``"float"`` rounds the
  exact float64 value to nearest, which differs from OpenCV by one grey level on ~12 % of pixels.
* ``load_mask``: a 0/255 defect mask -> bool at the target size, with the reference's binarisation.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions (lower case) that the folder scanners treat as images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# OpenCV's INTER_RESIZE_COEF_BITS = 11: interpolation weights are integers summing to 2048.
_COEF_ONE = 2048

MaskRule = Literal["reference", "nearest"]


def is_image_file(path: str | os.PathLike) -> bool:
  """True when the file name ends with one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
  return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def _open(path: str | os.PathLike) -> Image.Image:
  """Opens and fully decodes ``path`` with EXIF orientation applied (as ``cv2.imread`` does)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file not found: {path}")
  try:
    with Image.open(path) as im:
      im.load()  # Decode now so truncated/corrupt files fail here, with the file name.
      return ImageOps.exif_transpose(im)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(
        f"cannot decode image file {path}: {e}. Re-save it as PNG/JPEG/BMP/TIFF or remove it "
        "from the folder.") from e


def _to_uint8_array(im: Image.Image, path: str | os.PathLike) -> np.ndarray:
  """Converts a decoded PIL image to uint8, (H, W) for grey modes or (H, W, 3) for colour modes.

  Alpha is dropped, not composited (the reference's ``cv2.imread(IMREAD_COLOR)`` drops it too).
  16-bit and 32-bit integer greys keep their high byte (value >> 8), as OpenCV does when it converts
  16-bit data to 8 bits; pixel values outside [0, 65535] are clipped first.
  """
  mode = im.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    a = np.asarray(im).astype(np.int64)
    return (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
  if mode == "F":
    raise ValueError(
        f"image file {os.fspath(path)} holds floating-point pixels (PIL mode F), whose value range is "
        "ambiguous; convert it to an 8-bit or 16-bit PNG first.")
  if mode in ("1", "L"):
    return np.asarray(im.convert("L"))
  if mode == "LA":
    return np.asarray(im.getchannel("L"))
  if mode in ("RGBA", "P", "PA"):
    # Via RGBA so that palette transparency does not trigger PIL's conversion warning; alpha dropped.
    return np.asarray(im.convert("RGBA"))[..., :3].copy()
  # RGB, RGBX, CMYK, YCbCr, LAB, HSV, ...: PIL's own conversion.
  return np.asarray(im.convert("RGB"))


def load_rgb(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file to RGB.

  Grey (1, L, LA, 16-bit) images are replicated to three channels; palette images are expanded;
  alpha is dropped (not composited on black: a transparent pixel keeps its stored colour, like
  ``cv2.imread``); 16-bit data keep the high byte. EXIF orientation is applied.

  Args:
    path: image file (any format PIL reads; the scanners use ``IMAGE_EXTENSIONS``).

  Returns:
    uint8 array (H, W, 3), RGB.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file cannot be decoded (the message names the file).
  """
  a = _to_uint8_array(_open(path), path)
  if a.ndim == 2:
    a = np.repeat(a[:, :, None], 3, axis=2)
  return np.ascontiguousarray(a)


def _axis_taps(src: int, dst: int, clamp_weight: bool) -> tuple[np.ndarray, ...]:
  """Source indices and integer weights (sum ~2048) of OpenCV's INTER_LINEAR along one axis.

  Output sample ``i`` sits at source coordinate ``(i + 0.5) * src / dst - 0.5`` (computed in float64,
  stored in float32 as OpenCV does). Indices are clamped to the edge. OpenCV additionally zeroes the
  fraction outside the valid range along x (``clamp_weight``) but not along y; with fixed-point weights
  this changes the rounding, so both variants are kept.

  Returns:
    (i0, i1, w0, w1): int32 arrays of shape (dst,).
  """
  pos = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5).astype(np.float32)
  i0 = np.floor(pos).astype(np.int64)
  frac = pos - i0.astype(np.float32)
  if clamp_weight:
    outside = (i0 < 0) | (i0 >= src - 1)
    frac = np.where(outside, np.float32(0), frac)
    i0 = np.where(i0 < 0, 0, i0)
  i1 = np.clip(i0 + 1, 0, src - 1)
  i0 = np.clip(i0, 0, src - 1)
  # saturate_cast<short>(float) rounds half to even, like np.rint.
  w0 = np.rint((np.float32(1) - frac) * np.float32(_COEF_ONE))
  w1 = np.rint(frac * np.float32(_COEF_ONE))
  return (i0.astype(np.int32), i1.astype(np.int32), w0.astype(np.int32), w1.astype(np.int32))


def _float_taps(src: int, dst: int) -> tuple[np.ndarray, ...]:
  """Edge-clamped indices and exact float64 weights along one axis."""
  pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
  i0 = np.floor(pos)
  frac = pos - i0
  i0 = i0.astype(np.int64)
  return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), 1.0 - frac, frac


def resize_bilinear(image: np.ndarray, size: tuple[int, int],
                    arithmetic: Literal["opencv", "float"] = "opencv") -> np.ndarray:
  """Bilinear resize with ``cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR)`` semantics.

  Half-pixel centres, edge clamp, and no antialiasing when shrinking (a 4x reduction reads only the
  two middle pixels of each 4-pixel group). Separable: rows are gathered first, then columns, so the
  cost is O(out_H * in_W + out_H * out_W) per channel.

  Args:
    image: uint8 array (H, W) or (H, W, C).
    size: output (height, width) -- note: not OpenCV's (width, height) order.
    arithmetic: ``"opencv"`` (default) repeats OpenCV's 11-bit fixed-point weights and its rounding,
      bit-exact with cv2 for uint8; ``"float"`` computes in float64 and rounds half up.

  Returns:
    uint8 array (size[0], size[1]) or (size[0], size[1], C).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"resize_bilinear expects uint8 (H, W) or (H, W, C); got {image.dtype} "
                     f"{image.shape}")
  out_h, out_w = (int(s) for s in size)
  if out_h < 1 or out_w < 1:
    raise ValueError(f"resize_bilinear: output size must be positive, got {size}")
  in_h, in_w = image.shape[:2]
  if (in_h, in_w) == (out_h, out_w):
    return image.copy()  # Both arithmetics are exactly the identity here.
  tail = (1,) * (image.ndim - 2)  # Broadcast weights over the channel axis.
  if arithmetic == "float":
    y0, y1, wy0, wy1 = _float_taps(in_h, out_h)
    x0, x1, wx0, wx1 = _float_taps(in_w, out_w)
    rows = (image[y0].astype(np.float64) * wy0.reshape((-1, 1) + tail)
            + image[y1].astype(np.float64) * wy1.reshape((-1, 1) + tail))
    out = rows[:, x0] * wx0.reshape((1, -1) + tail) + rows[:, x1] * wx1.reshape((1, -1) + tail)
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)
  if arithmetic != "opencv":
    raise ValueError(f"resize_bilinear: arithmetic must be 'opencv' or 'float', got {arithmetic!r}")
  y0, y1, by0, by1 = _axis_taps(in_h, out_h, clamp_weight=False)
  x0, x1, ax0, ax1 = _axis_taps(in_w, out_w, clamp_weight=True)
  ax0 = ax0.reshape((1, -1) + tail)
  ax1 = ax1.reshape((1, -1) + tail)

  def horizontal(rows: np.ndarray) -> np.ndarray:
    # OpenCV's horizontal pass keeps the exact int sum (scale 2048), then drops 4 bits.
    r = rows.astype(np.int32)
    return (r[:, x0] * ax0 + r[:, x1] * ax1) >> 4

  top = horizontal(image[y0])
  bottom = horizontal(image[y1])
  # Vertical pass: (b * (h >> 4)) >> 16 per row, then a rounding shift by 2 (VResizeLinear, 8U).
  v = ((by0.reshape((-1, 1) + tail) * top) >> 16) + ((by1.reshape((-1, 1) + tail) * bottom) >> 16)
  return np.clip((v + 2) >> 2, 0, 255).astype(np.uint8)


def resize_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize with half-pixel centres (PIL's NEAREST, OpenCV's INTER_NEAREST_EXACT).

  Args:
    image: array (H, W) or (H, W, C), any dtype.
    size: output (height, width).

  Returns:
    Array of ``image``'s dtype, (size[0], size[1]) + image.shape[2:].
  """
  in_h, in_w = image.shape[:2]
  out_h, out_w = (int(s) for s in size)
  ys = np.minimum(((np.arange(out_h) + 0.5) * (in_h / out_h)).astype(np.int64), in_h - 1)
  xs = np.minimum(((np.arange(out_w) + 0.5) * (in_w / out_w)).astype(np.int64), in_w - 1)
  return image[ys][:, xs]


def load_mask(path: str | os.PathLike, size: tuple[int, int],
              rule: MaskRule = "reference") -> np.ndarray:
  """Loads a defect mask and resizes it to ``size``.

  The file must be single-channel-like: grey, or colour with three identical channels (alpha is
  ignored). Pixels > 127 are defect. The binary 0/255 mask is then resized to ``size`` (whatever the
  size of its image was):

  * ``"reference"``: OpenCV-exact bilinear resize, positive only where the result is exactly 255 --
    the reference's ``(resized / 255).astype(uint8)`` truncation (REFERENCE.md 6), so anti-aliased
    boundary pixels become negatives. For masks that are already 0/255 (MVTec) this is bit-identical
    to the reference, which resizes the raw mask without thresholding.
  * ``"nearest"``: nearest-neighbour resize with half-pixel centres.

  Args:
    path: mask file.
    size: output (height, width).
    rule: ``"reference"`` or ``"nearest"``.

  Returns:
    bool array (size[0], size[1]).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file cannot be decoded, or it is a genuinely coloured image.
  """
  if rule not in ("reference", "nearest"):
    raise ValueError(f"mask rule must be 'reference' or 'nearest', got {rule!r}")
  a = _to_uint8_array(_open(path), path)
  if a.ndim == 3:
    if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
      raise ValueError(
          f"mask file {os.fspath(path)} is a colour image (its R, G and B channels differ); a defect "
          "mask must be single-channel (0 = good, 255 = defect). Save it as 8-bit greyscale PNG.")
    a = a[..., 0]
  binary = np.where(a > 127, np.uint8(255), np.uint8(0))
  if rule == "nearest":
    return resize_nearest(binary, size) > 0
  return resize_bilinear(binary, size) == 255
