"""Tests for draem_jax.benchmark: analytic FLOPs vs docs/architecture.md, flags, and a tiny in-process run.

No timing assertions: only that the report has its fields, that every number is positive and finite, and
that ratios are absent with a reason when anomalib is not used.
"""

import json
import math
import mmap
import time

from absl import flags
import jax
import pytest

from draem_jax import benchmark


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_conv_macs_match_reference_tables():
  # docs/architecture.md: MACs of the original model_unet.py's layer lists at 256x256.
  recon, disc = benchmark.conv_macs(128, 64, 256, 256)
  assert recon == 159_903_645_696
  assert disc == 38_050_725_888
  assert 2 * (recon + disc) / 1e9 == pytest.approx(395.91, abs=0.005)
  assert benchmark.train_flops_per_image(128, 64, 256, 256) == pytest.approx(
      benchmark.FULL_TRAIN_FLOPS_PER_IMAGE, rel=0.01)
  # Conv weight counts of the same layer lists are docs/architecture.md's 69,016,320 and 28,353,024.
  assert sum(9 * i * o for _, i, o in benchmark._reconstructive_convs(128)) == 69_016_320
  assert sum(9 * i * o for _, i, o in benchmark._discriminative_convs(64)) == 28_353_024


def test_conv_macs_scale_with_pixels():
  full = benchmark.conv_macs(32, 16, 128, 128)
  quarter = benchmark.conv_macs(32, 16, 64, 64)
  assert full == (4 * quarter[0], 4 * quarter[1])


def _flag_values(argv):
  fv = flags.FlagValues()
  benchmark.define_flags(fv)
  fv(["benchmark", *argv])
  return fv


def test_config_from_flags_quick_and_overrides():
  cfg = benchmark.config_from_flags(_flag_values(["--quick", "--recon_width=4", "--scaling_devices=1,2",
                                                  "--noanomalib"]))
  assert cfg.repeats == benchmark.BenchConfig.quick().repeats
  assert cfg.recon_width == 4 and cfg.scaling_devices == (1, 2) and not cfg.use_anomalib
  assert benchmark.config_from_flags(_flag_values([])) == benchmark.BenchConfig()


@pytest.mark.parametrize("argv, message", [
    (["--sections=train,bogus"], "unknown"),
    (["--train_image_size=48"], "multiple of 32"),
    (["--synth_batch_sizes=8,x"], "integers"),
    (["--repeats=0"], "repeats"),
])
def test_bad_flags_raise(argv, message):
  with pytest.raises(ValueError, match=message):
    benchmark.config_from_flags(_flag_values(argv))


def test_tiny_run_report_fields(tmp_path, shared_data):
  out = tmp_path / "bench.json"
  md = tmp_path / "bench.md"
  # The train section and the 1-device scaling row compile the same program (conftest's persistent
  # cache serves the second). A 2-device row and the quality section (a full train + evaluate) would each
  # add a train-step compile (~30 s on 2 busy cores); they are left to the command line, and the quality
  # config to test_quality_config, to keep this test under a minute from a cold cache.
  argv = ["--sections=synthesis,train,infer,scaling", "--repeats=1", "--warmup=0",
          "--synth_image_size=32", "--synth_batch_sizes=2", "--max_textures=4",
          "--train_image_size=32", "--recon_width=4", "--disc_width=4", "--train_batch_size=2",
          "--infer_batch_size=2", "--scaling_devices=1,16", "--scaling_per_device_batch=2",
          f"--texture_dir={shared_data / 'dtd_subset' / 'images'}", "--noanomalib",
          f"--output={out}", f"--markdown_output={md}"]
  # Start the backend first (conftest's 8 host devices): the benchmark then leaves the device count
  # alone, so the 16-device scaling row must come back as skipped.
  num_devices = jax.device_count()
  assert num_devices < 16
  report = benchmark.run_from_flags(_flag_values(argv))
  assert jax.device_count() == num_devices
  assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=float))
  text = md.read_text()
  for title in ("Anomaly synthesis", "Train step", "Inference", "Scaling"):
    assert title in text
  assert "Detection quality" not in text

  assert report["anomalib"]["available"] is False and report["anomalib"]["reason"]
  assert report["machine"]["threads"] >= 1 and report["machine"]["cpu_count"] >= 1
  s = report["sections"]
  assert set(s) == {"synthesis", "train", "infer", "scaling"}

  for row in s["synthesis"] + s["train"] + s["infer"]:
    j = row["draem_jax"]
    for key in ("compile_s", "median_s", "images_per_s"):
      assert _positive_finite(j[key]), (key, j[key])
    assert row["ratio"] is None and "anomalib" in row["ratio_reason"]
    assert "anomalib" not in row
  assert _positive_finite(s["synthesis"][0]["draem_jax"]["images_per_s_per_core"])

  train = s["train"][0]["draem_jax"]
  assert train["flops_per_image_analytic"] == benchmark.train_flops_per_image(4, 4, 32, 32)
  assert _positive_finite(train["tflops_per_s"])
  if train["flops_per_image_xla"] is not None:  # XLA's count includes BN, losses and the optimizer
    assert _positive_finite(train["flops_per_image_xla"])
  assert (train["mfu"] is None) == (train["mfu_reason"] is not None)

  infer = s["infer"][0]["draem_jax"]
  assert infer["host_rss_peak_delta_mb"] >= 0 and _positive_finite(infer["process_peak_rss_mb"])
  assert (infer["device_peak_mb"] is None) == (infer["device_peak_reason"] is not None)

  scaling = {r["devices"]: r for r in s["scaling"]}
  assert set(scaling) == {1, 16}
  assert "skipped" in scaling[16] and "devices" in scaling[16]["skipped"]
  one = scaling[1]
  assert one["global_batch"] == 2 and one["speedup"] == 1.0 and one["efficiency"] == 1.0
  assert _positive_finite(one["draem_jax"]["images_per_s"])
  assert _positive_finite(one["draem_jax"]["compile_s"])


def test_quality_config(shared_data):
  cfg = benchmark.BenchConfig(category="piped_pa_bdp01_tl", quality_image_size=64, recon_width=8,
                              disc_width=4, quality_batch_size=8, max_textures=16,
                              data_dir=str(shared_data / "piped_mvtec"),
                              texture_dir=str(shared_data / "dtd_subset" / "images"))
  c = benchmark._load_mvtec_config(cfg)
  assert (c.dataset, c.category, c.image_size, c.batch_size) == ("folder", "piped_pa_bdp01_tl", 64, 8)
  assert (c.model.recon_width, c.model.disc_width, c.max_sources) == (8, 4, 16)
  assert c.data_dir == cfg.data_dir and c.anomaly_source_path == cfg.texture_dir
  assert c.eval.num_visualizations == 0


def test_random_variables_match_model_init_shapes():
  from draem_jax import models
  model = models.DRAEM(recon_width=4, disc_width=4)
  variables = benchmark._random_variables(model, 32)
  expected = jax.eval_shape(lambda k: model.init(k, jax.numpy.zeros((1, 32, 32, 3)), train=False),
                            jax.random.key(0))
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    assert got.shape == want.shape and got.dtype == want.dtype
  bn = variables["batch_stats"]["reconstructive"]["encoder"]["block1"]["bn_1"]
  assert float(bn["var"].min()) == 1.0 and float(bn["mean"].max()) == 0.0
  kernel = variables["params"]["reconstructive"]["encoder"]["block1"]["conv_0"]["kernel"]
  assert 0.005 < float(kernel.std()) < 0.05


def test_peak_rss_sees_an_allocation():
  # A fresh anonymous mapping, written through: new resident pages whatever the heap holds already.
  size = 64 * 2**20
  with benchmark.PeakRss() as rss:
    block = mmap.mmap(-1, size)
    block.write(b"\x01" * size)
    time.sleep(0.05)  # held for a few sampling intervals
    block.close()
  assert rss.peak_delta >= 48 * 2**20


def test_time_calls_median():
  calls = []
  t = benchmark.time_calls(lambda: calls.append(1), repeats=3, warmup=2)
  assert len(calls) == 5 and t["repeats"] == 3
  assert 0 <= t["min_s"] <= t["median_s"] <= t["max_s"]
