"""Geometric image operations shared by noise, augmentation and synthesis.

All functions work on one example; vmap them over a batch.
"""

import jax
import jax.numpy as jnp

# What rotated-in pixels (whose source lies outside the image) become: "constant" takes ``fill`` (the
# original's black corners), "edge" repeats the nearest border pixel, "reflect" mirrors the image about
# its border (edge pixel repeated: ``d c b a | a b c d``, OpenCV's BORDER_REFLECT).
FILL_MODES = {"constant": "constant", "edge": "nearest", "reflect": "reflect"}


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
    mode: static, a key of ``FILL_MODES``; "constant" is imgaug's (and DRAEM's) behaviour.

  Returns:
    Array with the shape and dtype of ``image``.
  """
  if mode not in FILL_MODES:
    raise ValueError(f"rotate: mode must be one of {sorted(FILL_MODES)}, got {mode!r}")
  h, w = image.shape[:2]
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  # Inverse mapping: for each output pixel find where it comes from in the input.
  dy, dx = yy - cy, xx - cx
  src_y = cos * dy - sin * dx + cy
  src_x = sin * dy + cos * dx + cx

  def sample(channel):
    return jax.scipy.ndimage.map_coordinates(channel, [src_y, src_x], order=1, mode=FILL_MODES[mode],
                                             cval=fill)

  if image.ndim == 2:
    return sample(image.astype(jnp.float32)).astype(image.dtype)
  out = jax.vmap(sample, in_axes=-1, out_axes=-1)(image.astype(jnp.float32))
  return out.astype(image.dtype)
