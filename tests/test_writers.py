"""Metric writer (JSONL always, TensorBoard when tensorboardX is present) and progress rates."""

import json
import time

import pytest

from draem_jax import writers


def test_metric_writer_appends_jsonl_across_runs(tmp_path):
  w = writers.MetricWriter(str(tmp_path), tensorboard=False)
  w.write_scalars(1, {"loss": 1.5, "l2": 0.25})
  w.close()
  w = writers.MetricWriter(str(tmp_path), tensorboard=False)  # a resumed run appends
  w.write_scalars(2, {"loss": 1.0})
  w.close()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 1.5, "l2": 0.25}, {"step": 2, "loss": 1.0}]


def test_tensorboard_event_files_when_available(tmp_path):
  pytest.importorskip("tensorboardX", reason="tensorboardX is the optional 'tensorboard' extra")
  w = writers.MetricWriter(str(tmp_path))
  w.write_scalars(3, {"loss": 0.5})
  w.close()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_progress_skips_the_compiling_step():
  p = writers.Progress(total_steps=100, batch_size=8, start_step=0)
  assert p.update(1) == {}               # first step includes compilation: no rate yet
  time.sleep(0.05)
  rates = p.update(11)
  assert rates["steps_per_sec"] == pytest.approx(10 / 0.05, rel=0.5)
  assert rates["images_per_sec"] == pytest.approx(8 * rates["steps_per_sec"])
  assert rates["eta_sec"] == pytest.approx(89 / rates["steps_per_sec"])
  assert writers.Progress.format_eta(3725) == "1:02:05"


def test_same_step_records_share_a_row_and_resume_supersedes_later_rows(tmp_path):
  w = writers.MetricWriter(str(tmp_path), tensorboard=False)
  for step in (2, 4, 6):
    w.write_scalars(step, {"loss": float(step)})
  w.write_scalars(6, {"val_pixel_ap": 0.5})  # validation of the step just logged
  w.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1] == {"step": 6, "loss": 6.0, "val_pixel_ap": 0.5} and len(rows) == 3
  # Resumed from the checkpoint at step 4: step 6 is redone, its old row is kept aside.
  w = writers.MetricWriter(str(tmp_path), tensorboard=False, resume_step=4)
  w.write_scalars(6, {"loss": 5.0})
  w.close()
  steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [2, 4, 6]
  assert json.loads((tmp_path / "metrics.superseded.jsonl").read_text())["loss"] == 6.0


def test_one_line_for_os_errors():
  e = FileNotFoundError(2, "No such file or directory", "/x/config.json")
  assert writers.one_line(e) == "No such file or directory: /x/config.json"
  assert writers.one_line(ValueError("a\n  b")) == "a b"
