"""Validation on good images only: the hold-out split, the fixed synthetic set, its scores against
scikit-learn, the training-time validator (metrics row, thresholds per step, best model kept)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

from draem_jax import recipes
from draem_jax import rundir
from draem_jax import steps
from draem_jax import validation
from draem_jax import writers
from draem_jax.data import datasets
from draem_jax.data import demo
from draem_jax.data import sources as sources_lib


def test_split_is_deterministic_disjoint_and_at_least_one():
  train, held = validation.split_indices(64, 0.1, seed=0)
  assert len(held) == 6 and len(train) == 58
  assert sorted(np.concatenate([train, held]).tolist()) == list(range(64))
  again, held2 = validation.split_indices(64, 0.1, seed=0)
  np.testing.assert_array_equal(held, held2)
  assert not np.array_equal(held, validation.split_indices(64, 0.1, seed=1)[1])
  assert len(validation.split_indices(3, 0.01, seed=0)[1]) == 1  # at least one image
  with pytest.raises(ValueError, match=r"train/good has 1 image\(s\).*holds out 1, leaving 0"):
    validation.split_indices(1, 0.1, seed=0)
  with pytest.raises(ValueError, match="config.validation.fraction"):
    validation.split_indices(10, 1.0, seed=0)
  assert validation.num_train_images(recipes.tiny(), 64) == 58


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
  """A small folder category (12 train, 6 good + 8 defective test images at 64 px) and a tiny config."""
  root = tmp_path_factory.mktemp("data")
  demo.write_demo_category(root, "mini", image_size=64, num_train=12, num_test_good=6, num_test_defect=8)
  c = recipes.tiny()
  c.dataset, c.data_dir, c.category = "folder", str(root), "mini"
  c.validation.fraction = 0.25
  c.validation.num_synthetic = 2
  c.eval.batch_size = 8
  return c


def test_prepare_records_the_split_and_reuses_it(mini, tmp_path):
  split = datasets.load_split(mini, str(tmp_path), "train")
  pool = sources_lib.procedural_sources(4, (32, 32), seed=0)
  train_images, vset = validation.prepare(mini, tmp_path, split, pool)
  record = json.loads((tmp_path / validation.VALIDATION_FILE).read_text())
  assert len(record["held_out"]) == 3 and record["held_out"] == vset.filenames
  assert len(train_images) == 9 and len(vset.clean) == 3
  held = {split.filenames.index(f) for f in vset.filenames}
  for i in held:  # the held-out images are not among the training images
    assert not any(np.array_equal(split.images[i], t) for t in train_images)
  # The synthetic set: fixed keys (the same every time), every example with a non-empty mask.
  assert 0 < len(vset.synthetic) <= 6 and vset.synthetic_masks.reshape(len(vset.synthetic), -1).any(1).all()
  _, again = validation.prepare(mini, tmp_path, split, pool)
  np.testing.assert_array_equal(again.synthetic, vset.synthetic)
  np.testing.assert_array_equal(again.synthetic_masks, vset.synthetic_masks)
  # A recorded split is used as recorded, even if the config's seed would draw another one.
  other_seed = mini.copy_and_resolve_references()
  other_seed.seed = 5
  _, reused = validation.prepare(other_seed, tmp_path, split, pool)
  assert reused.filenames == vset.filenames
  record["held_out"][0] = "train/good/gone.png"
  (tmp_path / validation.VALIDATION_FILE).write_text(json.dumps(record))
  with pytest.raises(FileNotFoundError, match="gone.png, which is no longer in the training folder"):
    validation.prepare(mini, tmp_path, split, pool)


def test_scores_match_sklearn():
  rng = np.random.default_rng(0)
  masks = rng.random((5, 16, 16)) < 0.2
  vset = validation.ValidationSet(clean=np.zeros((4, 16, 16, 3), np.uint8),
                                  synthetic=np.ones((5, 16, 16, 3), np.uint8), synthetic_masks=masks,
                                  filenames=["a", "b", "c", "d"])
  clean_maps = rng.random((4, 16, 16)).astype(np.float32) * 0.7
  syn_maps = (rng.random((5, 16, 16)) * 0.7 + 0.3 * masks).astype(np.float32)
  clean_scores, syn_scores = rng.random(4), rng.random(5) + 0.2

  def predict(images):
    return (syn_maps, syn_scores) if images[0, 0, 0, 0] else (clean_maps, clean_scores)

  values, maps, scores = validation.score(predict, vset)
  y = np.concatenate([np.zeros((4, 16, 16), bool), masks]).ravel()
  s = np.concatenate([clean_maps, syn_maps]).ravel()
  assert values["val_pixel_ap"] == pytest.approx(sklearn.metrics.average_precision_score(y, s))
  assert values["val_pixel_auroc"] == pytest.approx(sklearn.metrics.roc_auc_score(y, s))
  assert values["val_image_auroc"] == pytest.approx(sklearn.metrics.roc_auc_score(
      [0] * 4 + [1] * 5, np.concatenate([clean_scores, syn_scores])))
  np.testing.assert_array_equal(maps, clean_maps)


def test_validator_logs_stores_thresholds_and_keeps_the_best(mini, tmp_path):
  config = mini.copy_and_resolve_references()
  config.validation.select = "best"
  rundir.write_config(tmp_path, config)
  split = datasets.load_split(config, str(tmp_path), "train")
  _, vset = validation.prepare(config, tmp_path, split, sources_lib.procedural_sources(4, (32, 32), seed=0))
  model = steps.build_model(config)
  good = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
  writer = writers.MetricWriter(tmp_path, tensorboard=False)
  validator = validation.Validator(config, tmp_path, model, vset, writer)
  assert validator.due(config.validation.every_steps) and not validator.due(1)
  row = validator.run(4, good)
  # Worse model (discriminator biased towards "normal" everywhere): not kept as best.
  worse = jax.tree_util.tree_map_with_path(
      lambda p, x: x - 50.0 if "discriminative" in jax.tree_util.keystr(p) and x.ndim == 1
      and jax.tree_util.keystr(p).endswith("['bias']") else x, good)
  validator.run(8, worse)
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / rundir.METRICS_FILE).read_text().splitlines()]
  assert [r["step"] for r in rows] == [4, 8] and rows[0]["val_pixel_ap"] == row["val_pixel_ap"]
  assert set(validation.METRIC_NAMES) <= set(rows[0])
  # Thresholds per step, calibrated on the clean held-out images of that model.
  assert rundir.stored_threshold_steps(tmp_path) == [4, 8]
  th = rundir.read_thresholds(tmp_path, 4)
  maps, scores = validator._inferencer.model_size(vset.clean, good)
  # 3 images, target 5 %: just above the largest score (recomputed scores may differ by float rounding).
  assert th["num_images"] == 3 and th["achieved_image_fpr"] == 0.0
  assert th["image"] == pytest.approx(scores.max(), abs=1e-5)
  assert np.mean(maps >= th["pixel"] + 1e-5) <= config.threshold.pixel_fpr
  assert np.mean(maps >= th["pixel"] - 1e-3) >= config.threshold.pixel_fpr
  assert th["source"] == "validation: 3 held-out train/good images"
  # select="best": the best model is restored, recorded as such.
  record = validation.read_record(tmp_path)
  best_step = record["best"]["step"]
  assert best_step in (4, 8) and record["best"]["val_pixel_ap"] == max(r["val_pixel_ap"] for r in rows)
  _, restored, step, selected = validation.restore_selected(tmp_path, config)
  assert (step, selected) == (best_step, "best")
  want = good if best_step == 4 else worse
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(want))):
    np.testing.assert_array_equal(a, b)
