"""Anomaly-source textures (docs/anomaly_simulation.md): from a folder, from tfds, or procedural.

The reference draws, per training sample, one DTD image (``<dtd>/images/*/*.jpg``, 47 classes, 5,640
files) uniformly with replacement, reads it with ``cv2.imread`` and resizes it to 256 x 256 with
INTER_LINEAR (VitjanZ/DRAEM data_loader.py L78, L111-112, L161). Here the whole pool is decoded and
resized once into one uint8 array, which training puts on every device; the on-device synthesis picks
one texture per example by index.

``resize="antialias"`` (``config.source_resize``) shrinks with an antialiasing filter instead (PIL's
bilinear, whose triangle filter widens with the reduction; anomalib resizes its sources with torchvision's
``antialias=True``, the same filter): at 64 px an unfiltered 4x-8x reduction keeps about 2.5x the
high-frequency energy, i.e. aliased, noisier textures than the photographs hold (docs/recipe.md).

Memory: S * H * W * 3 bytes. All 5,640 DTD images at 256 x 256 take 1.11 GB (5640 * 196,608 bytes);
``max_sources`` caps this (e.g. 1,000 -> 197 MB), at the price of a smaller texture pool than the
reference's.
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging
from PIL import Image

from draem_jax.data import folder, image_io

TFDS_PREFIX = "tfds:"
RESIZE_RULES = ("original", "antialias")


def resize_antialias(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Antialiased bilinear resize (PIL's BILINEAR: a triangle filter scaled to the reduction).

  Args:
    image: uint8 (H, W, 3).
    size: output (height, width).

  Returns:
    uint8 (height, width, 3); plain bilinear interpolation when enlarging.
  """
  h, w = (int(v) for v in size)
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.Resampling.BILINEAR))


def resize_source(image: np.ndarray, size: tuple[int, int], resize: str = "original") -> np.ndarray:
  """One source image at ``size``: "original" = OpenCV's INTER_LINEAR (no antialias), or "antialias"."""
  if resize == "original":
    return image_io.resize_bilinear(image, size)
  if resize == "antialias":
    return resize_antialias(image, size)
  raise ValueError(f"source resize must be one of {RESIZE_RULES}, got {resize!r}")


def list_source_files(path: str | os.PathLike) -> list[str]:
  """Image files under ``path``, searched recursively, sorted by their path relative to ``path``.

  Raises:
    FileNotFoundError: ``path`` is not a folder.
    ValueError: no image file under it.
  """
  root = os.path.abspath(os.fspath(path))
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"anomaly-source folder {root} does not exist. Point it at a folder of texture images, e.g. "
        "the DTD images folder (dtd/images/<class>/*.jpg), or leave it unset to use procedural "
        "textures.")
  rel = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      if image_io.is_image_file(name) and not name.startswith("."):
        rel.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  if not rel:
    raise ValueError(
        f"no images ({', '.join(image_io.IMAGE_EXTENSIONS)}) found under anomaly-source folder "
        f"{root} (searched recursively). Put texture images there, e.g. DTD's images/<class>/*.jpg.")
  return [os.path.join(root, *r.split("/")) for r in sorted(rel)]


def _subsample(n: int, max_sources: int | None, seed: int) -> np.ndarray:
  """Sorted indices of a deterministic subset of size ``min(n, max_sources)``."""
  if max_sources is None or max_sources >= n:
    return np.arange(n)
  if max_sources < 1:
    raise ValueError(f"max_sources must be positive or None, got {max_sources}")
  return np.sort(np.random.default_rng(seed).choice(n, size=max_sources, replace=False))


def load_sources(path: str | os.PathLike, image_size: tuple[int, int],
                 max_sources: int | None = None, seed: int = 0,
                 num_workers: int | None = None,
                 tfds_data_dir: str | os.PathLike | None = None,
                 resize: str = "original") -> np.ndarray:
  """Decodes and resizes an anomaly-source pool.

  Args:
    path: a folder of images (searched recursively; the DTD layout dtd/images/<class>/*.jpg works
      as is), or ``"tfds:<name>"`` (e.g. ``"tfds:dtd"``) for a tfds dataset already prepared in
      array_record format (see ``load_tfds_sources``).
    image_size: output (height, width).
    max_sources: keep a deterministic random subset of this many images (sorted file order kept);
      None keeps all.
    seed: seed of that subset.
    num_workers: decoding threads.
    tfds_data_dir: where tfds keeps prepared datasets, for ``"tfds:<name>"`` (tfds default when None).
    resize: "original" (OpenCV-exact bilinear, no antialias, as the reference) or "antialias"
      (``resize_antialias``).

  Returns:
    uint8 (S, H, W, 3), RGB.

  Raises:
    FileNotFoundError / ValueError: missing folder, no images, undecodable file (named).
  """
  spec = os.fspath(path)
  if spec.startswith(TFDS_PREFIX):
    return load_tfds_sources(spec[len(TFDS_PREFIX):], image_size, data_dir=tfds_data_dir,
                             max_sources=max_sources, seed=seed, num_workers=num_workers, resize=resize)
  files = list_source_files(spec)
  keep = _subsample(len(files), max_sources, seed)
  if resize == "original":
    return folder.load_images(files, image_size, indices=keep, num_workers=num_workers)
  resize_source(np.zeros((1, 1, 3), np.uint8), (1, 1), resize)  # A bad rule fails before any decoding.
  h, w = image_size
  out = np.empty((len(keep), h, w, 3), np.uint8)

  def one(i: int) -> None:
    out[i] = resize_source(image_io.load_rgb(files[int(keep[i])]), (h, w), resize)

  image_io.parallel_map(one, range(len(keep)), num_workers)
  return out


def load_tfds_sources(name: str, image_size: tuple[int, int], *, split: str = "all",
                      data_dir: str | os.PathLike | None = None, max_sources: int | None = None,
                      seed: int = 0, num_workers: int | None = None,
                      resize: str = "original") -> np.ndarray:
  """Images of a prepared tfds dataset (e.g. ``dtd``) as a source pool; no download, no TF.

  The dataset must already be prepared in array_record format (``tfds build dtd
  --file_format=array_record``, which needs TensorFlow once, or a copy from a machine that has it).

  Args:
    name: tfds name, optionally with config/version ("dtd", "dtd/1:3.0.1").
    image_size: output (height, width).
    split: tfds split expression; "all" joins every split (DTD: train+validation+test = 5,640).
    data_dir: tfds data dir (tfds default when None).
    max_sources, seed, num_workers, resize: as in ``load_sources``.

  Returns:
    uint8 (S, H, W, 3), RGB, ordered by the dataset's record order (then subsampled).
  """
  try:
    # Imported here: tensorflow-datasets is needed only for tfds sources.
    import tensorflow_datasets as tfds
    b = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
  except Exception as e:  # Any failure to open the dataset becomes the user's one-line error.
    raise ValueError(f"cannot open tfds dataset {name!r}: {e}") from e
  if not b.is_prepared():
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in {b.data_dir}. Prepare it once with "
        f"`tfds build {name} --file_format=array_record` (needs TensorFlow), or use a folder of "
        "images instead (e.g. the extracted dtd/images).")
  if split == "all":
    split = "+".join(sorted(b.info.splits))
  try:
    source = b.as_data_source(split=split)
  except Exception as e:  # As above.
    raise ValueError(
        f"tfds dataset {name!r} in {b.data_dir} cannot be read without TensorFlow ({e}); prepare "
        "it with --file_format=array_record.") from e
  keep = _subsample(len(source), max_sources, seed)
  h, w = image_size
  out = np.empty((len(keep), h, w, 3), np.uint8)

  def one(i: int) -> None:
    img = np.asarray(source[int(keep[i])]["image"])
    if img.ndim == 2 or img.shape[-1] == 1:
      img = np.repeat(img.reshape(img.shape[:2] + (1,)), 3, axis=2)
    out[i] = resize_source(img[..., :3], (h, w), resize)

  image_io.parallel_map(one, range(len(keep)), num_workers)
  return out


# --- Procedural fallback -----------------------------------------------------------------------


def _value_noise(rng: np.random.Generator, size: tuple[int, int], res: int) -> np.ndarray:
  """Smooth value noise in [0, 1]: random values on a (res+1)^2 lattice, smoothstep interpolation.

  Returns:
    float64 (H, W).
  """
  h, w = size
  lattice = rng.random((res + 1, res + 1))
  y = np.linspace(0, res, h, endpoint=False) + 0.5 * res / h
  x = np.linspace(0, res, w, endpoint=False) + 0.5 * res / w
  y0 = np.minimum(y.astype(np.int64), res - 1)
  x0 = np.minimum(x.astype(np.int64), res - 1)
  ty, tx = y - y0, x - x0
  ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)  # Smoothstep: no grid-aligned creases.
  top = lattice[y0][:, x0] * (1 - tx) + lattice[y0][:, x0 + 1] * tx
  bottom = lattice[y0 + 1][:, x0] * (1 - tx) + lattice[y0 + 1][:, x0 + 1] * tx
  return top * (1 - ty)[:, None] + bottom * ty[:, None]


def _fractal(rng: np.random.Generator, size: tuple[int, int], base_res: int,
             octaves: int) -> np.ndarray:
  """Sum of value-noise octaves (res doubling, amplitude halving), rescaled to [0, 1]."""
  total = np.zeros(size)
  for o in range(octaves):
    total += 0.5 ** o * _value_noise(rng, size, base_res * 2 ** o)
  lo, hi = total.min(), total.max()
  return (total - lo) / max(hi - lo, 1e-12)


def _palette(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
  """Maps t in [0, 1] (H, W) through 2-4 random RGB colours (piecewise linear) -> float (H, W, 3)."""
  k = int(rng.integers(2, 5))
  stops = np.linspace(0.0, 1.0, k)
  colours = rng.random((k, 3)) * 255.0
  return np.stack([np.interp(t, stops, colours[:, c]) for c in range(3)], axis=-1)


def _procedural_texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
  """One colour texture, uint8 (H, W, 3); the kind is drawn from four families."""
  h, w = size
  yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
  kind = int(rng.integers(4))
  if kind == 0:  # Cloudy / blotchy: fractal noise.
    t = _fractal(rng, size, int(rng.choice([2, 4, 8])), int(rng.integers(3, 6)))
  elif kind == 1:  # Stripes, optionally wobbly: sinusoid with random orientation and frequency.
    theta = rng.uniform(0, np.pi)
    freq = rng.uniform(3, 30)
    warp = rng.uniform(0, 3) * _fractal(rng, size, 4, 3)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (freq * (xx * np.cos(theta) + yy * np.sin(theta)) + warp))
  elif kind == 2:  # Marble / wood: strongly warped rings.
    cy, cx = rng.uniform(-0.5, 1.5, 2)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(4, 20) * r + 4 * _fractal(rng, size, 4, 4)))
  else:  # Cells / checks with noisy edges.
    n = int(rng.integers(2, 12))
    jitter = 0.15 * (_fractal(rng, size, 8, 3) - 0.5)
    t = ((np.floor((yy + jitter) * n) + np.floor((xx - jitter) * n)) % 2) * 0.7 + 0.3 * _fractal(
        rng, size, 16, 2)
  img = _palette(rng, t)
  img += rng.normal(0.0, rng.uniform(0, 12), img.shape)  # Fine grain, as in photographed textures.
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def procedural_sources(num: int, image_size: tuple[int, int], seed: int = 0) -> np.ndarray:
  """Procedural colour textures, a fallback anomaly-source pool when no texture folder is given.

  Each texture is one of: fractal value noise (clouds/blotches), sinusoidal stripes warped by noise,
  warped rings (marble/wood), or noisy-edged checks; mapped through 2-4 random colours and with
  Gaussian grain. Texture ``i`` depends only on ``(seed, i)``, not on ``num``. DRAEM trained on such
  textures sees a narrower variety of anomaly appearances than with DTD, so expect lower accuracy
  (a warning is logged).

  Args:
    num: number of textures.
    image_size: (height, width).
    seed: integer seed.

  Returns:
    uint8 (num, H, W, 3).
  """
  if num < 1:
    raise ValueError(f"procedural_sources: num must be positive, got {num}")
  logging.warning(
      "No anomaly-source folder configured: using %d procedural textures. Expect lower accuracy "
      "than with DTD textures (the reference's source); set the source path to a DTD images "
      "folder for reference behaviour.", num)
  h, w = (int(s) for s in image_size)
  return np.stack([_procedural_texture(np.random.default_rng([seed, i]), (h, w))
                   for i in range(num)])
