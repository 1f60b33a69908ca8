"""Orbax checkpoints of a DRAEM run, behind a small interface.

A checkpoint holds two items so that evaluation and conversion need only the model:

* ``model``: ``{"params": ..., "batch_stats": ...}`` of the ``DRAEM`` module;
* ``train``: ``{"step", "opt_state", "key"}``: what training needs to resume exactly (the data
  position is a pure function of the step, so no iterator state is stored);
* ``ema`` (only with ``config.ema_decay`` > 0): ``{"params": EMA params, "batch_stats": ...}``, shaped
  like ``model``, so evaluation restores it with the model's abstract tree and resuming restores it too.

Orbax writes each step into a temporary folder and renames it when complete, so an interrupted save
never damages the previous checkpoint. A checkpoint can still be damaged afterwards (a truncated copy of
a work directory, a file deleted by hand, a clean-up of an old step killed half way): ``restore_intact``
then sets it aside into ``WORKDIR/damaged_checkpoints/`` (renamed, never deleted) with a warning and uses
the newest intact one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging as std_logging
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
EMA_ITEM = "ema"
DAMAGED_DIR = "damaged_checkpoints"


class NoCheckpointError(FileNotFoundError):
  """No (intact) checkpoint to restore; the message names the folder."""


def checkpoint_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINT_DIR


def manager(workdir, *, keep: int | None = 3, async_save: bool = True,
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
  if not read_only:
    _no_replica_parallel_saving_on_cpu()
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else 1,
      max_to_keep=None if read_only else keep,
      enable_async_checkpointing=async_save,
      read_only=read_only,
      create=not read_only,
  )
  with _quiet(_READ_ONLY_WARNING):  # read-only is what evaluation and prediction ask for
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("model", "train", EMA_ITEM))


@functools.cache  # once per process
def _no_replica_parallel_saving_on_cpu() -> None:
  """On CPU, orbax's replica-parallel saving only costs: it slices every replicated array into one piece
  per device, each an eagerly dispatched op (~2000 per save of a small DRAEM on 8 host devices, 5 s of a
  tiny test run's 6), to spread device-to-host copies that the CPU does not need. Orbax already turns it
  off for GPUs (by ``JAX_PLATFORMS``); this turns it off where every device is a CPU, on a copy of orbax's
  own global handler for ``jax.Array`` (a new handler would lose its array-metadata store, which keeps
  typed PRNG keys typed). The files written are the same; other checkpoints of the process save the
  same way. Where orbax's handler has no such switch, nothing changes."""
  if not all(d.platform == "cpu" for d in jax.devices()):
    return
  handler = copy.copy(ocp.type_handlers.get_type_handler(jax.Array))
  if getattr(handler, "_use_replica_parallel", False):
    handler._use_replica_parallel = False  # pylint: disable=protected-access
    with _quiet(_OVERRIDE_WARNING):
      ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


# orbax's warnings for what this module does on purpose (their format strings).
_OVERRIDE_WARNING = 'Type handler registry type "%s" overriding %s'
_READ_ONLY_WARNING = "Given directory is read only=%s"


class _Drop(std_logging.Filter):
  def __init__(self, message: str):
    super().__init__()
    self._message = message

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.msg != self._message


@contextlib.contextmanager
def _quiet(message: str):
  """Drops orbax's log record with format ``message`` meanwhile (it logs through absl's logger)."""
  drop = _Drop(message)
  logger = logging.get_absl_logger()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def all_steps(workdir) -> list[int]:
  """Every checkpoint step on disk, oldest first (intact or not)."""
  if not checkpoint_dir(workdir).is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)))  # finalized steps, no manager


def latest_step(workdir) -> int | None:
  """The newest checkpoint step on disk, or None when there is none."""
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def save(mngr: ocp.CheckpointManager, step: int, model: Any, train: Any | None = None,
         ema: Any | None = None) -> bool:
  """Saves ``model`` (and ``train``, ``ema`` when given) at ``step``; returns whether a save was started."""
  items = {"model": ocp.args.StandardSave(model)}
  if train is not None:
    items["train"] = ocp.args.StandardSave(train)
  if ema is not None:
    items[EMA_ITEM] = ocp.args.StandardSave(ema)
  return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_model: Any | None,
            abstract_train: Any | None = None,
            abstract_ema: Any | None = None) -> tuple[Any, Any | None, Any | None]:
  """Restores the items of ``step`` into the structure (and shardings) of the abstract trees.

  Args:
    mngr: the manager.
    step: which checkpoint.
    abstract_model: a tree of ``jax.ShapeDtypeStruct`` (with shardings) or arrays for the model item, or
      None to skip it (the EMA weights alone).
    abstract_train: the same for the train item, or None to skip it (evaluation, prediction).
    abstract_ema: the same (model-shaped) for the EMA item, or None to skip it.

  Returns:
    ``(model, train, ema)``; an item not requested is None.
  """
  wanted = {"model": abstract_model, "train": abstract_train, EMA_ITEM: abstract_ema}
  restored = mngr.restore(step, args=ocp.args.Composite(
      **{name: ocp.args.StandardRestore(tree) for name, tree in wanted.items() if tree is not None}))
  return tuple(restored[name] if tree is not None else None for name, tree in wanted.items())


def has_train_state(workdir, step: int) -> bool:
  """Whether checkpoint ``step`` holds the resumable train item (converted weights hold only a model)."""
  return (checkpoint_dir(workdir) / str(step) / "train").is_dir()


def has_ema(workdir, step: int) -> bool:
  """Whether checkpoint ``step`` holds EMA weights (runs with ``config.ema_decay`` > 0)."""
  return (checkpoint_dir(workdir) / str(step) / EMA_ITEM).is_dir()


def restore_ema(workdir, step: int, abstract_model: Any) -> Any:
  """The EMA variables ``{"params", "batch_stats"}`` of checkpoint ``step`` (model-shaped), for evaluation.

  Raises:
    NoCheckpointError: the checkpoint has no EMA item or it cannot be read (one line).
  """
  folder = checkpoint_dir(workdir) / str(step)
  if not has_ema(workdir, step):
    raise NoCheckpointError(f"checkpoint {folder} holds no EMA weights ({EMA_ITEM}/): trained with "
                            "config.ema_decay=0, or by an older version.")
  try:
    with manager(workdir, read_only=True) as mngr:
      return restore(mngr, step, None, abstract_ema=abstract_model)[2]
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
    raise NoCheckpointError(f"EMA weights of {folder} cannot be restored ({_one_line(e)}).") from None


def set_aside_damaged(workdir, step: int, reason: str) -> epath.Path:
  """Moves checkpoint ``step`` to ``WORKDIR/damaged_checkpoints/<step>.<time>`` (process 0)."""
  target = epath.Path(workdir) / DAMAGED_DIR / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir(workdir) / str(step)).rename(target)
  logging.warning("checkpoint %s is damaged (%s); moved to %s, using the previous one.",
                  checkpoint_dir(workdir) / str(step), reason, target)
  return target


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}"


def _is_layout_error(e: BaseException) -> bool:
  """Whether a restore failed on the devices or shardings asked for rather than on the files."""
  # orbax's StandardCheckpointHandler: a saved sharding that names devices this process lacks.
  return "topology mismatch" in str(e).lower()


def restore_intact(workdir, abstract_model: Any | None, abstract_train: Any | None = None,
                   step: int | None = None, abstract_ema: Any | None = None
                   ) -> tuple[int, Any, Any | None, Any | None]:
  """Restores the newest intact checkpoint (or exactly ``step``).

  A checkpoint that fails to restore any requested item (missing or truncated files, empty or corrupt
  metadata, an empty step folder, a missing item) is set aside with a warning and the next older one is
  tried.

  Args:
    workdir: the run's work directory.
    abstract_model: abstract tree (with shardings) of the model item, or None to skip it (the EMA alone).
    abstract_train: the same for the train item, or None for model-only restores.
    step: a specific checkpoint; then a damaged one raises instead of falling back.
    abstract_ema: the same (model-shaped) for the EMA item, or None (runs without EMA, evaluation).

  Returns:
    ``(step, model, train, ema)``; ``train`` and ``ema`` are None when not requested.

  Raises:
    NoCheckpointError: no checkpoint, or none intact; the message names the folder.
  """
  folder = checkpoint_dir(workdir)
  steps = all_steps(workdir)
  if not steps:
    raise NoCheckpointError(
        f"no checkpoint in {folder}: train the run first (or it was stopped before its first checkpoint).")
  if step is not None:
    if step not in steps:
      raise NoCheckpointError(f"checkpoint step {step} not in {folder}; available: {steps}")
    candidates = [step]
  else:
    candidates = steps[::-1]
  damaged = []
  for s in candidates:
    model_only = not has_train_state(workdir, s) and (folder / str(s) / "model").is_dir()
    if abstract_train is not None and model_only:
      raise NoCheckpointError(
          f"{workdir} holds converted or model-only weights (checkpoint {s} has no optimizer state); "
          "it can be evaluated but not trained further. Use another --workdir.")
    try:
      with manager(workdir, read_only=True) as mngr:
        return (s, *restore(mngr, s, abstract_model, abstract_train, abstract_ema))
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
      if _is_layout_error(e):
        # Intact files that do not fit this process's devices: not damage, so nothing is set aside.
        raise NoCheckpointError(
            f"checkpoint {folder / str(s)} was saved for other devices than this process has "
            f"({_one_line(e)}); restore it with the shardings of this process's devices.") from None
      if step is not None:
        raise NoCheckpointError(
            f"checkpoint {folder / str(s)} cannot be restored ({_one_line(e)}).") from None
      set_aside_damaged(workdir, s, _one_line(e))
      damaged.append(s)
  raise NoCheckpointError(
      f"no intact checkpoint in {folder}: steps {damaged} are damaged (moved to "
      f"{epath.Path(workdir) / DAMAGED_DIR}). Start again with another --workdir or "
      "--config.overwrite=True.")


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding stand-ins of a tree of arrays, for restoring into the same layout."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
