"""What happens when things go wrong: damaged checkpoints, changed configs, overwrite + preemption, bad
config values, OS errors. Tiny runs on the embedded demo data (32x32, 4-channel nets)."""

import errno
import glob
import json
import os
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest

from draem_jax import checkpointing
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import train
from draem_jax import writers


def tiny(**overrides):
  c = recipes.tiny()
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, demo_root):
  """A run stopped at step 6 of 8 with checkpoints 2, 4, 6 (copied by each test that damages it)."""
  workdir = str(tmp_path_factory.mktemp("stopped") / "run")
  with pytest.raises(train.StoppedEarly):
    train.train_and_evaluate(tiny(data_dir=demo_root, checkpoint_every_steps=2, stop_after_steps=6),
                             workdir)
  assert checkpointing.all_steps(workdir) == [2, 4, 6]
  return workdir


def _copy(run, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(run, target)
  return target


def _truncate_largest_data_file(step_dir):
  files = [f for f in glob.glob(f"{step_dir}/model/**/d/*", recursive=True) if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _delete_a_data_file(step_dir):
  files = [f for f in glob.glob(f"{step_dir}/model/**/d/*", recursive=True) if os.path.isfile(f)]
  os.remove(sorted(files)[0])


DAMAGES = {
    "truncated data file": _truncate_largest_data_file,
    "deleted data file": _delete_a_data_file,
    "missing item folder": lambda d: shutil.rmtree(os.path.join(d, "model")),
    "empty array metadata": lambda d: open(os.path.join(d, "model", "_METADATA"), "w").close(),
    "empty step folder": lambda d: (shutil.rmtree(d), os.makedirs(d)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_and_is_set_aside(stopped_run, tmp_path, damage, caplog):
  workdir = _copy(stopped_run, tmp_path)
  DAMAGES[damage](os.path.join(workdir, "checkpoints", "6"))
  model, variables, step = rundir.restore_model(workdir, tiny())
  assert step == 4
  assert "checkpoints/6 is damaged" in caplog.text
  aside = os.listdir(os.path.join(workdir, checkpointing.DAMAGED_DIR))
  assert len(aside) == 1 and aside[0].startswith("6.")  # moved, not deleted
  assert checkpointing.all_steps(workdir) == [2, 4]
  # What was restored is checkpoint 4 itself (bit-identical to restoring step 4 explicitly).
  _, explicit, _ = rundir.restore_model(_copy(stopped_run, tmp_path / "again"), tiny(), step=4)
  for a, b in zip(jax.tree.leaves(jax.device_get(variables)), jax.tree.leaves(jax.device_get(explicit))):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_saved_for_other_devices_is_not_set_aside(stopped_run, tmp_path, monkeypatch):
  """Intact files that name devices this process lacks (a pod run read on one host) are not damage."""
  workdir = _copy(stopped_run, tmp_path)

  def restore_elsewhere(*args, **kwargs):
    # orbax's own words when a saved sharding names devices that do not exist here.
    raise ValueError("Topology mismatch detected. The checkpoint was saved with a different topology "
                     "than the current one. Please provide a target tree with the desired topology.")

  monkeypatch.setattr(checkpointing, "restore", restore_elsewhere)
  with pytest.raises(checkpointing.NoCheckpointError, match="saved for other devices") as e:
    rundir.restore_model(workdir, tiny())
  assert "\n" not in str(e.value)
  assert checkpointing.all_steps(workdir) == [2, 4, 6]
  assert not os.path.exists(os.path.join(workdir, checkpointing.DAMAGED_DIR))


def test_restore_model_replicates_over_this_programs_devices(stopped_run):
  _, variables, _ = rundir.restore_model(stopped_run, tiny())
  assert all(leaf.devices() == set(jax.devices()) and leaf.sharding.is_fully_replicated
             for leaf in jax.tree.leaves(variables))


def test_no_intact_checkpoint_is_one_line_naming_the_folder(stopped_run, tmp_path):
  workdir = _copy(stopped_run, tmp_path)
  for step in (2, 4, 6):
    _delete_a_data_file(os.path.join(workdir, "checkpoints", str(step)))
  with pytest.raises(checkpointing.NoCheckpointError, match="no intact checkpoint in .*checkpoints") as e:
    rundir.restore_model(workdir, tiny())
  assert "\n" not in str(e.value)


def test_training_resumes_from_the_newest_intact_checkpoint(stopped_run, tmp_path, demo_root):
  """A damaged newest checkpoint and a half-deleted oldest one (a kill -9 during orbax's clean-up):
  training resumes from step 4, finishes, and the clean-up of old steps still works."""
  workdir = _copy(stopped_run, tmp_path)
  _truncate_largest_data_file(os.path.join(workdir, "checkpoints", "6"))
  _delete_a_data_file(os.path.join(workdir, "checkpoints", "2"))
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "train"))
  metrics = train.train_and_evaluate(tiny(data_dir=demo_root, checkpoint_every_steps=2), workdir)
  assert metrics["step"] == 8
  assert checkpointing.all_steps(workdir) == [4, 6, 8]  # keep_checkpoints=3: half-deleted 2 is gone
  assert os.listdir(os.path.join(workdir, checkpointing.DAMAGED_DIR))[0].startswith("6.")
  logged = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert logged == sorted(set(logged))  # no step twice


def test_overwrite_run_stopped_early_resumes_instead_of_restarting(stopped_run, tmp_path, demo_root):
  workdir = _copy(stopped_run, tmp_path)
  config = tiny(data_dir=demo_root, overwrite=True, num_epochs=1, stop_after_steps=2)
  with pytest.raises(train.StoppedEarly):  # sets the old run aside, starts again, stops at 2
    train.train_and_evaluate(config, workdir)
  aside = sorted(p for p in os.listdir(workdir) if ".replaced-" in p)
  assert any(p.startswith("checkpoints.replaced-") for p in aside)
  assert any(p.startswith("tensorboard.replaced-") or p.startswith("metrics.jsonl.replaced-")
             for p in aside)
  # The scheduler reruns the same command: it resumes from step 2, nothing else is set aside.
  config.stop_after_steps = 0
  metrics = train.train_and_evaluate(config, workdir)
  assert metrics["step"] == 4
  assert sorted(p for p in os.listdir(workdir) if ".replaced-" in p) == aside
  # Finished: the same overwrite command now means "train again" (and sets this run aside).
  with pytest.raises(train.StoppedEarly):
    train.train_and_evaluate(tiny(data_dir=demo_root, overwrite=True, num_epochs=1, stop_after_steps=1),
                             workdir)
  assert len([p for p in os.listdir(workdir) if p.startswith("checkpoints.replaced-")]) == 2


# ----------------------------------------------------------------------------------------------------
# Resume refuses what changes the training (deny by default).
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("model.dtype", "bfloat16"), ("synthesis.rotate_prob", 0.0), ("max_sources", 10),
    ("channel_order", "bgr"), ("synthesis.texture_weight_range", (0.1, 1.0)), ("lr_decay_factor", 0.5),
    ("num_epochs", 3), ("seed", 1)])
def test_resume_refuses_any_training_change(tmp_path, field, value):
  saved = tiny()
  rundir.write_config(tmp_path, saved)
  changed = tiny()
  head, _, last = field.rpartition(".")
  (changed[head] if head else changed)[last] = value
  with pytest.raises(rundir.ConfigChangedError, match=field.replace(".", r"\.")):
    rundir.check_resume(tmp_path, changed)


@pytest.mark.parametrize("field,value", [
    ("eval.batch_size", 32), ("log_every_steps", 1), ("data_dir", "/elsewhere"), ("stop_after_steps", 5),
    ("checkpoint_every_steps", 7), ("anomaly_source_path", "/moved/dtd")])
def test_resume_allows_bookkeeping_changes(tmp_path, field, value):
  rundir.write_config(tmp_path, tiny())
  changed = tiny()
  head, _, last = field.rpartition(".")
  (changed[head] if head else changed)[last] = value
  rundir.check_resume(tmp_path, changed)


def test_checkpoints_without_config_json_are_refused(stopped_run, tmp_path, demo_root):
  workdir = _copy(stopped_run, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(rundir.RunError, match="no config.json"):
    train.train_and_evaluate(tiny(data_dir=demo_root), workdir)


# ----------------------------------------------------------------------------------------------------
# Config values checked up front, one line naming the field.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("num_epochs", 0, "config.num_epochs=0"), ("num_epochs", -3, "config.num_epochs=-3"),
    ("batch_size", 0, "config.batch_size=0"), ("learning_rate", 0.0, "config.learning_rate"),
    ("learning_rate", float("nan"), "config.learning_rate"),
    ("learning_rate", float("inf"), "config.learning_rate"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps"),
    ("log_every_steps", -1, "config.log_every_steps"), ("category", "", "config.category"),
    ("category", "../etc", "config.category"), ("dataset", "imagenet", "config.dataset"),
    ("image_size", 100, "config.image_size=100"), ("model.dtype", "float16", "config.model.dtype"),
    ("synthesis.rotate_prob", 1.5, "config.synthesis"), ("lr_decay_fractions", (0.9, 0.8), "lr_decay"),
])
def test_bad_config_values_name_the_field(field, value, message, tmp_path):
  config = tiny()
  head, _, last = field.rpartition(".")
  (config[head] if head else config)[last] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")) as e:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w").exists()  # nothing written


def test_a_config_lacking_a_recipe_field_is_refused_naming_it(tmp_path):
  config = tiny()
  del config.predict
  with pytest.raises(ValueError, match=r"config\.predict\.tile is missing: build the config on") as e:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w").exists()


def test_missing_test_good_is_found_before_training(tmp_path):
  root = tmp_path / "data" / "part"
  (root / "train" / "good").mkdir(parents=True)
  (root / "test" / "scratch").mkdir(parents=True)
  (root / "ground_truth" / "scratch").mkdir(parents=True)
  from PIL import Image  # small real PNGs
  img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
  for i in range(4):
    img.save(root / "train" / "good" / f"{i}.png")
  img.save(root / "test" / "scratch" / "0.png")
  Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "ground_truth" / "scratch" / "0_mask.png")
  config = tiny(dataset="folder", data_dir=str(tmp_path / "data"), category="part", batch_size=8)
  with pytest.raises(FileNotFoundError, match=r"test/good is missing"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------------
# OS errors: one line naming the path.
# ----------------------------------------------------------------------------------------------------

def test_workdir_that_is_a_file_or_below_a_file(tmp_path, demo_root):
  blocker = tmp_path / "file"
  blocker.write_text("user data")
  for workdir in (blocker, blocker / "run"):
    with pytest.raises(OSError) as e:
      train.train_and_evaluate(tiny(data_dir=demo_root), str(workdir))
    line = writers.one_line(e.value)
    assert str(blocker) in line and "\n" not in line
  assert blocker.read_text() == "user data"


def _mount_tmpfs(path: pathlib.Path, options: str) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
  return r.returncode == 0


@pytest.fixture
def small_mounts(tmp_path):
  ro, full = tmp_path / "ro", tmp_path / "full"
  if not (_mount_tmpfs(ro, "ro,size=1m") and _mount_tmpfs(full, "size=256k")):
    subprocess.run(["umount", str(ro)], capture_output=True)
    pytest.skip("cannot mount a tmpfs here (needs root with mount rights); CI runs as root")
  yield ro, full
  for p in (ro, full):
    subprocess.run(["umount", "-l", str(p)], capture_output=True)


def test_read_only_and_full_file_systems_are_one_line(small_mounts, demo_root, stopped_run):
  ro, full = small_mounts
  with pytest.raises(OSError) as e:
    train.train_and_evaluate(tiny(data_dir=demo_root), str(ro / "run"))
  assert e.value.errno == errno.EROFS and str(ro) in writers.one_line(e.value)
  # A full disk while writing the run (the checkpoints do not fit into 256 KiB).
  with pytest.raises(Exception) as e:
    train.train_and_evaluate(tiny(data_dir=demo_root, checkpoint_every_steps=2), str(full / "run"))
  text = writers.one_line(e.value)
  assert "No space left" in text or "ENOSPC" in text or "space" in text.lower(), text


def test_one_line_names_both_paths_of_a_rename():
  e = OSError(errno.EACCES, "Permission denied", "/a/run", None, "/a/run.replaced-1")
  assert writers.one_line(e) == "Permission denied: /a/run -> /a/run.replaced-1"
