"""Tests for draem_jax.data.sources: texture folders (DTD layout), tfds sources, procedural fallback."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from draem_jax.data import image_io, mvtec_ad, sources


def texture(h, w, salt):
  yy, xx = np.mgrid[0:h, 0:w]
  v = (yy * (3 + salt) + xx * (5 + 2 * salt)) % 256
  return np.stack([v, 255 - v, (v + 85 * salt) % 256], axis=-1).astype(np.uint8)


@pytest.fixture()
def texture_dir(tmp_path):
  """DTD-like nested folder with mixed formats, an upper-case extension and non-image files."""
  root = tmp_path / "dtd" / "images"
  files = {"banded/b_01.jpg": (40, 30), "banded/b_00.png": (20, 20), "zigzag/z.PNG": (24, 36),
           "cracked/deep/c.bmp": (17, 23), "a_top.png": (16, 16)}
  for k, (rel, (h, w)) in enumerate(sorted(files.items())):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(texture(h, w, k)).save(root / rel)
  (root / "banded" / "readme.txt").write_text("x")
  (root / ".hidden").mkdir()
  Image.fromarray(texture(8, 8, 9)).save(root / ".hidden" / "skip.png")
  return root


EXPECTED_ORDER = ["a_top.png", "banded/b_00.png", "banded/b_01.jpg", "cracked/deep/c.bmp",
                  "zigzag/z.PNG"]


def test_load_sources_recursive_sorted(texture_dir):
  files = sources.list_source_files(texture_dir)
  assert [os.path.relpath(f, texture_dir).replace(os.sep, "/") for f in files] == EXPECTED_ORDER
  pool = sources.load_sources(texture_dir, (12, 10))
  assert pool.shape == (5, 12, 10, 3) and pool.dtype == np.uint8
  for img, rel in zip(pool, EXPECTED_ORDER):
    raw = np.asarray(Image.open(texture_dir / rel).convert("RGB"))
    np.testing.assert_array_equal(img, image_io.resize_bilinear(raw, (12, 10)))


def test_max_sources_deterministic_subset(texture_dir):
  full = sources.load_sources(texture_dir, (8, 8))
  a = sources.load_sources(texture_dir, (8, 8), max_sources=3, seed=1)
  assert a.shape == (3, 8, 8, 3)
  np.testing.assert_array_equal(a, sources.load_sources(texture_dir, (8, 8), max_sources=3, seed=1))
  # Rows are distinct images of the full pool, in the pool's order.
  idx = [next(j for j in range(5) if np.array_equal(full[j], img)) for img in a]
  assert idx == sorted(set(idx))
  subsets = {tuple(np.flatnonzero(sources._subsample(5, 3, s))) for s in range(20)}
  assert len(subsets) > 1  # The seed matters.
  assert sources.load_sources(texture_dir, (8, 8), max_sources=50).shape[0] == 5
  with pytest.raises(ValueError, match="max_sources"):
    sources.load_sources(texture_dir, (8, 8), max_sources=0)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)nope does not exist.*DTD"):
    sources.load_sources(tmp_path / "nope", (8, 8))
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "sub" / "x.txt").write_text("x")
  with pytest.raises(ValueError, match=r"no images .* found under .*empty"):
    sources.load_sources(tmp_path / "empty", (8, 8))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "t.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match=r"t\.jpg"):
    sources.load_sources(bad, (8, 8))


def test_real_dtd_subset(shared_data):
  root = shared_data / "dtd_subset" / "images"
  files = sources.list_source_files(root)
  assert len(files) == 180 and all(f.endswith(".jpg") for f in files)
  assert len({os.path.basename(os.path.dirname(f)) for f in files}) == 10  # 10 DTD classes.
  pool = sources.load_sources(root, (32, 32), max_sources=30)  # Decoding all 180 takes ~2 s.
  assert pool.shape == (30, 32, 32, 3) and pool.dtype == np.uint8
  # The parent folder works as well (DTD's dtd/images/<class>/*.jpg found recursively).
  assert sources.load_sources(shared_data / "dtd_subset", (8, 8), max_sources=4).shape == (4, 8, 8, 3)
  assert pool.nbytes == 30 * 32 * 32 * 3  # S * H * W * 3 bytes, as documented.


def test_tfds_source_reads_prepared_dataset(tmp_path):
  manual = tmp_path / "manual" / "tex" / "train" / "good"
  manual.mkdir(parents=True)
  for k in range(4):
    Image.fromarray(texture(20, 20 + k, k)).save(manual / f"{k}.png")
  data_dir = tmp_path / "tfds"
  mvtec_ad.builder("tex", data_dir=data_dir, manual_dir=tmp_path / "manual").download_and_prepare()
  pool = sources.load_tfds_sources("mvtec_ad/tex", (8, 8), data_dir=data_dir)
  ref = sources.load_sources(manual, (8, 8))
  # Record order is tfds's hashed order: compare as a set of images.
  key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
  assert key(pool) == key(ref)
  assert sources.load_tfds_sources("mvtec_ad/tex", (8, 8), data_dir=data_dir,
                                   max_sources=2).shape == (2, 8, 8, 3)
  # The "tfds:" spelling of a source path (config.anomaly_source_path) reads the same pool.
  np.testing.assert_array_equal(sources.load_sources("tfds:mvtec_ad/tex", (8, 8), tfds_data_dir=data_dir),
                                pool)


def test_tfds_source_not_prepared(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'dtd' is not prepared.*array_record"):
    sources.load_tfds_sources("dtd", (8, 8), data_dir=tmp_path)


def test_procedural_sources(caplog):
  with caplog.at_level(logging.WARNING):
    pool = sources.procedural_sources(8, (32, 48), seed=3)
  assert "lower accuracy" in caplog.text
  assert pool.shape == (8, 32, 48, 3) and pool.dtype == np.uint8
  np.testing.assert_array_equal(pool, sources.procedural_sources(8, (32, 48), seed=3))
  # Texture i depends on (seed, i) only, not on how many are drawn.
  np.testing.assert_array_equal(pool[:3], sources.procedural_sources(3, (32, 48), seed=3))
  assert not np.array_equal(pool, sources.procedural_sources(8, (32, 48), seed=4))
  # Textured and colourful, not flat: spatial and channel variation in every texture.
  assert np.all(pool.reshape(8, -1, 3).std(axis=1).max(axis=1) > 10)
  assert len({p.tobytes() for p in pool}) == 8
  with pytest.raises(ValueError, match="num"):
    sources.procedural_sources(0, (8, 8))
