r"""Trains DRAEM on one category, then evaluates it.

  python -m draem_jax.train --config=configs/mvtec.py:bottle --workdir=workdirs/bottle

Reads top to bottom: flags -> work directory -> mesh -> data -> model and optimizer -> resume ->
jitted step -> loop (log, checkpoint, preemption) -> evaluation. Restarting the same command resumes from
the newest checkpoint and ends bit-identical to an uninterrupted run; a finished run is only re-evaluated
unless ``--config.overwrite=True``.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from draem_jax import checkpointing
from draem_jax import evaluate
from draem_jax import parallel
from draem_jax import steps
from draem_jax import synthesis
from draem_jax import writers
from draem_jax.data import datasets
from draem_jax.data import pipeline

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the library imports cleanly."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mvtec.py:bottle.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation.")
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (TPU pods, Slurm, multi-node GPU). "
                    "Detected automatically on multi-worker TPU slices.")
  flags.mark_flags_as_required(["config", "workdir"])

# Fields that define the trained model; resuming with a different value would mix two runs.
_STRUCTURAL_FIELDS = ("dataset", "category", "image_size", "batch_size", "seed", "model.recon_width",
                      "model.disc_width", "synthesis.variant", "lr_schedule", "learning_rate",
                      "num_epochs")


class TrainingError(RuntimeError):
  """A training run cannot continue (bad state, diverged loss)."""


# ----------------------------------------------------------------------------------------------------
# Work directory: config record, finished-run guard.
# ----------------------------------------------------------------------------------------------------

def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, total_steps: int) -> str:
  """Checks the work directory against the config; returns "fresh", "resume" or "finished".

  Sets a previous run aside (renamed, never deleted) when ``config.overwrite`` is true.
  """
  config_path = os.path.join(workdir, "config.json")
  latest = checkpointing.latest_step(workdir)
  if latest is None:
    return "fresh"
  if config.overwrite:
    if jax.process_index() == 0:
      renamed, stamp = checkpointing.set_run_aside(workdir)
      logging.warning("config.overwrite=True: %s of the previous run in %s renamed to *.replaced-%s",
                      renamed, workdir, stamp)
    _sync("overwrite")
    return "fresh"
  if os.path.exists(config_path):
    with open(config_path, encoding="utf-8") as f:
      saved = ml_collections.ConfigDict(json.load(f))
    changed = [f for f in _STRUCTURAL_FIELDS if _safe_get(saved, f) != _safe_get(config, f)]
    if changed:
      details = ", ".join(f"{f}: {_safe_get(saved, f)!r} -> {_safe_get(config, f)!r}" for f in changed)
      raise TrainingError(
          f"{workdir} holds a run with a different config ({details}). Use another --workdir, or "
          "--config.overwrite=True to set the old run aside and start again.")
  if not checkpointing.has_train_state(workdir, latest):
    raise TrainingError(
        f"{workdir} holds converted or model-only weights (checkpoint {latest} has no optimizer state); "
        "it can be evaluated but not trained further. Use another --workdir.")
  return "finished" if latest >= total_steps else "resume"


def _safe_get(config, dotted):
  try:
    return _get(config, dotted)
  except (KeyError, AttributeError):
    return None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    checkpointing.write_config(workdir, config)


# ----------------------------------------------------------------------------------------------------
# Preemption: SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly.
# ----------------------------------------------------------------------------------------------------

class _Preemption:

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a test thread): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next step and stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, mngr, step: int) -> bool:
    if jax.process_count() > 1:
      # Every process must agree on the step; orbax's preemption sync point does that.
      return bool(mngr.reached_preemption(step)) or self.requested
    return self.requested


# ----------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir`` and evaluates it; returns the evaluation metrics."""

  workdir = os.path.abspath(workdir)
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())

  # -- Mesh.
  mesh = parallel.make_mesh()
  repl, data_sh = parallel.replicated(mesh), parallel.data_sharding(mesh)
  parallel.check_batch_size(config.batch_size, jax.device_count(), jax.process_count(),
                            name="config.batch_size")

  # -- Data: training images (uint8, in memory) and anomaly sources (uint8, on device).
  train_images = datasets.load_train_images(config, workdir)
  num_train = len(train_images)
  spe = steps.steps_per_epoch(num_train, config.batch_size)
  total_steps = config.num_epochs * spe
  logging.info("%d training images, %d steps per epoch, %d epochs = %d steps", num_train, spe,
               config.num_epochs, total_steps)

  status = prepare_workdir(config, workdir, total_steps)
  if status == "finished":
    logging.info("Run in %s is finished (%d steps); re-evaluating only. Use --config.overwrite=True "
                 "to train again.", workdir, total_steps)
    return evaluate.evaluate_workdir(workdir, config=config)
  write_config(config, workdir)

  sources = jax.device_put(datasets.load_anomaly_sources(config), repl)

  # -- Model, optimizer, state built directly with the replicated sharding.
  model = steps.build_model(config)
  schedule = steps.learning_rate_schedule(config, num_train)
  tx = steps.make_optimizer(schedule)
  image_shape = (config.image_size, config.image_size)
  init_fn = jax.jit(lambda key: steps.create_train_state(model, tx, key, image_shape),
                    out_shardings=repl)
  # Made by a jitted call so it is a global replicated array on multi-host runs too.
  seed_key = jax.jit(jax.random.key, out_shardings=repl)(config.seed)

  mngr = checkpointing.manager(workdir, keep=config.keep_checkpoints)
  if status == "resume":
    abstract = jax.eval_shape(init_fn, seed_key)
    start = mngr.latest_step()
    model_vars, train_item = checkpointing.restore(
        mngr, start, checkpointing.abstract_like(abstract.model_variables()),
        checkpointing.abstract_like(abstract.train_item()))
    state = steps.TrainState(params=model_vars["params"], batch_stats=model_vars["batch_stats"],
                             **train_item)
    logging.info("Resumed from step %d of %d.", start, total_steps)
  else:
    state = init_fn(seed_key)
    start = 0

  # -- The jitted step: batch sharded over "data", state replicated and donated.
  synthesis_config = synthesis_config_for(config)
  train_step = jax.jit(steps.make_train_step(model, tx, synthesis_config, schedule),
                       in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl),
                       donate_argnums=0)

  train_iter = pipeline.TrainIterator(train_images, global_batch_size=config.batch_size,
                                      seed=config.seed, start_step=start, sharding=data_sh,
                                      end_step=total_steps)
  writer = writers.MetricWriter(workdir)
  progress = writers.Progress(total_steps, config.batch_size, start)
  history: list[dict[str, float]] = []

  def finish_step(step: int, metrics, last: bool = False) -> None:
    """Pulls one step's metrics to the host (one step behind dispatch), checks and logs them."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # The gradient norm is checked too: a finite loss with non-finite gradients still poisons the
    # parameters this step saves.
    if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
      raise TrainingError(
          f"Non-finite loss ({values['loss']}) or gradient norm ({values['grad_norm']}) at step "
          f"{step}; stopping. The last good checkpoint "
          f"(step {mngr.latest_step()}) is intact. Lower config.learning_rate or use float32.")
    history.append(values)
    if step % config.log_every_steps == 0 or step == total_steps or last:
      rates = progress.update(step)
      means = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
      history.clear()
      writer.write_scalars(step, {**means, **rates})
      logging.info(
          "step %d/%d  loss %.4f (l2 %.4f ssim %.4f focal %.4f)  %s", step, total_steps,
          means["loss"], means["l2"], means["ssim"], means["focal"],
          (f"{rates['steps_per_sec']:.2f} steps/s  {rates['images_per_sec']:.1f} img/s  "
           f"ETA {writers.Progress.format_eta(rates['eta_sec'])}") if rates else "(compiling)")

  pending = None
  stopped_early = False
  step = start
  # jit's explicit shardings place every array; no ambient mesh context is needed.
  try:
    with _Preemption() as preemption, train_iter:
      for step in range(start + 1, total_steps + 1):
        batch = next(train_iter)
        state, metrics = train_step(state, batch, sources)
        if pending is not None:
          finish_step(*pending)
        pending = (step, metrics)
        stop = preemption.should_stop(mngr, step) or (
            config.get("stop_after_steps", 0) > 0 and step - start >= config.stop_after_steps)
        if step % config.checkpoint_every_steps == 0 or step == total_steps or stop:
          finish_step(*pending, last=stop)  # never save a state whose loss was not checked
          pending = None
          checkpointing.save(mngr, step, state.model_variables(), state.train_item())
        if stop:
          stopped_early = step < total_steps
          break
      if pending is not None:
        finish_step(*pending)
  finally:
    # Let an in-flight (async) save complete even when training failed: it holds a checked state.
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if stopped_early:
    logging.warning("Stopped at step %d of %d (SIGTERM or config.stop_after_steps); rerun the same "
                    "command to resume.", step, total_steps)
    return {}
  return evaluate.evaluate_workdir(workdir, config=config)


def synthesis_config_for(config) -> synthesis.SynthesisConfig:
  variant = config.synthesis.variant
  if variant == "original":
    return synthesis.SynthesisConfig()
  if variant == "paper":
    return synthesis.SynthesisConfig.paper()
  raise ValueError(f"config.synthesis.variant={variant!r}: use 'original' or 'paper'.")


def maybe_initialize_distributed(multihost: bool) -> None:
  """Initialises multi-process JAX when asked or on a multi-worker TPU slice; before any JAX use."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if multihost or ("," in hosts):
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  maybe_initialize_distributed(FLAGS.multihost)
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (TrainingError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  define_flags()
  app.run(main)
