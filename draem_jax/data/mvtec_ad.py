"""tensorflow-datasets builder ``mvtec_ad`` (MVTec AD or any folder in its layout), usable without TF.

Importing this module registers ``mvtec_ad`` with tfds, with one config per MVTec AD category; a
user's own category folder gets a config created on the fly by ``builder(name, ...)``::

  from draem_jax.data import mvtec_ad
  b = mvtec_ad.builder("bottle", data_dir="~/tensorflow_datasets", manual_dir="~/mvtec")
  b.download_and_prepare()            # reads manual_dir, writes array_record files under data_dir
  test = b.as_data_source(split="test")   # random access, no TensorFlow needed
  data = mvtec_ad.load_category_from_tfds("bottle", data_dir=..., split="test")  # = folder.py

The manual dir holds either the extracted tree (``<manual_dir>/<category>/train/good/...``, also one
folder level deeper) or the official ``mvtec_anomaly_detection.tar.xz`` (or ``<category>.tar.xz``),
which is extracted once with Python's ``tarfile`` into ``<download_dir>/extracted/`` -- tfds's own
extractor needs TensorFlow. Nothing is written into the manual dir.

Stored features (full resolution; resizing happens when loading):
  image        PNG, 8-bit RGB (the original bytes when the file already is an 8-bit RGB PNG, else the
               ``image_io.load_rgb`` result re-encoded losslessly)
  mask         PNG, 8-bit single channel, 0/255 (> 127 in the source file), all zero for good images
  label        ClassLabel ["good", "defect"]
  defect_type  Text, the test/ sub-folder ("good" for train)
  filename     Text, path relative to the category folder, e.g. "test/crack/000.png"

Encoding images from NumPy arrays needs TensorFlow in tfds, so the PNG bytes are produced with PIL;
decoding (``as_data_source``) uses PIL (or OpenCV when installed). array_record files are written in
a hashed-key order, not the folder order: sort or key by ``filename``.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import uuid

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from draem_jax import published
from draem_jax.data import folder, image_io

CATEGORIES = published.CATEGORIES

TARBALL = "mvtec_anomaly_detection.tar.xz"

_HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

_DESCRIPTION = (
    "MVTec AD: 15 categories of industrial objects and textures for unsupervised anomaly detection "
    "(train: defect-free images only; test: good and defective images with pixel masks). Also used "
    "for any folder in the same layout.")

_CITATION = """@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={CVPR},
  year={2019}
}"""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CONFIG_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class MvtecAd(tfds.core.GeneratorBasedBuilder):
  """MVTec AD (one config per category); see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: full-resolution PNG image and 0/255 mask."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download {TARBALL} (about 4.9 GB; free registration; licence CC BY-NC-SA 4.0) from the MVTec
  website, {_HOMEPAGE}, and either put the tarball itself in the manual dir or extract it there, so
  that <manual_dir>/<category>/train/good/ exists. For your own data, use the folder that holds your
  category folders (same layout) as the manual dir.
  """
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=c, description=f"MVTec AD category {c}.") for c in CATEGORIES
  ]

  def __init__(self, *, manual_dir: str | os.PathLike | None = None,
               file_format: str = "array_record", **kwargs):
    """Same arguments as any tfds builder, plus a default ``manual_dir``; array_record by default."""
    self._default_manual_dir = None if manual_dir is None else os.path.expanduser(
        os.fspath(manual_dir))
    super().__init__(file_format=file_format, **kwargs)

  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
    """tfds's ``download_and_prepare``, using the ``manual_dir`` given at construction if any."""
    if self._default_manual_dir is not None:
      if download_config is None:
        download_config = tfds.download.DownloadConfig()
      if download_config.manual_dir is None:
        download_config = download_config.replace(manual_dir=self._default_manual_dir)
    return super().download_and_prepare(download_dir=download_dir,
                                        download_config=download_config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not dataset_info_from_configs): that helper reads README/CITATIONS files from
    # this module's package folder, which belongs to draem_jax, not to the dataset.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=["good", "defect"]),
            "defect_type": tfds.features.Text(),
            "filename": tfds.features.Text(),
        }),
        homepage=_HOMEPAGE,
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds asserts when the manual dir is missing or empty.
      raise FileNotFoundError(f"{e}") from e
    root = find_root(manual_dir, self.builder_config.name, os.fspath(dl_manager.download_dir))
    files = folder.scan_category(root, self.builder_config.name)
    splits = {"train": self._generate_examples(files, "train")}
    if files.test:
      splits["test"] = self._generate_examples(files, "test")
    return splits

  def _generate_examples(self, files: folder.CategoryFiles, split: str):
    if split == "train":
      items = [(p, folder.GOOD, None) for p in files.train]
    else:
      items = list(zip(files.test, files.test_types, files.test_masks))
    # Decoding/encoding dominates; threads overlap it (PIL releases the GIL). Chunks bound the
    # memory held by encoded examples that the writer has not consumed yet.
    chunk = 8 * image_io.default_num_workers()
    for start in range(0, len(items), chunk):
      yield from image_io.parallel_map(lambda it: _example(files, *it), items[start:start + chunk])


def _encode_png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _example(files: folder.CategoryFiles, path: str, defect_type: str, mask_path: str | None):
  """One tfds example; the key is the file's path relative to the category folder."""
  rgb = image_io.load_rgb(path)  # Validates the file and gives the canonical pixels.
  with open(path, "rb") as f:
    raw = f.read()
  # An 8-bit RGB PNG (bit depth 8, colour type 2 in IHDR) without EXIF orientation decodes to exactly
  # ``rgb``: keep its bytes instead of re-encoding (a 1024^2 PNG encode costs ~0.3 s).
  passthrough = (raw[:8] == _PNG_SIGNATURE and raw[12:16] == b"IHDR" and raw[24] == 8
                 and raw[25] == 2 and b"eXIf" not in raw)
  if mask_path is None:
    mask = np.zeros(rgb.shape[:2], np.uint8)
  else:
    mask = np.where(image_io.read_mask(mask_path), np.uint8(255), np.uint8(0))
  rel = files.relative(path)
  return rel, {
      "image": raw if passthrough else _encode_png(rgb),
      "mask": _encode_png(mask),
      "label": int(defect_type != folder.GOOD),
      "defect_type": defect_type,
      "filename": rel,
  }


def _has_category(base: str, category: str) -> str | None:
  """``base`` or one of its sub-folders that holds ``<category>/``; None if none does."""
  if not os.path.isdir(base):
    return None
  if os.path.isdir(os.path.join(base, category)):
    return base
  with os.scandir(base) as it:
    subs = sorted(e.path for e in it if e.is_dir() and not e.name.startswith("."))
  for sub in subs:
    if os.path.isdir(os.path.join(sub, category)):
      return sub
  return None


def _extract(tarball: str, download_dir: str) -> str:
  """Extracts ``tarball`` once into ``<download_dir>/extracted/<name>`` (atomic rename)."""
  dest = os.path.join(download_dir, "extracted", os.path.basename(tarball))
  if os.path.isdir(dest):
    return dest
  tmp = f"{dest}.incomplete_{uuid.uuid4().hex}"
  os.makedirs(tmp)
  with tarfile.open(tarball) as tar:
    # filter="data" refuses absolute paths, links out of the tree and device files.
    tar.extractall(tmp, filter="data")
  try:
    os.rename(tmp, dest)
  except OSError:  # Another process finished first.
    if not os.path.isdir(dest):
      raise
  return dest


def find_root(manual_dir: str | os.PathLike, category: str, download_dir: str | os.PathLike) -> str:
  """Folder that holds ``<category>/`` inside ``manual_dir``, extracting a tarball if needed.

  Looks in ``manual_dir`` and its sub-folders, then for ``mvtec_anomaly_detection.tar.xz`` or
  ``<category>.tar[.xz|.gz]``/``.tgz`` in ``manual_dir``, extracted under ``download_dir``.

  Raises:
    FileNotFoundError: neither the tree nor a tarball is there (the message lists what is).
  """
  manual_dir, download_dir = os.fspath(manual_dir), os.fspath(download_dir)
  root = _has_category(manual_dir, category)
  if root is not None:
    return root
  names = [TARBALL] + [f"{category}{ext}" for ext in (".tar.xz", ".tar.gz", ".tgz", ".tar")]
  for name in names:
    tarball = os.path.join(manual_dir, name)
    if os.path.isfile(tarball):
      root = _has_category(_extract(tarball, download_dir), category)
      if root is not None:
        return root
  listing = sorted(os.listdir(manual_dir)) if os.path.isdir(manual_dir) else []
  raise FileNotFoundError(
      f"manual dir {manual_dir} holds neither a {category!r} category folder (as "
      f"<manual_dir>/{category}/train/good/) nor {TARBALL}; it contains: "
      f"{listing[:20] if listing else 'nothing'}.\n{MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def builder(category: str, *, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None,
            file_format: str = "array_record") -> MvtecAd:
  """The ``mvtec_ad`` builder for ``category``: an MVTec AD category or any category folder name.

  Args:
    category: config name; one of ``CATEGORIES`` or the name of a category folder in the manual dir
      (letters, digits, ``_ . -``).
    data_dir: where tfds writes/reads the prepared dataset (tfds default when None).
    manual_dir: folder holding the tree or the tarball (used by ``download_and_prepare``).
    file_format: "array_record" (random access without TF) or "tfrecord".

  Returns:
    The builder (not yet prepared).
  """
  if not _CONFIG_NAME.match(category):
    raise ValueError(f"category name {category!r} must use only letters, digits and '_.-'")
  config = category if category in CATEGORIES else tfds.core.BuilderConfig(
      name=category, description=f"Category folder {category!r} in the MVTec AD layout.")
  return MvtecAd(config=config, data_dir=None if data_dir is None else os.fspath(data_dir),
                 manual_dir=manual_dir, file_format=file_format)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_category_from_tfds(category: str, *, data_dir: str | os.PathLike | None = None,
                            manual_dir: str | os.PathLike | None = None,
                            image_size: tuple[int, int] = (256, 256), split: str = "train",
                            mask_rule: image_io.MaskRule = "reference", prepare: bool = True,
                            num_workers: int | None = None) -> folder.CategoryData:
  """Same result as ``folder.load_category``, read from the prepared ``mvtec_ad`` dataset.

  Examples are sorted by ``filename``, which reproduces folder.py's order; images and masks go
  through the same resize code, so the arrays are identical.

  Args:
    category: config name (see ``builder``).
    data_dir: tfds data dir.
    manual_dir: source for preparing (only needed when not prepared yet).
    image_size: output (height, width).
    split: "train" or "test".
    mask_rule: see ``image_io.load_mask``.
    prepare: call ``download_and_prepare`` first (a no-op when already prepared).
    num_workers: decoding threads.

  Returns:
    folder.CategoryData; ``paths`` are "mvtec_ad/<category>:<filename>".
  """
  b = builder(category, data_dir=data_dir, manual_dir=manual_dir)
  if prepare:
    b.download_and_prepare()
  if split not in b.info.splits:
    raise ValueError(f"mvtec_ad/{category} has no split {split!r}; it has {list(b.info.splits)}")
  source = b.as_data_source(split=split)
  n = len(source)
  h, w = image_size
  images = np.empty((n, h, w, 3), np.uint8)
  masks = np.empty((n, h, w), bool)
  meta = [None] * n

  def one(i: int) -> None:
    ex = source[i]
    images[i] = image_io.resize_bilinear(ex["image"], (h, w))
    masks[i] = image_io.resize_mask(ex["mask"][..., 0], (h, w), mask_rule)
    meta[i] = (_text(ex["filename"]), _text(ex["defect_type"]), int(ex["label"]))

  image_io.parallel_map(one, range(n), num_workers)
  order = sorted(range(n), key=lambda i: meta[i][0])
  filenames = [meta[i][0] for i in order]
  return folder.CategoryData(
      category=category, split=split, images=images[order], masks=masks[order],
      labels=np.asarray([meta[i][2] for i in order], np.int32),
      defect_types=[meta[i][1] for i in order], filenames=filenames,
      paths=[f"mvtec_ad/{category}:{f}" for f in filenames])
