"""The recipe switches (docs/recipe.md): each changes only what it says, and its default is the original.

Tiny widths and 32x32 images throughout; the end-to-end EMA test trains the tiny recipe for 4 steps.
"""

import functools
import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from draem_jax import checkpointing
from draem_jax import conv as conv_lib
from draem_jax import evaluate
from draem_jax import geometry
from draem_jax import losses
from draem_jax import models
from draem_jax import noise
from draem_jax import parallel
from draem_jax import prng
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import steps
from draem_jax import synthesis
from draem_jax import train
from draem_jax import validation
from draem_jax.data import folder
from draem_jax.data import sources

SIZE = 32


# ----------------------------------------------------------------------------------------------------
# 1. Antialiased anomaly-source resize.
# ----------------------------------------------------------------------------------------------------

def _high_frequency_energy(images: np.ndarray) -> float:
  """Mean power above half the Nyquist frequency (either axis) of the grey, mean-free images."""
  grey = images.astype(np.float64).mean(axis=-1)
  grey -= grey.mean(axis=(1, 2), keepdims=True)
  power = np.abs(np.fft.fft2(grey)) ** 2
  f0 = np.abs(np.fft.fftfreq(grey.shape[1]))[:, None]
  f1 = np.abs(np.fft.fftfreq(grey.shape[2]))[None, :]
  return float(power[:, (f0 > 0.25) | (f1 > 0.25)].mean())


@pytest.fixture(scope="module")
def texture_dir(tmp_path_factory):
  """Four 256x256 textures with detail finer than a 32-px grid resolves (8x reduction)."""
  root = tmp_path_factory.mktemp("textures")
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:256, :256]
  for i in range(4):
    stripes = 127.5 + 80 * np.sin(2 * np.pi * (xx * (0.3 + 0.05 * i) + yy * 0.11))
    img = np.clip(stripes[..., None] + rng.normal(0, 30, (256, 256, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(root / f"t{i}.png")
  return root


def test_antialias_resize_is_pils_and_lowers_high_frequency_energy(texture_dir):
  files = sources.list_source_files(texture_dir)
  aa = sources.load_sources(texture_dir, (SIZE, SIZE), resize="antialias")
  plain = sources.load_sources(texture_dir, (SIZE, SIZE), resize="original")
  # PIL's antialiased bilinear, computed independently from the files.
  pil = np.stack([np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
                  for f in files])
  np.testing.assert_array_equal(aa, pil)
  assert _high_frequency_energy(aa) < 0.5 * _high_frequency_energy(plain)
  # Means are kept: the filter changes detail, not colour.
  np.testing.assert_allclose(aa.mean(axis=(1, 2)), plain.mean(axis=(1, 2)), atol=6)


def test_source_resize_default_is_the_original_resize(texture_dir):
  files = sources.list_source_files(texture_dir)
  before = folder.load_images(files, (SIZE, SIZE))  # what load_sources did before the switch
  np.testing.assert_array_equal(sources.load_sources(texture_dir, (SIZE, SIZE)), before)
  np.testing.assert_array_equal(sources.load_sources(texture_dir, (SIZE, SIZE), resize="original"), before)
  with pytest.raises(ValueError, match="antialias"):
    sources.load_sources(texture_dir, (SIZE, SIZE), resize="area")


def test_dtd_sources_antialias(shared_data):
  pool = {r: sources.load_sources(shared_data / "dtd_subset" / "images", (64, 64), max_sources=12, resize=r)
          for r in sources.RESIZE_RULES}
  assert _high_frequency_energy(pool["antialias"]) < _high_frequency_energy(pool["original"])


# ----------------------------------------------------------------------------------------------------
# 2. Non-empty synthetic masks.
# ----------------------------------------------------------------------------------------------------

@jax.jit
def _both_masks(keys):
  keep = jax.vmap(lambda k: noise.perlin_mask(k, (SIZE, SIZE)))(keys)
  retry = jax.vmap(lambda k: noise.perlin_mask_nonempty(k, (SIZE, SIZE)))(keys)
  return keep, retry


def test_nonempty_masks_never_empty_and_unchanged_when_nonempty():
  keep, retry = jax.device_get(_both_masks(prng.example_keys(jax.random.key(0), 1024)))
  empty = keep.max(axis=(1, 2)) == 0
  assert 0.01 < empty.mean() < 0.15  # ~5 % of the original's masks are empty
  assert (retry.max(axis=(1, 2)) == 1).all()
  np.testing.assert_array_equal(retry[~empty], keep[~empty])
  assert set(np.unique(retry)) <= {0.0, 1.0}


def test_nonempty_masks_rescale_when_every_candidate_is_empty():
  # A threshold no noise reaches makes every candidate empty: the last one is rescaled to [-1, 1].
  mask = noise.perlin_mask_nonempty(jax.random.key(3), (SIZE, SIZE), threshold=0.99, attempts=2)
  assert float(mask.max()) == 1.0


def _stand_in(key, image):  # a known texture, and no 10 s compile of the real augmenter
  del key
  return 1.0 - image


def _synthesize(config, images, pool, num_devices=1, sequential=None):
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  repl = parallel.replicated(mesh)
  fn = jax.jit(lambda k, x, s: synthesis.synthesize(k, x, s, config=config, sequential=sequential),
               in_shardings=(repl, parallel.data_sharding(mesh), repl))
  return jax.device_get(fn(jax.random.key(7), images, pool))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.3, 0.9, (64, SIZE, SIZE, 3)).astype(np.float32)
  pool = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
  return images, pool


def test_retry_fills_only_the_empty_anomalies(batch, monkeypatch):
  monkeypatch.setattr(synthesis.augment, "random_augment_one", _stand_in)
  images, pool = batch
  keep = _synthesize(synthesis.SynthesisConfig(), images, pool)
  retry = _synthesize(synthesis.SynthesisConfig(empty_mask="retry"), images, pool)
  keys = prng.example_keys(jax.random.key(7), len(images))
  anomaly = np.asarray(jax.vmap(lambda k: synthesis.sample_choices(k, 3).anomaly)(keys))
  assert (retry.has_anomaly == anomaly).all()  # every chosen anomaly has a mask, no clean one gains one
  same = keep.has_anomaly == retry.has_anomaly  # clean examples, and anomalies non-empty anyway
  assert same.sum() < len(images) and (~same <= anomaly).all()
  for field in ("target", "augmented", "mask"):
    np.testing.assert_array_equal(getattr(retry, field)[same], getattr(keep, field)[same], err_msg=field)
  # One key per example: the same batch on 8 devices, and vectorised instead of sequential, is identical.
  for other in (_synthesize(synthesis.SynthesisConfig(empty_mask="retry"), images, pool, num_devices=8),
                _synthesize(synthesis.SynthesisConfig(empty_mask="retry"), images, pool, sequential=False)):
    for field in ("target", "augmented", "mask", "has_anomaly"):
      np.testing.assert_allclose(getattr(other, field), getattr(retry, field), atol=1e-6, err_msg=field)


# ----------------------------------------------------------------------------------------------------
# 3. Rotation fill of the normal image.
# ----------------------------------------------------------------------------------------------------

def test_edge_and_reflect_fill_leave_no_black_corners():
  image = jnp.asarray(np.random.default_rng(0).uniform(0.3, 0.9, (SIZE, SIZE, 3)), jnp.float32)
  black = geometry.rotate(image, 45.0)
  assert float(black[0, 0].max()) == 0.0  # the original's corner
  for mode in ("edge", "reflect"):
    out = geometry.rotate(image, 45.0, mode=mode)
    assert float(out.min()) >= 0.3 - 1e-6, mode
    # Inside the image the rotation is the same bilinear sampling.
    np.testing.assert_array_equal(np.asarray(out)[12:20, 12:20], np.asarray(black)[12:20, 12:20])
  np.testing.assert_array_equal(geometry.rotate(image, 30.0, mode="constant"), geometry.rotate(image, 30.0))


def test_rotate_fill_changes_only_rotated_targets(batch, monkeypatch):
  monkeypatch.setattr(synthesis.augment, "random_augment_one", _stand_in)
  images, pool = batch
  black = _synthesize(synthesis.SynthesisConfig(no_anomaly_prob=1.0), images, pool)
  edge = _synthesize(synthesis.SynthesisConfig(no_anomaly_prob=1.0, rotate_fill="edge"), images, pool)
  rotated = np.array([not np.array_equal(t, x) for t, x in zip(black.target, images)])
  assert 0 < rotated.sum() < len(images)
  # The images lie in [0.3, 0.9]: anything darker is fill (tiny angles only graze the corners).
  dark = black.target[rotated].min(axis=(1, 2, 3)) < 0.3 - 1e-6
  assert dark.mean() > 0.8 and (black.target[rotated].min(axis=(1, 2, 3)) == 0).mean() > 0.5
  assert edge.target[rotated].min() >= 0.3 - 1e-6
  np.testing.assert_array_equal(edge.target[~rotated], black.target[~rotated])


def test_synthesis_defaults_are_the_original():
  assert synthesis.SynthesisConfig() == synthesis.SynthesisConfig(empty_mask="keep", rotate_fill="black")
  assert synthesis.SynthesisConfig.original() == synthesis.SynthesisConfig()
  for field, value in (("empty_mask", "rescale"), ("rotate_fill", "white")):
    with pytest.raises(ValueError, match=field):
      synthesis.SynthesisConfig(**{field: value})


def test_default_synthesis_is_bit_identical_to_explicit_defaults(batch):
  images, pool = batch
  implicit = _synthesize(synthesis.SynthesisConfig(), images, pool)
  explicit = _synthesize(synthesis.SynthesisConfig(empty_mask="keep", rotate_fill="black"), images, pool)
  for a, b in zip(implicit, explicit):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------
# 4. Initialisation.
# ----------------------------------------------------------------------------------------------------

def _params(init_scheme=None, recon=8, disc=8):
  kw = {} if init_scheme is None else {"init_scheme": init_scheme}
  model = models.DRAEM(recon_width=recon, disc_width=disc, **kw)
  return jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)["params"])


def _leaves(tree, name):
  return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
          if getattr(p[-1], "key", None) == name]


def test_pytorch_default_init_matches_torchs_conv2d_formula():
  if os.environ.get("DRAEM_REQUIRE_TORCH") == "1":
    import torch  # CI's first interpreter: a failing import must fail the test
  else:
    torch = pytest.importorskip("torch", reason="torch (CPU) gives the reference initialisation")
  params = _leaves(_params("pytorch_default"), "kernel")
  biases = dict(_leaves(_params("pytorch_default"), "bias"))
  assert len(params) == 23 + 28
  for path, k in params:
    cin, cout = k.shape[2], k.shape[3]
    reference = torch.nn.Conv2d(cin, cout, 3)  # torch's own default init
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(reference.weight)
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
    assert fan_in == 9 * cin and abs(bound - 1 / math.sqrt(fan_in)) < 1e-12
    assert np.abs(k).max() <= bound and float(reference.weight.abs().max()) <= bound
    if k.size >= 2000:  # the uniform's std, bound / sqrt(3), within sampling error
      np.testing.assert_allclose(k.std(), bound / math.sqrt(3), rtol=0.1, err_msg=path)
      np.testing.assert_allclose(float(reference.weight.std()), bound / math.sqrt(3), rtol=0.1)
    assert np.abs(biases[path.replace("kernel", "bias")]).max() <= bound
  # Without weights_init, BatchNorm's gamma is 1.
  assert all((s == 1).all() for _, s in _leaves(_params("pytorch_default"), "scale"))


def test_default_init_is_the_original_and_explicit_default_is_identical():
  implicit, explicit = _params(), _params("normal_0.02")
  for a, b in zip(jax.tree.leaves(implicit), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(a, b)
  kernels = np.concatenate([k.ravel() for _, k in _leaves(implicit, "kernel")])
  np.testing.assert_allclose(kernels.std(), 0.02, rtol=0.05)
  scales = np.concatenate([s.ravel() for _, s in _leaves(implicit, "scale")])
  np.testing.assert_allclose([scales.mean(), scales.std()], [1.0, 0.02], rtol=0.1)
  with pytest.raises(ValueError, match="init_scheme"):
    _params("xavier")


def test_width_scaled_init():
  x = jnp.zeros((1, 8, 8, 64))
  key = jax.random.key(1)

  def kernel(width, original):
    conv, _ = models.init_factories("width_scaled", conv_lib.Conv3x3, width, original)
    return np.asarray(conv(128).init(key, x)["params"]["kernel"])

  default = np.asarray(conv_lib.Conv3x3(128).init(key, x)["params"]["kernel"])
  np.testing.assert_array_equal(kernel(128, 128), default)  # at the original width: the original
  np.testing.assert_allclose(kernel(32, 128), 2.0 * default, rtol=1e-6)  # sqrt(128 / 32) = 2
  # Biases and BN are not touched.
  conv, norm = models.init_factories("width_scaled", conv_lib.Conv3x3, 32, 128)
  np.testing.assert_array_equal(conv(128).init(key, x)["params"]["bias"],
                                conv_lib.Conv3x3(128).init(key, x)["params"]["bias"])
  assert norm is models.BatchNorm
  assert isinstance(conv(4), nn.Module)


# ----------------------------------------------------------------------------------------------------
# 5. EMA of the weights.
# ----------------------------------------------------------------------------------------------------

def test_ema_update_formula():
  ema = {"a": jnp.full((3,), 2.0), "b": jnp.zeros((2, 2))}
  params = {"a": jnp.full((3,), 4.0), "b": jnp.ones((2, 2))}
  out = steps.ema_update(ema, params, 0.75)
  np.testing.assert_allclose(out["a"], 2.5)
  np.testing.assert_allclose(out["b"], 0.25)


def _tiny(demo_root, **overrides):
  c = recipes.tiny()  # 64 demo images, batch 16: 4 steps per epoch
  c.update(dict(data_dir=demo_root, num_epochs=1, checkpoint_every_steps=1, keep_checkpoints=None,
                **overrides))
  c.validation.fraction = 0.0
  c.eval.num_visualizations = 0
  return c


DECAY = 0.5


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
  """A: 4 steps with EMA; B: the same stopped after step 1 and resumed; C: 2 steps without EMA."""
  root = tmp_path_factory.mktemp("ema_runs")
  demo_root = str(root / "demo")
  with pytest.MonkeyPatch.context() as mp:
    # The real augmenter adds a long compile and nothing EMA-related; every run uses the same stand-in.
    mp.setattr(synthesis.augment, "random_augment_one", _stand_in)
    results = {"A": train.train_and_evaluate(_tiny(demo_root, ema_decay=DECAY), str(root / "A"))}
    with pytest.raises(train.StoppedEarly):
      train.train_and_evaluate(_tiny(demo_root, ema_decay=DECAY, stop_after_steps=1), str(root / "B"))
    assert checkpointing.has_ema(str(root / "B"), 1)
    results["B"] = train.train_and_evaluate(_tiny(demo_root, ema_decay=DECAY), str(root / "B"))
    with pytest.raises(train.StoppedEarly):
      train.train_and_evaluate(_tiny(demo_root, stop_after_steps=2), str(root / "C"))
  abstract = rundir.abstract_variables(steps.build_model(_tiny(demo_root)), SIZE)

  @functools.cache
  def raw(run, step):
    return jax.device_get(checkpointing.restore_intact(str(root / run), abstract, step=step)[1])

  @functools.cache
  def ema(run, step):
    return jax.device_get(checkpointing.restore_ema(str(root / run), step, abstract))

  return root, results, raw, ema


def test_ema_is_the_hand_computed_average_and_changes_nothing_else(ema_runs):
  _, _, raw, ema = ema_runs
  expected = jax.tree.map(lambda x: np.asarray(x, np.float64), ema("A", 1)["params"])
  for step in (2, 3, 4):
    expected = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * np.asarray(p, np.float64), expected,
                            raw("A", step)["params"])
    got = ema("A", step)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got["params"])):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    # The EMA item carries the raw weights' running BN statistics.
    for a, b in zip(jax.tree.leaves(got["batch_stats"]), jax.tree.leaves(raw("A", step)["batch_stats"])):
      np.testing.assert_array_equal(a, b)
  first = lambda tree: jax.tree.leaves(tree["params"])[0]  # noqa: E731
  assert not np.array_equal(first(ema("A", 4)), first(raw("A", 4)))
  # The raw training is exactly that of a run without EMA.
  for step in (1, 2):
    for a, b in zip(jax.tree.leaves(raw("A", step)), jax.tree.leaves(raw("C", step))):
      np.testing.assert_array_equal(a, b)


def test_ema_survives_resume_bit_identically_and_is_evaluated(ema_runs):
  root, results, raw, ema = ema_runs
  for a, b in zip(jax.tree.leaves((ema("A", 4), raw("A", 4))), jax.tree.leaves((ema("B", 4), raw("B", 4)))):
    np.testing.assert_array_equal(a, b)
  for r in results.values():
    assert r["ema_decay"] == DECAY and 0 <= r["ema_pixel_ap"] <= 1
    assert {"ema_image_auroc", "ema_aupro", "image_auroc", "pixel_ap"} <= set(r)
  assert results["A"]["ema_pixel_ap"] == results["B"]["ema_pixel_ap"]
  assert "EMA weights (EMA decay 0.5)" in (root / "A" / "eval" / "metrics.md").read_text()


def test_unreadable_ema_weights_leave_the_evaluation_without_ema_metrics(ema_runs, tmp_path, caplog):
  root = ema_runs[0]
  run = tmp_path / "A"
  shutil.copytree(root / "A", run, ignore=shutil.ignore_patterns("eval*"))
  (run / "checkpoints" / "4" / checkpointing.EMA_ITEM / "_METADATA").write_text("")
  results = evaluate.evaluate_workdir(str(run))
  assert results["step"] == 4 and results["image_auroc"] == ema_runs[1]["A"]["image_auroc"]
  assert not [k for k in results if k.startswith("ema_")]
  assert "no metrics of the other weights: EMA weights of" in caplog.text


@pytest.fixture(scope="module")
def ema_model_runs(tmp_path_factory):
  """D: 3 steps with ema_as_model and held-out images; E: the same without ema_as_model."""
  root = tmp_path_factory.mktemp("ema_model_runs")
  demo_root = str(root / "demo")
  results = {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(synthesis.augment, "random_augment_one", _stand_in)
    for run, as_model in (("D", True), ("E", False)):
      c = _tiny(demo_root, ema_decay=DECAY, ema_as_model=as_model)
      c.validation.fraction = 0.25
      results[run] = train.train_and_evaluate(c, str(root / run))
  return root, results


def test_ema_as_model_makes_the_ema_the_evaluated_validated_model(ema_model_runs):
  root, results = ema_model_runs
  d, e = results["D"], results["E"]
  abstract = rundir.abstract_variables(steps.build_model(recipes.tiny()), SIZE)
  last = d["step"]  # 48 training images (16 held out), batch 16: 3 steps
  assert last == e["step"] == 3
  # The switch changes no training: both runs' raw and EMA weights are bit-identical.
  for item in (lambda r: checkpointing.restore_intact(str(root / r), abstract, step=last)[1],
               lambda r: checkpointing.restore_ema(str(root / r), last, abstract)):
    for a, b in zip(jax.tree.leaves(jax.device_get(item("D"))), jax.tree.leaves(jax.device_get(item("E")))):
      np.testing.assert_array_equal(a, b)
  # What predict and export restore (validation.restore_selected) is the EMA item.
  _, served, step, _ = validation.restore_selected(str(root / "D"), rundir.load_config(root / "D"))
  assert step == last
  ema_e = checkpointing.restore_ema(str(root / "E"), last, abstract)
  for a, b in zip(jax.tree.leaves(jax.device_get(served)), jax.tree.leaves(jax.device_get(ema_e))):
    np.testing.assert_array_equal(a, b)
  # D's model metrics are E's EMA metrics, and D reports the raw weights' beside them.
  for k in ("image_auroc", "pixel_ap", "aupro", "pixel_auroc"):
    assert d[k] == e[f"ema_{k}"], k
    assert d[f"raw_{k}"] == e[k], k
  assert not [k for k in d if k.startswith("ema_") and k != "ema_decay"]
  assert "Raw weights (EMA decay 0.5)" in (root / "D" / "eval" / "metrics.md").read_text()
  # Validation and its thresholds (written by the training loop) are the EMA's: they differ from E's and
  # equal what evaluation calibrates afresh from the restored model.
  stored = rundir.read_thresholds(root / "D", last)
  assert stored["image"] != rundir.read_thresholds(root / "E", last)["image"]
  assert d["val_pixel_ap"] != e["val_pixel_ap"]
  (root / "D" / rundir.THRESHOLDS_FILE).unlink()
  again = evaluate.evaluate_workdir(str(root / "D"), echo=lambda *_: None)
  assert again["normal_thresholds"]["image"] == pytest.approx(stored["image"], rel=1e-6)
  assert again["normal_thresholds"]["pixel"] == pytest.approx(stored["pixel"], rel=1e-6)
  assert again["image_auroc"] == d["image_auroc"]


def test_default_run_writes_no_ema(ema_runs):
  root = ema_runs[0]
  for step in (1, 2):
    items = sorted(p for p in os.listdir(root / "C" / "checkpoints" / str(step))
                   if (root / "C" / "checkpoints" / str(step) / p).is_dir())
    assert items == ["model", "train"]
  with pytest.raises(checkpointing.NoCheckpointError, match="no EMA"):
    checkpointing.restore_ema(str(root / "C"), 2, {})
  model, tx = models.DRAEM(recon_width=4, disc_width=4), steps.make_optimizer(1e-3)
  state = jax.eval_shape(lambda k: steps.create_train_state(model, tx, k, (SIZE, SIZE)), jax.random.key(0))
  assert state.ema_params is None and state.ema_variables() is None
  assert set(state.train_item()) == {"step", "opt_state", "key"}
  assert set(state.model_variables()) == {"params", "batch_stats"}


# ----------------------------------------------------------------------------------------------------
# 6. Config fields, validation, the fast variant, resuming runs recorded before the switches.
# ----------------------------------------------------------------------------------------------------

def _flat(config, prefix="") -> dict:
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _field(config, name):
  for part in name.split("."):
    config = config[part]
  return config


def test_recipe_defaults_are_the_original_and_fast_turns_the_switches_on():
  base, fast = recipes.from_argument("bottle"), recipes.from_argument("bottle,fast")
  for name, default in recipes.SWITCH_DEFAULTS.items():
    assert _field(base, name) == default, name
  assert fast.synthesis.rotate_prob == 0.0 and fast.synthesis.empty_mask == "retry"
  assert fast.loss.focal_normal_weight == 0.05 and fast.ema_decay == 0.9 and fast.ema_as_model
  changed = {k for k, v in _flat(fast).items() if v != _flat(base)[k]}
  assert changed == {"synthesis.rotate_prob", "synthesis.empty_mask", "loss.focal_normal_weight",
                     "ema_decay", "ema_as_model"}
  recipes.validate(fast)
  paper_fast = recipes.from_argument("bottle,paper,fast")
  assert paper_fast.synthesis.rotate_prob == 0.0 and paper_fast.synthesis.empty_mask == "retry"
  paper = _flat(recipes.from_argument("bottle,paper"))
  assert {k for k, v in _flat(paper_fast).items() if v != paper[k]} == changed
  assert recipes.synthesis_config(base) == synthesis.SynthesisConfig()
  assert recipes.loss_config(base) == losses.ORIGINAL_LOSS
  assert recipes.loss_config(fast) == losses.LossConfig(focal_normal_weight=0.05)
  with pytest.raises(ValueError, match="known: paper, fast"):
    recipes.from_argument("bottle,faster")


@pytest.mark.parametrize("name,value", [
    ("source_resize", "area"), ("model.init", "xavier"), ("ema_decay", 1.0), ("ema_decay", -0.1),
    ("ema_decay", True), ("synthesis.empty_mask", "rescale"), ("synthesis.rotate_fill", "white"),
    ("loss.focal_normal_weight", -0.5), ("loss.focal_normal_weight", float("nan")),
    ("loss.weights", (1.0, 1.0)), ("loss.weights", (0.0, 0.0, 0.0)), ("loss.weights", (1.0, -1.0, 1.0)),
    ("ema_as_model", True)])
def test_validate_names_the_bad_switch(name, value):
  config = recipes.tiny()
  head, _, last = name.rpartition(".")
  (config[head] if head else config)[last] = value
  with pytest.raises(ValueError, match=last):
    recipes.validate(config)


def test_loss_config_reaches_the_step_and_its_default_is_the_original():
  model = models.DRAEM(recon_width=4, disc_width=4)
  tx = steps.make_optimizer(lambda _: 1e-3)
  state = steps.create_train_state(model, tx, jax.random.key(0), (32, 32))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((4, 32, 32, 3)), jnp.float32)
  sources = jnp.asarray(rng.integers(0, 256, (3, 32, 32, 3)), jnp.uint8)
  syn = synthesis.synthesize(jax.random.key(1), images, sources)
  assert float(jnp.sum(syn.has_anomaly)) > 0
  run = jax.jit(lambda syn, cfg: steps.loss_and_grads(model, state.params, state.batch_stats, syn, cfg),
                static_argnums=1)
  implicit = jax.jit(lambda syn: steps.loss_and_grads(model, state.params, state.batch_stats, syn))(syn)
  explicit = run(syn, losses.LossConfig((1.0, 1.0, 1.0), 1.0))
  jax.tree.map(np.testing.assert_array_equal, implicit, explicit)
  grads, _, m = run(syn, losses.LossConfig((1.0, 1.0, 0.5), 0.0))
  np.testing.assert_allclose(float(m["loss"]), float(m["l2"] + m["ssim"] + 0.5 * m["focal"]), rtol=1e-6)
  assert float(m["focal"]) < float(explicit[2]["focal"])  # the normal pixels' terms are gone
  assert float(m["l2"]) == float(explicit[2]["l2"])
  assert not np.allclose(np.asarray(jax.tree.leaves(grads)[0]), np.asarray(jax.tree.leaves(explicit[0])[0]))


def _record_without_switches(workdir, config):
  values = json.loads(config.to_json())
  for name in recipes.SWITCH_DEFAULTS:
    head, _, last = name.rpartition(".")
    del (values[head] if head else values)[last]
  rundir.write_json(rundir.path(workdir) / rundir.CONFIG_FILE, values)


def test_run_recorded_before_the_switches_resumes_with_their_defaults(tmp_path):
  _record_without_switches(tmp_path, recipes.tiny())
  rundir.check_resume(tmp_path, recipes.tiny())  # the defaults: what the old run trained with
  for name, value in (("source_resize", "antialias"), ("synthesis.empty_mask", "retry"),
                      ("synthesis.rotate_fill", "edge"), ("model.init", "pytorch_default"),
                      ("ema_decay", 0.9), ("loss.focal_normal_weight", 0.1),
                      ("loss.weights", (1.0, 1.0, 0.5)), ("ema_as_model", True)):
    changed = recipes.tiny()
    head, _, last = name.rpartition(".")
    (changed[head] if head else changed)[last] = value
    with pytest.raises(rundir.ConfigChangedError, match=name.replace(".", r"\.")):
      rundir.check_resume(tmp_path, changed)
