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
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np


class MetricWriter:
  """Writes scalar metrics of process 0 to JSONL, the log and (optionally) TensorBoard."""

  def __init__(self, workdir: str, *, filename: str = "metrics.jsonl", tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._file = None
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    # Append: a resumed run continues the same file instead of replacing what was logged before.
    self._file = open(os.path.join(workdir, filename), "a", encoding="utf-8")
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.info("tensorboardX not installed; metrics go to metrics.jsonl only "
                     "(pip install 'draem_jax[tensorboard]' for TensorBoard files).")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._active:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


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
