"""Tests for draem_jax.data.folder on generated MVTec-layout trees and on the real piped_mvtec data."""

import os

import numpy as np
import pytest
from PIL import Image

from draem_jax.data import folder, image_io

RED = (255, 0, 0)


def texture(h, w, salt):
  yy, xx = np.mgrid[0:h, 0:w]
  base = (40 + (yy * 7 + xx * 3 + salt * 11) % 120).astype(np.uint8)
  return np.stack([base, base // 2 + 60, 200 - base], axis=-1).astype(np.uint8)


def defect_pair(h, w, box, salt):
  """An image with a red rectangle and its 0/255 mask covering exactly that rectangle."""
  y0, y1, x0, x1 = box
  img = texture(h, w, salt)
  img[y0:y1, x0:x1] = RED
  mask = np.zeros((h, w), np.uint8)
  mask[y0:y1, x0:x1] = 255
  return img, mask


def save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def make_category(root, name):
  """widget-like category: 6 train images (mixed formats/sizes), 2 good + 3 defect test images."""
  cat = root / name
  for i in range(4):
    save(cat / "train" / "good" / f"{i:03d}.png", texture(32, 32, i))
  save(cat / "train" / "good" / "004.PNG", texture(32, 32, 4)[..., 0])  # Greyscale, upper-case ext.
  save(cat / "train" / "good" / "005.bmp", texture(40, 48, 5))  # Another size: resized, no error.
  (cat / "train" / "good" / "notes.txt").write_text("not an image")
  save(cat / "test" / "good" / "000.png", texture(32, 32, 10))
  save(cat / "test" / "good" / "001.png", texture(32, 32, 11))
  boxes = {("crack", "000"): (4, 20, 8, 16), ("crack", "001"): (16, 32, 0, 24),
           ("scratch", "000"): (0, 8, 0, 32)}
  for k, ((kind, stem), box) in enumerate(boxes.items()):
    img, mask = defect_pair(32, 32, box, 20 + k)
    save(cat / "test" / kind / f"{stem}.png", img)
    if kind == "scratch":  # An RGB mask with identical channels is accepted.
      mask = np.repeat(mask[..., None], 3, axis=-1)
    save(cat / "ground_truth" / kind / f"{stem}_mask.png", mask)
  return cat


@pytest.fixture()
def tree(tmp_path):
  root = tmp_path / "data"
  make_category(root, "widget")
  make_category(root, "gadget")
  (root / "docs").mkdir()  # Not a category: no train/good.
  return root


def snapshot(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      st = os.stat(p)
      out[p] = (st.st_size, st.st_mtime_ns)
    out[dirpath] = "dir"
  return out


TRAIN = ["train/good/000.png", "train/good/001.png", "train/good/002.png", "train/good/003.png",
         "train/good/004.PNG", "train/good/005.bmp"]
TEST = ["test/crack/000.png", "test/crack/001.png", "test/good/000.png", "test/good/001.png",
        "test/scratch/000.png"]


def test_list_and_scan(tree):
  assert folder.list_categories(tree) == ["gadget", "widget"]
  files = folder.scan_category(tree, "widget")
  assert [files.relative(p) for p in files.train] == TRAIN
  assert [files.relative(p) for p in files.test] == TEST
  assert files.test_types == ["crack", "crack", "good", "good", "scratch"]
  masks = [None if m is None else files.relative(m) for m in files.test_masks]
  assert masks == ["ground_truth/crack/000_mask.png", "ground_truth/crack/001_mask.png", None, None,
                   "ground_truth/scratch/000_mask.png"]


def test_load_train(tree):
  data = folder.load_category(tree, "widget", image_size=(16, 24), split="train")
  assert data.images.shape == (6, 16, 24, 3) and data.images.dtype == np.uint8
  assert data.masks.shape == (6, 16, 24) and data.masks.dtype == bool and not data.masks.any()
  assert data.labels.dtype == np.int32 and not data.labels.any()
  assert data.defect_types == ["good"] * 6 and data.filenames == TRAIN and len(data) == 6
  assert data.nbytes == 6 * 16 * 24 * 4 + 6 * 4
  for img, rel in zip(data.images, TRAIN):
    # Reference: PIL decode + the (separately tested) OpenCV-exact resize.
    raw = np.asarray(Image.open(tree / "widget" / rel).convert("RGB"))
    np.testing.assert_array_equal(img, image_io.resize_bilinear(raw, (16, 24)))
  # The greyscale file is replicated to three equal channels.
  assert np.array_equal(data.images[4, ..., 0], data.images[4, ..., 2])


@pytest.mark.parametrize("rule", ["reference", "nearest"])
def test_load_test_masks_aligned(tree, rule):
  data = folder.load_category(tree, "widget", image_size=(16, 16), split="test", mask_rule=rule)
  assert data.filenames == TEST
  np.testing.assert_array_equal(data.labels, [1, 1, 0, 0, 1])
  assert data.defect_types == ["crack", "crack", "good", "good", "scratch"]
  assert not data.masks[2:4].any()
  for i in (0, 1, 4):
    m = data.masks[i]
    assert m.any()
    # Every mask pixel shows the red defect drawn at the same place in that image (alignment), and
    # masks differ between images (no mix-up).
    assert np.all(data.images[i][m] == RED)
  assert not np.array_equal(data.masks[0], data.masks[1])
  ref = image_io.load_mask(tree / "widget" / "ground_truth" / "crack" / "001_mask.png", (16, 16), rule)
  np.testing.assert_array_equal(data.masks[1], ref)


def test_load_images_indices_and_threads(tree):
  files = folder.scan_category(tree, "widget")
  full = folder.load_images(files.train, (8, 8))
  np.testing.assert_array_equal(folder.load_images(files.train, (8, 8), indices=[5, 0]), full[[5, 0]])
  np.testing.assert_array_equal(folder.load_images(files.train, (8, 8), num_workers=1), full)
  part = folder.load_category(tree, "widget", (8, 8), split="test", indices=[4, 1])
  assert part.filenames == [TEST[4], TEST[1]] and list(part.labels) == [1, 1]
  with pytest.raises(IndexError):
    folder.load_images(files.train, (8, 8), indices=[6])


def test_nothing_written_into_dataset(tree):
  before = snapshot(tree)
  folder.load_category(tree, "widget", (16, 16), split="train")
  folder.load_category(tree, "widget", (16, 16), split="test")
  assert snapshot(tree) == before


def test_error_missing_root(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)nowhere does not exist.*Expected layout"):
    folder.load_category(tmp_path / "nowhere", "widget")


def test_error_missing_category(tree):
  with pytest.raises(FileNotFoundError) as e:
    folder.scan_category(tree, "bottle")
  msg = str(e.value)
  assert "'bottle' not found" in msg and "['gadget', 'widget']" in msg
  assert "<root>/<category>/train/good" in msg


def test_error_empty_or_missing_train(tree):
  for f in (tree / "widget" / "train" / "good").iterdir():
    f.unlink()
  with pytest.raises(ValueError, match=r"no training images in .*widget.train.good"):
    folder.scan_category(tree, "widget")
  (tree / "widget" / "train" / "good").rmdir()
  with pytest.raises(FileNotFoundError, match="has no training folder"):
    folder.scan_category(tree, "widget")


def test_error_undecodable_image(tree):
  (tree / "widget" / "train" / "good" / "002.png").write_bytes(b"\x89PNG broken")
  with pytest.raises(ValueError, match=r"cannot decode image file .*002\.png"):
    folder.load_category(tree, "widget", (8, 8))


def test_error_defect_without_mask(tree):
  (tree / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
  with pytest.raises(FileNotFoundError) as e:
    folder.scan_category(tree, "widget")
  assert "crack" in str(e.value) and "001_mask.png" in str(e.value) and "test/good" in str(e.value)


def test_error_coloured_mask(tree):
  mask = np.zeros((32, 32, 3), np.uint8)
  mask[2:5, 2:5] = (0, 255, 0)
  save(tree / "widget" / "ground_truth" / "crack" / "000_mask.png", mask)
  with pytest.raises(ValueError, match=r"000_mask\.png is a colour image"):
    folder.load_category(tree, "widget", (8, 8), split="test")


def test_error_no_test_split_and_bad_split(tree):
  import shutil
  shutil.rmtree(tree / "gadget" / "test")
  assert folder.scan_category(tree, "gadget").test == []
  with pytest.raises(FileNotFoundError, match="no test images"):
    folder.load_category(tree, "gadget", (8, 8), split="test")
  with pytest.raises(ValueError, match="split"):
    folder.load_category(tree, "gadget", (8, 8), split="validation")


# --- real data ------------------------------------------------------------------------------------


def test_piped_mvtec_all_categories(shared_data):
  root = shared_data / "piped_mvtec"
  cats = folder.list_categories(root)
  assert len(cats) == 12 and all(c.startswith("piped_pa_") for c in cats)
  before = snapshot(root)
  for cat in cats:
    files = folder.scan_category(root, cat)
    assert len(files.train) == 32 and len(files.test) == 64
    for img, kind, mask in zip(files.test, files.test_types, files.test_masks):
      if kind == "good":
        assert mask is None
      else:
        stem = os.path.splitext(os.path.basename(img))[0]
        assert os.path.basename(mask) == f"{stem}_mask.png"
        assert os.path.basename(os.path.dirname(mask)) == kind
    data = folder.load_category(root, cat, image_size=(128, 128), split="test")
    assert data.images.shape == (64, 128, 128, 3) and data.masks.shape == (64, 128, 128)
    assert data.labels.sum() == 48 and set(data.defect_types) == {"good", "impurity"}
    np.testing.assert_array_equal(data.labels, [t != "good" for t in data.defect_types])
    assert not data.masks[data.labels == 0].any()
    grey = data.images.astype(np.float64).mean(-1)
    for i in np.flatnonzero(data.labels):
      m = data.masks[i]
      assert m.any(), data.paths[i]
      # Alignment: impurities are darker than the paper around them (>= 20 grey levels in all 576
      # defect images); a misplaced mask would average over paper instead.
      assert grey[i][m].mean() < grey[i][~m].mean() - 10, data.paths[i]
  assert snapshot(root) == before
