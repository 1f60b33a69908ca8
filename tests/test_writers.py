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
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
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
