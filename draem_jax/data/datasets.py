"""What a config's data fields mean: the training images, the test split and the anomaly sources.

``config.dataset`` selects the source of a category:

* ``"folder"``: any folder in the MVTec AD layout, ``config.data_dir/<category>/...`` (``folder.py``);
* ``"tfds"``: the ``mvtec_ad`` tensorflow-datasets builder, prepared from ``config.data_dir`` (the manual
  dir with the extracted tree or the official tarball) into ``config.tfds_data_dir``;
* ``"demo"``: the embedded procedural fabric category, written on first use to ``config.data_dir`` or,
  when that is empty, ``<workdir>/demo_data``.

Every process loads the whole (small: <= 391 images per MVTec category, 77 MB at 256x256) training set:
batches are drawn per step from a permutation of all of it, so any process may need any image.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np

from draem_jax import recipes
from draem_jax.data import demo
from draem_jax.data import folder
from draem_jax.data import sources

# Procedural fallback pool size when no anomaly-source path is configured.
NUM_PROCEDURAL_SOURCES = 64

DATASETS = recipes.DATASETS


def _image_size(config) -> tuple[int, int]:
  size = int(config.image_size)
  if size < 32 or size % 32:
    raise ValueError(f"config.image_size={config.image_size} must be a positive multiple of 32 "
                     "(the discriminative U-Net pools five times).")
  return size, size


def data_root(config, workdir: str) -> str:
  """The dataset root folder for ``config.dataset`` ("folder", "demo") or the tfds manual dir."""
  if config.dataset == "demo":
    root = config.data_dir or os.path.join(workdir, "demo_data")
    demo.ensure_demo_dataset(root, category=config.category)
    return root
  if config.dataset in ("folder", "tfds"):
    if not config.data_dir:
      raise ValueError(f"config.data_dir is empty: set it to the dataset root for "
                       f"config.dataset={config.dataset!r}, e.g. --config.data_dir=/data/mvtec.")
    return config.data_dir
  raise ValueError(f"config.dataset={config.dataset!r}: use one of {DATASETS}.")


def check_category(config, workdir: str) -> None:
  """Finds, before any training, what would make the run fail later: a missing train/good folder, a
  defect image without mask, or a test split with only one kind of image (no ``test/good`` or no defect
  folder), which cannot be scored. A category with no ``test/`` at all is fine (trained without labels).
  """
  if config.dataset == "tfds":
    return  # the builder checks its manual dir when it prepares the data
  root = data_root(config, workdir)
  files = folder.scan_category(root, config.category)
  if not files.test:
    return
  test_dir = os.path.join(files.root, config.category, "test")
  kinds = set(files.test_types)
  if folder.GOOD not in kinds:
    raise FileNotFoundError(
        f"{os.path.join(test_dir, folder.GOOD)} is missing or holds no image: the test split needs "
        "defect-free images to be scored. Add them, or remove test/ to train without labelled tests.")
  if kinds == {folder.GOOD}:
    raise FileNotFoundError(
        f"{test_dir} holds only {folder.GOOD}/: add a folder per defect type (with masks under "
        "ground_truth/), or remove test/ to train without labelled tests.")


def load_split(config, workdir: str, split: str) -> folder.CategoryData:
  """One split ("train" or "test") of ``config.category``, resized to ``config.image_size``; for a
  ``config.train_crop`` run to ``config.load_size`` (cropped on the device in training, tiled in
  evaluation)."""
  size = _image_size(config)
  if config.train_crop:  # crops in training, tiles at this resolution in evaluation
    size = (int(config.load_size), int(config.load_size))
  root = data_root(config, workdir)
  mask_rule = config.mask_rule
  if config.dataset == "tfds":
    from draem_jax.data import mvtec_ad  # tensorflow-datasets is imported only for dataset="tfds"
    return mvtec_ad.load_category_from_tfds(
        config.category, data_dir=config.tfds_data_dir or None, manual_dir=root,
        image_size=size, split=split, mask_rule=mask_rule)
  return folder.load_category(root, config.category, image_size=size, split=split,
                              mask_rule=mask_rule)


def load_train_images(config, workdir: str) -> np.ndarray:
  """uint8 (N, H, W, 3) RGB training images (train/good) of ``config.category``."""
  return load_split(config, workdir, "train").images


def load_test_split(config, workdir: str) -> folder.CategoryData:
  """The test split: images uint8 (N, H, W, 3), masks bool (N, H, W), labels int32 (N,), names."""
  return load_split(config, workdir, "test")


def load_anomaly_sources(config) -> np.ndarray:
  """uint8 (S, H, W, 3) anomaly-source textures at the training size.

  ``config.anomaly_source_path``: a folder searched recursively (DTD: ``dtd/images``) or ``tfds:dtd``;
  empty means the procedural fallback (accuracy will be lower; a warning is logged).
  ``config.max_sources`` > 0 keeps a deterministic subset (memory: 5,640 DTD images at 256x256 are
  1.1 GB, replicated on every device).
  """
  size = _image_size(config)
  max_sources = int(config.max_sources) or None
  if config.anomaly_source_path:
    pool = sources.load_sources(config.anomaly_source_path, size, max_sources=max_sources,
                                tfds_data_dir=config.tfds_data_dir or None,
                                seed=config.seed, resize=config.source_resize)
  else:
    pool = sources.procedural_sources(max_sources or NUM_PROCEDURAL_SOURCES, size, seed=config.seed)
  logging.info("%d anomaly sources at %dx%d (%.1f MB)", len(pool), size[0], size[1], pool.nbytes / 2**20)
  return pool
