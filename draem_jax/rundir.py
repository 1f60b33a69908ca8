"""The run directory: everything a run keeps in ``WORKDIR``, and the rules for reusing it.

Layout::

  WORKDIR/config.json        the config the run was trained (or converted) with: values, not names
  WORKDIR/checkpoints/<step> orbax checkpoints (``checkpointing``)
  WORKDIR/metrics.jsonl      training curves, one JSON object per logged step
  WORKDIR/tensorboard/       the same as TensorBoard events (with tensorboardX)
  WORKDIR/thresholds.json    normal-only decision thresholds, per checkpoint step
  WORKDIR/eval/              the evaluation report

Rules: nothing a run wrote is deleted; setting a run aside renames its entries to
``<name>.replaced-<time>``. A resumed run must have the same config except for the bookkeeping fields
(``recipes.BOOKKEEPING_FIELDS``; deny by default). Every path goes through ``etils.epath``, so a ``gs://``
work directory works wherever orbax's checkpoints do.
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from draem_jax import checkpointing
from draem_jax import parallel
from draem_jax import recipes

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
THRESHOLDS_FILE = "thresholds.json"
# Everything a run writes into its work directory (user data beside it is never touched).
RUN_ENTRIES = (checkpointing.CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, "tensorboard", THRESHOLDS_FILE,
               "validation.json", "best", "eval")


class RunError(FileNotFoundError):
  """The work directory holds no usable run (one line, naming the path and what to do)."""


class ConfigChangedError(ValueError):
  """A run would be resumed with a config that trains something else."""


def path(workdir) -> epath.Path:
  """``workdir`` as an ``epath.Path`` (local or a ``gs://`` URL), made absolute when local."""
  p = epath.Path(workdir)
  return p if "://" in str(workdir) else epath.Path(p.expanduser().resolve())


# ----------------------------------------------------------------------------------------------------
# JSON records, written atomically.
# ----------------------------------------------------------------------------------------------------

def write_json(file, obj: Any) -> None:
  """Writes ``obj`` as JSON through a temporary file and a rename: readers see the old or the new."""
  file = epath.Path(file)
  file.parent.mkdir(parents=True, exist_ok=True)
  tmp = file.parent / f".{file.name}.tmp"
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  tmp.rename(file) if "://" in str(file) else tmp.replace(file)


def read_json(file) -> Any:
  """Reads a JSON file; a damaged one raises RunError naming it."""
  file = epath.Path(file)
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise RunError(f"{file} is not valid JSON ({e}); restore it from a copy or set the run aside.") from None


def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  """Records ``config`` as ``WORKDIR/config.json`` (process 0 only)."""
  if jax.process_index() == 0:
    write_json(path(workdir) / CONFIG_FILE, json.loads(config.to_json()))


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a run was trained (or converted) with, from ``WORKDIR/config.json``.

  A record from an older version (or an older converter) lacks the fields added since; the run behaved
  as ``recipes.BEFORE_FIELD_EXISTED`` and otherwise the recipe's defaults describe, so they are
  completed from the recipe (``recipes.complete``, logged) and code reads every field directly. The
  resume check compares the record as written (deny by default).
  """
  file = path(workdir) / CONFIG_FILE
  if not file.exists():
    raise RunError(
        f"{file} not found: {workdir} is not a draem_jax run. Train one with "
        "`python -m draem_jax.train --config=... --workdir=...` or convert released weights with "
        "`python -m draem_jax.convert`.")
  recorded = read_json(file)
  if not isinstance(recorded, dict):
    raise RunError(f"{file} holds {type(recorded).__name__}, not a config object; restore it from a copy "
                   "or set the run aside.")
  try:
    config, filled = recipes.complete(recorded, recipes.BEFORE_FIELD_EXISTED)
  except ValueError as e:
    raise RunError(f"{file}: {e}; restore it from a copy or set the run aside.") from None
  if filled:
    logging.warning("%s lacks %d field(s) added since it was recorded; using the recipe's values: %s",
                    file, len(filled), ", ".join(filled))
  return ml_collections.ConfigDict(config)


def existing_run_entries(workdir) -> list[str]:
  """The entries of ``RUN_ENTRIES`` present in ``workdir``."""
  root = path(workdir)
  return [n for n in RUN_ENTRIES if (root / n).exists()]


def set_run_aside(workdir) -> tuple[list[str], str]:
  """Renames a previous run's entries to ``<name>.replaced-<time>``: nothing is ever deleted.

  Returns:
    The renamed entry names and the time stamp used.
  """
  root = path(workdir)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  while any((root / f"{n}.replaced-{stamp}").exists() for n in RUN_ENTRIES):
    time.sleep(1.0)  # two set-asides within one second: never reuse a name
    stamp = time.strftime("%Y%m%d-%H%M%S")
  renamed = existing_run_entries(root)
  for name in renamed:
    (root / name).rename(root / f"{name}.replaced-{stamp}")
  return renamed, stamp


# ----------------------------------------------------------------------------------------------------
# Resume: deny by default.
# ----------------------------------------------------------------------------------------------------

def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, (dict, ml_collections.ConfigDict)):
    out = {}
    for k, v in dict(tree).items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  if isinstance(tree, (list, tuple)):  # JSON has no tuples: compare sequences as lists
    return {prefix[:-1]: list(tree)}
  return {prefix[:-1]: tree}


def _is_bookkeeping(field: str) -> bool:
  return any(field == b or field.startswith(b + ".") for b in recipes.BOOKKEEPING_FIELDS)


def config_changes(saved, config) -> list[str]:
  """``"field: old -> new"`` for every field that differs and is not bookkeeping."""
  a = _flatten(json.loads(saved.to_json()) if hasattr(saved, "to_json") else saved)
  b = _flatten(json.loads(config.to_json()))
  missing = object()
  changes = []
  for field in sorted(set(a) | set(b)):
    if _is_bookkeeping(field):
      continue
    old, new = a.get(field, missing), b.get(field, missing)
    if old is missing:  # the run trained with what it did before the field existed (JSON: no tuples)
      old = recipes.BEFORE_FIELD_EXISTED.get(field, missing)
      old = list(old) if isinstance(old, tuple) else old
    if old != new:
      show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
      changes.append(f"{field}: {show(old)} -> {show(new)}")
  return changes


def check_resume(workdir, config) -> None:
  """Raises unless ``config`` may resume the run in ``workdir`` (one line naming what changed)."""
  file = path(workdir) / CONFIG_FILE
  if not file.exists():
    raise RunError(
        f"{workdir} holds checkpoints but no {CONFIG_FILE}, so what they were trained with is unknown. "
        "Use another --workdir, or --config.overwrite=True to set them aside and start again.")
  changes = config_changes(ml_collections.ConfigDict(read_json(file)), config)
  if changes:
    raise ConfigChangedError(
        f"{workdir} holds a run with a different config ({'; '.join(changes)}). Use another "
        "--workdir, or --config.overwrite=True to set the old run aside and start again.")


# ----------------------------------------------------------------------------------------------------
# Model variables.
# ----------------------------------------------------------------------------------------------------

def abstract_variables(model, image_size: int, sharding=None) -> dict[str, Any]:
  """``{"params", "batch_stats"}`` of ``model`` as ShapeDtypeStructs (no compute), with ``sharding``."""
  shape = (1, image_size, image_size, 3)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(shape, np.float32), train=False))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), dict(tree))


def restore_model(workdir, config, step: int | None = None, sharding=None):
  """Restores the model of a run: the newest intact checkpoint, or ``step``.

  A damaged newest checkpoint is set aside with a warning and the next one is used. ``sharding``: where
  the variables go (default: replicated over every device of the program). With
  ``config.ema_as_model`` the variables are the checkpoint's EMA weights (such a run writes them into
  every checkpoint, and cannot be resumed without the switch, so a checkpoint without them is damaged).

  Returns:
    ``(model, variables, step)`` with variables ``{"params", "batch_stats"}``.
  """
  from draem_jax import steps  # pylint: disable=g-import-not-at-top  (steps imports the data pipeline)
  model = steps.build_model(config)
  if sharding is None:
    # Replicated over this program's devices (all processes'): without a sharding orbax would restore
    # the layout the run was saved with, whose devices (e.g. another process's) need not exist here.
    sharding = parallel.replicated(parallel.make_mesh())
  abstract = abstract_variables(model, config.image_size, sharding)
  if config.get("ema_as_model", False):
    step, _, _, variables = checkpointing.restore_intact(path(workdir), None, step=step,
                                                         abstract_ema=abstract)
  else:
    step, variables, _, _ = checkpointing.restore_intact(path(workdir), abstract, step=step)
  return model, variables, step


# ----------------------------------------------------------------------------------------------------
# Normal-only thresholds, per checkpoint step.
# ----------------------------------------------------------------------------------------------------

def write_thresholds(workdir, step: int, thresholds: dict[str, Any]) -> None:
  """Stores the decision thresholds computed for checkpoint ``step``.

  Args:
    workdir: the run.
    step: checkpoint step the thresholds belong to.
    thresholds: ``{"image": float, "pixel": float, "image_fpr": float, "pixel_fpr": float,
      "num_images": int, "source": str}``.
  """
  if jax.process_index() != 0:
    return
  file = path(workdir) / THRESHOLDS_FILE
  table = read_json(file) if file.exists() else {}
  table[str(int(step))] = {**thresholds, "step": int(step)}
  write_json(file, table)


def read_thresholds(workdir, step: int) -> dict[str, Any] | None:
  """The thresholds stored for checkpoint ``step``, or None."""
  file = path(workdir) / THRESHOLDS_FILE
  if not file.exists():
    return None
  return read_json(file).get(str(int(step)))


def stored_threshold_steps(workdir) -> list[int]:
  """The checkpoint steps that have stored thresholds."""
  file = path(workdir) / THRESHOLDS_FILE
  return sorted(int(s) for s in read_json(file)) if file.exists() else []


def log_set_aside(workdir, renamed: list[str], stamp: str) -> None:
  logging.warning("%s of the previous run in %s renamed to *.replaced-%s", ", ".join(renamed), workdir,
                  stamp)
