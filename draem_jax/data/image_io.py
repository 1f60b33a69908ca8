"""Host-side image decoding and OpenCV-compatible bilinear resizing (NumPy + PIL, no OpenCV needed).

The reference DRAEM reads every image with ``cv2.imread`` and shrinks it with ``cv2.resize(...,
INTER_LINEAR)``, and its pixel ground truth is "bilinearly resized mask == 255" (docs/evaluation.md).
This module reproduces both on the host:

* ``load_rgb``: any PIL-readable file -> uint8 RGB. Note the channel order: RGB, where the reference
  works in BGR (cv2); callers that want the reference's order flip the last axis.
* ``resize_bilinear``: OpenCV's INTER_LINEAR for uint8 (half-pixel centres, edge clamp, no antialias
  when shrinking). The default ``arithmetic="opencv"`` repeats OpenCV's 11-bit fixed-point arithmetic
  and is bit-exact with ``cv2.resize`` (checked against opencv 4.14 and 5.0); ``"exact"`` rounds the
  exact value to nearest, which differs from OpenCV by one grey level on ~12 % of pixels.
* ``load_mask``: a 0/255 defect mask -> bool at the target size, with the reference's binarisation.
* ``parallel_map``: the one thread pool that every loader decodes on.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions (lower case) that the folder scanners treat as images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# OpenCV's INTER_RESIZE_COEF_BITS = 11: interpolation weights are integers summing to 2048.
_COEF_ONE = 2048

MaskRule = Literal["reference", "nearest"]

_T = TypeVar("_T")
_R = TypeVar("_R")


def default_num_workers() -> int:
  """Decoding threads when the caller gives none: the CPU count, at most 8."""
  return min(8, os.cpu_count() or 1)


def parallel_map(fn: Callable[[_T], _R], items: Iterable[_T], num_workers: int | None = None) -> list[_R]:
  """``[fn(x) for x in items]`` on a thread pool, in order; the first exception is re-raised.

  Threads pay off because PIL's decoders and NumPy's large array operations release the GIL.

  Args:
    fn: function of one item.
    items: the items (consumed at once).
    num_workers: threads; None means ``default_num_workers()``. One thread (or one item) runs inline.

  Returns:
    The results in the order of ``items``.
  """
  items = list(items)
  workers = num_workers or default_num_workers()
  if workers <= 1 or len(items) <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(min(workers, len(items))) as pool:
    return list(pool.map(fn, items))


def is_image_file(path: str | os.PathLike) -> bool:
  """True when the file name ends with one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
  return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


# PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (~179 Mpx) as decompression bombs; this variable
# raises the limit for genuine large images (read once, at import).
MAX_PIXELS_ENV = "DRAEM_MAX_IMAGE_PIXELS"
if os.environ.get(MAX_PIXELS_ENV):
  Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS_ENV])


def _open(path: str | os.PathLike) -> Image.Image:
  """Opens and fully decodes ``path`` with EXIF orientation applied (as ``cv2.imread`` does)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file not found: {path}")
  try:
    with Image.open(path) as im:
      im.load()  # Decode now so truncated/corrupt files fail here, with the file name.
      return ImageOps.exif_transpose(im)
  except Image.DecompressionBombError as e:
    raise ValueError(
        f"{path} is larger than PIL's decompression-bomb limit ({e}). If the image is genuine, allow it "
        f"with the environment variable {MAX_PIXELS_ENV}=<pixels> (predict: --max_image_pixels).") from None
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
  scale = 1.0 / (dst / src)  # OpenCV inverts its inverse scale; may differ from src/dst in the last ulp.
  pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
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


def _exact_taps(src: int, dst: int) -> tuple[np.ndarray, ...]:
  """Edge-clamped indices and exact integer weights (denominator 2 * dst) along one axis.

  The sample position (i + 0.5) * src / dst - 0.5 equals ((2i + 1) * src - dst) / (2 * dst), so
  integer arithmetic gives its floor and fraction exactly (no float ties to mis-round).
  """
  num = (2 * np.arange(dst, dtype=np.int64) + 1) * src - dst
  i0 = num // (2 * dst)
  frac = num - i0 * (2 * dst)
  return (np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), 2 * dst - frac, frac)


def resize_bilinear(image: np.ndarray, size: tuple[int, int],
                    arithmetic: Literal["opencv", "exact"] = "opencv") -> np.ndarray:
  """Bilinear resize with ``cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR)`` semantics.

  Half-pixel centres, edge clamp, and no antialiasing when shrinking (a 4x reduction reads only the
  two middle pixels of each 4-pixel group). Separable: the two tap rows and then the two tap columns
  are gathered as uint8, so the arithmetic runs at output size only.

  Args:
    image: uint8 array (H, W) or (H, W, C).
    size: output (height, width) -- note: not OpenCV's (width, height) order.
    arithmetic: ``"opencv"`` (default) repeats OpenCV's 11-bit fixed-point weights and its rounding,
      bit-exact with cv2 for uint8; ``"exact"`` rounds the exact value half up (computed with
      integers, so no float ties are mis-rounded).

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
  # Work on (H, W * C) with per-channel column indices: every op then runs on contiguous 2-D rows.
  channels = 1 if image.ndim == 2 else image.shape[2]
  flat = image.reshape(in_h, in_w * channels)

  def columns(idx: np.ndarray) -> np.ndarray:
    return (idx[:, None] * channels + np.arange(channels)).reshape(-1)

  def per_channel(w: np.ndarray) -> np.ndarray:
    return np.repeat(w, channels)[None, :]

  if arithmetic == "exact":
    # Exact rational value, rounded half up: int64 numerators over (2 * out_h) * (2 * out_w).
    y0, y1, wy0, wy1 = _exact_taps(in_h, out_h)
    x0, x1, wx0, wx1 = _exact_taps(in_w, out_w)
    c0, c1, wx0, wx1 = columns(x0), columns(x1), per_channel(wx0), per_channel(wx1)

    def horizontal_exact(rows: np.ndarray) -> np.ndarray:
      return (np.take(rows, c0, axis=1).astype(np.int64) * wx0
              + np.take(rows, c1, axis=1).astype(np.int64) * wx1)

    out = (horizontal_exact(flat[y0]) * wy0[:, None] + horizontal_exact(flat[y1]) * wy1[:, None])
    den = 4 * out_h * out_w
    out = (2 * out + den) // (2 * den)
    return out.astype(np.uint8).reshape((out_h, out_w) + image.shape[2:])
  if arithmetic != "opencv":
    raise ValueError(f"resize_bilinear: arithmetic must be 'opencv' or 'exact', got {arithmetic!r}")
  y0, y1, by0, by1 = _axis_taps(in_h, out_h, clamp_weight=False)
  x0, x1, ax0, ax1 = _axis_taps(in_w, out_w, clamp_weight=True)
  c0, c1, ax0, ax1 = columns(x0), columns(x1), per_channel(ax0), per_channel(ax1)

  def horizontal(rows: np.ndarray) -> np.ndarray:
    # Gather the taps as uint8 first so the int32 work is at output size. OpenCV's horizontal pass
    # keeps the exact int sum (scale 2048); the vertical pass then drops 4 bits.
    h = np.take(rows, c0, axis=1).astype(np.int32)
    h *= ax0
    h += np.take(rows, c1, axis=1).astype(np.int32) * ax1
    h >>= 4
    return h

  # Vertical pass: (b * (h >> 4)) >> 16 per row, then a rounding shift by 2 (VResizeLinear, 8U).
  top = horizontal(flat[y0])
  top *= by0[:, None]
  top >>= 16
  bottom = horizontal(flat[y1])
  bottom *= by1[:, None]
  bottom >>= 16
  top += bottom
  top += 2
  top >>= 2
  np.minimum(top, 255, out=top)
  return top.astype(np.uint8).reshape((out_h, out_w) + image.shape[2:])


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


def _check_rule(rule: str) -> None:
  if rule not in ("reference", "nearest"):
    raise ValueError(f"mask rule must be 'reference' or 'nearest', got {rule!r}")


def load_mask(path: str | os.PathLike, size: tuple[int, int],
              rule: MaskRule = "reference") -> np.ndarray:
  """Loads a defect mask and resizes it to ``size``.

  The file must be single-channel-like: grey, or colour with three identical channels (alpha is
  ignored). Pixels > 127 are defect. The binary 0/255 mask is then resized to ``size`` (whatever the
  size of its image was):

  * ``"reference"``: OpenCV-exact bilinear resize, positive only where the result is exactly 255 --
    the reference's ``(resized / 255).astype(uint8)`` truncation (VitjanZ/DRAEM test_DRAEM.py L122), so
    anti-aliased boundary pixels become negatives. For masks that are already 0/255 (MVTec) this is
    bit-identical to the reference, which resizes the raw mask without thresholding.
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
  _check_rule(rule)
  return resize_mask(read_mask(path), size, rule)


def read_mask(path: str | os.PathLike) -> np.ndarray:
  """Decodes a defect mask at its own size: pixels > 127 are defect.

  Args:
    path: mask file; grey, or colour with three identical channels (alpha ignored).

  Returns:
    bool array (H, W).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file cannot be decoded, or it is a genuinely coloured image.
  """
  a = _to_uint8_array(_open(path), path)
  if a.ndim == 3:
    if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
      raise ValueError(
          f"mask file {os.fspath(path)} is a colour image (its R, G and B channels differ); a defect "
          "mask must be single-channel (0 = good, 255 = defect). Save it as 8-bit greyscale PNG.")
    a = a[..., 0]
  return a > 127


def resize_mask(mask: np.ndarray, size: tuple[int, int], rule: MaskRule = "reference") -> np.ndarray:
  """Binarises a grey mask (> 127 = defect) and resizes it with ``rule`` (see ``load_mask``).

  Args:
    mask: uint8 (H, W) grey mask, or bool (H, W).
    size: output (height, width).
    rule: ``"reference"`` or ``"nearest"``.

  Returns:
    bool array (size[0], size[1]).
  """
  _check_rule(rule)
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"resize_mask expects a (H, W) mask, got shape {mask.shape}")
  defect = mask if mask.dtype == bool else mask > 127
  binary = np.where(defect, np.uint8(255), np.uint8(0))
  if rule == "nearest":
    return resize_nearest(binary, size) > 0
  return resize_bilinear(binary, size) == 255
