"""Tests for the tfds builder draem_jax.data.mvtec_ad (prepared and read back without TensorFlow).

Reference: folder.load_category on the same tree (tested in test_folder.py) must give identical arrays.
"""

import os
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from draem_jax.data import folder, mvtec_ad

SIZE = (16, 16)


def texture(h, w, salt):
  yy, xx = np.mgrid[0:h, 0:w]
  base = (30 + (yy * 5 + xx * 9 + salt * 13) % 150).astype(np.uint8)
  return np.stack([base, 255 - base, base // 3], axis=-1)


def save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def make_tree(root, name="toy"):
  """Small category: 3 train (one greyscale, one of another size), 1 good + 2 defect test images."""
  cat = root / name
  save(cat / "train" / "good" / "000.png", texture(24, 24, 0))
  save(cat / "train" / "good" / "001.png", texture(24, 24, 1)[..., 1])  # Re-encoded as RGB.
  save(cat / "train" / "good" / "002.jpg", texture(30, 20, 2))  # JPEG: re-encoded as PNG.
  save(cat / "test" / "good" / "000.png", texture(24, 24, 3))
  for k, kind in enumerate(["hole", "cut"]):
    img = texture(24, 24, 4 + k)
    mask = np.zeros((24, 24), np.uint8)
    mask[3 + 5 * k:12 + 5 * k, 4:20] = 255
    img[mask > 0] = (250, 250, 0)
    save(cat / "test" / kind / "000.png", img)
    save(cat / "ground_truth" / kind / "000_mask.png", mask)
  return root


def listing(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      st = os.stat(os.path.join(dirpath, f))
      out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
  return out


def assert_same(a, b):
  assert a.filenames == b.filenames and a.defect_types == b.defect_types
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.masks, b.masks)
  assert a.images.dtype == np.uint8 and a.masks.dtype == bool and a.labels.dtype == np.int32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The toy tree prepared once per module: (manual_dir, data_dir, listing of manual_dir before)."""
  manual = make_tree(tmp_path_factory.mktemp("manual"))
  before = listing(manual)
  data_dir = tmp_path_factory.mktemp("tfds")
  mvtec_ad.builder("toy", data_dir=data_dir, manual_dir=manual).download_and_prepare()
  return manual, data_dir, before


def test_configs_and_registration(tmp_path):
  b = tfds.builder("mvtec_ad/bottle", data_dir=tmp_path)
  assert isinstance(b, mvtec_ad.MvtecAd) and b.info.file_format.value == "array_record"
  assert set(b.info.features) == {"image", "mask", "label", "defect_type", "filename"}
  assert b.info.features["label"].names == ["good", "defect"]
  with pytest.raises(ValueError, match="letters"):
    mvtec_ad.builder("a/b")


def test_prepared_toy_matches_folder(prepared):
  manual, data_dir, before = prepared
  b = mvtec_ad.builder("toy", data_dir=data_dir)
  assert b.is_prepared()
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 3, "test": 3}
  written = os.listdir(data_dir / "mvtec_ad" / "toy" / "1.0.0")
  assert any(".array_record-" in f for f in written), written
  for split in ("train", "test"):
    got = mvtec_ad.load_category_from_tfds("toy", data_dir=data_dir, split=split, image_size=SIZE)
    ref = folder.load_category(manual, "toy", image_size=SIZE, split=split)
    assert_same(got, ref)
    assert got.paths[0].startswith("mvtec_ad/toy:")
  # The generic tfds entry point reads it back too (record order is not the folder order).
  test = tfds.data_source("mvtec_ad/toy", data_dir=data_dir, split="test")
  ex = {test[i]["filename"].decode(): test[i] for i in range(len(test))}  # Text -> bytes.
  assert sorted(ex) == ["test/cut/000.png", "test/good/000.png", "test/hole/000.png"]
  hole = ex["test/hole/000.png"]
  assert hole["image"].shape == (24, 24, 3) and hole["mask"].shape == (24, 24, 1)
  assert set(np.unique(hole["mask"])) == {0, 255} and hole["label"] == 1
  assert not ex["test/good/000.png"]["mask"].any() and ex["test/good/000.png"]["label"] == 0
  # Masks sit on the yellow defect pixels of their own image.
  assert np.all(hole["image"][hole["mask"][..., 0] > 0] == (250, 250, 0))
  assert listing(manual) == before  # Nothing written into the manual dir.
  assert "tensorflow" not in sys.modules


def test_piped_category_matches_folder(shared_data, tmp_path):
  root = shared_data / "piped_mvtec"
  cat = "piped_pa_btn01_rl"  # Holds the one 127x128 image/mask pair.
  before = listing(root)
  for split in ("train", "test"):
    got = mvtec_ad.load_category_from_tfds(cat, data_dir=tmp_path, manual_dir=root, split=split,
                                           image_size=(64, 64))
    ref = folder.load_category(root, cat, image_size=(64, 64), split=split)
    assert_same(got, ref)
    assert len(got) == {"train": 32, "test": 64}[split]
  assert listing(root) == before


def test_tarball_in_manual_dir(tmp_path):
  tree = make_tree(tmp_path / "tree")
  manual = tmp_path / "manual"
  manual.mkdir()
  with tarfile.open(manual / mvtec_ad.TARBALL, "w:xz") as tar:
    tar.add(tree / "toy", arcname="toy")
  before = listing(manual)
  data_dir = tmp_path / "tfds"
  got = mvtec_ad.load_category_from_tfds("toy", data_dir=data_dir, manual_dir=manual, split="test",
                                         image_size=SIZE)
  assert_same(got, folder.load_category(tree, "toy", image_size=SIZE, split="test"))
  assert (data_dir / "downloads" / "extracted" / mvtec_ad.TARBALL / "toy" / "train").is_dir()
  assert listing(manual) == before


def test_manual_dir_errors(tmp_path):
  wrong = tmp_path / "wrong"
  (wrong / "something_else").mkdir(parents=True)
  with pytest.raises(FileNotFoundError) as e:
    mvtec_ad.builder("bottle", data_dir=tmp_path / "d1", manual_dir=wrong).download_and_prepare()
  msg = str(e.value)
  assert "neither" in msg and "mvtec_anomaly_detection.tar.xz" in msg and "something_else" in msg
  with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
    mvtec_ad.builder("bottle", data_dir=tmp_path / "d2",
                     manual_dir=tmp_path / "absent").download_and_prepare()
  # A malformed tree is reported by folder.scan_category's checks.
  bad = make_tree(tmp_path / "bad")
  (bad / "toy" / "ground_truth" / "cut" / "000_mask.png").unlink()
  with pytest.raises(FileNotFoundError, match="000_mask.png"):
    mvtec_ad.builder("toy", data_dir=tmp_path / "d3", manual_dir=bad).download_and_prepare()


def test_missing_split(tmp_path):
  manual = make_tree(tmp_path / "m")
  import shutil
  shutil.rmtree(manual / "toy" / "test")
  got = mvtec_ad.load_category_from_tfds("toy", data_dir=tmp_path / "d", manual_dir=manual,
                                         image_size=SIZE)
  assert len(got) == 3
  with pytest.raises(ValueError, match="no split 'test'"):
    mvtec_ad.load_category_from_tfds("toy", data_dir=tmp_path / "d", split="test")
