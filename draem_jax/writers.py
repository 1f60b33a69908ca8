"""Metric logging and progress reporting; only process 0 writes.

``MetricWriter`` appends one JSON line per call to ``WORKDIR/metrics.jsonl`` (always), logs through absl,
and writes TensorBoard event files when ``tensorboardX`` is installed (the ``tensorboard`` extra); no
TensorFlow needed. ``Progress`` turns step timestamps into steps/s, images/s and an ETA, leaving out the
first (compiling) step.
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import time
from typing import Any, Callable, Mapping

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import numpy as np


class MetricWriter:
  """Writes scalar metrics of process 0 to JSONL, the log and (optionally) TensorBoard.

  ``resume_step``: a resumed run redoes the steps after its checkpoint, so rows logged past it by the
  interrupted invocation are moved to ``metrics.superseded.jsonl`` (kept, never deleted) and the log has
  each step once; a second record of the step just written (validation) joins its row. Paths go through
  ``etils.epath``; on object stores (no append) the file is rewritten.
  """

  def __init__(self, workdir, *, filename: str = "metrics.jsonl", tensorboard: bool = True,
               resume_step: int | None = None):
    self._active = jax.process_index() == 0
    self._tb = None
    self._rows: list[str] = []
    if not self._active:
      return
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    self._path = root / filename
    self._append = "://" not in str(root)
    if self._path.exists():
      self._rows = [line for line in self._path.read_text().splitlines() if line.strip()]
    if resume_step is not None:
      keep = [r for r in self._rows if json.loads(r).get("step", 0) <= resume_step]
      dropped = [r for r in self._rows if json.loads(r).get("step", 0) > resume_step]
      if dropped:
        superseded = root / (filename.rsplit(".", 1)[0] + ".superseded.jsonl")
        old = superseded.read_text() if superseded.exists() else ""
        superseded.write_text(old + "\n".join(dropped) + "\n")
        self._rows = keep
        self._rewrite()
    if tensorboard:
      try:
        import tensorboardX  # imported only when installed (the tensorboard extra)
        self._tb = tensorboardX.SummaryWriter(str(root / "tensorboard"))
      except ImportError:
        logging.info("tensorboardX not installed; metrics go to metrics.jsonl only "
                     "(pip install 'draem_jax[tensorboard]' for TensorBoard files).")

  def _rewrite(self) -> None:
    tmp = self._path.parent / f".{self._path.name}.tmp"
    tmp.write_text("".join(r + "\n" for r in self._rows))
    tmp.rename(self._path) if not self._append else tmp.replace(self._path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._active:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if self._rows and json.loads(self._rows[-1]).get("step") == int(step):
      # A second record of the same step (validation after the training metrics): one row per step.
      self._rows[-1] = json.dumps({**json.loads(self._rows[-1]), **values})
      self._rewrite()
    else:
      row = json.dumps({"step": int(step), **values})
      self._rows.append(row)
      if self._append:
        with self._path.open("a") as f:
          f.write(row + "\n")
      else:
        self._rewrite()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Closes the TensorBoard file; a failure to flush it (a full disk) is a warning, so that it never
    hides the error that ended the run."""
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except OSError as e:
        logging.warning("TensorBoard events not flushed (%s): metrics.jsonl has every row written.",
                        one_line(e))


class Progress:
  """Steps/s, images/s and ETA from the wall time between reported steps."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._t0 = None  # time of the first *completed* step after the (compiling) first one
    self._s0 = start_step

  def update(self, step: int) -> dict[str, float]:
    """Call after ``step`` has completed; returns rates (empty until two steps have been seen)."""
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._s0 = now, step
      return {}
    steps = step - self._s0
    elapsed = now - self._t0
    if steps <= 0 or elapsed <= 0:
      return {}
    rate = steps / elapsed
    return {"steps_per_sec": rate, "images_per_sec": rate * self.batch_size,
            "eta_sec": (self.total_steps - step) / rate}

  @staticmethod
  def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
      return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class _DropLibraryInfo(logging_std.Filter):
  """Drops INFO/DEBUG records that orbax and tfds log through absl (dozens per checkpoint)."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}", f"{os.sep}etils{os.sep}")

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in self._NOISY)
    if noisy and str(record.msg).startswith("Given directory is read only"):
      return False  # orbax's note on every read-only (evaluation) manager; expected, not a problem
    return record.levelno >= logging_std.WARNING or not noisy


def quiet_library_logs() -> None:
  """Keeps the command-line log to draem_jax's own progress lines (library warnings still show)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def one_line(e: BaseException) -> str:
  """An exception as one line; OS errors name the file and the reason (no traceback)."""
  if isinstance(e, OSError) and e.strerror:
    names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n)
    return f"{e.strerror}: {names}" if names else e.strerror
  return " ".join(str(e).split()) or type(e).__name__


def parse_flags(argv: list[str], known_config: Callable[[], Any] | None = None) -> list[str]:
  """absl flag parsing where a bad flag or config override is one line, not a traceback.

  ``known_config`` returns a config holding every field ``--config.FIELD`` may name (suggestions for a
  misspelt one); default: ``recipes.mvtec()``, a superset of every recipe's fields. For ``app.run``'s
  ``flags_parser``, bind it with ``functools.partial``.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f"error: {one_line(e)} (see --help)") from None
  except Exception as e:  # pylint: disable=broad-except  (config files and overrides raise anything)
    cause = e.__cause__ or e
    unknown = _unknown_config_override(argv, cause, known_config)
    if unknown:
      raise SystemExit(f"error: {unknown}") from None
    raise SystemExit(f"error: {type(cause).__name__}: {one_line(cause)}") from None


def _unknown_config_override(argv: list[str], e: BaseException,
                             known_config: Callable[[], Any] | None) -> str | None:
  """For ``--config.no_such=1``: the field named, with the closest known fields."""
  if not isinstance(e, (AttributeError, KeyError)):
    return None
  import difflib  # only on this error path
  if known_config is None:
    from draem_jax import recipes  # a superset of every recipe's fields
    known_config = recipes.mvtec
  known = _dotted_keys(known_config())
  for arg in argv[1:]:
    if arg.startswith("--config."):
      field = arg[len("--config."):].split("=", 1)[0]
      if field not in known:
        close = difflib.get_close_matches(field, known, n=3)
        hint = f"; did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
        return f"--config.{field}: the config has no field {field!r}{hint}"
  return None


def _dotted_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if hasattr(v, "items"):
      keys += _dotted_keys(v, f"{prefix}{k}.")
  return keys


def default_compilation_cache_dir() -> str:
  """Where the programs keep compiled XLA programs: ``$XDG_CACHE_HOME/draem_jax/jax_compilation_cache``
  (``~/.cache/...`` without XDG_CACHE_HOME); ``JAX_COMPILATION_CACHE_DIR`` overrides it."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "draem_jax", "jax_compilation_cache")


def enable_compilation_cache() -> None:
  """Persistent compilation cache, so a second run of a program compiles nothing it compiled before."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", default_compilation_cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_program(main) -> None:
  """``absl.app.run(main)`` with one-line errors for bad flags and config overrides, and the
  persistent compilation cache on."""
  enable_compilation_cache()
  app.run(main, flags_parser=parse_flags)
