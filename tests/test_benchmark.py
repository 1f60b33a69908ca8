"""Tests for the benchmarks package: FLOPs of the traced model vs docs/architecture.md, the config, the
timing harness, and an in-process run of the CPU sections and the accelerator section at toy sizes.

No timing assertions: only that the report has its fields, that numbers are positive and finite, and
that ratios are absent with a reason when anomalib is not used.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import config as config_lib
from benchmarks import harness
from benchmarks import jax_side
from benchmarks import report
from benchmarks import run
from draem_jax import models


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_flops_of_traced_model_match_reference_tables():
  # docs/architecture.md: forward MACs of the original model_unet.py at 256x256, widths 128/64.
  shapes = jax_side.conv_layer_shapes(models.DRAEM(), 1, 256)
  assert len(shapes) == 23 + 28
  macs = [s[1] * s[2] * 9 * s[3] * cout for s, cout in shapes]
  assert sum(macs[:23]) == 159_903_645_696 and sum(macs[23:]) == 38_050_725_888
  assert jax_side.train_flops_per_image(models.DRAEM(), 256) == pytest.approx(1.19e12, rel=0.01)
  # Pixels scale the count exactly; widths enter through the traced channel counts.
  assert jax_side.train_flops_per_image(models.DRAEM(16, 8), 128) == 4 * jax_side.train_flops_per_image(
      models.DRAEM(16, 8), 64)


def test_peak_lookup():
  assert jax_side.peak_tflops(123.0) == (123.0, "config.accelerator.peak_tflops")
  peak, source = jax_side.peak_tflops()
  assert peak is None and "peak_tflops" in source  # the CPU has no entry


def test_config_presets_and_validation():
  for preset in ("default", "quick", "accelerator", "tiny"):
    c = config_lib.get_config(preset)
    run.validate(c)
    assert set(c.sections) <= set(config_lib.SECTIONS)
  assert config_lib.get_config("accelerator").sections == ("accelerator",)
  with pytest.raises(ValueError, match="unknown preset"):
    config_lib.get_config("huge")
  c = config_lib.get_config("quick")
  c.sections = ("train", "bogus")
  with pytest.raises(ValueError, match="unknown"):
    run.validate(c)
  c = config_lib.get_config("quick")
  c.train.rows = ((48, 16, 16, 8),)
  with pytest.raises(ValueError, match="multiple of 32"):
    run.validate(c)


def test_interleaved_alternates_sides():
  calls = []
  t = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                          warmup=1)
  assert calls == ["a", "b"] + ["a", "b"] * 3
  assert set(t) == {"a", "b"} and t["a"]["repeats"] == 3
  assert all(t[k]["min_s"] <= t[k]["median_s"] <= t[k]["max_s"] for k in t)


def test_benchmarks_md_regeneration_keeps_the_rest(tmp_path):
  path = tmp_path / "BENCHMARKS.md"
  path.write_text(f"# Title\nintro\n{report.GENERATED_BEGIN}\nold\n{report.GENERATED_END}\n"
                  "## Exported models\nkeep\n")
  report.update_benchmarks_md(str(path), "| new | table |")
  text = path.read_text()
  assert "old" not in text and "| new | table |" in text
  assert text.startswith("# Title\nintro\n") and text.endswith("## Exported models\nkeep\n")
  (tmp_path / "plain.md").write_text("no markers")
  with pytest.raises(ValueError, match="marker"):
    report.update_benchmarks_md(str(tmp_path / "plain.md"), "x")


def test_tiny_run_report_fields(shared_data):
  c = config_lib.get_config("tiny")
  c.texture_dir = str(shared_data / "dtd_subset" / "images")
  out = run.run(c)
  assert set(out["sections"]) == {"synthesis", "train", "infer", "accelerator"}
  assert not out["anomalib"]["available"] and out["anomalib"]["reason"]
  assert out["machine"]["backend"] == "cpu" and out["machine"]["load_average_before"]

  syn = out["sections"]["synthesis"]["rows"][0]
  assert _positive_finite(syn["draem_jax"]["images_per_s"]) and syn["ratio"] is None and syn["ratio_reason"]
  train = out["sections"]["train"]["rows"][0]
  j = train["draem_jax"]
  assert all(_positive_finite(j[k]) for k in ("median_s", "cpu_median_s", "images_per_s", "compile_s"))
  assert _positive_finite(train["flops_per_image"]) and train["ratio"] is None
  infer = out["sections"]["infer"]["rows"][0]["draem_jax"]
  assert _positive_finite(infer["images_per_s"]) and "reason" in infer["device_memory"]  # CPU: no stats

  acc = out["sections"]["accelerator"]
  rows = acc["rows"]
  assert [r["dtype"] for r in rows] == ["bfloat16", "bfloat16"] and rows[1]["largest"]
  assert rows[1]["batch"] == c.accelerator.max_batch_limit and "no device memory limit" in rows[1]["note"]
  for r in rows + acc["scaling"]:
    assert _positive_finite(r["images_per_s"]) and _positive_finite(r["synthesis_share"])
    assert r["mfu"] is None and "peak_tflops" in r["peak_source"]
  assert [r["devices"] for r in acc["scaling"]] == [1, 2]
  assert acc["infer"] and _positive_finite(acc["infer"][0]["images_per_s"])
  line = json.loads(run.sections.module("accelerator").json_line(acc))
  assert line["device"] == acc["device_kind"] and len(line["train"]) == 2

  text = report.markdown(out)
  for header in ("### Anomaly synthesis", "### Train step", "### Inference", "### Accelerator"):
    assert header in text
  assert json.loads(report.summary_line(out))["train"][0]["ratio"] is None


def test_cli_refuses_to_overwrite(tmp_path, monkeypatch):
  existing = tmp_path / "bench.json"
  existing.write_text("{}")
  c = config_lib.get_config("tiny")
  c.output = str(existing)
  monkeypatch.setattr(run, "_CONFIG", type("F", (), {"value": c})())
  monkeypatch.setattr(run, "_OVERWRITE", type("F", (), {"value": False})())
  with pytest.raises(SystemExit, match="exists; pass --overwrite"):
    run.main(["run"])
  assert existing.read_text() == "{}"


@pytest.mark.parametrize("argv, line", [
    (["--config.repeat=2"], "error: --config.repeat: the config has no field 'repeat'; did you mean "
                            "--config.repeats"),
    (["--quick", "--config.sections=trian"], "error: config.sections: unknown ['trian']"),
])
def test_cli_bad_config_is_one_line(argv, line):
  # A subprocess: config_flags reads sys.argv when the flag is defined, at import of benchmarks.run.
  repo = pathlib.Path(__file__).resolve().parent.parent
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=repo, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr[-2000:]


def _flat(c) -> dict:
  out = {}
  for k, v in c.items():
    if hasattr(v, "items"):
      out.update({f"{k}.{kk}": vv for kk, vv in _flat(v).items()})
    else:
      out[k] = v
  return out


def test_each_ablation_changes_only_what_its_name_says(tmp_path):
  from benchmarks import ablations
  category = tmp_path / "cat" / "train" / "good"
  category.mkdir(parents=True)
  for i in range(32):  # PIPED's training split: 4 steps per epoch at batch 8
    (category / f"{i}.png").touch()
  args = type("Args", (), dict(data_dir=str(tmp_path), textures="dtd", size=64, widths=(32, 16), batch=8,
                               steps=100, ema_decay=0.0))

  def diff(name):
    base = _flat(ablations.make_config("original", "cat", 0, args)[0])
    mine = _flat(ablations.make_config(name, "cat", 0, args)[0])
    assert mine.keys() == base.keys()
    return {k: mine[k] for k in mine if mine[k] != base[k]}

  config, steps = ablations.make_config("original", "cat", 1, args)
  assert (config.seed, config.image_size, config.batch_size, steps) == (1, 64, 8, 100)
  v1 = {"source_resize": "antialias", "synthesis.empty_mask": "retry", "synthesis.rotate_fill": "edge",
        "model.init": "pytorch_default"}
  assert diff("fast_v1") == v1
  assert diff("fast_v1_rotate_off") == {**v1, "synthesis.rotate_prob": 0.0}
  assert diff("rotate_off") == {"synthesis.rotate_prob": 0.0}
  retry = {"synthesis.rotate_prob": 0.0, "synthesis.empty_mask": "retry"}
  assert diff("rotate_off_retry") == retry
  assert diff("fast_focal_normal_0.1") == {**retry, "loss.focal_normal_weight": 0.1}
  assert diff("fast") == {**diff("fast_focal_normal_0.05"), "ema_decay": 0.9, "ema_as_model": True}
  assert diff("fast_focal_normal_0.05") == {**retry, "loss.focal_normal_weight": 0.05}
  assert diff("fast_focal_anomalous_only") == {**retry, "loss.focal_normal_weight": 0.0,
                                               "loss.weights": (1.0, 1.0, 0.5)}
  for name in ablations.ABLATIONS:
    assert name == "original" or diff(name), name
  for name, (base, _) in ablations.CROSSES.items():
    assert base in ablations.ABLATIONS, name
