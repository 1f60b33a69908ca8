"""Images larger than the model: overlapping tiles for inference, random crops for training.

Inference (``tile_grid``, ``extract_tiles``, ``stitch``): an image is optionally rescaled by ``scale``,
cut into overlapping tiles of the model's size that cover it (the last row and column of tiles end flush
with the image; starts are spread evenly, so neighbouring tiles overlap by at least ``overlap`` of a tile),
and the tiles' anomaly maps are stitched back by the mean over every tile that covers a pixel. The image
score is then computed on the stitched map, as for a plain run. An image of exactly the model size is
one tile, and its map is the plain run's.

Training (``random_crops``): with ``config.train_crop`` the training images are loaded at
``config.load_size`` and every step draws one random ``image_size`` crop per example on the device, so
small defects of high-resolution parts are trained at full detail instead of being shrunk away.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from draem_jax import prng


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
  """Start offsets of tiles of size ``tile`` covering ``[0, length)``.

  Args:
    length: image extent along one axis (>= tile).
    tile: tile extent.
    overlap: minimum overlap of neighbouring tiles as a fraction of ``tile``, in [0, 1).

  Returns:
    Sorted starts; the first is 0 and the last is ``length - tile``.
  """
  if length < tile:
    raise ValueError(f"tile_starts: image extent {length} is smaller than the tile {tile}; rescale it up.")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"tile overlap={overlap!r} must be in [0, 1) (a fraction of the tile).")
  if length == tile:
    return [0]
  stride = max(1, int(math.floor(tile * (1.0 - overlap))))
  n = math.ceil((length - tile) / stride) + 1
  return [int(s) for s in np.linspace(0, length - tile, n).round().astype(int)]


def tile_grid(height: int, width: int, tile: int, overlap: float = 0.25) -> list[tuple[int, int]]:
  """``(y, x)`` top-left corners of the tiles covering a ``height`` x ``width`` image, row-major."""
  return [(y, x) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def scaled_size(height: int, width: int, scale: float, tile: int) -> tuple[int, int]:
  """The size an image is resized to before tiling: ``scale`` times its size, at least one tile."""
  if not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"tile scale={scale!r} must be a finite number > 0 (1 = the image's own resolution).")
  return max(tile, int(round(height * scale))), max(tile, int(round(width * scale)))


def extract_tiles(image: np.ndarray, grid: list[tuple[int, int]], tile: int) -> np.ndarray:
  """The tiles of ``image`` (H, W, C) at ``grid``: (T, tile, tile, C), same dtype."""
  return np.stack([image[y:y + tile, x:x + tile] for y, x in grid])


def stitch(tile_maps: np.ndarray, grid: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
  """Mean over overlapping tiles: (T, t, t) tile maps -> float32 (H, W) map.

  Args:
    tile_maps: the maps of the tiles, in ``grid`` order.
    grid: their ``(y, x)`` corners (from ``tile_grid``; every pixel covered at least once).
    shape: (H, W) of the stitched map.
  """
  tile_maps = np.asarray(tile_maps)
  t = tile_maps.shape[1]
  total = np.zeros(shape, np.float64)
  count = np.zeros(shape, np.int32)
  for m, (y, x) in zip(tile_maps, grid):
    total[y:y + t, x:x + t] += m
    count[y:y + t, x:x + t] += 1
  if (count == 0).any():
    raise ValueError("stitch: the tiles do not cover the whole map; build the grid with tile_grid.")
  return (total / count).astype(np.float32)


def random_crops(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """One uniformly placed ``size`` x ``size`` crop per image (pure, jittable, on device).

  Example i draws its offsets from ``prng.example_keys(key, N)[i]`` only, so a crop depends neither on
  the batch size nor on the sharding. Use a key of its own (e.g. ``fold_in(step_key, 1)``), not the
  synthesis key, so crops and synthetic anomalies are independent.

  Args:
    key: typed PRNG key of the batch.
    images: (N, H, W, C) any dtype, H and W >= ``size`` (static).
    size: crop extent (static).

  Returns:
    (N, size, size, C), the dtype of ``images``.
  """
  n, h, w, c = images.shape
  if h < size or w < size:
    raise ValueError(f"random_crops: images {images.shape[1:3]} are smaller than the crop {size}; set "
                     "config.load_size >= config.image_size.")
  keys = prng.example_keys(key, n)

  def one(k, image):
    ky, kx = jax.random.split(k)
    y = jax.random.randint(ky, (), 0, h - size + 1)
    x = jax.random.randint(kx, (), 0, w - size + 1)
    return jax.lax.dynamic_slice(image, (y, x, jnp.zeros((), y.dtype)), (size, size, c))

  return jax.vmap(one)(keys, images)
