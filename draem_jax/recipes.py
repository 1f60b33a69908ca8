"""The training recipes as config values, and the check every config passes before a run starts.

``configs/*.py`` (the files given to ``--config``) build on these functions; library code never loads a
config file by path. A recorded config (``WORKDIR/config.json``) holds values, not names: the synthesis
knobs and the learning-rate decay points are spelled out, so a run says what it did.

* ``mvtec(category, variants)``: the original code's recipe for one MVTec AD category (256x256, batch 8,
  Adam 1e-4, 700 epochs, lr x0.2 at 80 % and 90 % of the epochs, widths 128 / 64); variant ``paper``
  changes what the paper states differently (DRAEM paper, Sec. 3.2 and 4.1); variant ``fast`` turns on
  the recipe switches that make short budgets learn more per step (docs/recipe.md).
* ``demo()``: the embedded procedural fabric at 64x64 with small networks, minutes on a CPU.
* ``tiny()``: the demo at 32x32 with 4-channel networks and 8 steps, for the test suite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_collections

from draem_jax import losses
from draem_jax import models
from draem_jax import synthesis
from draem_jax.data import sources

# Fields that may change between invocations of one run without changing what is trained: how often it
# logs and saves, when this invocation stops, how it is evaluated, and where data is read from (data may
# move). Every other field is compared on resume (deny by default).
BOOKKEEPING_FIELDS = (
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "overwrite", "stop_after_steps",
    "data_dir", "tfds_data_dir", "anomaly_source_path", "eval", "validation.every_steps",
    "threshold", "validation.select", "predict",
)

# The recipe switches (docs/recipe.md) with the value a run recorded before the switch existed trained
# with (the original code's): the resume check reads a field absent from the record as this value.
SWITCH_DEFAULTS = {
    "source_resize": "original", "synthesis.empty_mask": "keep", "synthesis.rotate_fill": "black",
    "model.init": "normal_0.02", "ema_decay": 0.0, "loss.weights": (1.0, 1.0, 1.0),
    "loss.focal_normal_weight": 1.0, "ema_as_model": False,
}
# What a run recorded before a field existed trained with, for reading older records (the resume check
# and ``rundir.load_config``): the switches' original values, and no hold-out split (before it existed
# every train/good image was trained on).
BEFORE_FIELD_EXISTED = {**SWITCH_DEFAULTS, "validation.fraction": 0.0}
VARIANTS = ("paper", "fast")

DATASETS = ("folder", "tfds", "demo")
DTYPES = ("float32", "bfloat16")


def synthesis_values(config: synthesis.SynthesisConfig) -> ml_collections.ConfigDict:
  """The fields of a SynthesisConfig as a ConfigDict (recorded with the run)."""
  values = dataclasses.asdict(config)
  values["texture_weight_range"] = tuple(values["texture_weight_range"])
  return ml_collections.ConfigDict(values)


def synthesis_config(config) -> synthesis.SynthesisConfig:
  """The SynthesisConfig that ``config.synthesis`` records."""
  values = dict(config.synthesis)
  known = {f.name for f in dataclasses.fields(synthesis.SynthesisConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"config.synthesis.{unknown[0]}: unknown field; known: {sorted(known)}")
  return synthesis.SynthesisConfig(**values)


def loss_config(config) -> losses.LossConfig:
  """The LossConfig that ``config.loss`` records."""
  return losses.LossConfig(weights=tuple(float(w) for w in config.loss.weights),
                           focal_normal_weight=float(config.loss.focal_normal_weight))


def mvtec(category: str = "bottle", variants: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The original code's recipe for one MVTec AD category; ``variants`` may hold "paper" and "fast"."""
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
  paper, fast = "paper" in variants, "fast" in variants

  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data.
  c.dataset = "folder"            # "folder": MVTec layout on disk; "tfds": the mvtec_ad builder; "demo"
  c.data_dir = "data/mvtec_anomaly_detection"  # folder root, or tfds manual dir when dataset="tfds"
  c.tfds_data_dir = ""            # where tfds keeps prepared datasets ("" = tfds default)
  c.category = category
  c.image_size = 256
  c.anomaly_source_path = ""      # folder of textures (DTD: dtd/images); "" = procedural fallback
  c.max_sources = 0               # 0 = all; otherwise a deterministic subsample (memory)
  c.mask_rule = "reference"       # eval mask resize: "reference" (bilinear, ==255) or "nearest"
  c.channel_order = "rgb"         # "bgr" for weights trained on OpenCV images (released checkpoints)
  c.source_resize = "original"    # texture shrink: "original" (bilinear, no antialias) or "antialias"

  # Anomaly synthesis: every knob of synthesis.SynthesisConfig, recorded with the run (empty_mask:
  # "keep" / "retry" an empty Perlin mask; rotate_fill: "black" / "edge" / "reflect" rotated corners).
  c.synthesis = synthesis_values(
      synthesis.SynthesisConfig.paper() if paper else synthesis.SynthesisConfig.original())

  # Model.
  c.model = ml_collections.ConfigDict()
  c.model.recon_width = 128
  c.model.disc_width = 64
  c.model.dtype = "float32"       # "bfloat16": bf16 compute, f32 params
  c.model.init = "normal_0.02"    # "normal_0.02" (original), "pytorch_default", "width_scaled" (models.INITS)

  # Optimisation: Adam on both networks; lr x lr_decay_factor at each fraction of num_epochs (rounded
  # up to a whole epoch). original: x0.2 at 80 % and 90 %; paper: x0.1 at epochs 400 and 600 of 700.
  c.batch_size = 8                # global, over all devices of all processes
  c.num_epochs = 700
  c.learning_rate = 1e-4
  c.lr_decay_fractions = (4 / 7, 6 / 7) if paper else (0.8, 0.9)
  c.lr_decay_factor = 0.1 if paper else 0.2
  c.ema_decay = 0.0               # > 0: keep an EMA of the weights, evaluated beside the raw ones; 0 = off
  # True (needs ema_decay > 0): the EMA weights are the run's model (validation, thresholds, selection,
  # evaluation, predict, export); the raw weights' metrics are reported beside them instead.
  c.ema_as_model = False

  # The objective (losses.LossConfig): (l2, ssim, focal) weights, and the focal weight of normal pixels.
  c.loss = ml_collections.ConfigDict()
  c.loss.weights = (1.0, 1.0, 1.0)
  c.loss.focal_normal_weight = 1.0

  # Bookkeeping (may change between invocations of one run).
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.overwrite = False             # True: set a previous run aside (renamed, never deleted) and retrain
  c.stop_after_steps = 0          # >0: checkpoint and stop after this many steps of this invocation

  # Validation on held-out good images (never trained on) with fixed synthetic anomalies; model
  # selection; normal-only thresholds; inference on images larger than the model.
  c.validation = ml_collections.ConfigDict()
  c.validation.fraction = 0.1     # share of train/good held out (at least 1 image); 0 = none
  c.validation.num_synthetic = 4  # synthetic anomalies per held-out image
  c.validation.every_steps = 1000  # also at every checkpoint and at the end
  c.validation.select = "last"    # "last" (as the original) or "best" (best synthetic pixel AP)
  c.threshold = ml_collections.ConfigDict()
  c.threshold.image_fpr = 0.05    # target share of good images flagged (see draem_jax/thresholds.py)
  c.threshold.pixel_fpr = 0.005   # target share of good pixels in defect regions
  c.predict = ml_collections.ConfigDict()
  c.predict.tile = False          # True: overlapping model-size tiles instead of resizing the image
  c.predict.tile_scale = 1.0      # rescale factor before tiling (1 = the image's own resolution)
  c.predict.tile_overlap = 0.25   # minimum overlap of neighbouring tiles (fraction of a tile)
  c.predict.min_region_area = 16  # defect regions smaller than this (original-image pixels) are dropped
  c.train_crop = False            # True: random image_size crops of images loaded at load_size
  c.load_size = 0                 # with train_crop: size images are loaded at (>= image_size)

  # Evaluation.
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  c.eval.num_visualizations = 16
  c.eval.score_filter_size = 21
  c.eval.aupro_fpr_limit = 0.3
  if fast:
    _fast(c)
  return c


def _fast(c: ml_collections.ConfigDict) -> None:
  """The ``fast`` variant: normal images are not rotated, an example that drew an anomaly gets one, the
  focal loss weights normal pixels 0.05, and the model is an EMA (decay 0.9) of the weights.

  ``synthesis.rotate_prob = 0`` (the original rotates 30 % of them by up to 90 degrees with black
  corners, plausibly teaching that dark patches are normal), ``synthesis.empty_mask = "retry"`` (about 5 %
  of the original's masks are empty), ``loss.focal_normal_weight = 0.05`` (the original weights every
  pixel 1; anomalib under kornia 0.9 weights normal pixels 0) and ``ema_decay = 0.9`` with
  ``ema_as_model`` (the EMA weights are validated, evaluated and exported; 0.9 averages about the last
  10 steps, chosen at 100-step budgets). Measured at a short budget only: docs/recipe.md has the
  protocol, the table and the expected numbers (configs/mvtec.py quotes them).
  """
  c.synthesis.rotate_prob = 0.0
  c.synthesis.empty_mask = "retry"
  c.loss.focal_normal_weight = 0.05
  c.ema_decay = 0.9
  c.ema_as_model = True


def demo() -> ml_collections.ConfigDict:
  """The embedded procedural fabric category (generated under ``<workdir>/demo_data`` on first use)."""
  c = mvtec("demo_fabric")
  c.dataset = "demo"
  c.data_dir = ""                  # "" = <workdir>/demo_data
  c.image_size = 64
  c.model.recon_width = 16
  c.model.disc_width = 16
  c.batch_size = 8
  # Tuned on the demo data (the table in configs/demo.py): 160 steps at lr 2e-3 without the
  # normal-image rotation, whose black corners taught the model that dark patches are normal (holes
  # were missed): image AUROC 0.968 / 0.986 / 0.995 over seeds 0-2 when it was chosen, against 0.868
  # for 320 steps at lr 1e-3 with the original's rotation.
  c.num_epochs = 20
  c.learning_rate = 2e-3
  c.synthesis.rotate_prob = 0.0
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  c.eval.num_visualizations = 8
  return c


def tiny() -> ml_collections.ConfigDict:
  """The demo at 32x32 with 4-channel networks: 64 images, batch 16, 2 epochs = 8 steps (tests)."""
  c = demo()
  # The tests keep the original's rotation (its code path) and the earlier demo learning rate.
  c.synthesis.rotate_prob = synthesis.SynthesisConfig.original().rotate_prob
  c.learning_rate = 1e-3
  c.image_size = 32
  c.model.recon_width = 4
  c.model.disc_width = 4
  c.batch_size = 16
  c.num_epochs = 2
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.eval.batch_size = 16
  c.eval.num_visualizations = 2
  return c


def complete(values: dict, overrides: dict | None = None) -> tuple[dict, list[str]]:
  """``values`` (a config as nested dicts) with every field of the recipe (``mvtec()``) it lacks added.

  A field is added with its value in ``overrides`` (dotted name -> value), else the recipe's default;
  fields the recipe does not know are kept. Raises ValueError naming a field that should be a block.

  Returns:
    ``(completed copy, ["field=value", ...] for each field added)``.
  """
  overrides = overrides or {}
  added: list[str] = []

  def fill(rec: dict, defaults: dict, prefix: str) -> dict:
    out = dict(rec)
    for key, default in defaults.items():
      name = prefix + key
      if isinstance(default, dict):
        if key in rec and not isinstance(rec[key], dict):
          raise ValueError(f"config.{name}={rec[key]!r} must be a block of fields "
                           f"({', '.join(sorted(default))})")
        out[key] = fill(rec.get(key, {}), default, name + ".")
      elif key not in rec:
        out[key] = overrides.get(name, default)
        added.append(f"{name}={out[key]!r}")
    return out

  return fill(values, json.loads(mvtec().to_json()), ""), added


def from_argument(arg: str | None, default_category: str = "bottle") -> ml_collections.ConfigDict:
  """``configs/mvtec.py:ARG``: ``CATEGORY[,VARIANT...]``."""
  parts = [p for p in (arg or default_category).split(",") if p]
  return mvtec(parts[0], tuple(parts[1:]))


# ----------------------------------------------------------------------------------------------------
# Validation: one line naming the field, before anything is loaded or written.
# ----------------------------------------------------------------------------------------------------

def _positive_int(config, name: str, value, allow_zero: bool = False) -> None:
  ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"config.{name}={value!r} must be an integer {bound}.")


def validate(config) -> None:
  """Raises ValueError naming the first bad field of a training config."""
  try:
    _, missing = complete(config.to_dict())
  except ValueError as e:
    raise ValueError(f"{e}.") from None
  if missing:
    raise ValueError(f"config.{missing[0].split('=')[0]} is missing: build the config on draem_jax.recipes "
                     "(mvtec(), demo() or tiny()), which define every field.")
  for name in ("num_epochs", "batch_size", "log_every_steps", "checkpoint_every_steps",
               "model.recon_width", "model.disc_width", "eval.batch_size", "eval.score_filter_size"):
    value = config
    for part in name.split("."):
      value = value[part]
    _positive_int(config, name, value)
  for name in ("stop_after_steps", "max_sources", "seed", "eval.num_visualizations"):
    value = config
    for part in name.split("."):
      value = value[part]
    _positive_int(config, name, value, allow_zero=True)
  if config.keep_checkpoints is not None:
    _positive_int(config, "keep_checkpoints", config.keep_checkpoints)
  lr = config.learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ValueError(f"config.learning_rate={lr!r} must be a finite number > 0 (the recipe: 1e-4).")
  fractions = tuple(config.lr_decay_fractions)
  if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions):
    raise ValueError(f"config.lr_decay_fractions={fractions!r} must be increasing fractions in (0, 1].")
  if not 0 < config.lr_decay_factor <= 1:
    raise ValueError(f"config.lr_decay_factor={config.lr_decay_factor!r} must be in (0, 1].")
  if config.dataset not in DATASETS:
    raise ValueError(f"config.dataset={config.dataset!r}: use one of {DATASETS}.")
  if not config.category or os.sep in config.category or config.category in (".", ".."):
    raise ValueError(f"config.category={config.category!r} must be a category folder name, e.g. bottle.")
  if config.image_size < 32 or config.image_size % 32:
    raise ValueError(f"config.image_size={config.image_size} must be a positive multiple of 32 "
                     "(the discriminative U-Net pools five times).")
  if config.model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={config.model.dtype!r}: use one of {DTYPES}.")
  if config.channel_order not in ("rgb", "bgr"):
    raise ValueError(f"config.channel_order={config.channel_order!r}: use 'rgb' or 'bgr'.")
  if config.source_resize not in sources.RESIZE_RULES:
    raise ValueError(f"config.source_resize={config.source_resize!r}: use one of {sources.RESIZE_RULES}.")
  if config.model.init not in models.INITS:
    raise ValueError(f"config.model.init={config.model.init!r}: use one of {models.INITS}.")
  ema = config.ema_decay
  if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
    raise ValueError(f"config.ema_decay={ema!r} must be a number in [0, 1) (0 = no EMA; e.g. 0.99).")
  if not isinstance(config.ema_as_model, bool):
    raise ValueError(f"config.ema_as_model={config.ema_as_model!r} must be True or False.")
  if config.ema_as_model and not ema > 0:
    raise ValueError("config.ema_as_model=True needs an EMA to use: set config.ema_decay > 0 (e.g. 0.9 "
                     "for a few hundred steps, 0.999 for a full run).")
  _validate_loss(config)
  if config.mask_rule not in ("reference", "nearest"):
    raise ValueError(f"config.mask_rule={config.mask_rule!r}: use 'reference' or 'nearest'.")
  if not 0 < config.eval.aupro_fpr_limit <= 1:
    raise ValueError(f"config.eval.aupro_fpr_limit={config.eval.aupro_fpr_limit!r} must be in (0, 1].")
  try:
    synthesis_config(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.synthesis: {e}") from None
  _validate_validation(config)


def _validate_loss(config) -> None:
  def number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
  w = config.loss.weights
  if not isinstance(w, (tuple, list)) or len(w) != 3 or not all(number(x) for x in w) or not any(w):
    raise ValueError(f"config.loss.weights={w!r} must be three finite numbers >= 0, not all 0: the "
                     "(l2, ssim, focal) weights, e.g. (1.0, 1.0, 1.0).")
  if not number(config.loss.focal_normal_weight):
    raise ValueError(f"config.loss.focal_normal_weight={config.loss.focal_normal_weight!r} must be a "
                     "finite number >= 0 (1 = the original).")


def _fraction(name: str, value, low_open: bool = False) -> None:
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
  if not ok or not ((0 < value) if low_open else (0 <= value)) or value >= 1:
    bound = "(0, 1)" if low_open else "[0, 1)"
    raise ValueError(f"config.{name}={value!r} must be a number in {bound}.")


def _validate_validation(config) -> None:
  """The validation, threshold, predict and crop fields."""
  v = config.validation
  _fraction("validation.fraction", v.fraction)
  _positive_int(config, "validation.num_synthetic", v.num_synthetic, allow_zero=True)
  _positive_int(config, "validation.every_steps", v.every_steps)
  if v.select not in ("last", "best"):
    raise ValueError(f"config.validation.select={v.select!r}: use 'last' or 'best'.")
  if v.select == "best" and not v.fraction:
    raise ValueError("config.validation.select='best' needs held-out images: set "
                     "config.validation.fraction > 0.")
  t = config.threshold
  _fraction("threshold.image_fpr", t.image_fpr)
  _fraction("threshold.pixel_fpr", t.pixel_fpr)
  p = config.predict
  if not isinstance(p.tile, bool):
    raise ValueError(f"config.predict.tile={p.tile!r} must be True or False.")
  scale = p.tile_scale
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
      or scale <= 0:
    raise ValueError(f"config.predict.tile_scale={scale!r} must be a finite number > 0.")
  _fraction("predict.tile_overlap", p.tile_overlap)
  _positive_int(config, "predict.min_region_area", p.min_region_area)
  if not isinstance(config.train_crop, bool):
    raise ValueError(f"config.train_crop={config.train_crop!r} must be True or False.")
  _positive_int(config, "load_size", config.load_size, allow_zero=True)
  if config.train_crop and config.load_size < config.image_size:
    raise ValueError(f"config.train_crop=True needs config.load_size >= config.image_size "
                     f"({config.image_size}); got load_size={config.load_size}.")
  if not config.train_crop and config.load_size:
    raise ValueError(f"config.load_size={config.load_size} is used only with config.train_crop=True; "
                     "set it to 0 or turn train_crop on.")
