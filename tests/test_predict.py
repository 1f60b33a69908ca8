"""predict: regions and decisions per image, never overwriting, the loaded step's thresholds only, one
unreadable or oversized image reported without losing the others, its own output never read, streaming."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.measure
from PIL import Image

from draem_jax import checkpointing
from draem_jax import inference
from draem_jax import predict
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import steps

REPO = pathlib.Path(__file__).resolve().parent.parent
STEP = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny run made by hand: config.json, one model-only checkpoint, thresholds for its step."""
  workdir = tmp_path_factory.mktemp("run")
  config = recipes.tiny()
  config.eval.batch_size = 8
  model = steps.build_model(config)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
  rundir.write_config(workdir, config)
  with checkpointing.manager(workdir, keep=None, async_save=False) as mngr:
    checkpointing.save(mngr, STEP, dict(variables))
  return workdir


def _set_thresholds(workdir, step, image, pixel):
  (workdir / rundir.THRESHOLDS_FILE).unlink(missing_ok=True)
  rundir.write_thresholds(workdir, step, {"image": image, "pixel": pixel, "image_fpr": 0.05,
                                          "pixel_fpr": 0.005, "num_images": 6, "source": "test"})


def _images(folder, rng):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "sub").mkdir(exist_ok=True)
  sizes = {"a.png": (40, 56), "b.jpg": (32, 32), "sub/c.png": (70, 45), "sub/a.png": (33, 64)}
  for name, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
  (folder / "broken.png").write_bytes(b"not a png at all")
  return sizes


def _rows(out):
  with open(out / predict.CSV_FILE, newline="") as f:
    table = list(csv.DictReader(f))
  records = [json.loads(line) for line in (out / predict.JSONL_FILE).read_text().splitlines()]
  return table, records


def test_predictions_regions_and_errors(run_dir, tmp_path):
  rng = np.random.default_rng(0)
  inputs = tmp_path / "in"
  sizes = _images(inputs, rng)
  out = inputs / "predictions"  # inside the input folder: must not be read back as input
  out.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(out / "stale_heatmap.png")
  _set_thresholds(run_dir, STEP, image=0.5, pixel=0.5)
  # A pixel threshold in the middle of the maps makes regions; find it from the model's own maps.
  paths = predict.list_inputs(str(inputs), exclude=str(out))
  assert not any(p.startswith(str(out)) for p in paths) and len(paths) == 5
  model, variables, _ = rundir.restore_model(run_dir, rundir.load_config(run_dir))
  inf = inference.Inferencer(model, variables, rundir.load_config(run_dir))
  ok_paths = [p for p in paths if "broken" not in p]
  maps, scores = inf.images([np.asarray(Image.open(p).convert("RGB")) for p in ok_paths])
  pixel = float(np.quantile(np.concatenate([m.ravel() for m in maps]), 0.9))
  image = float(np.median(scores))
  _set_thresholds(run_dir, STEP, image=image, pixel=pixel)

  summary = predict.predict_files(run_dir, paths, str(out), input_root=str(inputs), batch_size=3,
                                  min_region_area=3)
  assert summary["num_images"] == 5 and summary["num_errors"] == 1 and summary["step"] == STEP
  table, records = _rows(out)
  assert len(table) == len(records) == 5
  broken = [r for r in records if r["status"] == "error"]
  assert len(broken) == 1 and "broken.png" in broken[0]["error"] and "\n" not in broken[0]["error"]
  by_path = {r["path"]: r for r in records if r["status"] == "ok"}
  assert sum(r["anomalous"] for r in by_path.values()) == int(np.sum(scores >= image))
  for path, want_score, amap in zip(ok_paths, scores, maps):
    r = by_path[path]
    rel = os.path.relpath(path, inputs)
    h, w = sizes[rel]
    assert (r["height"], r["width"]) == (h, w)
    assert r["score"] == pytest.approx(float(want_score), rel=1e-6)
    mask = np.asarray(Image.open(r["mask"])) > 0
    heat = Image.open(r["heatmap"])
    assert mask.shape == (h, w) and heat.size == (w, h)  # the input's size
    assert "score" in heat.text["Title"] and "defect regions" in Image.open(r["mask"]).text["Title"]
    # Regions: 8-connected components of the saved mask (skimage), all >= min area.
    labels = skimage.measure.label(mask, connectivity=2)
    props = skimage.measure.regionprops(labels, intensity_image=amap)
    assert len(r["regions"]) == len(props)
    assert sorted(x["area"] for x in r["regions"]) == sorted(int(p.area) for p in props)
    for reg in r["regions"]:
      assert reg["area"] >= 3 and reg["max_score"] >= pixel
      x0, y0, x1, y1 = reg["bbox"]
      assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
    row = next(t for t in table if t["path"] == path)
    assert int(row["num_regions"]) == len(r["regions"])
  # Same file name in two folders: both kept.
  assert (out / "a_heatmap.png").exists() and (out / "sub" / "a_heatmap.png").exists()
  assert (out / "stale_heatmap.png").exists()

  # Never overwrites: a second run refuses before writing anything, naming a file.
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  with pytest.raises(FileExistsError, match=r"predictions\.csv already exists .*--overwrite"):
    predict.predict_files(run_dir, paths, str(out), input_root=str(inputs))
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
  again = predict.predict_files(run_dir, paths, str(out), input_root=str(inputs), overwrite=True,
                                min_region_area=3)
  assert again["num_images"] == 5


def test_thresholds_of_another_step_are_refused(run_dir, tmp_path):
  img = tmp_path / "x.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
  _set_thresholds(run_dir, 4, image=0.5, pixel=0.5)
  with pytest.raises(ValueError, match=r"thresholds for checkpoint steps \[4\] but not for step 8"):
    predict.predict_files(run_dir, [str(img)], str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  (run_dir / rundir.THRESHOLDS_FILE).unlink()
  with pytest.raises(ValueError, match="no thresholds stored for checkpoint step 8"):
    predict.predict_files(run_dir, [str(img)], str(tmp_path / "out"))
  # Explicit thresholds need no stored ones.
  summary = predict.predict_files(run_dir, [str(img)], str(tmp_path / "out"), image_threshold=0.5,
                                  pixel_threshold=0.9)
  assert summary["thresholds"]["source"] == "command line"


def test_streams_batches(run_dir, tmp_path, monkeypatch):
  _set_thresholds(run_dir, STEP, image=0.5, pixel=0.5)
  folder = tmp_path / "many"
  folder.mkdir()
  for i in range(11):
    Image.fromarray(np.full((32, 32, 3), i * 20, np.uint8)).save(folder / f"{i:02d}.png")
  seen = []
  original = inference.Inferencer.images

  def spy(self, images, **kw):
    seen.append(len(images))
    return original(self, images, **kw)

  monkeypatch.setattr(inference.Inferencer, "images", spy)
  predict.predict_files(run_dir, predict.list_inputs(str(folder)), str(tmp_path / "out"), batch_size=4)
  assert seen == [4, 4, 3]


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "draem_jax.predict", *args], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=300)


def test_cli_decompression_bomb_and_output_file(run_dir, tmp_path):
  _set_thresholds(run_dir, STEP, image=0.5, pixel=0.5)
  folder = tmp_path / "in"
  folder.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "big.png")     # 1024 px > 2 x 400
  Image.fromarray(np.zeros((20, 25, 3), np.uint8)).save(folder / "medium.png")  # 500 px: PIL only warns
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "small.png")   # 256 px: fine
  out = tmp_path / "out"
  r = _cli(f"--workdir={run_dir}", f"--input={folder}", f"--output={out}", "--max_image_pixels=400")
  assert r.returncode == 1, r.stderr
  errors_printed = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert errors_printed[-1].startswith("error: 2 of 3 input images could not be read"), r.stderr
  _, records = _rows(out)
  errors = {os.path.basename(x["path"]): x["error"] for x in records if x["status"] == "error"}
  assert set(errors) == {"big.png", "medium.png"}
  assert "1,024 pixels" in errors["big.png"] and "--max_image_pixels=1024" in errors["big.png"]
  assert "--max_image_pixels=500" in errors["medium.png"]
  assert "Traceback" not in r.stderr
  # --output that is a file: one line, nothing written.
  afile = tmp_path / "file.txt"
  afile.write_text("keep me")
  r = _cli(f"--workdir={run_dir}", f"--input={folder}", f"--output={afile}")
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
      f"error: --output={afile} is a file, not a folder; give a folder for the predictions.")
  assert afile.read_text() == "keep me"


def test_tiled_prediction_keeps_the_input_size(run_dir, tmp_path):
  _set_thresholds(run_dir, STEP, image=0.5, pixel=0.5)
  img = tmp_path / "wide.png"
  Image.fromarray(np.random.default_rng(3).integers(0, 256, (45, 100, 3), dtype=np.uint8)).save(img)
  out = tmp_path / "out"
  predict.predict_files(run_dir, [str(img)], str(out), tile=True, tile_overlap=0.5)
  record = json.loads((out / predict.JSONL_FILE).read_text())
  assert (record["height"], record["width"]) == (45, 100)
  assert Image.open(out / "wide_mask.png").size == (100, 45)
  settings = json.loads((out / predict.SETTINGS_FILE).read_text())
  assert settings["tile"] is True and settings["tile_overlap"] == 0.5 and settings["step"] == STEP
