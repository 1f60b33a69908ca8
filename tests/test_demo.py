"""Tests for draem_jax.data.demo: the generated textile category in the MVTec AD layout."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from draem_jax.data import demo
from draem_jax.data import folder

SMALL = dict(image_size=64, num_train=6, num_test_good=3, num_test_defect=8, seed=0)


def _read(path):
  with Image.open(path) as im:
    return im.mode, np.asarray(im)


@pytest.fixture(scope="module")
def small_category(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  return root, demo.write_demo_category(root, **SMALL)


def test_layout_and_counts(small_category):
  root, cat = small_category
  assert cat == root / "demo_fabric"
  names = lambda d: sorted(p.name for p in (cat / d).iterdir())  # noqa: E731
  assert names("train/good") == [f"{i:03d}.png" for i in range(6)]
  assert names("test/good") == ["000.png", "001.png", "002.png"]
  assert names("test") == sorted(["good", *demo.DEFECT_TYPES])
  assert names("ground_truth") == sorted(demo.DEFECT_TYPES)
  for d in demo.DEFECT_TYPES:
    assert names(f"test/{d}") == ["000.png", "001.png"]
    assert names(f"ground_truth/{d}") == ["000_mask.png", "001_mask.png"]
  marker = json.loads((cat / demo.MARKER).read_text())
  assert marker["image_size"] == 64 and marker["num_test_defect"] == 8
  assert not any(p.name.startswith(".demo_fabric") for p in root.iterdir())  # no temp left over


def test_images_and_masks(small_category):
  _, cat = small_category
  for path in sorted(cat.glob("t*/*/*.png")):
    mode, img = _read(path)
    assert mode == "RGB" and img.shape == (64, 64, 3) and img.dtype == np.uint8, path
  for d in demo.DEFECT_TYPES:
    for stem in ("000", "001"):
      mode, mask = _read(cat / "ground_truth" / d / f"{stem}_mask.png")
      assert mode == "L" and mask.shape == (64, 64)  # single channel, aligned with its image
      assert set(np.unique(mask)) == {0, 255}         # binary and non-empty
      assert (mask == 255).sum() >= 10


def test_masks_are_exact_and_defects_visible():
  # The defective image equals its clean counterpart outside the mask, and differs clearly inside.
  for d in demo.DEFECT_TYPES:
    for index in range(6):
      image, mask = demo.render_example(3, "test_defect", index, 64, d)
      clean, none = demo.render_example(3, "test_defect", index, 64)
      assert not none.any()
      diff = np.abs(image.astype(int) - clean).max(axis=-1)
      assert not diff[~mask].any(), (d, index)
      assert diff[mask].mean() > 15, (d, index, diff[mask].mean())
      assert (diff[mask] > 12).mean() > 0.5, (d, index)


def test_good_images_vary_but_look_alike():
  imgs = np.stack([demo.render_example(0, "train", i, 64)[0] for i in range(8)]).astype(float)
  pair = [np.abs(imgs[0] - imgs[k]).mean() for k in range(1, 8)]
  assert min(pair) > 10  # not copies: phase, angle, colour and grain differ
  means = imgs.mean(axis=(1, 2))
  assert means.std(axis=0).max() < 10  # same fabric: per-image mean colour within a few levels
  assert (means[:, 2] > means[:, 1]).all() and (means[:, 1] > means[:, 0]).all()  # denim blue
  # A woven texture: strong local contrast (threads), unlike a flat or smooth image.
  assert imgs.std(axis=(1, 2)).min() > 15


def test_deterministic_given_the_seed(tmp_path, small_category):
  _, first = small_category
  again = demo.write_demo_category(tmp_path / "a", **SMALL)
  other = demo.write_demo_category(tmp_path / "b", **{**SMALL, "seed": 1})
  files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
  assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
  for rel in files:
    np.testing.assert_array_equal(_read(first / rel)[1], _read(again / rel)[1])
  assert not np.array_equal(_read(first / "train/good/000.png")[1],
                            _read(other / "train/good/000.png")[1])


def test_ensure_writes_once_reuses_and_protects_user_folders(tmp_path):
  settings = dict(image_size=32, num_train=2, num_test_good=1, num_test_defect=4)
  cat = demo.ensure_demo_dataset(tmp_path, **settings)
  (cat / "keep.txt").write_text("x")  # survives a reuse ...
  assert demo.ensure_demo_dataset(tmp_path, **settings) == cat
  assert (cat / "keep.txt").exists()
  demo.ensure_demo_dataset(tmp_path, **{**settings, "num_train": 3})  # ... not a settings change
  assert not (cat / "keep.txt").exists()
  assert len(list((cat / "train/good").iterdir())) == 3
  user = tmp_path / "mine"
  user.mkdir()
  (user / "precious.png").write_bytes(b"user data")
  with pytest.raises(ValueError, match="refusing to overwrite"):
    demo.ensure_demo_dataset(tmp_path, category="mine", **settings)
  assert sorted(p.name for p in user.iterdir()) == ["precious.png"]
  with pytest.raises(TypeError, match="unknown settings"):
    demo.ensure_demo_dataset(tmp_path, num_trian=3)


def test_bad_arguments():
  with pytest.raises(ValueError, match="defect="):
    demo.render_example(0, "test_defect", 0, 64, "crack")
  with pytest.raises(ValueError, match="split="):
    demo.render_example(0, "val", 0, 64)


def test_folder_reader_loads_the_demo(small_category):
  root, _ = small_category
  train = folder.load_category(root, "demo_fabric", image_size=(64, 64), split="train")
  test = folder.load_category(root, "demo_fabric", image_size=(64, 64), split="test")
  assert train.images.shape == (6, 64, 64, 3) and train.images.dtype == np.uint8
  assert test.images.shape == (11, 64, 64, 3)
  assert int(np.sum(test.labels)) == 8
  # Same size, so the reader's masks are the written ones exactly.
  for i, rel in enumerate(test.filenames):
    parts = pathlib.PurePosixPath(rel).parts
    if parts[1] == "good":
      assert not test.masks[i].any()
    else:
      stem = pathlib.PurePosixPath(rel).stem
      gt = _read(small_category[1] / "ground_truth" / parts[1] / f"{stem}_mask.png")[1]
      np.testing.assert_array_equal(test.masks[i], gt == 255)
      np.testing.assert_array_equal(test.images[i], _read(small_category[1] / rel)[1])
