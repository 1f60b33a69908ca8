"""Anomaly maps of images of any size with a trained model: one jitted forward pass, batched and sharded.

``Inferencer`` compiles the model once for batches of ``(batch_size, S, S, 3)`` (S = ``config.image_size``)
and feeds it every image, whatever its size:

* plain: the image is resized to S x S (OpenCV-exact bilinear, as in training), the map is resized back
  to the image's size and the image score is the model-resolution score (the original protocol);
* tiled (``tile=True``): the image is rescaled by ``tile_scale`` or resized to ``tile_resize`` (at least
  one tile), cut into
  overlapping S x S tiles (``tiling``), the tiles' maps are stitched by the mean over overlaps, and the
  score is the same filtered maximum computed on the stitched map; the map is then resized back.

Batches are padded to ``batch_size`` (a multiple of the device count) and split over the ``data`` mesh
axis; every process passes the same images (validation sets are small and held by every process).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from PIL import Image
import scipy.ndimage

from draem_jax import parallel
from draem_jax import steps
from draem_jax import tiling
from draem_jax.data import image_io


def resize_map(amap: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a float (h, w) map to ``size_hw`` (identity when the size matches)."""
  if tuple(amap.shape) == tuple(size_hw):
    return np.asarray(amap, np.float32)
  return np.asarray(Image.fromarray(np.asarray(amap, np.float32), mode="F").resize(
      (size_hw[1], size_hw[0]), Image.Resampling.BILINEAR))


def filtered_max(amap: np.ndarray, filter_size: int) -> float:
  """The image score of a map on the host: max of the zero-padded ``filter_size`` mean filter.

  The same quantity as ``scoring.image_score`` (``count_include_pad`` box filter), in float64.
  """
  if filter_size <= 1:
    return float(np.max(amap))
  return float(np.max(scipy.ndimage.uniform_filter(np.asarray(amap, np.float64), size=filter_size,
                                                   mode="constant", cval=0.0)))


@functools.lru_cache(maxsize=16)
def _jitted_infer(model, filter_size: int, bgr: bool, mesh):
  """One compiled forward pass per (model, score filter, channel order, mesh): Inferencers share it."""
  infer = steps.make_infer_fn(model, filter_size=filter_size, bgr=bgr)
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(lambda v, x: infer(v, x)[:2], in_shardings=(repl, data), out_shardings=(data, data))


class Inferencer:
  """Maps and scores of a model on images of any size (see the module docstring)."""

  def __init__(self, model, variables, config, *, batch_size: int | None = None, mesh=None):
    """
    Args:
      model: the DRAEM module (``steps.build_model(config)``).
      variables: its ``{"params", "batch_stats"}`` (host or device arrays).
      config: the run's config (``image_size``, ``channel_order``, ``eval.score_filter_size``,
        ``eval.batch_size``).
      batch_size: images (or tiles) per forward pass; default ``config.eval.batch_size``; rounded up to
        a multiple of the device count.
      mesh: device mesh (default: all devices).
    """
    self.size = int(config.image_size)
    self.filter_size = int(config.eval.score_filter_size)
    mesh = parallel.make_mesh() if mesh is None else mesh
    self._repl, self._data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    devices = parallel.num_devices(self._data)
    b = max(1, int(batch_size or config.eval.batch_size))
    self.batch_size = -(-b // devices) * devices
    self._infer = _jitted_infer(model, self.filter_size, config.channel_order == "bgr", mesh)
    self.variables = jax.device_put(variables, self._repl)

  def model_size(self, images: np.ndarray, variables=None) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores of images already at the model size.

    Args:
      images: uint8 (N, S, S, 3) RGB (or float in [0, 1]).
      variables: other variables than the constructor's (e.g. the state during training).

    Returns:
      maps float32 (N, S, S) and scores float32 (N,).
    """
    images = np.asarray(images)
    n = len(images)
    variables = self.variables if variables is None else variables
    maps = np.zeros((n, self.size, self.size), np.float32)
    scores = np.zeros((n,), np.float32)
    rows = parallel.host_slice(self.batch_size)
    for start in range(0, n, self.batch_size):
      chunk = images[start:start + self.batch_size]
      k = len(chunk)
      if k < self.batch_size:  # pad to the compiled shape; padded rows are dropped below
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - k,) + chunk.shape[1:], chunk.dtype)])
      m, s = self._infer(variables, parallel.to_global(chunk[rows], self._data))
      m, s = parallel.gather_to_host((m, s))
      maps[start:start + k], scores[start:start + k] = m[:k], s[:k]
    return maps, scores

  def images(self, images: Sequence[np.ndarray], *, tile: bool = False, tile_scale: float = 1.0,
             tile_overlap: float = 0.25, tile_resize: tuple[int, int] | None = None,
             variables=None) -> tuple[list[np.ndarray], np.ndarray]:
    """Maps at each image's own size and image scores, for images of any sizes.

    Args:
      images: uint8 (H_i, W_i, 3) RGB images.
      tile: tiled inference (see the module docstring) instead of resizing to the model size.
      tile_scale: rescale factor before tiling (1 = the image's own resolution).
      tile_overlap: minimum overlap of neighbouring tiles, a fraction of the tile.
      tile_resize: (h, w) every image is resized to before tiling, instead of ``tile_scale`` (a
        ``config.train_crop`` run: the ``load_size`` its training images had).
      variables: other variables than the constructor's.

    Returns:
      ``(maps, scores)``: float32 maps (H_i, W_i) and float32 scores (len(images),).
    """
    s = self.size
    if not tile:
      batch = np.stack([image_io.resize_bilinear(im, (s, s)) for im in images]) if images else \
          np.zeros((0, s, s, 3), np.uint8)
      maps, scores = self.model_size(batch, variables)
      return [resize_map(m, im.shape[:2]) for m, im in zip(maps, images)], scores
    # Tiled: all tiles of all images in one stream of model-size batches.
    tiles, layout = [], []
    for im in images:
      if tile_resize is not None:
        h, w = max(s, int(tile_resize[0])), max(s, int(tile_resize[1]))
      else:
        h, w = tiling.scaled_size(im.shape[0], im.shape[1], tile_scale, s)
      scaled = im if (h, w) == im.shape[:2] else image_io.resize_bilinear(im, (h, w))
      grid = tiling.tile_grid(h, w, s, tile_overlap)
      tiles.append(tiling.extract_tiles(scaled, grid, s))
      layout.append((grid, (h, w)))
    tile_maps, _ = self.model_size(np.concatenate(tiles) if tiles else np.zeros((0, s, s, 3), np.uint8),
                                   variables)
    maps, scores, start = [], [], 0
    for im, (grid, hw) in zip(images, layout):
      stitched = tiling.stitch(tile_maps[start:start + len(grid)], grid, hw)
      start += len(grid)
      scores.append(filtered_max(stitched, self.filter_size))
      maps.append(resize_map(stitched, im.shape[:2]))
    return maps, np.asarray(scores, np.float32)
