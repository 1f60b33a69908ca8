r"""Imports PyTorch DRAEM weights (the official release or anomalib) into a draem_jax run directory.

Official checkpoints (two files per category, linked from the README of VitjanZ/DRAEM):

  python -m draem_jax.convert --workdir=workdirs/released/bottle \
      --reconstructive=DRAEM_seg_large_ae_large_0.0001_800_bs8_bottle_.pckl \
      --discriminative=DRAEM_seg_large_ae_large_0.0001_800_bs8_bottle__seg.pckl
  python -m draem_jax.evaluate --workdir=workdirs/released/bottle --data_dir=/data/mvtec

anomalib Lightning checkpoint: ``--anomalib_checkpoint=model.ckpt`` instead of the two files (add
``--allow_unknown_objects`` when its hyper-parameters hold Python objects: they are replaced by inert
placeholders, never imported). ``--config=configs/mvtec.py:<category>`` is optional: by default
configs/mvtec.py is used with the category found in the file name.

The files are read by ``torch_pickle`` (no torch, no code execution). The converted run holds the
``model`` item only (no optimizer state: it can be evaluated and used for prediction, not trained
further) and a ``config.json`` with:

* ``channel_order = "bgr"`` for the official weights: they were trained on OpenCV (BGR) images and their
  reconstruction is BGR too, and the discriminator sees [recon, image] in that order; flipping the input
  image once is exact, whereas permuting weights would also have to permute the reconstruction output.
  anomalib trains on RGB (PIL) images: "rgb".
* ``model.recon_width`` / ``model.disc_width`` from the tensors (128 / 64 for the release).
* ``num_epochs = 800`` for the official weights (their file names say 800 epochs); the checkpoint step
  is the number of optimizer steps they represent: 800 * ceil(N_train / 8) for the 15 MVTec AD
  categories (e.g. bottle 21,600), 0 when unknown (``--step`` overrides). For anomalib, the Lightning
  ``global_step``.

A work directory that already holds checkpoints or a config.json is left alone unless ``--overwrite``,
which renames the previous files aside (``*.replaced-<time>``) rather than deleting them.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from draem_jax import checkpointing
from draem_jax import models
from draem_jax import published
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import torch_pickle

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the library imports cleanly."""
  flags.DEFINE_string("reconstructive", None, "Official reconstructive-net file (*_.pckl).")
  flags.DEFINE_string("discriminative", None, "Official discriminative-net file (*__seg.pckl).")
  flags.DEFINE_string("anomalib_checkpoint", None, "anomalib Lightning checkpoint (.ckpt) of a DRAEM "
                      "model, instead of --reconstructive/--discriminative.")
  flags.DEFINE_string("workdir", None, "Run directory to create (checkpoints/, config.json).")
  config_flags.DEFINE_config_file(
      "config", None, "Config of the run, e.g. configs/mvtec.py:bottle (default: configs/mvtec.py with "
      "the category found in the checkpoint file name).", lock_config=False)
  flags.DEFINE_bool("overwrite", False, "Set an existing run in --workdir aside (renamed, not deleted).")
  flags.DEFINE_integer("step", None, "Checkpoint step to record (default: see the module docstring).")
  flags.DEFINE_bool("allow_unknown_objects", False, "Read checkpoints whose non-weight entries hold "
                    "Python objects (Lightning hyper-parameters): they become inert placeholders and "
                    "are discarded.")
  flags.mark_flags_as_required(["workdir"])


RELEASED_EPOCHS = 800  # file names DRAEM_seg_large_ae_large_0.0001_800_bs8_<category>_.pckl
RELEASED_BATCH_SIZE = 8  # the original trainer makes ceil(N / 8) steps per epoch (drop_last=False)

ANOMALIB_PREFIXES = {"reconstructive": "reconstructive_subnetwork.",
                     "discriminative": "discriminative_subnetwork."}


class ConversionError(ValueError):
  """The state dicts do not describe DRAEM's networks (unknown/missing key, wrong shape, SSPCAB...)."""


# ----------------------------------------------------------------------------------------------------
# Library: state dicts -> flax variables.
# ----------------------------------------------------------------------------------------------------

_LEAF_TO_TORCH = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
                  "var": "running_var"}


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
  """Inverse of ``models.torch_key_to_flax`` within one sub-network.

  Args:
    path: e.g. ("encoder", "block1", "conv_0", "kernel") or ("decoder_segment", "up_b", "bn_2", "mean").

  Returns:
    The torch state_dict key, e.g. "encoder.block1.0.weight", "decoder_segment.up_b.2.running_mean".
  """
  parent, block, layer, leaf = path
  return f"{parent}.{block}.{layer.split('_')[-1]}.{_LEAF_TO_TORCH[leaf]}"


def abstract_variables(recon_width: int, disc_width: int) -> dict[str, Any]:
  """Shapes/dtypes of ``DRAEM(recon_width, disc_width)``'s ``{'params', 'batch_stats'}`` (no compute)."""
  # Variable shapes do not depend on the image size; 32x32 is the smallest valid input.
  return rundir.abstract_variables(models.DRAEM(recon_width=recon_width, disc_width=disc_width), 32)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _check_not_sspcab(sd: Mapping[str, np.ndarray], source: str) -> None:
  if any(re.match(r"encoder\.block5\.[a-z]", k) for k in sd):
    raise ConversionError(
        f"{source}: the reconstructive net has an SSPCAB block5 (anomalib enable_sspcab=True; keys like "
        "'encoder.block5.masked_conv1.weight'); draem_jax implements plain DRAEM only. Convert a model "
        "trained with enable_sspcab=False.")


def _infer_width(sd: Mapping[str, np.ndarray], key: str, source: str) -> int:
  if key not in sd:
    raise ConversionError(f"{source}: no '{key}' tensor, so this is not a DRAEM "
                          f"{'discriminative' if 'segment' in key else 'reconstructive'} state dict "
                          f"(first keys: {list(sd)[:4]}).")
  return int(np.shape(sd[key])[0])


def _convert_net(sd: Mapping[str, np.ndarray], net: str, expected: dict[tuple[str, ...], Any],
                 out: dict[str, dict], source: str) -> None:
  """Maps one sub-network's state dict into ``out[collection][net]``, checking every key and shape."""
  seen = set()
  for key, value in sd.items():
    try:
      mapped = models.torch_key_to_flax(key)
    except ValueError as e:
      raise ConversionError(f"{source}: unknown key {key!r}: not a tensor of DRAEM's {net} network "
                            f"({e})") from None
    if mapped is None:  # num_batches_tracked: flax does not count batches, but the BN must exist.
      bn = ("batch_stats", net, *key.split(".")[:2], f"bn_{key.split('.')[2]}", "mean")
      if bn not in expected:
        raise ConversionError(f"{source}: unknown key {key!r} (no such BatchNorm in the {net} network)")
      continue
    collection, path = mapped
    full = (collection, net, *path)
    if full not in expected:
      raise ConversionError(f"{source}: unknown key {key!r}: the {net} network at these widths has no "
                            f"{'/'.join(full)}")
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      raise ConversionError(f"{source}: {key!r} has dtype {value.dtype}, expected floating point")
    if path[-1] == "kernel":
      if value.ndim != 4:
        raise ConversionError(f"{source}: {key!r} has shape {value.shape}, expected a 4-D OIHW kernel")
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    want = tuple(expected[full].shape)
    if value.shape != want:
      shown = (want[3], want[2], want[0], want[1]) if path[-1] == "kernel" else want
      got = (value.shape[3], value.shape[2], value.shape[0], value.shape[1]) if path[-1] == "kernel" \
          else value.shape
      raise ConversionError(f"{source}: {key!r} has shape {got}, expected {shown} (torch layout) for "
                            "DRAEM at the inferred widths; is it the right network file?")
    _set(out, full, np.ascontiguousarray(value, dtype=np.float32))
    seen.add(full)
  missing = [p for p in expected if p[1] == net and p not in seen]
  if missing:
    names = [flax_path_to_torch_key(p[2:]) for p in missing]
    raise ConversionError(f"{source}: {len(missing)} tensor(s) of the {net} network missing, e.g. "
                          f"{names[:5]}")


def state_dicts_to_variables(recon_sd: Mapping[str, np.ndarray], disc_sd: Mapping[str, np.ndarray], *,
                             recon_width: int | None = None, disc_width: int | None = None,
                             recon_source: str = "reconstructive state dict",
                             disc_source: str = "discriminative state dict") -> dict[str, Any]:
  """Converts the two original DRAEM state dicts into ``DRAEM`` variables.

  Conv weights go OIHW -> HWIO; BN weight/bias/running_mean/running_var -> params scale/bias and
  batch_stats mean/var; ``num_batches_tracked`` is dropped. Every key must map to a variable of
  ``DRAEM(recon_width, disc_width)`` with the right shape and every variable must be provided.

  Args:
    recon_sd: ``ReconstructiveSubNetwork.state_dict()`` as ``{key: np.ndarray}`` (keys ``encoder.*``,
      ``decoder.*``).
    disc_sd: ``DiscriminativeSubNetwork.state_dict()`` (keys ``encoder_segment.*``, ``decoder_segment.*``)
      whose first conv reads [reconstruction, image] (the original order).
    recon_width: base width of the reconstructive net; None infers it from ``encoder.block1.0.weight``.
    disc_width: base width of the discriminative net; None infers it from
      ``encoder_segment.block1.0.weight``.
    recon_source: name of the reconstructive source in error messages (e.g. its file).
    disc_source: the same for the discriminative source.

  Returns:
    ``{"params": {"reconstructive": ..., "discriminative": ...}, "batch_stats": {...}}``, nested dicts
    of float32 NumPy arrays in the structure of ``DRAEM.init``.

  Raises:
    ConversionError: unknown or missing key, wrong shape or dtype, swapped files, SSPCAB weights.
  """
  if any(k.startswith("encoder_segment.") for k in recon_sd) and any(
      k.startswith("encoder.") for k in disc_sd):
    raise ConversionError(f"{recon_source} holds the discriminative net and {disc_source} the "
                          "reconstructive one: swap the two files (the discriminative one is *_seg.pckl).")
  _check_not_sspcab(recon_sd, recon_source)
  if recon_width is None:
    recon_width = _infer_width(recon_sd, "encoder.block1.0.weight", recon_source)
  if disc_width is None:
    disc_width = _infer_width(disc_sd, "encoder_segment.block1.0.weight", disc_source)
  abstract = abstract_variables(recon_width, disc_width)
  expected = {(c, *p): v for c in ("params", "batch_stats") for p, v in _flatten(abstract[c]).items()}
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  _convert_net(recon_sd, "reconstructive", expected, out, recon_source)
  _convert_net(disc_sd, "discriminative", expected, out, disc_source)
  return out


def split_anomalib_state_dict(sd: Mapping[str, np.ndarray], source: str = "anomalib state dict"
                              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
  """Splits an anomalib DRAEM state dict into (reconstructive, discriminative, ignored keys).

  Keys are ``model.reconstructive_subnetwork.*`` / ``model.discriminative_subnetwork.*`` (Lightning
  module) or the same without ``model.`` (``DraemModel.state_dict()``). Keys outside ``model.`` belong
  to anomalib's pre/post-processing and metrics (thresholds, normalisation statistics), which draem_jax
  does not use: they are returned as ignored. An unknown key inside ``model.`` is an error.
  """
  lightning = any(k.startswith("model.") for k in sd)
  root = "model." if lightning else ""
  nets: dict[str, dict[str, np.ndarray]] = {"reconstructive": {}, "discriminative": {}}
  ignored = []
  for key, value in sd.items():
    if not key.startswith(root):
      ignored.append(key)
      continue
    rest = key[len(root):]
    for net, prefix in ANOMALIB_PREFIXES.items():
      if rest.startswith(prefix):
        nets[net][rest[len(prefix):]] = value
        break
    else:
      raise ConversionError(f"{source}: unknown key {key!r} (expected {root}reconstructive_subnetwork.* "
                            f"or {root}discriminative_subnetwork.*)")
  if not nets["reconstructive"] or not nets["discriminative"]:
    raise ConversionError(f"{source}: not an anomalib DRAEM state dict (no {root}reconstructive_subnetwork."
                          f" / {root}discriminative_subnetwork. keys; first keys: {list(sd)[:4]})")
  return nets["reconstructive"], nets["discriminative"], ignored


def anomalib_state_dict_to_variables(sd: Mapping[str, np.ndarray], *, recon_width: int | None = None,
                                     disc_width: int | None = None,
                                     source: str = "anomalib state dict") -> dict[str, Any]:
  """Converts an anomalib DRAEM state dict into ``DRAEM`` variables (original [recon, image] order).

  anomalib feeds its discriminator [image, reconstruction] (docs/paper_vs_code.md), so input channels 0:3 and
  3:6 of ``encoder_segment.block1.0.weight`` are swapped; ``DRAEM`` (disc_input_order "recon_image")
  then computes the same function. Keys outside ``model.`` are ignored (logged).

  Args:
    sd: the Lightning ``state_dict`` (or ``DraemModel.state_dict()``) as ``{key: np.ndarray}``.
    recon_width: see ``state_dicts_to_variables``.
    disc_width: see ``state_dicts_to_variables``.
    source: name of the source in error messages.

  Returns:
    ``{"params", "batch_stats"}`` as ``state_dicts_to_variables``.

  Raises:
    ConversionError: as ``state_dicts_to_variables``; SSPCAB models (``enable_sspcab=True``) are refused.
  """
  recon_sd, disc_sd, ignored = split_anomalib_state_dict(sd, source)
  if ignored:
    logging.info("%s: ignoring %d non-model entries (anomalib pre/post-processing): %s", source,
                 len(ignored), ", ".join(ignored[:10]))
  first = "encoder_segment.block1.0.weight"
  if first in disc_sd:
    w = np.asarray(disc_sd[first])
    if w.ndim != 4 or w.shape[1] != 6:
      raise ConversionError(f"{source}: discriminative_subnetwork.{first} has shape {w.shape}, expected "
                            "(C, 6, 3, 3) (input [image, reconstruction])")
    disc_sd = dict(disc_sd)
    disc_sd[first] = np.concatenate([w[:, 3:6], w[:, 0:3]], axis=1)  # [image, recon] -> [recon, image]
  return state_dicts_to_variables(recon_sd, disc_sd, recon_width=recon_width, disc_width=disc_width,
                                  recon_source=f"{source} (reconstructive_subnetwork)",
                                  disc_source=f"{source} (discriminative_subnetwork)")


# ----------------------------------------------------------------------------------------------------
# Writing a run directory.
# ----------------------------------------------------------------------------------------------------

def released_step(category: str) -> int:
  """Optimizer steps behind the released weights of an MVTec category (800 epochs, batch 8), else 0."""
  n = published.TRAIN_IMAGES.get(category)
  return 0 if n is None else RELEASED_EPOCHS * math.ceil(n / RELEASED_BATCH_SIZE)


def category_from_filename(path: str) -> str | None:
  """The MVTec category named in a checkpoint file name (e.g. ``..._bs8_bottle_.pckl``), or None."""
  name = os.path.basename(path)
  # Longest first, and delimited, so that e.g. "metal_nut" is not read as something shorter.
  for category in sorted(published.CATEGORIES, key=len, reverse=True):
    if re.search(rf"(^|[^a-z]){category}([^a-z]|$)", name):
      return category
  return None


def default_config(category: str) -> ml_collections.ConfigDict:
  """The recipe of ``configs/mvtec.py:<category>`` (``recipes.mvtec``)."""
  return recipes.mvtec(category)


def run_config(config: ml_collections.ConfigDict, variables: Mapping[str, Any], *, channel_order: str,
               num_epochs: int | None) -> ml_collections.ConfigDict:
  """A copy of ``config`` describing the converted weights (widths, float32, channel order, epochs)."""
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; the caller's stays as it is
  config.model.recon_width = int(variables["params"]["reconstructive"]["encoder"]["block1"]["conv_0"]
                                 ["kernel"].shape[-1])
  config.model.disc_width = int(variables["params"]["discriminative"]["encoder_segment"]["block1"]
                                ["conv_0"]["kernel"].shape[-1])
  config.channel_order = channel_order
  if num_epochs is not None:
    config.num_epochs = num_epochs
  return config


def _existing_run(workdir: str, overwrite: bool) -> list[str]:
  """The entries of a previous run in ``workdir``; raises FileExistsError if any and not ``overwrite``."""
  existing = rundir.existing_run_entries(workdir)
  if existing and not overwrite:
    raise FileExistsError(f"{workdir} already holds a run ({', '.join(existing)}); nothing was written. "
                          "Use another --workdir, or --overwrite to rename the old files aside.")
  return existing


def write_run(workdir: str, variables: Mapping[str, Any], config: ml_collections.ConfigDict, *,
              step: int = 0, overwrite: bool = False) -> str:
  """Writes ``config.json`` and a model-only orbax checkpoint at ``step`` into ``workdir``.

  Args:
    workdir: run directory (created).
    variables: ``{"params", "batch_stats"}`` of ``DRAEM`` at ``config.model`` widths.
    config: the run config (see ``run_config``).
    step: checkpoint step recorded.
    overwrite: when the directory already holds a run (checkpoints/, config.json, ...), rename those
      entries to ``*.replaced-<time>`` instead of refusing.

  Returns:
    The absolute work directory.

  Raises:
    FileExistsError: the directory holds a run and ``overwrite`` is False.
  """
  workdir = os.path.abspath(workdir)
  existing = _existing_run(workdir, overwrite)
  if existing:
    renamed, stamp = rundir.set_run_aside(workdir)
    logging.warning("--overwrite: renamed %s in %s to *.replaced-%s", renamed, workdir, stamp)
  rundir.write_config(workdir, config)
  with checkpointing.manager(workdir, keep=None, async_save=False) as mngr:
    checkpointing.save(mngr, step, dict(variables))
    mngr.wait_until_finished()
  return workdir


class Converted(NamedTuple):
  """Converted weights and what the run directory should record about them."""
  variables: dict[str, Any]  # {"params", "batch_stats"} of DRAEM
  channel_order: str  # "bgr" (official release) or "rgb" (anomalib)
  step: int | None  # optimizer steps the weights represent, when known from the checkpoint
  num_epochs: int | None  # epochs the weights were trained for, when known
  category: str | None  # MVTec category named in the file name


def load_converted(*, reconstructive: str | None = None, discriminative: str | None = None,
                   anomalib_checkpoint: str | None = None, allow_unknown_objects: bool = False
                   ) -> Converted:
  """Reads and converts either the two official files or one anomalib checkpoint.

  Args:
    reconstructive: official ``*_.pckl`` (reconstructive state dict).
    discriminative: official ``*__seg.pckl`` (discriminative state dict).
    anomalib_checkpoint: anomalib Lightning ``.ckpt`` (instead of the two files).
    allow_unknown_objects: see ``torch_pickle.load``.

  Returns:
    ``Converted``; for anomalib the step is the checkpoint's ``global_step`` (None if absent).

  Raises:
    ValueError: wrong flag combination, unreadable file (``torch_pickle.CheckpointFormatError``) or
      weights that are not DRAEM's (``ConversionError``).
  """
  if anomalib_checkpoint:
    if reconstructive or discriminative:
      raise ValueError("pass either --anomalib_checkpoint or --reconstructive/--discriminative, not both")
    ckpt = torch_pickle.load(anomalib_checkpoint, allow_unknown_objects=allow_unknown_objects)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, np.ndarray) for v in sd.values()):
      raise ConversionError(f"{anomalib_checkpoint}: no state dict of tensors in this checkpoint")
    step = ckpt.get("global_step")
    variables = anomalib_state_dict_to_variables(sd, source=anomalib_checkpoint)
    # anomalib trains on RGB (PIL) images; its epoch count is not a recipe constant (early stopping).
    return Converted(variables, "rgb", step if isinstance(step, int) else None, None,
                     category_from_filename(anomalib_checkpoint))
  if not (reconstructive and discriminative):
    raise ValueError("pass --reconstructive=FILE.pckl and --discriminative=FILE_seg.pckl (the official "
                     "release), or --anomalib_checkpoint=FILE.ckpt")
  recon_sd = torch_pickle.load_state_dict(reconstructive, allow_unknown_objects=allow_unknown_objects)
  disc_sd = torch_pickle.load_state_dict(discriminative, allow_unknown_objects=allow_unknown_objects)
  variables = state_dicts_to_variables(recon_sd, disc_sd, recon_source=reconstructive,
                                       disc_source=discriminative)
  return Converted(variables, "bgr", None, RELEASED_EPOCHS, category_from_filename(reconstructive))


# ----------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    _existing_run(os.path.abspath(FLAGS.workdir), FLAGS.overwrite)  # fail before the slow part
    conv = load_converted(reconstructive=FLAGS.reconstructive, discriminative=FLAGS.discriminative,
                          anomalib_checkpoint=FLAGS.anomalib_checkpoint,
                          allow_unknown_objects=FLAGS.allow_unknown_objects)
    config = FLAGS.config
    if config is None:
      if conv.category is None:
        raise ValueError("no MVTec category in the checkpoint file name: pass "
                         "--config=configs/mvtec.py:<category>")
      config = default_config(conv.category)
    elif conv.category is not None and conv.category != config.category:
      logging.warning("The file name says category %r but the config says %r; using the config.",
                      conv.category, config.category)
    step = conv.step
    if FLAGS.step is not None:
      step = FLAGS.step
    elif step is None:
      step = released_step(config.category) if conv.channel_order == "bgr" else 0
    config = run_config(config, conv.variables, channel_order=conv.channel_order,
                        num_epochs=conv.num_epochs)
    workdir = write_run(FLAGS.workdir, conv.variables, config, step=step, overwrite=FLAGS.overwrite)
  except (OSError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  n = sum(int(np.size(v)) for v in jax.tree.leaves(conv.variables["params"]))
  print(f"Wrote {workdir}: {n:,} parameters (widths {config.model.recon_width}/"
        f"{config.model.disc_width}), checkpoint step {step}, channel_order={config.channel_order}, "
        f"category {config.category}.\nEvaluate with: python -m draem_jax.evaluate --workdir={workdir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
