"""Perlin noise and the thresholded Perlin masks that shape DRAEM's simulated anomalies.

The noise is the reference ``rand_perlin_2d_np`` (VitjanZ/DRAEM perlin.py L46-65;
docs/anomaly_simulation.md): random unit gradients on an (r0+1) x (r1+1) lattice, quintic fade, bilinear
blend of the four corner dot products, scaled by sqrt(2).

Unlike the reference, the lattice resolution may be a *traced* value. The angles live in a fixed-size
table for the largest resolution R; the image is split into R x R fine cells, each fine cell looks up the
corners of the coarse cell (at the drawn resolution r, r | R) that contains it, and every pixel computes
its in-cell fraction with integer arithmetic. One compiled program therefore serves all 36 resolutions
that DRAEM draws, with no branch per resolution and no retracing.

Shapes the lattice does not divide are handled like anomalib: the noise is evaluated on a larger grid
and cropped to the top-left (H, W). We pad each axis to the next multiple of the largest resolution (32
for DRAEM), which every drawn resolution divides, rather than to the next power of two as anomalib
does, so the cells stay close to H / r pixels. Shapes that are multiples of 32 give exactly the reference.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from draem_jax import geometry
from draem_jax import prng

_SQRT2 = math.sqrt(2.0)


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
  """Validates a static (H, W) output shape."""
  if len(shape) != 2 or any(not isinstance(s, int) or s < 1 for s in shape):
    raise ValueError(f"noise shape must be two positive Python ints (H, W), got {shape!r}")
  return int(shape[0]), int(shape[1])


def _fade(t: jax.Array) -> jax.Array:
  """Quintic fade 6t^5 - 15t^4 + 10t^3 (Horner form)."""
  return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _axis(n: int, lattice: int, r: jax.Array) -> tuple[jax.Array, jax.Array, int]:
  """Per-axis Perlin coordinates: fine-cell -> coarse-cell map and per-pixel fraction.

  The axis is virtually padded to ``padded = ceil(n / lattice) * lattice`` pixels and split into
  ``lattice`` equal fine cells; with r | lattice, fine cell k lies inside coarse cell k * r // lattice.

  Args:
    n: static number of pixels along the axis.
    lattice: static size of the angle table along the axis minus one (the largest resolution).
    r: scalar int32 resolution (may be traced), dividing ``lattice``.

  Returns:
    cell: (lattice,) int32 coarse cell of each fine cell.
    frac: (n,) float32 in [0, 1): (i * r / padded) mod 1, the reference's ``grid`` value.
    padded: the static padded length.
  """
  padded = -(-n // lattice) * lattice
  cell = jnp.arange(lattice, dtype=jnp.int32) * r // lattice
  # Integer arithmetic keeps the cell boundaries exact: frac is 0, not 0.99999, at each boundary.
  pos = jnp.arange(n, dtype=jnp.int32) * r % padded
  frac = pos.astype(jnp.float32) / jnp.float32(padded)
  return cell, frac, padded


def perlin_from_angles(angles: jax.Array, shape: Sequence[int],
                       res: Sequence[int] | jax.Array | None = None) -> jax.Array:
  """Deterministic Perlin noise from lattice gradient angles (perlin.py L46-65).

  Args:
    angles: (A0, A1) float gradient angles in radians; the gradient at lattice corner (i, j) is
      (cos, sin) of ``angles[i, j]``, its first component pairing with the row offset.
    shape: static output shape (H, W).
    res: lattice resolution (r0, r1). None (the default) means (A0 - 1, A1 - 1), i.e. ``angles`` is the
      whole lattice. Otherwise an int pair or an int array of shape (2,), possibly traced, where each
      r must divide A - 1 (a traced value is not checked); only ``angles[:r0 + 1, :r1 + 1]`` is used.

  Returns:
    (H, W) float32 noise, roughly in [-1, 1]. When A - 1 divides the shape along an axis this is the
    reference formula along that axis; otherwise it is the top-left crop of the noise on the next
    multiple of A - 1 (anomalib's fix for shapes the lattice does not divide).
  """
  h, w = _check_shape(shape)
  if angles.ndim != 2 or angles.shape[0] < 2 or angles.shape[1] < 2:
    raise ValueError(f"angles must have shape (r0 + 1, r1 + 1) with r >= 1, got {angles.shape}")
  lat0, lat1 = angles.shape[0] - 1, angles.shape[1] - 1
  if res is None:
    res = (lat0, lat1)
  elif isinstance(res, Sequence) and all(isinstance(r, int) for r in res):
    if len(res) != 2 or not all(r >= 1 and lat % r == 0 for r, lat in zip(res, (lat0, lat1))):
      raise ValueError(f"res={tuple(res)} must divide the lattice {(lat0, lat1)} of angles "
                       f"{angles.shape}; pass angles of shape (r0 + 1, r1 + 1) for other values")
  res = jnp.asarray(res, jnp.int32)
  if res.shape != (2,):
    raise ValueError(f"res must be a pair (r0, r1), got shape {res.shape}")

  cell0, f0, pad0 = _axis(h, lat0, res[0])
  cell1, f1, pad1 = _axis(w, lat1, res[1])
  angles = angles.astype(jnp.float32)
  cos, sin = jnp.cos(angles), jnp.sin(angles)

  def gather(table, di, dj):
    # Look up each fine cell's corner gradient in the small table, then repeat it over the fine cell's
    # pixels with a broadcast, which fuses; a per-pixel gather is ~10x slower on CPU.
    fine = jnp.take(jnp.take(table, cell1 + dj, axis=1, mode="clip"), cell0 + di, axis=0, mode="clip")
    tiled = jnp.broadcast_to(fine[:, None, :, None], (lat0, pad0 // lat0, lat1, pad1 // lat1))
    return tiled.reshape(pad0, pad1)[:h, :w]

  def corner_dot(di, dj):
    # The corner's gradient dotted with the pixel's offset from that corner.
    return (f0 - di)[:, None] * gather(cos, di, dj) + (f1 - dj)[None, :] * gather(sin, di, dj)

  n00, n10 = corner_dot(0, 0), corner_dot(1, 0)
  n01, n11 = corner_dot(0, 1), corner_dot(1, 1)
  t0, t1 = _fade(f0)[:, None], _fade(f1)[None, :]
  near = n00 + t0 * (n10 - n00)
  far = n01 + t0 * (n11 - n01)
  return (_SQRT2 * (near + t1 * (far - near))).astype(jnp.float32)


def perlin(key: jax.Array, shape: Sequence[int], res: Sequence[int]) -> jax.Array:
  """Perlin noise with gradient angles drawn from U[0, 2pi).

  Args:
    key: typed PRNG key.
    shape: static output shape (H, W).
    res: static lattice resolution (r0, r1), Python ints >= 1.

  Returns:
    (H, W) float32 noise.
  """
  if len(res) != 2 or any(not isinstance(r, int) or r < 1 for r in res):
    raise ValueError(f"res must be two positive Python ints (r0, r1), got {res!r}")
  angles = prng.draw_flat(jax.random.uniform, key, (res[0] + 1, res[1] + 1), jnp.float32, 0.0,
                          2.0 * math.pi)
  return perlin_from_angles(angles, shape)


def perlin_mask_noise(key: jax.Array, shape: Sequence[int], *, max_log2_res: int = 6,
                      rotate_degrees: float = 90.0) -> jax.Array:
  """The rotated Perlin noise that ``perlin_mask`` thresholds (data_loader.py L115-119).

  Draws res = (2^a, 2^b) with a, b independent and uniform in {0, ..., max_log2_res - 1}, Perlin noise at
  that resolution, and rotates it by U(-rotate_degrees, rotate_degrees) (bilinear, zero fill, so
  rotated-in corners are never anomalous).

  Args:
    key: typed PRNG key of this example.
    shape: static output shape (H, W).
    max_log2_res: static exclusive bound of the log2 resolution (6 -> res up to 32, the reference).
    rotate_degrees: static half-range of the noise rotation; 0 skips the rotation entirely.

  Returns:
    (H, W) float32 noise, roughly in [-1, 1].
  """
  shape = _check_shape(shape)
  if not isinstance(max_log2_res, int) or max_log2_res < 1:
    raise ValueError(f"max_log2_res must be a Python int >= 1, got {max_log2_res!r}")
  k_res, k_angles, k_rot = jax.random.split(key, 3)
  log2_res = jax.random.randint(k_res, (2,), 0, max_log2_res, dtype=jnp.int32)
  res = jnp.left_shift(jnp.int32(1), log2_res)
  # One fixed-size angle table for every resolution; the unused corners cost nothing noticeable.
  max_res = 2 ** (max_log2_res - 1)
  # Drawn flat: the same values, half the compile time of a 2-D draw on the CPU (prng.draw_flat).
  angles = prng.draw_flat(jax.random.uniform, k_angles, (max_res + 1, max_res + 1), jnp.float32, 0.0,
                          2.0 * math.pi)
  noise = perlin_from_angles(angles, shape, res)
  if rotate_degrees != 0:
    degrees = jax.random.uniform(k_rot, (), jnp.float32, -rotate_degrees, rotate_degrees)
    noise = geometry.rotate(noise, degrees)
  return noise


def perlin_mask(key: jax.Array, shape: Sequence[int], *, threshold: float | jax.Array = 0.5,
                max_log2_res: int = 6, rotate_degrees: float = 90.0) -> jax.Array:
  """DRAEM's binary anomaly mask for one example (data_loader.py L109-122).

  ``perlin_mask_noise(key, ...) > threshold``. About 5 % of these masks are empty at the reference's
  settings (docs/recipe.md); ``perlin_mask_nonempty`` redraws those.

  Args:
    key: typed PRNG key of this example.
    shape: static output shape (H, W).
    threshold: mask = noise > threshold (strict). May be traced.
    max_log2_res: static exclusive bound of the log2 resolution (6 -> res up to 32, the reference).
    rotate_degrees: static half-range of the noise rotation; 0 skips the rotation entirely.

  Returns:
    (H, W) float32 mask with values in {0, 1}.
  """
  noise = perlin_mask_noise(key, shape, max_log2_res=max_log2_res, rotate_degrees=rotate_degrees)
  return (noise > threshold).astype(jnp.float32)


# Candidates of perlin_mask_nonempty: at DRAEM's settings P(all empty) ~ 0.05^8, i.e. never.
NONEMPTY_ATTEMPTS = 8


def perlin_mask_nonempty(key: jax.Array, shape: Sequence[int], *, threshold: float | jax.Array = 0.5,
                         max_log2_res: int = 6, rotate_degrees: float = 90.0,
                         attempts: int = NONEMPTY_ATTEMPTS) -> jax.Array:
  """``perlin_mask`` that is never empty: the first non-empty of up to ``attempts`` candidates.

  Candidate 0 is ``perlin_mask(key, ...)`` itself, so a mask that was non-empty anyway is returned
  unchanged; candidate k >= 1 draws fresh noise from ``fold_in(key, k)``. The candidates are drawn one at
  a time in a ``lax.while_loop`` (shape-stable; under ``vmap`` the loop runs until every example is done
  and keeps each example's own first hit, so the result does not depend on the batch or its sharding).
  If all candidates are empty the last one's noise is rescaled to [-1, 1] (anomalib's remedy for noise
  that stays below the threshold), whose maximum 1 exceeds any threshold < 1.

  Args:
    key, shape, threshold, max_log2_res, rotate_degrees: as in ``perlin_mask``.
    attempts: static number of candidates (>= 1).

  Returns:
    (H, W) float32 mask with values in {0, 1}, non-empty for thresholds below 1.
  """
  if not isinstance(attempts, int) or attempts < 1:
    raise ValueError(f"attempts must be a Python int >= 1, got {attempts!r}")

  def draw(k):
    return perlin_mask_noise(k, shape, max_log2_res=max_log2_res, rotate_degrees=rotate_degrees)

  def empty(noise):
    return jnp.logical_not(jnp.any(noise > threshold))

  def body(carry):
    i, _ = carry
    return i + 1, draw(jax.random.fold_in(key, i))

  _, noise = jax.lax.while_loop(lambda c: (c[0] < attempts) & empty(c[1]), body, (jnp.int32(1), draw(key)))
  lo, hi = jnp.min(noise), jnp.max(noise)
  rescaled = 2.0 * (noise - lo) / jnp.maximum(hi - lo, 1e-12) - 1.0
  noise = jnp.where(empty(noise), rescaled, noise)
  return (noise > threshold).astype(jnp.float32)


def perlin_masks(key: jax.Array, num: int, shape: Sequence[int], **kwargs) -> jax.Array:
  """A batch of ``perlin_mask``, example i drawn from ``prng.example_keys(key, num)[i]``.

  Args:
    key: typed PRNG key of the batch.
    num: static batch size.
    shape: static mask shape (H, W).
    **kwargs: keyword arguments of ``perlin_mask``.

  Returns:
    (num, H, W) float32 masks in {0, 1}; example i does not depend on ``num``.
  """
  keys = prng.example_keys(key, num)
  return jax.vmap(lambda k: perlin_mask(k, shape, **kwargs))(keys)
