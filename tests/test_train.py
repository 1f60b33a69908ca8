"""End-to-end training: resume == uninterrupted, finished runs are kept, failures are clear, CLIs work.

Runs the real entry points on the embedded demo category at 32x32 with 4-channel networks.
"""

import json
import os
import re
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from draem_jax import checkpointing
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import train

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_demo_config(**overrides):
  c = recipes.tiny()  # 32x32, 4-channel nets, 64 demo images, batch 16, 8 steps
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_data"))


def _restore(workdir, config):
  model, variables, step = rundir.restore_model(workdir, config)
  return jax.device_get(variables), step


def test_resume_is_bit_identical_to_uninterrupted(tmp_path, demo_root):
  straight = load_demo_config(data_dir=demo_root)
  metrics_a = train.train_and_evaluate(straight, str(tmp_path / "a"))
  assert 0.0 <= metrics_a["pixel_auroc"] <= 1.0

  interrupted = load_demo_config(data_dir=demo_root, stop_after_steps=3)
  with pytest.raises(train.StoppedEarly, match="stopped at step 3 of 8"):
    train.train_and_evaluate(interrupted, str(tmp_path / "b"))
  assert checkpointing.latest_step(str(tmp_path / "b")) == 3
  # As if the stopped process had logged steps past its checkpoint before dying: a resumed run redoes
  # them, so they leave metrics.jsonl (kept aside in metrics.superseded.jsonl).
  with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
  resumed = load_demo_config(data_dir=demo_root)
  metrics_b = train.train_and_evaluate(resumed, str(tmp_path / "b"))

  vars_a, step_a = _restore(str(tmp_path / "a"), straight)
  vars_b, step_b = _restore(str(tmp_path / "b"), resumed)
  assert step_a == step_b == 8
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(vars_a)[0], jax.tree.leaves(vars_b)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert metrics_a == metrics_b
  # The metrics log continues across the restart: steps 2, 4, 6, 8 in both runs.
  steps_b = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
  assert steps_b == [2, 3, 4, 6, 8]
  assert json.loads((tmp_path / "b" / "metrics.superseded.jsonl").read_text())["loss"] == 123.0
  assert (tmp_path / "b" / "eval" / "metrics.json").exists()
  assert len(list((tmp_path / "b" / "eval" / "overlays").glob("*.png"))) == 2


def test_finished_run_is_only_reevaluated_and_overwrite_keeps_the_old_run(tmp_path, demo_root):
  config = load_demo_config(data_dir=demo_root, num_epochs=1)
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(config, workdir)
  ckpt_dir = pathlib.Path(checkpointing.checkpoint_dir(workdir))
  before = sorted(p.name for p in ckpt_dir.iterdir())
  log_before = (tmp_path / "run" / "metrics.jsonl").read_text()

  again = train.train_and_evaluate(config, workdir)
  assert again == first
  assert sorted(p.name for p in ckpt_dir.iterdir()) == before
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == log_before

  config.overwrite = True
  train.train_and_evaluate(config, workdir)
  kept = [p.name for p in (tmp_path / "run").iterdir() if ".replaced-" in p.name]
  assert any(name.startswith("checkpoints.replaced-") for name in kept)
  assert any(name.startswith("metrics.jsonl.replaced-") for name in kept)


def test_changed_config_on_resume_is_refused(tmp_path, demo_root):
  workdir = str(tmp_path / "run")
  with pytest.raises(train.StoppedEarly):
    train.train_and_evaluate(load_demo_config(data_dir=demo_root, stop_after_steps=1), workdir)
  changed = load_demo_config(data_dir=demo_root)
  changed.model.recon_width = 8
  with pytest.raises(train.TrainingError, match="model.recon_width: 4 -> 8"):
    train.train_and_evaluate(changed, workdir)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, demo_root):
  config = load_demo_config(data_dir=demo_root, learning_rate=1e30, checkpoint_every_steps=1)
  workdir = str(tmp_path / "run")
  with pytest.raises(train.TrainingError, match=r"at step (\d+)") as info:
    train.train_and_evaluate(config, workdir)
  bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  assert "step None" not in str(info.value)
  latest = checkpointing.latest_step(workdir)
  assert latest == bad_step - 1
  # The last checkpoint is complete and restorable.
  variables, step = _restore(workdir, config)
  assert step == latest
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


# ----------------------------------------------------------------------------------------------------
# The command-line programs.
# ----------------------------------------------------------------------------------------------------

def _cli(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
         "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


def test_train_evaluate_predict_cli(tmp_path, demo_root):
  workdir = tmp_path / "run"
  overrides = ["--config.image_size=32", "--config.model.recon_width=4", "--config.model.disc_width=4",
               "--config.batch_size=8", "--config.num_epochs=1", "--config.eval.batch_size=8",
               f"--config.data_dir={demo_root}", "--config.eval.num_visualizations=1"]
  # Stopped early with a checkpoint: the documented exit code, so schedulers requeue the job.
  r = _cli("draem_jax.train", "--config=configs/demo.py", f"--workdir={workdir}", *overrides,
           "--config.stop_after_steps=4")
  assert r.returncode == train.EXIT_STOPPED_EARLY == 75, r.stderr[-3000:]
  r = _cli("draem_jax.train", "--config=configs/demo.py", f"--workdir={workdir}", *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from step 4" in r.stderr
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert metrics["step"] == 8 and "aupro" in metrics

  r = _cli("draem_jax.evaluate", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| image AUROC |" in r.stdout

  test_dir = pathlib.Path(demo_root) / "demo_fabric" / "test"
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  for p in sorted(test_dir.glob("*/*.png"))[:3]:
    (inputs / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
  out = tmp_path / "out"
  r = _cli("draem_jax.predict", f"--workdir={workdir}", f"--input={inputs}", f"--output={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = (out / "predictions.csv").read_text().splitlines()
  assert len(rows) == 4 and rows[0] == "path,status,score,anomalous,num_regions,heatmap,mask,error"
  assert len(list(out.glob("*_heatmap.png"))) == 3 and len(list(out.glob("*_mask.png"))) == 3

  # Bad input: an unreadable image is named in one clear line, not a traceback.
  bad = inputs / "broken.png"
  bad.write_bytes(b"not a png")
  r = _cli("draem_jax.predict", f"--workdir={workdir}", f"--input={bad}", f"--output={tmp_path / 'out2'}")
  assert r.returncode != 0
  assert "broken.png" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_inputs_give_clear_errors(tmp_path):
  r = _cli("draem_jax.train", "--config=configs/demo.py", f"--workdir={tmp_path}",
           "--config.num_epoch=1")
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "did you mean --config.num_epochs?" in r.stderr.strip().splitlines()[-1]

  r = _cli("draem_jax.evaluate", f"--workdir={tmp_path / 'missing'}")
  assert r.returncode != 0
  assert "config.json not found" in r.stderr and "Traceback" not in r.stderr

  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(load_demo_config().to_dict()))
  r = _cli("draem_jax.evaluate", f"--workdir={empty}")
  assert r.returncode != 0
  assert "no checkpoint" in r.stderr and "Traceback" not in r.stderr

  r = _cli("draem_jax.train", "--config=configs/mvtec.py:bottle", f"--workdir={tmp_path / 'w'}",
           f"--config.data_dir={tmp_path / 'nowhere'}")
  assert r.returncode != 0
  assert "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_a_bad_conv_table_variable_stops_training_before_it_writes_anything(tmp_path, conv_table_variable):
  conv_table_variable("neon")
  with pytest.raises(ValueError, match="DRAEM_CPU_CONV_TABLE='neon': use one of"):
    train.train_and_evaluate(load_demo_config(), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_an_unexpected_error_in_a_multi_process_run_ends_the_process_at_once(monkeypatch, capsys):
  # Raised as usual, it would wait 300 s at jax.distributed's shutdown barrier for processes that wait in a
  # collective for this one: the process ends at once with the traceback and exit code 1 instead.
  def buggy(config, workdir):
    raise KeyError("a bug")

  class Exited(Exception):
    pass

  def fake_exit(code):
    raise Exited(code)

  monkeypatch.setattr(train, "train_and_evaluate", buggy)
  monkeypatch.setattr(train.jax, "process_count", lambda: 2)
  monkeypatch.setattr(train.os, "_exit", fake_exit)
  with pytest.raises(Exited) as exited:
    train.run(recipes.tiny(), "unused")
  assert exited.value.args == (1,)
  err = capsys.readouterr().err
  assert "Traceback" in err and "KeyError: 'a bug'" in err
  assert err.strip().splitlines()[-1].startswith("error: this process stopped on the unexpected error above")
  monkeypatch.setattr(train.jax, "process_count", lambda: 1)  # one process: raised as usual
  with pytest.raises(KeyError):
    train.run(recipes.tiny(), "unused")
