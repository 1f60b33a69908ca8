"""export: the StableHLO file run by plain JAX in a process without draem_jax, the ONNX file run by
onnxruntime, both against predict on real images (demo and a PIPED category) for N = 1 and N = 5; the
embedded resize against image_io; bad requests refused with nothing written."""

import csv
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from draem_jax import checkpointing
from draem_jax import export
from draem_jax import inference
from draem_jax import models
from draem_jax import predict
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import steps
from draem_jax.data import demo
from draem_jax.data import image_io

REPO = pathlib.Path(__file__).resolve().parent.parent
STEP = 3
CAMERA = (128, 128)  # PIPED images are 128x128; demo images are rendered at that size too
PIPED_CATEGORY = "piped_pa_bdp01_tl"


def _tiny_variables(config, images):
  """Random weights (NumPy, like DRAEM's init) with BatchNorm statistics of ``images``: a net whose maps
  vary with the input. (A jitted ``model.init`` costs more CPU than the rest of this file.)"""
  model = steps.build_model(config)
  rng = np.random.default_rng(0)
  abstract = flax.traverse_util.flatten_dict(rundir.abstract_variables(model, config.image_size), sep="/")
  flat = {}
  for k, a in abstract.items():
    if k.endswith("kernel"):
      flat[k] = rng.normal(0, 0.02, a.shape)
    elif k.endswith("scale"):
      flat[k] = 1 + rng.normal(0, 0.02, a.shape)
    elif k.endswith("var"):
      flat[k] = np.ones(a.shape)
    else:  # biases, BN means
      flat[k] = rng.uniform(-0.05, 0.05, a.shape)
  variables = flax.traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")
  x = jnp.asarray(np.stack([image_io.resize_bilinear(im, (config.image_size,) * 2) for im in images]))

  @jax.jit
  def batch_stats(v, x):
    # One train-mode pass: running = m * old + (1 - m) * batch, so batch = (running - m * old) / (1 - m).
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    m = models.BN_MOMENTUM
    return jax.tree.map(lambda new, old: (new - m * old) / (1 - m), upd["batch_stats"], v["batch_stats"])

  variables = {"params": variables["params"], "batch_stats": batch_stats(variables, x / 255.0)}
  flat = flax.traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  # Variances floored at 0.01 (gain <= 10 per BatchNorm): with the exact statistics of these smooth images
  # a random net amplifies float rounding so much that XLA's fused and unfused programs differ by 1e-4.
  flat = {k: np.maximum(a, np.float32(0.01)) if k.endswith("/var") else a for k, a in flat.items()}
  key = "params/discriminative/decoder_segment/fin_out/conv_0/kernel"
  flat[key] = flat[key] * np.float32(5)  # spread the maps over [0, 1]
  return model, flax.traverse_util.unflatten_dict(flat, sep="/")


def _gap_threshold(values, lo=0.3, hi=0.7):
  """The midpoint of the widest gap between sorted values in the [lo, hi] quantile range: every value
  is then far (relative to float32 rounding) from the threshold, so decisions cannot flip by noise."""
  v = np.sort(np.asarray(values, np.float64).ravel())
  a, b = int(lo * (len(v) - 1)), max(int(hi * (len(v) - 1)), int(lo * (len(v) - 1)) + 1)
  i = a + int(np.argmax(np.diff(v[a:b + 1])))
  return float((v[i] + v[i + 1]) / 2)


def _demo_images():
  kinds = [None, "scratch", "hole", "stain", "misprint"]
  return [demo.render_example(3, "test_defect", i, image_size=CAMERA[0], defect=d)[0]
          for i, d in enumerate(kinds)]


def _piped_images(shared_data):
  root = shared_data / "piped_mvtec" / PIPED_CATEGORY / "test"
  paths = sorted(root.glob("good/*.png"))[:2] + sorted(root.glob("impurity/*.png"))[:3]
  return [image_io.load_rgb(p) for p in paths]


def _optional_shared_data(request):
  try:
    return request.getfixturevalue("shared_data")
  except pytest.skip.Exception:
    return None


def _jax_path(run, images):
  """What predict computes for these images: OpenCV-exact resize, the model, maps at model size."""
  s = run["config"].image_size
  inf = inference.Inferencer(run["model"], run["variables"], run["config"], batch_size=8)
  return inf.model_size(np.stack([image_io.resize_bilinear(im, (s, s)) for im in images]))


def _predict_rows(run, images, folder):
  """predict's own scores and decisions for the images saved as PNG files."""
  folder.mkdir(parents=True)
  paths = []
  for i, im in enumerate(images):
    paths.append(str(folder / f"{i}.png"))
    Image.fromarray(im).save(paths[-1])
  out = folder / "out"
  predict.predict_files(str(run["workdir"]), paths, str(out), image_threshold=run["thresholds"]["image"],
                        pixel_threshold=run["thresholds"]["pixel"], batch_size=8)
  with open(out / "predictions.csv", newline="") as f:
    rows = {r["path"]: r for r in csv.DictReader(f)}
  return np.array([float(rows[p]["score"]) for p in paths], np.float32), \
      np.array([rows[p]["anomalous"] == "True" for p in paths])


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
  """A tiny run (32x32 model, widths 4) with thresholds, exported to StableHLO and ONNX for 128x128."""
  workdir = tmp_path_factory.mktemp("run")
  config = recipes.tiny()
  shared = _optional_shared_data(request)
  sets = {"demo": _demo_images()}
  if shared is not None:
    sets["piped"] = _piped_images(shared)
  model, variables = _tiny_variables(config, [im for s in sets.values() for im in s])
  rundir.write_config(workdir, config)
  with checkpointing.manager(workdir, keep=None, async_save=False) as mngr:
    checkpointing.save(mngr, STEP, variables)
  r = {"workdir": workdir, "config": config, "model": model, "variables": variables, "sets": sets}
  ref = {name: _jax_path(r, ims) for name, ims in sets.items()}
  maps = np.concatenate([m for m, _ in ref.values()])
  scores = np.concatenate([s for _, s in ref.values()])
  r["thresholds"] = {"image": _gap_threshold(scores), "pixel": _gap_threshold(maps),
                     "image_fpr": 0.05, "pixel_fpr": 0.01, "num_images": 5, "source": "test"}
  rundir.write_thresholds(workdir, STEP, r["thresholds"])
  r["ref"] = ref
  r["python"] = _export_python()
  formats = ["stablehlo"] + (["onnx"] if r["python"] else [])
  out = tmp_path_factory.mktemp("export") / "tiny"
  r["written"] = {w["format"]: w for w in export.export_run(
      workdir, str(out), formats, input_size=f"{CAMERA[0]}x{CAMERA[1]}", export_python=r["python"])}
  return r


def _export_python():
  try:
    return export.find_export_python()
  except FileNotFoundError as e:
    if os.environ.get("CI"):  # CI makes the export environment (.ci/run): never skip there
      raise
    print(f"ONNX tests will skip: {e}")
    return None


def _require_onnx(run):
  if run["python"] is None:
    pytest.skip("no export environment (bash tools/make_export_venv.sh makes it; CI always does)")
  pytest.importorskip("onnxruntime")  # in the test extra


def _batches(images):
  x = np.stack(images)
  return {1: x[:1], 5: x[:5]}


def _check_parity(got, ref_maps, ref_scores, pred_scores, pred_decisions, thresholds, what):
  assert got["anomaly_map"].shape == ref_maps.shape and got["anomaly_map"].dtype == np.float32, what
  np.testing.assert_allclose(got["anomaly_map"], ref_maps, rtol=0, atol=1e-5, err_msg=what)
  np.testing.assert_allclose(got["score"], ref_scores, rtol=0, atol=1e-5, err_msg=what)
  np.testing.assert_allclose(got["score"], pred_scores, rtol=0, atol=1e-5, err_msg=what)
  np.testing.assert_array_equal(got["decision"], pred_decisions, err_msg=what)
  # predict's rule (float32 map vs float64 threshold), at the model's resolution.
  np.testing.assert_array_equal(got["mask"], ref_maps.astype(np.float64) >= thresholds["pixel"], err_msg=what)
  assert 0 < got["mask"].mean() < 1, what


_PLAIN_JAX = r"""
import sys
import numpy as np
import jax
jax.config.update("jax_platforms", "cpu")
with open(sys.argv[1], "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
inputs = np.load(sys.argv[2])
outs = {}
for key in inputs.files:
  for name, value in exported.call(inputs[key]).items():
    outs[f"{key}/{name}"] = np.asarray(value)
np.savez(sys.argv[3], **outs)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("draem_jax", "flax", "orbax", "optax")))
"""


@pytest.fixture(scope="module")
def plain_jax_outputs(run, tmp_path_factory):
  """The StableHLO file run by a process that imports only jax and numpy, on every image batch."""
  tmp = tmp_path_factory.mktemp("plain")
  inputs = {f"{name}_{n}": x for name, ims in run["sets"].items() for n, x in _batches(ims).items()}
  np.savez(tmp / "in.npz", **inputs)
  (tmp / "run.py").write_text(_PLAIN_JAX)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, str(tmp / "run.py"), run["written"]["stablehlo"]["path"],
                         str(tmp / "in.npz"), str(tmp / "out.npz")], capture_output=True, text=True,
                        cwd=tmp, env=env, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout  # no draem_jax, flax, orbax, optax
  with np.load(tmp / "out.npz") as z:
    flat = {k: z[k] for k in z.files}
  return {key: {name: flat[f"{key}/{name}"] for name in export.OUTPUT_NAMES} for key in inputs}


@pytest.mark.parametrize("image_set", ["demo", "piped"])
@pytest.mark.numerics
def test_stablehlo_in_plain_jax_equals_predict(run, plain_jax_outputs, image_set, tmp_path):
  if image_set not in run["sets"]:
    pytest.skip("real PIPED data absent")
  ref_maps, ref_scores = run["ref"][image_set]
  pred_scores, pred_decisions = _predict_rows(run, run["sets"][image_set], tmp_path / "predict")
  for n in (1, 5):
    _check_parity(plain_jax_outputs[f"{image_set}_{n}"], ref_maps[:n], ref_scores[:n], pred_scores[:n],
                  pred_decisions[:n], run["thresholds"], f"stablehlo {image_set} N={n}")
  assert pred_decisions.any() or image_set == "piped"  # the demo threshold splits its images


@pytest.mark.parametrize("image_set", ["demo", "piped"])
@pytest.mark.numerics
def test_onnx_in_onnxruntime_equals_jax(run, image_set, tmp_path):
  _require_onnx(run)
  if image_set not in run["sets"]:
    pytest.skip("real PIPED data absent")
  import onnxruntime  # pylint: disable=g-import-not-at-top
  w = run["written"]["onnx"]
  session = onnxruntime.InferenceSession(w["path"], providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == ["images"]
  (inp,) = session.get_inputs()
  assert inp.type == "tensor(uint8)" and inp.shape[1:] == [128, 128, 3]
  ref_maps, ref_scores = run["ref"][image_set]
  pred_scores, pred_decisions = _predict_rows(run, run["sets"][image_set], tmp_path / "predict")
  for n, x in _batches(run["sets"][image_set]).items():
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))
    _check_parity(got, ref_maps[:n], ref_scores[:n], pred_scores[:n], pred_decisions[:n],
                  run["thresholds"], f"onnx {image_set} N={n}")
  assert w["onnx"]["converter"] == "jax2onnx" and w["onnx"]["probe_check"]["max_abs_map_diff"] < 1e-5


def test_sidecars_and_load(run):
  th = run["thresholds"]
  for fmt, w in run["written"].items():
    side = json.loads(pathlib.Path(w["path"] + ".json").read_text())
    assert side["sha256"] == export.sha256_file(w["path"])
    assert side["size_bytes"] == os.path.getsize(w["path"])
    assert side["checkpoint_step"] == STEP and side["input"]["shape"] == ["N", 128, 128, 3]
    assert side["thresholds"]["image"] == th["image"] and side["thresholds"]["source"] == "test"
    # The stored float32 threshold decides like the float64 one.
    t32 = np.float32(side["thresholds"]["image_float32"])
    assert t32 >= th["image"] and np.nextafter(t32, np.float32(-np.inf)) < th["image"]
    assert side["versions"]["jax"] == jax.__version__ and side["config"]["image_size"] == 32
    if fmt == "stablehlo" or importlib.util.find_spec("onnxruntime") is not None:
      deployed = export.load(w["path"])
      x = np.stack(run["sets"]["demo"][:2])
      got = deployed(x)
      np.testing.assert_allclose(got["anomaly_map"], run["ref"]["demo"][0][:2], atol=1e-5, rtol=0)
      with pytest.raises(ValueError, match="takes uint8 images"):
        deployed(x.astype(np.float32))


@pytest.mark.numerics
def test_resize_matches_image_io():
  rng = np.random.default_rng(1)
  cases = [((128, 128), (32, 32)), ((37, 53), (32, 32)), ((20, 24), (64, 32)), ((300, 199), (64, 64))]
  for (h, w), size in cases:
    x = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    got = np.asarray(jax.jit(lambda a, size=size: export.resize_bilinear(a, size))(x))
    want = np.stack([image_io.resize_bilinear(im, size) for im in x])
    np.testing.assert_array_equal(got, want, err_msg=f"{(h, w)} -> {size}")
  real = np.stack(_demo_images()[:2])
  np.testing.assert_array_equal(np.asarray(export.resize_bilinear(real, (32, 32))),
                                np.stack([image_io.resize_bilinear(im, (32, 32)) for im in real]))


def test_float32_threshold_decides_like_float64():
  rng = np.random.default_rng(2)
  for t in np.concatenate([rng.random(200), [0.5, 1.0, 0.0, 1e-30]]):
    t32 = np.float32(export.float32_threshold(float(t)))
    near = np.float32(t) + np.arange(-3, 4, dtype=np.float32) * np.spacing(np.float32(t))
    np.testing.assert_array_equal(near >= t32, near.astype(np.float64) >= t)


@pytest.fixture(scope="module")
def bare_run(run, tmp_path_factory):
  """A run with the same model but no thresholds: maps and scores only."""
  workdir = tmp_path_factory.mktemp("bare")
  rundir.write_config(workdir, run["config"])
  with checkpointing.manager(workdir, keep=None, async_save=False) as mngr:
    checkpointing.save(mngr, 5, run["variables"])
  return workdir, run["config"], run["model"], run["variables"]


def test_without_thresholds_model_resolution_and_overwrite(bare_run, tmp_path, caplog):
  workdir, config, model, variables = bare_run
  out = tmp_path / "out" / "m.stablehlo"
  with caplog.at_level("WARNING"):
    (w,) = export.export_run(workdir, str(out), "stablehlo")
  assert "no thresholds stored for checkpoint step 5" in caplog.text
  assert w["thresholds"] is None and list(w["outputs"]) == ["anomaly_map", "score"]
  deployed = export.load(str(out))
  x = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  got = deployed(x)
  assert sorted(got) == ["anomaly_map", "score"]
  maps, scores = inference.Inferencer(model, variables, config, batch_size=8).model_size(x)
  np.testing.assert_allclose(got["anomaly_map"], maps, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["score"], scores, atol=1e-5, rtol=0)
  before = out.read_bytes()
  with pytest.raises(FileExistsError, match="already exists; nothing was written"):
    export.export_run(workdir, str(out), "stablehlo", image_threshold=0.5, pixel_threshold=0.5)
  assert out.read_bytes() == before
  (w,) = export.export_run(workdir, str(out), "stablehlo", image_threshold=0.5, pixel_threshold=0.5,
                           overwrite=True)
  assert list(w["outputs"]) == list(export.OUTPUT_NAMES) and sorted(export.load(str(out))(x)) == sorted(
      export.OUTPUT_NAMES)
  # A changed file is refused by load.
  shutil.copy(out, tmp_path / "c.stablehlo")
  shutil.copy(str(out) + ".json", tmp_path / "c.stablehlo.json")
  with open(tmp_path / "c.stablehlo", "r+b") as f:
    f.seek(100)
    f.write(b"\x00\x01\x02")
  with pytest.raises(ValueError, match="does not match the sha256"):
    export.load(str(tmp_path / "c.stablehlo"))


def _listing(root):
  return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


def test_bad_requests_one_line_nothing_written(bare_run, tmp_path):
  workdir, config, _, _ = bare_run
  empty = tmp_path / "empty"
  empty.mkdir()
  rundir.write_config(empty, config)  # a run directory without checkpoints
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "exists.onnx").write_text("keep")
  cases = [
      (dict(workdir=empty, output=tmp_path / "o" / "m.stablehlo", formats="stablehlo"), "no checkpoint in"),
      (dict(workdir=workdir, output=tmp_path / "o" / "m", formats=["tflite"]), "--format=tflite is unknown"),
      (dict(workdir=workdir, output=tmp_path / "a_file" / "m.stablehlo", formats="stablehlo"),
       "is a file, not a folder"),
      (dict(workdir=workdir, output=tmp_path / "exists.onnx", formats="onnx"), "already exists"),
      (dict(workdir=workdir, output=tmp_path / "o" / "m", formats="all", input_size="12x"), "is not HxW"),
      (dict(workdir=workdir, output=tmp_path / "o" / "m", formats="stablehlo", input_size="0x64"),
       "the model takes images from 1x1"),
      (dict(workdir=workdir, output=tmp_path / "o" / "m", formats="stablehlo", input_size="99999x64"),
       "the model takes images from 1x1"),
      (dict(workdir=workdir, output=tmp_path / "o" / "m", formats="stablehlo", image_threshold=0.5),
       "give --pixel_threshold too"),
      (dict(workdir=workdir, output=tmp_path / "o" / "m", formats="onnx",
            export_python=str(tmp_path / "nowhere" / "python")), "needs the export environment"),
  ]
  before = _listing(tmp_path)
  for kwargs, message in cases:
    args = dict(kwargs)
    with pytest.raises((ValueError, OSError)) as e:
      export.export_run(args.pop("workdir"), str(args.pop("output")), args.pop("formats"), **args)
    assert message in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))
    assert _listing(tmp_path) == before, kwargs
  assert (tmp_path / "exists.onnx").read_text() == "keep"


def test_cli_error_is_one_line(bare_run, tmp_path):
  workdir, _, _, _ = bare_run
  proc = subprocess.run([sys.executable, "-m", "draem_jax.export", f"--workdir={workdir}", "--format=tflite",
                         f"--output={tmp_path / 'm'}"], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == ("error: --format=tflite is unknown; give one of stablehlo, "
                                                  "onnx or all.")
  assert not (tmp_path / "m").exists()
