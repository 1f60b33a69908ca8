"""Orbax checkpoints of a DRAEM run, behind a small interface.

A checkpoint holds two items so that evaluation and conversion need only the model:

* ``model``: ``{"params": ..., "batch_stats": ...}`` of the ``DRAEM`` module;
* ``train``: ``{"step", "opt_state", "key"}``: what training needs to resume exactly (the data
  position is a pure function of the step, so no iterator state is stored).

Orbax writes each step into a temporary folder and renames it when complete, so a checkpoint on disk is
either whole or absent; an interrupted save never damages the previous one.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(workdir: str, *, keep: int | None = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager for ``WORKDIR/checkpoints``.

  The caller decides when to save (every ``save`` call writes); orbax's own interval logic always
  saves the first step it sees, which would write an unrequested checkpoint after each resume.

  Args:
    workdir: the run's work directory (shared by all processes on multi-host runs).
    keep: number of most recent checkpoints kept; None keeps all.
    async_save: write in a background thread (the train step goes on meanwhile).
    read_only: never create or delete anything (evaluation, prediction).
  """
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else 1,
      max_to_keep=None if read_only else keep,
      enable_async_checkpointing=async_save,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("model", "train"))


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step in ``workdir``, or None when there is none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with manager(workdir, read_only=True) as mngr:
    return mngr.latest_step()


def save(mngr: ocp.CheckpointManager, step: int, model: Any, train: Any | None = None) -> bool:
  """Saves ``model`` (and ``train`` when given) at ``step``; returns whether a save was started."""
  items = {"model": ocp.args.StandardSave(model)}
  if train is not None:
    items["train"] = ocp.args.StandardSave(train)
  return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_model: Any,
            abstract_train: Any | None = None) -> tuple[Any, Any | None]:
  """Restores the items of ``step`` into the structure (and shardings) of the abstract trees.

  Args:
    mngr: the manager.
    step: which checkpoint.
    abstract_model: a tree of ``jax.ShapeDtypeStruct`` (with shardings) or arrays for the model item.
    abstract_train: the same for the train item, or None to skip it (evaluation, prediction).

  Returns:
    ``(model, train)``; ``train`` is None when not requested.
  """
  items = {"model": ocp.args.StandardRestore(abstract_model)}
  if abstract_train is not None:
    items["train"] = ocp.args.StandardRestore(abstract_train)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored["model"], (restored["train"] if abstract_train is not None else None)


def has_train_state(workdir: str, step: int) -> bool:
  """Whether checkpoint ``step`` holds the resumable train item (converted weights hold only a model)."""
  return os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), "train"))


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding stand-ins of a tree of arrays, for restoring into the same layout."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# Everything a run writes into its work directory (besides user data, which is never touched).
RUN_ENTRIES = (CHECKPOINT_DIR, "config.json", "metrics.jsonl", "eval")


def existing_run_entries(workdir: str) -> list[str]:
  """The entries of ``RUN_ENTRIES`` present in ``workdir``."""
  return [n for n in RUN_ENTRIES if os.path.exists(os.path.join(workdir, n))]


def set_run_aside(workdir: str) -> tuple[list[str], str]:
  """Renames a previous run's entries to ``<name>.replaced-<time>``: nothing is ever deleted.

  Returns:
    The renamed entry names and the time stamp used.
  """
  stamp = time.strftime("%Y%m%d-%H%M%S")
  renamed = existing_run_entries(workdir)
  for name in renamed:
    path = os.path.join(workdir, name)
    os.rename(path, f"{path}.replaced-{stamp}")
  return renamed, stamp


def write_config(workdir: str, config) -> None:
  """Writes ``WORKDIR/config.json`` atomically (temporary file + rename)."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, os.path.join(workdir, "config.json"))
