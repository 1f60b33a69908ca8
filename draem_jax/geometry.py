"""Geometric image operations shared by noise, augmentation and synthesis.

All functions work on one example; vmap them over a batch.
"""

import jax
import jax.numpy as jnp

# What rotated-in pixels (whose source lies outside the image) become: "constant" takes ``fill`` (the
# original's black corners), "edge" repeats the nearest border pixel, "reflect" mirrors the image about
# its border (edge pixel repeated: ``d c b a | a b c d``, OpenCV's BORDER_REFLECT).
FILL_MODES = ("constant", "edge", "reflect")


def rotate(image: jax.Array, degrees: jax.Array | float, fill: float = 0.0,
           mode: str = "constant") -> jax.Array:
  """Rotates an image about its centre with bilinear sampling; outside pixels per ``mode``.

  Matches imgaug's ``Affine(rotate=...)`` defaults that DRAEM uses (order=1, mode="constant", cval=0,
  fit_output=False): the centre of rotation is the pixel-grid centre ((W-1)/2, (H-1)/2) and pixels whose
  source falls outside the image take ``fill``. The sign convention is irrelevant for DRAEM because every
  angle is drawn from a symmetric range.

  Args:
    image: (H, W) or (H, W, C) float array.
    degrees: scalar rotation angle in degrees (may be traced).
    fill: value for pixels rotated in from outside (``mode="constant"`` only).
    mode: static, one of ``FILL_MODES``; "constant" is imgaug's (and DRAEM's) behaviour.

  Returns:
    Array with the shape and dtype of ``image``.
  """
  if mode not in FILL_MODES:
    raise ValueError(f"rotate: mode must be one of {sorted(FILL_MODES)}, got {mode!r}")
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  # A zero angle returns the image as it is (bilinear sampling at whole pixels would too). The
  # conditional also matters for speed on XLA:CPU: its boundary keeps the sampled image and the result
  # in memory; without it XLA fuses the four gathers, and whatever computed the image (the Perlin noise,
  # say), into every consumer, once per channel a consumer broadcasts to: the rotated Perlin mask cost
  # ~5x more inside DRAEM's blend than alone. Under vmap it is a select, as before.
  return jax.lax.cond(theta == 0, lambda x: x, lambda x: _sample_rotated(x, theta, fill, mode), image)


def _sample_rotated(image: jax.Array, theta: jax.Array, fill: float, mode: str) -> jax.Array:
  """``rotate``'s bilinear sampling; ``theta`` a float32 scalar in radians."""
  h, w = image.shape[:2]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  dy = (jnp.arange(h, dtype=jnp.float32) - cy)[:, None]
  dx = (jnp.arange(w, dtype=jnp.float32) - cx)[None, :]
  # Inverse mapping: for each output pixel (H, W) find where it comes from in the input.
  src_y = cos * dy - sin * dx + cy
  src_x = sin * dy + cos * dx + cx
  y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
  fy, fx = src_y - y0, src_x - x0
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  # Bilinear sampling written out (what map_coordinates(order=1) computes, with its border modes): one
  # gather of whole pixels (all channels) per tap from the flattened image. map_coordinates gathers
  # each channel with a 2-D index per tap, ~4x slower on XLA:CPU when the angle is traced.
  pixels = image.reshape(h * w, -1).astype(jnp.float32)
  out = jnp.zeros((h, w, pixels.shape[-1]), jnp.float32)
  for oy, wy in ((0, 1.0 - fy), (1, fy)):
    for ox, wx in ((0, 1.0 - fx), (1, fx)):
      iy, ix = _border_index(y0 + oy, h, mode), _border_index(x0 + ox, w, mode)
      value = pixels[iy * w + ix].reshape(h, w, -1)
      if mode == "constant":
        inside = (y0 + oy >= 0) & (y0 + oy < h) & (x0 + ox >= 0) & (x0 + ox < w)
        value = jnp.where(inside[..., None], value, jnp.float32(fill))
      out = out + (wy * wx)[..., None] * value
  return out.reshape(image.shape).astype(image.dtype)


def _border_index(index: jax.Array, size: int, mode: str) -> jax.Array:
  """int32 indices (any shape) -> indices in [0, size) for ``mode`` (one of ``FILL_MODES``).

  "constant" and "edge" clamp (a clamped "constant" tap is then replaced by the fill); "reflect"
  mirrors with period 2 * size, the edge pixel repeated (``d c b a | a b c d``).
  """
  if mode == "reflect":
    folded = jnp.remainder(index, 2 * size)
    return jnp.where(folded < size, folded, 2 * size - 1 - folded)
  return jnp.clip(index, 0, size - 1)
