"""evaluate: normal-only decisions vs the oracle against scikit-learn, per-defect-type metrics, metrics
printed before a failing report write, no test split -> validation report only, earlier eval kept."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

from draem_jax import checkpointing
from draem_jax import evaluate
from draem_jax import inference
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import steps
from draem_jax import validation
from draem_jax import writers
from draem_jax.data import datasets
from draem_jax.data import demo

STEP = 8


def _make_run(workdir, data_root, category):
  """A run made by hand (random weights): config, checkpoint, validation split, thresholds of STEP."""
  c = recipes.tiny()
  c.dataset, c.data_dir, c.category = "folder", str(data_root), category
  c.validation.fraction = 0.25
  c.validation.num_synthetic = 2
  c.eval.batch_size = 8
  c.eval.num_visualizations = 3
  rundir.write_config(workdir, c)
  model = steps.build_model(c)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(1))
  with checkpointing.manager(workdir, keep=None, async_save=False) as mngr:
    checkpointing.save(mngr, STEP, dict(variables))
  split = datasets.load_split(c, str(workdir), "train")
  _, vset = validation.prepare(c, workdir, split, datasets.load_anomaly_sources(c))
  writer = writers.MetricWriter(workdir, tensorboard=False)
  validation.Validator(c, workdir, model, vset, writer).run(STEP, variables)
  writer.close()
  return c, model, variables


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  demo.write_demo_category(root, "mini", image_size=64, num_train=12, num_test_good=6, num_test_defect=8)
  shutil.copytree(root / "mini" / "train", root / "notest" / "train")
  return root


@pytest.fixture(scope="module")
def mini_run(data_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mini_run")
  return workdir, _make_run(workdir, data_root, "mini")


def test_normal_only_and_oracle_decisions(mini_run, tmp_path):
  source, (config, model, variables) = mini_run
  shutil.copytree(source, tmp_path, dirs_exist_ok=True)
  printed = []
  results = evaluate.evaluate_workdir(tmp_path, echo=printed.append)
  th = rundir.read_thresholds(tmp_path, STEP)
  assert results["normal_thresholds"]["image"] == th["image"]
  # Independent recomputation of the test maps and the decisions (scikit-learn).
  test = datasets.load_test_split(config, str(tmp_path))
  maps, scores = inference.Inferencer(model, variables, config).model_size(test.images)
  y, pred = test.labels.astype(bool), scores >= th["image"]
  assert results["normal_image_recall"] == pytest.approx(sklearn.metrics.recall_score(y, pred))
  tn, fp, fn, tp = sklearn.metrics.confusion_matrix(y, pred, labels=[0, 1]).ravel()
  assert results["normal_image_fpr"] == pytest.approx(fp / (fp + tn))
  if tp + fp:
    assert results["normal_image_precision"] == pytest.approx(tp / (tp + fp))
  else:
    assert results["normal_image_precision"] is None  # nothing flagged: undefined, stored as null
  pix = maps.ravel() >= th["pixel"]
  want_recall = sklearn.metrics.recall_score(test.masks.ravel(), pix)
  assert results["normal_pixel_recall"] == pytest.approx(want_recall)
  # Oracle: the F1-max threshold on the test labels, labelled as such.
  p, r, t = sklearn.metrics.precision_recall_curve(y, scores)
  f1 = 2 * p * r / np.maximum(p + r, 1e-12)
  assert results["oracle_image_f1"] == pytest.approx(f1[:-1].max())
  assert results["image_auroc"] == pytest.approx(sklearn.metrics.roc_auc_score(y, scores))
  # Per defect type: that type vs all good images.
  types = np.asarray(test.defect_types)
  for row in results["per_defect_type"]:
    sel = (types == row["defect_type"]) | (types == "good")
    assert row["image_auroc"] == pytest.approx(
        sklearn.metrics.roc_auc_score(types[sel] != "good", scores[sel]))
    if not test.masks[sel].any():  # thin defects can vanish at 32 px (the reference mask rule)
      assert row["pixel_ap"] is None
      continue
    assert row["pixel_ap"] == pytest.approx(
        sklearn.metrics.average_precision_score(test.masks[sel].ravel(), maps[sel].ravel()))
  assert {r["defect_type"] for r in results["per_defect_type"]} == set(demo.DEFECT_TYPES)
  text = printed[-1]
  assert "normal-only (held-out good images)" in text and "oracle F1-max (tuned on test labels)" in text
  eval_dir = tmp_path / "eval"
  assert json.loads((eval_dir / "metrics.json").read_text())["step"] == STEP
  page = (eval_dir / "report.html").read_text()
  assert "Gallery" in page and "Per defect type" in page and page.count("data:image/png;base64,") >= 8
  assert len(list((eval_dir / "overlays").glob("*.png"))) == 3

  # Re-evaluating keeps the earlier report (renamed aside, never overwritten).
  again = evaluate.evaluate_workdir(tmp_path, echo=printed.append)
  assert again == results
  assert len(list(tmp_path.glob("eval.replaced-*"))) == 1

  # A failing report write still shows the metrics first.
  def broken(*a, **k):
    raise OSError(28, "No space left on device", str(eval_dir / "metrics.json"))

  printed.clear()
  original = evaluate.write_report
  evaluate.write_report = broken
  try:
    with pytest.raises(OSError):
      evaluate.evaluate_workdir(tmp_path, echo=printed.append)
  finally:
    evaluate.write_report = original
  assert printed and "| image AUROC |" in printed[-1]


def test_missing_thresholds_are_calibrated_from_the_recorded_split(mini_run, tmp_path):
  shutil.copytree(mini_run[0], tmp_path, dirs_exist_ok=True)
  stored = rundir.read_thresholds(tmp_path, STEP)
  (tmp_path / rundir.THRESHOLDS_FILE).unlink()
  results = evaluate.evaluate_workdir(tmp_path, echo=lambda s: None)
  assert rundir.read_thresholds(tmp_path, STEP)["image"] == pytest.approx(stored["image"], abs=1e-5)
  assert results["normal_thresholds"]["num_images"] == stored["num_images"]


def test_no_test_split_writes_the_validation_report_only(data_root, tmp_path):
  _make_run(tmp_path, data_root, "notest")
  printed = []
  results = evaluate.evaluate_workdir(tmp_path, echo=printed.append)
  assert printed[0] == "notest: no labelled test split (no test/ folder): writing the validation report only."
  assert results["num_test_images"] == 0 and "image_auroc" not in results
  assert "val_pixel_ap" in results and results["normal_thresholds"]["step"] == STEP
  page = (tmp_path / "eval" / "report.html").read_text()
  assert "Synthetic validation" in page and "Gallery" not in page


# Fields recipes.mvtec() gained after the first recorded configs (validation/threshold/predict/crop).
_NEWER_FIELDS = ("validation", "threshold", "predict", "train_crop", "load_size", "channel_order")


def test_an_older_config_record_is_completed_and_evaluate_and_predict_work(data_root, tmp_path, caplog):
  c = recipes.tiny()
  c.dataset, c.data_dir, c.category = "folder", str(data_root), "mini"
  c.eval.batch_size = 8
  c.eval.num_visualizations = 2
  old = json.loads(c.to_json())
  for name in _NEWER_FIELDS:
    del old[name]
  rundir.write_json(tmp_path / rundir.CONFIG_FILE, old)
  model = steps.build_model(c)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(1))
  with checkpointing.manager(tmp_path, keep=None, async_save=False) as mngr:
    checkpointing.save(mngr, STEP, dict(variables))

  with caplog.at_level("WARNING"):
    loaded = rundir.load_config(tmp_path)
  assert "field(s) added since it was recorded" in caplog.text
  assert "predict.min_region_area=16" in caplog.text and "validation.fraction=0.0" in caplog.text
  recipe = recipes.mvtec()
  assert loaded.validation.fraction == 0.0  # nothing was held out before the hold-out split existed
  assert loaded.validation.select == recipe.validation.select == "last"
  assert loaded.threshold.to_dict() == recipe.threshold.to_dict()
  assert loaded.predict.to_dict() == recipe.predict.to_dict()
  assert (loaded.train_crop, loaded.load_size, loaded.channel_order) == (False, 0, "rgb")
  assert {k: v for k, v in json.loads(loaded.to_json()).items() if k not in _NEWER_FIELDS} == old
  assert json.loads((tmp_path / rundir.CONFIG_FILE).read_text()) == old  # the record stays as written

  results = evaluate.evaluate_workdir(tmp_path, echo=lambda s: None)
  assert "normal_thresholds" not in results and "no held-out good images" in results["normal_thresholds_note"]
  assert results["num_test_images"] == 14 and 0 <= results["image_auroc"] <= 1
  assert (tmp_path / "eval" / "report.html").exists()

  from draem_jax import predict  # pylint: disable=g-import-not-at-top
  files = sorted(str(p) for p in (data_root / "mini" / "test").rglob("*.png"))[:3]
  out = predict.predict_files(tmp_path, files, str(tmp_path / "pred"), image_threshold=0.5,
                              pixel_threshold=0.5)
  assert out["num_images"] == 3 and out["num_errors"] == 0
  settings = json.loads((tmp_path / "pred" / predict.SETTINGS_FILE).read_text())
  assert settings["min_region_area"] == 16 and settings["tile"] is False and settings["tile_overlap"] == 0.25


def test_a_config_record_with_a_name_for_a_block_is_refused_naming_the_field(tmp_path):
  record = json.loads(recipes.tiny().to_json())
  record["synthesis"] = "paper"
  rundir.write_json(tmp_path / rundir.CONFIG_FILE, record)
  with pytest.raises(rundir.RunError, match=r"config\.json: config\.synthesis='paper' must be a block") as e:
    rundir.load_config(tmp_path)
  assert "\n" not in str(e.value)
