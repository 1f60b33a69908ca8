"""Validation with good images only: a held-out split of train/good and fixed synthetic anomalies on it.

* **Hold-out split** (``split_indices``, ``prepare``): ``config.validation.fraction`` of the training
  images (at least one; deterministic from ``config.seed``) is never trained on. The held-out file names
  are recorded in ``WORKDIR/validation.json``, so a resumed or re-evaluated run uses the same split.
* **Synthetic validation set** (``synthesize_set``): ``config.validation.num_synthetic`` anomalies per
  held-out image from the training synthesis (the run's ``config.synthesis``, every example with an
  anomaly) with a fixed key, so every validation of a run scores the same images. The clean held-out
  images are part of the set.
* **Scoring** (``score``): pixel AP and AUROC on the synthetic masks (clean images' pixels are
  normal), image AUROC of clean vs synthetic images. Logged during training as ``val_pixel_ap``,
  ``val_pixel_auroc``, ``val_image_auroc``: learning progress without any real defect.
* **Selection** (``BestKeeper``, ``restore_selected``): ``config.validation.select = "best"`` keeps the
  checkpoint with the best ``val_pixel_ap`` in ``WORKDIR/best`` (recorded in validation.json);
  ``"last"`` (default, as the original) uses the newest checkpoint. The test split is never used.
* **Thresholds**: the clean held-out images' maps and scores give the normal-only thresholds
  (``thresholds.calibrate``), stored per checkpoint step (``rundir.write_thresholds``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import numpy as np

from draem_jax import checkpointing
from draem_jax import metrics as metrics_lib
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import synthesis
from draem_jax import thresholds as thresholds_lib
from draem_jax.data import image_io

VALIDATION_FILE = "validation.json"
BEST_DIR = "best"
# Mixed into the run's seed: the split and the synthetic set draw from streams of their own.
_SPLIT_SALT = 0x5A11D
_SYNTH_SALT = 0x5A17E
# Synthesis runs in fixed chunks (one compile; memory bounded); chunk c uses fold_in(key, c).
_SYNTH_CHUNK = 16
# At most this many anomaly sources are resized when the held-out images are larger than the sources.
_MAX_RESIZED_SOURCES = 32
METRIC_NAMES = ("val_pixel_ap", "val_pixel_auroc", "val_image_auroc")


@dataclasses.dataclass
class ValidationSet:
  """The fixed validation images of a run.

  Attributes:
    clean: uint8 (M, H, W, 3) held-out good images.
    synthetic: uint8 (K, H, W, 3) the same images with synthetic anomalies (K <= M * num_synthetic:
      examples whose mask came out empty are dropped).
    synthetic_masks: bool (K, H, W).
    filenames: the M held-out files (relative to the category folder).
  """
  clean: np.ndarray
  synthetic: np.ndarray
  synthetic_masks: np.ndarray
  filenames: list[str]

  @property
  def source(self) -> str:
    return f"validation: {len(self.clean)} held-out train/good images"


def enabled(config) -> bool:
  """Whether ``config`` holds out validation images (``config.validation.fraction > 0``)."""
  return float(config.validation.fraction) > 0


# ----------------------------------------------------------------------------------------------------
# Hold-out split.
# ----------------------------------------------------------------------------------------------------

def split_indices(num_images: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic hold-out split of ``num_images`` training images.

  Args:
    num_images: N, the number of train/good images.
    fraction: share held out, in (0, 1); at least one image is held out.
    seed: the run's seed.

  Returns:
    ``(train, held_out)``: sorted int64 index arrays, disjoint, together ``0 .. N-1``.

  Raises:
    ValueError: fewer than two images, or nothing left to train on (the message names the numbers).
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.validation.fraction={fraction!r} must be in (0, 1), or 0 for no validation.")
  n_hold = max(1, int(round(fraction * num_images)))
  if num_images - n_hold < 1:
    raise ValueError(
        f"train/good has {num_images} image(s): config.validation.fraction={fraction} holds out {n_hold}, "
        f"leaving {num_images - n_hold} to train on. Add good images (at least 2), or set "
        "--config.validation.fraction=0 (then there are no normal-only thresholds).")
  order = np.random.default_rng([int(seed), _SPLIT_SALT]).permutation(num_images)
  return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def validation_file(workdir) -> epath.Path:
  return rundir.path(workdir) / VALIDATION_FILE


def read_record(workdir) -> dict[str, Any] | None:
  """The run's ``validation.json`` (held-out files, best checkpoint), or None."""
  file = validation_file(workdir)
  return rundir.read_json(file) if file.exists() else None


def held_out_positions(config, workdir, filenames: list[str]) -> np.ndarray:
  """Positions in ``filenames`` (the train split, sorted) of the held-out images of the run.

  Uses ``WORKDIR/validation.json`` when it exists (resume, evaluation) and otherwise draws the split and
  records it (process 0).
  """
  record = read_record(workdir)
  if record is not None:
    where = {f: i for i, f in enumerate(filenames)}
    missing = [f for f in record["held_out"] if f not in where]
    if missing:
      raise FileNotFoundError(
          f"{validation_file(workdir)} holds out {missing[0]}, which is no longer in the training folder "
          f"({len(missing)} missing); restore it, or start a new run (another --workdir).")
    return np.asarray(sorted(where[f] for f in record["held_out"]), np.int64)
  fraction = float(config.validation.fraction)
  _, held = split_indices(len(filenames), fraction, config.seed)
  if jax.process_index() == 0:
    rundir.write_json(validation_file(workdir), {
        "fraction": fraction, "seed": int(config.seed), "num_train_files": len(filenames),
        "held_out": [filenames[i] for i in held], "best": None})
  return held


def prepare(config, workdir, train_split, sources) -> tuple[np.ndarray, ValidationSet | None]:
  """Splits the training images and builds the fixed validation set.

  Args:
    config: the run's config.
    workdir: the run (``validation.json`` is read or written there).
    train_split: ``datasets.load_split(config, workdir, "train")`` (``.images`` uint8 (N, H, W, 3),
      ``.filenames``).
    sources: uint8 (S, h, w, 3) anomaly sources (host or device).

  Returns:
    ``(train_images, vset)``: the images to train on (uint8 (N - M, H, W, 3)) and the validation set,
    or all images and None when validation is off.
  """
  images = np.asarray(train_split.images)
  if not enabled(config):
    return images, None
  held = held_out_positions(config, workdir, list(train_split.filenames))
  keep = np.setdiff1d(np.arange(len(images)), held)
  clean = images[held]
  syn, masks = synthesize_set(config, clean, sources, int(config.validation.num_synthetic))
  vset = ValidationSet(clean=clean, synthetic=syn, synthetic_masks=masks,
                       filenames=[train_split.filenames[i] for i in held])
  logging.info("validation: %d held-out good images (not trained on), %d synthetic anomalies", len(clean),
               len(syn))
  return images[keep], vset


# ----------------------------------------------------------------------------------------------------
# Synthetic anomalies with fixed keys.
# ----------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config",))
def _synthesize_chunk(key, images, sources, config):
  syn = synthesis.synthesize(key, images.astype(np.float32) / 255.0, sources, config=config)
  return syn.augmented, syn.mask[..., 0]


def synthesize_set(config, clean: np.ndarray, sources, num_per_image: int) -> tuple[np.ndarray, np.ndarray]:
  """``num_per_image`` synthetic anomalies per clean image, from the run's synthesis with fixed keys.

  Every example takes the anomaly branch (``no_anomaly_prob = 0``); examples whose Perlin mask came
  out empty are dropped. Pixels are rounded to uint8, like a camera image.

  Returns:
    uint8 (K, H, W, 3) images and bool (K, H, W) masks.
  """
  h, w = clean.shape[1:3]
  if num_per_image < 1 or len(clean) == 0:
    return np.zeros((0, h, w, 3), np.uint8), np.zeros((0, h, w), bool)
  syn_config = dataclasses.replace(recipes.synthesis_config(config), no_anomaly_prob=0.0)
  if tuple(sources.shape[1:3]) != (h, w):  # held-out images at config.load_size (train_crop runs)
    subset = np.asarray(sources[:_MAX_RESIZED_SOURCES])
    sources = np.stack([image_io.resize_bilinear(s, (h, w)) for s in subset])
  base = np.repeat(clean, num_per_image, axis=0)
  key = jax.random.fold_in(jax.random.key(int(config.seed)), _SYNTH_SALT)
  out_images, out_masks = [], []
  for c, start in enumerate(range(0, len(base), _SYNTH_CHUNK)):
    chunk = base[start:start + _SYNTH_CHUNK]
    k = len(chunk)
    padded = np.concatenate([chunk, np.zeros((_SYNTH_CHUNK - k, h, w, 3), np.uint8)])
    aug, mask = jax.device_get(_synthesize_chunk(jax.random.fold_in(key, c), padded, sources, syn_config))
    out_images.append((np.clip(aug[:k], 0, 1) * 255 + 0.5).astype(np.uint8))
    out_masks.append(mask[:k] > 0.5)
  images, masks = np.concatenate(out_images), np.concatenate(out_masks)
  keep = masks.reshape(len(masks), -1).any(axis=1)
  return images[keep], masks[keep]


# ----------------------------------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------------------------------

PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def make_predict(inferencer, config, variables=None) -> PredictFn:
  """``images -> (maps, scores)`` at the images' own size with an ``inference.Inferencer``.

  Images at the model size go straight through; larger ones (the held-out and test images of a
  ``config.train_crop`` run, at ``config.load_size``) are tiled at their own resolution, the scale the
  model was trained at. ``variables``: other than the inferencer's (e.g. the training state).
  """
  size = inferencer.size
  overlap = float(config.predict.tile_overlap)

  def predict(images):
    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
      return inferencer.model_size(images, variables)
    maps, scores = inferencer.images(list(images), tile=True, tile_scale=1.0, tile_overlap=overlap,
                                     variables=variables)
    return np.stack(maps), scores

  return predict


def score(predict: PredictFn, vset: ValidationSet) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """Scores the validation set.

  Args:
    predict: ``images uint8 (N, H, W, 3) -> (maps float (N, H, W), scores float (N,))``, e.g.
      ``inference.Inferencer(...).model_size`` with the current variables.
    vset: the validation set.

  Returns:
    ``(metrics, clean_maps, clean_scores)``: ``{"val_pixel_ap", "val_pixel_auroc", "val_image_auroc"}``
    (NaN where the set has no synthetic anomaly) and the clean images' maps (M, H, W) and scores (M,)
    for the thresholds.
  """
  clean_maps, clean_scores = predict(vset.clean)
  out = {name: float("nan") for name in METRIC_NAMES}
  if not (np.isfinite(clean_maps).all() and np.isfinite(clean_scores).all()):
    return out, clean_maps, clean_scores  # a diverged model: nothing to score (the caller says so)
  if len(vset.synthetic):
    syn_maps, syn_scores = predict(vset.synthetic)
    if not (np.isfinite(syn_maps).all() and np.isfinite(syn_scores).all()):
      return out, clean_maps, clean_scores
    masks = np.concatenate([np.zeros(clean_maps.shape, bool), vset.synthetic_masks])
    maps = np.concatenate([clean_maps, syn_maps])
    labels = np.concatenate([np.zeros(len(clean_scores), np.int32), np.ones(len(syn_scores), np.int32)])
    out["val_pixel_ap"] = metrics_lib.average_precision(masks, maps)
    out["val_pixel_auroc"] = metrics_lib.auroc(masks, maps)
    out["val_image_auroc"] = metrics_lib.auroc(labels, np.concatenate([clean_scores, syn_scores]))
  return out, clean_maps, clean_scores


def calibrate(config, clean_maps, clean_scores, source: str) -> dict[str, Any]:
  """Normal-only thresholds at ``config.threshold``'s targets from the clean held-out maps."""
  return thresholds_lib.calibrate(clean_maps, clean_scores, float(config.threshold.image_fpr),
                                  float(config.threshold.pixel_fpr), source)


def run(predict: PredictFn, vset: ValidationSet, config, workdir=None, step: int | None = None):
  """Scores ``vset`` and, with ``workdir`` and ``step``, stores the thresholds of that step.

  Returns:
    ``(metrics, thresholds)``; thresholds None (nothing stored) when the model's maps are not finite.
  """
  values, clean_maps, clean_scores = score(predict, vset)
  if not (np.isfinite(clean_maps).all() and np.isfinite(clean_scores).all()):
    logging.warning("validation%s: the model's anomaly maps are not finite (diverged weights); no "
                    "thresholds stored.", "" if step is None else f" at step {step}")
    return values, None
  th = calibrate(config, clean_maps, clean_scores, vset.source)
  if workdir is not None and step is not None:
    rundir.write_thresholds(workdir, step, th)
  return values, th


# ----------------------------------------------------------------------------------------------------
# Model selection on the synthetic validation.
# ----------------------------------------------------------------------------------------------------

class BestKeeper:
  """Keeps the model with the best ``val_pixel_ap`` in ``WORKDIR/best`` (one model-only checkpoint)."""

  def __init__(self, workdir):
    self.workdir = rundir.path(workdir)
    record = read_record(self.workdir) or {}
    best = record.get("best") or {}
    self.step = best.get("step")
    self.value = best.get("val_pixel_ap", -np.inf)

  def update(self, step: int, values: dict[str, float], variables) -> bool:
    """Saves ``variables`` when ``values["val_pixel_ap"]`` beats the best so far; returns whether."""
    value = values.get("val_pixel_ap", float("nan"))
    if not np.isfinite(value) or value <= self.value:
      return False
    with checkpointing.manager(self.workdir / BEST_DIR, keep=1, async_save=False) as mngr:
      checkpointing.save(mngr, step, variables)
      mngr.wait_until_finished()
    self.step, self.value = int(step), float(value)
    if jax.process_index() == 0:
      record = read_record(self.workdir) or {}
      record["best"] = {"step": self.step, "val_pixel_ap": self.value, "selected_by": "val_pixel_ap"}
      rundir.write_json(validation_file(self.workdir), record)
    logging.info("validation: new best val_pixel_ap %.4f at step %d (kept in %s)", value, step,
                 self.workdir / BEST_DIR)
    return True


def restore_selected(workdir, config, step: int | None = None, sharding=None):
  """The model a run's config selects: the best one for ``select="best"``, else the newest.

  ``step`` restores exactly that regular checkpoint.

  Returns:
    ``(model, variables, step, selected)`` with ``selected`` "best" or "last" (or "step").
  """
  if step is not None:
    model, variables, step = rundir.restore_model(workdir, config, step=step, sharding=sharding)
    return model, variables, step, "step"
  select = config.validation.select
  record = read_record(workdir) or {}
  if select == "best" and record.get("best"):
    from draem_jax import steps  # pylint: disable=g-import-not-at-top
    model = steps.build_model(config)
    abstract = rundir.abstract_variables(model, config.image_size, sharding)
    step, variables, _, _ = checkpointing.restore_intact(rundir.path(workdir) / BEST_DIR, abstract)
    return model, variables, step, "best"
  model, variables, step = rundir.restore_model(workdir, config, sharding=sharding)
  return model, variables, step, "last"


# ----------------------------------------------------------------------------------------------------
# During training.
# ----------------------------------------------------------------------------------------------------

def num_train_images(config, num_files: int) -> int:
  """How many of ``num_files`` train/good images are trained on after the hold-out split."""
  if not enabled(config):
    return num_files
  train, _ = split_indices(num_files, float(config.validation.fraction), config.seed)
  return len(train)


class Validator:
  """Scores the validation set during training, logs it, stores thresholds and keeps the best model.

  ``run(step, variables)`` at every checkpoint (so every saved step has thresholds) and whenever
  ``due(step)``: writes ``val_pixel_ap``, ``val_pixel_auroc``, ``val_image_auroc`` and the thresholds
  as one row of ``metrics.jsonl`` (and TensorBoard), stores the thresholds of ``step``, and under
  ``select="best"`` saves the model to ``WORKDIR/best`` when ``val_pixel_ap`` improved. Without a
  validation set every call does nothing.
  """

  def __init__(self, config, workdir, model, vset: ValidationSet | None, writer, mesh=None):
    self.config, self.workdir, self.vset, self.writer = config, rundir.path(workdir), vset, writer
    self.every = int(config.validation.every_steps) if vset is not None else 0
    self.best = BestKeeper(workdir) if vset is not None and config.validation.select == "best" else None
    self._inferencer = None
    if vset is not None:
      from draem_jax import inference  # pylint: disable=g-import-not-at-top  (inference imports steps)
      self._inferencer = inference.Inferencer(model, None, config, mesh=mesh)
    self._done = set()

  def due(self, step: int) -> bool:
    return self.vset is not None and self.every > 0 and step % self.every == 0

  def run(self, step: int, variables) -> dict[str, float]:
    """Validates ``variables`` (the model of ``step``); returns the logged values (empty when off)."""
    if self.vset is None or step in self._done:
      return {}
    self._done.add(step)
    predict = make_predict(self._inferencer, self.config, variables)
    values, th = run(predict, self.vset, self.config, self.workdir, step)
    row = dict(values)
    if th is not None:
      row.update(threshold_image=th["image"], threshold_pixel=th["pixel"])
    self.writer.write_scalars(step, row)
    logging.info("validation step %d: pixel AP %.4f, pixel AUROC %.4f, image AUROC %.4f (%d held-out "
                 "+ %d synthetic)", step, values["val_pixel_ap"], values["val_pixel_auroc"],
                 values["val_image_auroc"], len(self.vset.clean), len(self.vset.synthetic))
    if self.best is not None:
      self.best.update(step, values, variables)
    return row
