"""Any dataset folder in the MVTec AD layout -> uint8 image arrays, bool masks and labels (host, NumPy).

Layout (docs/evaluation.md; the original reads it in VitjanZ/DRAEM data_loader.py L14 and L51-54)::

  <root>/<category>/train/good/*.png                             defect-free training images
  <root>/<category>/test/<good|defect_type>/*.png                test images
  <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   0/255 masks of the defect images

Any of png/jpg/jpeg/bmp/tif/tiff is accepted (case-insensitive) for images and masks. File lists are
sorted by their path relative to the category folder, so the test order is the reference's
``sorted(glob(test/*/*.png))``. Images of mixed sizes are all resized to the requested size. Nothing is
ever written inside the dataset folder.

Memory: N images at H x W take N * H * W * 3 bytes (uint8) plus N * H * W bytes of bool masks; e.g. the
largest MVTec training set (hazelnut, 391 images) at 256 x 256 is 77 MB.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from draem_jax.data import image_io

LAYOUT_HELP = (
    "Expected layout (MVTec AD):\n"
    "  <root>/<category>/train/good/*.png\n"
    "  <root>/<category>/test/<good|defect_type>/*.png\n"
    "  <root>/<category>/ground_truth/<defect_type>/<image_stem>_mask.png")

GOOD = "good"


@dataclasses.dataclass(frozen=True)
class CategoryFiles:
  """The files of one category, sorted; paths are absolute strings.

  Attributes:
    root: dataset root folder.
    category: category folder name.
    train: training images (train/good).
    test: test images, sorted by relative path (defect type, then name).
    test_types: defect type (folder name under test/) of each test image; "good" for normal ones.
    test_masks: mask file of each test image, None for good ones.
  """
  root: str
  category: str
  train: list[str]
  test: list[str]
  test_types: list[str]
  test_masks: list[str | None]

  def relative(self, path: str) -> str:
    """``path`` relative to the category folder, with "/" separators (e.g. "test/crack/000.png")."""
    return os.path.relpath(path, os.path.join(self.root, self.category)).replace(os.sep, "/")


@dataclasses.dataclass
class CategoryData:
  """One split of one category, decoded and resized.

  Attributes:
    category: category name.
    split: "train" or "test".
    images: uint8 (N, H, W, 3), RGB.
    masks: bool (N, H, W); all False for good images (and so for the whole train split).
    labels: int32 (N,), 0 good / 1 defect.
    defect_types: N strings, "good" or the defect folder name.
    filenames: N paths relative to the category folder ("test/crack/000.png"); the same for every
      source, so they identify an example across folder.py and the tfds builder.
    paths: N strings saying where each image was read from (a file path, or "mvtec_ad/<config>:<file>"
      for tfds).
  """
  category: str
  split: str
  images: np.ndarray
  masks: np.ndarray
  labels: np.ndarray
  defect_types: list[str]
  filenames: list[str]
  paths: list[str]

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def nbytes(self) -> int:
    """Host memory held by the arrays, in bytes."""
    return int(self.images.nbytes + self.masks.nbytes + self.labels.nbytes)


def _image_files(folder: str) -> list[str]:
  """Image files directly inside ``folder`` (not recursive), sorted by name."""
  with os.scandir(folder) as it:
    names = [e.name for e in it if e.is_file() and image_io.is_image_file(e.name)
             and not e.name.startswith(".")]
  return [os.path.join(folder, n) for n in sorted(names)]


def _subdirs(folder: str) -> list[str]:
  with os.scandir(folder) as it:
    return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _check_root(root: str | os.PathLike) -> str:
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"dataset root {root} does not exist or is not a folder. Point it at the folder that "
        f"holds the category folders.\n{LAYOUT_HELP}")
  return root


def list_categories(root: str | os.PathLike) -> list[str]:
  """Names of the sub-folders of ``root`` that contain ``train/good``, sorted.

  Raises:
    FileNotFoundError: ``root`` is not a folder.
  """
  root = _check_root(root)
  return [d for d in _subdirs(root) if os.path.isdir(os.path.join(root, d, "train", GOOD))]


def _find_mask(gt_dir: str, stem: str) -> str | None:
  """``<gt_dir>/<stem>_mask.<ext>``, PNG preferred; None when absent."""
  for ext in image_io.IMAGE_EXTENSIONS:
    for candidate in (ext, ext.upper()):
      path = os.path.join(gt_dir, f"{stem}_mask{candidate}")
      if os.path.isfile(path):
        return path
  return None


def scan_category(root: str | os.PathLike, category: str) -> CategoryFiles:
  """Lists and checks the files of one category (no decoding).

  Args:
    root: dataset root.
    category: category folder name.

  Returns:
    The sorted file lists. A category without a ``test`` folder gets empty test lists.

  Raises:
    FileNotFoundError: missing root, category or train/good folder, or a defect image without mask.
    ValueError: train/good holds no image.
  """
  root = _check_root(root)
  cat_dir = os.path.join(root, category)
  if not os.path.isdir(cat_dir):
    found = list_categories(root)
    raise FileNotFoundError(
        f"category {category!r} not found: {cat_dir} is not a folder. Categories found in {root}: "
        f"{found if found else 'none'}.\n{LAYOUT_HELP}")
  train_dir = os.path.join(cat_dir, "train", GOOD)
  if not os.path.isdir(train_dir):
    raise FileNotFoundError(
        f"category {category!r} has no training folder {train_dir}. Put the defect-free training "
        f"images there.\n{LAYOUT_HELP}")
  train = _image_files(train_dir)
  if not train:
    raise ValueError(
        f"no training images in {train_dir} (looked for {', '.join(image_io.IMAGE_EXTENSIONS)}). "
        f"Put the defect-free training images there.\n{LAYOUT_HELP}")
  test, types, masks = [], [], []
  test_dir = os.path.join(cat_dir, "test")
  if os.path.isdir(test_dir):
    for defect_type in _subdirs(test_dir):
      for path in _image_files(os.path.join(test_dir, defect_type)):
        mask = None
        if defect_type != GOOD:
          gt_dir = os.path.join(cat_dir, "ground_truth", defect_type)
          stem = os.path.splitext(os.path.basename(path))[0]
          mask = _find_mask(gt_dir, stem)
          if mask is None:
            raise FileNotFoundError(
                f"defect test image {path} has no mask: expected "
                f"{os.path.join(gt_dir, stem + '_mask.png')}. Add the 0/255 mask (255 = defect), or "
                f"move the image to test/{GOOD} if it is defect-free.")
        test.append(path)
        types.append(defect_type)
        masks.append(mask)
  return CategoryFiles(root=root, category=category, train=train, test=test, test_types=types,
                       test_masks=masks)


def _select(items: Sequence, indices: Sequence[int] | np.ndarray | None) -> list:
  if indices is None:
    return list(items)
  idx = np.asarray(indices, dtype=np.int64).reshape(-1)
  if idx.size and (idx.min() < -len(items) or idx.max() >= len(items)):
    raise IndexError(f"indices out of range for {len(items)} files: {idx.min()}..{idx.max()}")
  return [items[i] for i in idx]


def load_images(paths: Sequence[str | os.PathLike], size: tuple[int, int],
                indices: Sequence[int] | np.ndarray | None = None,
                num_workers: int | None = None) -> np.ndarray:
  """Decodes and resizes images (only ``paths[indices]`` when given), on a thread pool.

  Each process of a multi-host job can pass its own share of indices and decode only those.

  Args:
    paths: image files.
    size: output (height, width).
    indices: which entries of ``paths`` to load, in that order; None = all.
    num_workers: threads; default ``image_io.default_num_workers()``.

  Returns:
    uint8 (len(indices), H, W, 3), RGB, resized with OpenCV-exact bilinear interpolation.
  """
  chosen = _select(paths, indices)
  h, w = size
  out = np.empty((len(chosen), h, w, 3), np.uint8)

  def one(i: int) -> None:
    out[i] = image_io.resize_bilinear(image_io.load_rgb(chosen[i]), (h, w))

  image_io.parallel_map(one, range(len(chosen)), num_workers)
  return out


def load_masks(mask_paths: Sequence[str | os.PathLike | None], size: tuple[int, int],
               rule: image_io.MaskRule = "reference",
               indices: Sequence[int] | np.ndarray | None = None,
               num_workers: int | None = None) -> np.ndarray:
  """Loads masks (None entries give all-False masks), see ``image_io.load_mask``.

  Returns:
    bool (len(indices), H, W).
  """
  chosen = _select(mask_paths, indices)
  out = np.zeros((len(chosen), size[0], size[1]), bool)

  def one(i: int) -> None:
    if chosen[i] is not None:
      out[i] = image_io.load_mask(chosen[i], size, rule)

  image_io.parallel_map(one, range(len(chosen)), num_workers)
  return out


def load_category(root: str | os.PathLike, category: str,
                  image_size: tuple[int, int] = (256, 256), split: str = "train",
                  mask_rule: image_io.MaskRule = "reference",
                  indices: Sequence[int] | np.ndarray | None = None,
                  num_workers: int | None = None) -> CategoryData:
  """Loads one split of one category.

  Args:
    root: dataset root (folder holding the category folders).
    category: category folder name.
    image_size: output (height, width); the reference uses (256, 256).
    split: "train" (train/good) or "test" (test/*, with masks from ground_truth/).
    mask_rule: see ``image_io.load_mask``; "reference" reproduces the reference's pixel labels.
    indices: optional subset (positions in the sorted file list) to load.
    num_workers: decoding threads.

  Returns:
    CategoryData with images uint8 (N, H, W, 3), masks bool (N, H, W), labels int32 (N,).

  Raises:
    FileNotFoundError / ValueError: see ``scan_category``, ``image_io.load_rgb`` and
    ``image_io.load_mask``; also a test split requested from a category without test images.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  files = scan_category(root, category)
  if split == "train":
    paths, types, mask_paths = files.train, [GOOD] * len(files.train), [None] * len(files.train)
  else:
    if not files.test:
      raise FileNotFoundError(
          f"category {category!r} has no test images under "
          f"{os.path.join(files.root, category, 'test')}.\n{LAYOUT_HELP}")
    paths, types, mask_paths = files.test, files.test_types, files.test_masks
  paths, types, mask_paths = (_select(x, indices) for x in (paths, types, mask_paths))
  images = load_images(paths, image_size, num_workers=num_workers)
  masks = load_masks(mask_paths, image_size, mask_rule, num_workers=num_workers)
  if any(m is not None for m in mask_paths):
    _warn_size_mismatch(paths, mask_paths)
  return CategoryData(
      category=category, split=split, images=images, masks=masks,
      labels=np.asarray([t != GOOD for t in types], np.int32),
      defect_types=list(types), filenames=[files.relative(p) for p in paths],
      paths=[str(p) for p in paths])


def _warn_size_mismatch(paths: Sequence[str], mask_paths: Sequence[str | None]) -> None:
  """Logs masks whose native size differs from their image's (they are resized anyway)."""
  from PIL import Image  # Header reads only; no decoding.
  bad = []
  for p, m in zip(paths, mask_paths):
    if m is None:
      continue
    with Image.open(p) as a, Image.open(m) as b:
      if a.size != b.size:
        bad.append(f"{m} {b.size[::-1]} vs image {a.size[::-1]}")
  if bad:
    logging.warning("%d masks differ in size from their image and were resized to the target size "
                    "independently, e.g. %s", len(bad), bad[0])
