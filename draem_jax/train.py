r"""Trains DRAEM on one category, then evaluates it.

  python -m draem_jax.train --config=configs/mvtec.py:bottle --workdir=workdirs/bottle

``train_and_evaluate`` reads top to bottom: config check -> work directory -> mesh -> data on the
devices -> model, optimizer and state (fresh or restored) -> the jitted step -> loop (log, checkpoint,
stop) -> evaluation. Restarting the same command resumes from the newest intact checkpoint and ends
bit-identical to an uninterrupted run; a finished run is only re-evaluated.

Exit codes: 0 finished (and evaluated); 1 error (one line on stderr); ``EXIT_STOPPED_EARLY`` (75,
"temporary failure") when the run stopped before its last step on SIGTERM or ``config.stop_after_steps``
with a checkpoint saved: rerun the same command to resume (schedulers that requeue on non-zero exits
do exactly that); ``EXIT_PEER_LOST`` (69, "service unavailable") when another process of a multi-process
run stopped (killed, crashed): this one exits as soon as a collective with it fails, with one line;
rerun every process to resume from the last checkpoint.

``--config.overwrite=True`` sets a previous run aside (renamed ``*.replaced-<time>``, never deleted) and
starts again, except for an unfinished run that an overwrite invocation with the same config started:
that one is resumed, so a preempted ``overwrite`` job rerun by its scheduler continues instead of
restarting from step 0 forever.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import sys
import traceback
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp

from draem_jax import checkpointing
from draem_jax import conv
from draem_jax import evaluate
from draem_jax import parallel
from draem_jax import recipes
from draem_jax import rundir
from draem_jax import steps
from draem_jax import validation
from draem_jax import writers
from draem_jax.data import datasets
from draem_jax.data import pipeline

FLAGS = flags.FLAGS
EXIT_STOPPED_EARLY = 75  # sysexits.h EX_TEMPFAIL: stopped with a checkpoint; rerun to resume
EXIT_PEER_LOST = 69  # sysexits.h EX_UNAVAILABLE: another process of the run stopped; rerun all to resume
# A collective whose peer process is gone (gloo on CPU hosts; the coordination service's status).
_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Gloo \w+ failed|UNAVAILABLE")


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the library imports cleanly."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mvtec.py:bottle.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation.")
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (TPU pods, Slurm, multi-node GPU). "
                    "Detected automatically on multi-worker TPU slices.")
  flags.mark_flags_as_required(["config", "workdir"])


class TrainingError(RuntimeError):
  """A training run cannot continue (bad state, diverged loss)."""


class StoppedEarly(Exception):
  """The run saved a checkpoint and stopped before its last step (SIGTERM, ``stop_after_steps``)."""


# ----------------------------------------------------------------------------------------------------
# Work directory: fresh, resume or finished.
# ----------------------------------------------------------------------------------------------------

def prepare_workdir(config: ml_collections.ConfigDict, workdir, total_steps: int) -> str:
  """Checks the work directory against the config; returns "fresh", "resume" or "finished".

  Sets a previous run aside (renamed, never deleted) under ``config.overwrite`` (see the module
  docstring for when an overwrite run resumes instead).
  """
  steps_on_disk = checkpointing.all_steps(workdir)
  if not steps_on_disk:
    return "fresh"
  latest = steps_on_disk[-1]
  if config.overwrite and not _started_by_this_overwrite(workdir, config, latest, total_steps):
    if jax.process_index() == 0:
      renamed, stamp = rundir.set_run_aside(workdir)
      rundir.log_set_aside(workdir, renamed, stamp)
    _sync("overwrite")
    return "fresh"
  try:
    rundir.check_resume(workdir, config)
  except rundir.ConfigChangedError as e:
    raise TrainingError(str(e)) from None
  return "finished" if latest >= total_steps else "resume"


def _started_by_this_overwrite(workdir, config, latest: int, total_steps: int) -> bool:
  """An unfinished run recorded with overwrite=True and the same config: resume it, do not restart."""
  file = rundir.path(workdir) / rundir.CONFIG_FILE
  if latest >= total_steps or not file.exists():
    return False
  saved = ml_collections.ConfigDict(rundir.read_json(file))
  return bool(saved.get("overwrite")) and not rundir.config_changes(saved, config)


# How long a process of a multi-process run waits at a barrier for the slowest one (reading data,
# compiling on a loaded host).
BARRIER_TIMEOUT_S = 20 * 60


def _sync(name: str) -> None:
  """Waits for every process at the coordination service's barrier ``name`` (no-op in one process).

  Not a collective: on CPU the first gloo collective waits only 30 s (fixed in XLA) for the slowest
  process to join, and a two-process CI run on two loaded cores failed there, in the checkpoint
  manager's first sync. A barrier before the first collective puts every process at it together.
  """
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=f"draem_jax_{name}", timeout_ms=BARRIER_TIMEOUT_S * 1000)


# ----------------------------------------------------------------------------------------------------
# Preemption: SIGTERM sets a flag; the loop saves at the next step boundary and exits.
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

def _initial_state(status: str, workdir, init_fn, seed_key, abstract, ema_decay: float,
                   total_steps: int) -> tuple[steps.TrainState, int]:
  """(state, start step): the newest intact checkpoint's when resuming, else ``init_fn(seed_key)``."""
  if status != "resume":
    # Compiled with XLA's default optimisations although it runs once: without them it compiles ~2.5x
    # faster on CPU, but some initial weights differ in the last bit, enough to move the demo's image
    # AUROC over seeds 0-2 from 0.968 / 0.986 / 0.995 to 0.946 / 0.896 / 0.958. XLA backend level 1
    # (25.7 -> 17.5 s for the demo's model) kept every bit with jax 0.10.2 but not with jax 0.12.
    return init_fn(seed_key), 0
  try:  # a checkpoint whose EMA item is damaged falls back like one with a damaged model
    start, model_vars, train_item, ema_vars = checkpointing.restore_intact(
        workdir, checkpointing.abstract_like(abstract.model_variables()),
        checkpointing.abstract_like(abstract.train_item()),
        abstract_ema=checkpointing.abstract_like(abstract.ema_variables()) if ema_decay > 0 else None)
  except checkpointing.NoCheckpointError as e:
    raise TrainingError(str(e)) from None
  logging.info("Resumed from step %d of %d.", start, total_steps)
  return steps.TrainState(params=model_vars["params"], batch_stats=model_vars["batch_stats"],
                          ema_params=ema_vars["params"] if ema_vars is not None else None,
                          **train_item), start


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir`` and evaluates it; returns the evaluation metrics.

  Raises:
    StoppedEarly: a checkpoint was saved before the last step (SIGTERM, ``config.stop_after_steps``).
    TrainingError, ValueError, OSError: one-line messages naming the field or file.
  """
  recipes.validate(config)
  if jax.default_backend() == "cpu":
    conv.cpu_table_name()  # a bad DRAEM_CPU_CONV_TABLE: one line now, not at the first trace after setup
  workdir = rundir.path(workdir)
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())

  # -- Mesh: one "data" axis over every device of every process.
  mesh = parallel.make_mesh()
  repl = parallel.replicated(mesh)
  parallel.check_batch_size(config.batch_size, jax.device_count(), jax.process_count(),
                            name="config.batch_size")

  # -- Data: every split checked before any training; training images (uint8) and anomaly sources
  # (uint8) go onto every device once.
  datasets.check_category(config, str(workdir))
  # Held-out good images (config.validation) are never trained on; the split is recorded in the run.
  train_split = datasets.load_split(config, str(workdir), "train")
  pipeline.check_train_images(train_split.images)
  num_train = validation.num_train_images(config, len(train_split))
  spe = steps.steps_per_epoch(num_train, config.batch_size)
  total_steps = config.num_epochs * spe
  logging.info("%d training images, %d steps per epoch, %d epochs = %d steps", num_train, spe,
               config.num_epochs, total_steps)

  status = prepare_workdir(config, workdir, total_steps)
  if status == "finished":
    logging.info("Run in %s is finished (%d steps); re-evaluating only. Use --config.overwrite=True "
                 "to train again.", workdir, total_steps)
    return evaluate.evaluate_workdir(str(workdir), config=config)
  if status == "fresh":
    rundir.write_config(workdir, config)
  sources = datasets.load_anomaly_sources(config)
  train_images, vset = validation.prepare(config, workdir, train_split, sources)
  train_images = parallel.replicate(train_images, mesh)
  sources = parallel.replicate(sources, mesh)

  # -- Model, optimizer and state, built directly with the replicated sharding.
  model = steps.build_model(config)
  schedule = steps.learning_rate_schedule(config, num_train)
  tx = steps.make_optimizer(schedule)
  image_shape = (config.image_size, config.image_size)
  ema_decay = float(config.ema_decay)
  init_fn = jax.jit(lambda key: steps.create_train_state(model, tx, key, image_shape, ema=ema_decay > 0),
                    out_shardings=repl)
  # Made by a jitted call so it is a global replicated array on multi-host runs too.
  seed_key = jax.jit(jax.random.key, out_shardings=repl)(config.seed)
  abstract = jax.eval_shape(init_fn, seed_key)

  # -- The jitted step: images picked, anomalies synthesized and both nets updated on the devices. In a
  # single-process run it compiles in a thread while the state is initialised or restored: with a cold
  # compilation cache these are a short run's two slowest compilations (the initialiser draws ~200
  # parameter tensors), and XLA compiles without the GIL, so on two cores the two overlap. Not with
  # several processes: there the processes meet at a barrier before each stage with collectives
  # (orbax's restore and manager, the step's all-reduce; see _sync), and a compilation running beside
  # the restore would spread them apart again.
  step_fn = steps.jit_train_step(
      mesh, model=model, tx=tx, synthesis_config=recipes.synthesis_config(config), schedule=schedule,
      batch_size=config.batch_size, data_seed=config.seed,
      crop_size=config.image_size if config.train_crop else None, ema_decay=ema_decay,
      loss_config=recipes.loss_config(config))
  def compile_step():
    return step_fn.lower(abstract, train_images, sources).compile()

  if jax.process_count() == 1:
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_train_step") as pool:
      compiled_step = pool.submit(compile_step)
      state, start = _initial_state(status, workdir, init_fn, seed_key, abstract, ema_decay, total_steps)
      train_step = compiled_step.result()
  else:
    _sync("state")
    state, start = _initial_state(status, workdir, init_fn, seed_key, abstract, ema_decay, total_steps)
    train_step = compile_step()
    _sync("compiled")

  mngr = checkpointing.manager(workdir, keep=config.keep_checkpoints)
  writer = writers.MetricWriter(workdir, resume_step=start if status == "resume" else None)
  progress = writers.Progress(total_steps, config.batch_size, start)
  validator = validation.Validator(config, workdir, model, vset, writer, mesh=mesh)
  history: list[dict[str, float]] = []

  def finish_step(step: int, metrics, last: bool = False) -> None:
    """Pulls one step's metrics to the host (one step behind dispatch), checks and logs them."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # The gradient norm is checked too: a finite loss with non-finite gradients still poisons the
    # parameters this step saves.
    if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
      saved = mngr.latest_step()
      kept = (f"the last good checkpoint (step {saved}) is intact" if saved is not None
              else "no checkpoint was written yet")
      raise TrainingError(
          f"Non-finite loss ({values['loss']}) or gradient norm ({values['grad_norm']}) at step {step}; "
          f"stopping, {kept}. Lower config.learning_rate or use float32.")
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

  def served(state) -> dict:
    """The weights that are the run's model (validated, thresholded, selected): the EMA with
    config.ema_as_model, else the raw ones."""
    return state.ema_variables() if config.ema_as_model else state.model_variables()

  pending = None
  step = start
  stop = False
  lost = False
  try:
    with _Preemption() as preemption:
      for step in range(start + 1, total_steps + 1):
        state, metrics = train_step(state, train_images, sources)
        if pending is not None:
          finish_step(*pending)
        pending = (step, metrics)
        stop = preemption.should_stop(mngr, step) or (
            config.stop_after_steps > 0 and step - start >= config.stop_after_steps)
        if step % config.checkpoint_every_steps == 0 or step == total_steps or stop:
          finish_step(*pending, last=stop)  # never save a state whose loss was not checked
          pending = None
          checkpointing.save(mngr, step, state.model_variables(), state.train_item(), state.ema_variables())
          validator.run(step, served(state))  # every saved step gets its thresholds
        elif validator.due(step):
          validator.run(step, served(state))
        if stop:
          break
      if pending is not None:
        finish_step(*pending)
  except jax.errors.JaxRuntimeError as e:
    lost = peer_lost(e)
    raise
  finally:
    # Let an in-flight (async) save complete even when training failed: it holds a checked state. Not
    # when another process is gone: the save waits at a barrier for it, which only jax.distributed's
    # heartbeat timeout ends, with a C++ abort.
    try:
      if not lost:
        mngr.wait_until_finished()
        mngr.close()
    finally:
      writer.close()  # also when the save failed (a full disk): no writer thread outlives the run
  if stop and step < total_steps:
    raise StoppedEarly(
        f"stopped at step {step} of {total_steps} with a checkpoint (SIGTERM or config.stop_after_steps); "
        "rerun the same command to resume.")
  return evaluate.evaluate_workdir(str(workdir), config=config)


def maybe_initialize_distributed(multihost: bool) -> None:
  """Initialises multi-process JAX when asked or on a multi-worker TPU slice; before any JAX use."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if (multihost or ("," in hosts)) and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  maybe_initialize_distributed(FLAGS.multihost)
  run(FLAGS.config, FLAGS.workdir)


def run(config: ml_collections.ConfigDict, workdir) -> None:
  """``train_and_evaluate`` with the program's exit codes (module docstring); errors are one line."""
  try:
    train_and_evaluate(config, workdir)
  except StoppedEarly as e:
    logging.warning("%s", e)
    raise SystemExit(EXIT_STOPPED_EARLY) from None
  except (TrainingError, ValueError, OSError) as e:
    _exit(f"error: {writers.one_line(e)}", 1)
  except Exception as e:
    if peer_lost(e):
      _exit(f"error: another process of this {jax.process_count()}-process run stopped "
            f"({writers.one_line(e)}); rerun every process with the same command to resume from the last "
            "checkpoint.", EXIT_PEER_LOST)
    _exit_on_bug()  # a bug: the traceback is for the report
    raise


def _exit_on_bug() -> None:
  """In a multi-process run, ends this process at once with the traceback of the exception being handled:
  raised as usual, it would reach jax.distributed's shutdown barrier while the others wait in a collective
  for this one, and every process would abort only after the 300 s shutdown timeout."""
  if jax.process_count() > 1:
    traceback.print_exc()
    _exit("error: this process stopped on the unexpected error above; the others stop too.", 1)


def peer_lost(e: BaseException) -> bool:
  """Whether ``e`` is a collective failing because another process of the run is gone."""
  return (jax.process_count() > 1 and isinstance(e, jax.errors.JaxRuntimeError)
          and _PEER_LOST.search(str(e)) is not None)


def _exit(line: str, code: int) -> None:
  """Ends the program with ``line`` on stderr. A multi-process run ends at once: jax.distributed's
  shutdown at exit waits at a barrier for every process, and with one gone it aborts with a C++ trace
  after the heartbeat timeout; the other processes see this one's connections close and stop too."""
  if jax.process_count() == 1:
    raise SystemExit(line)
  logging.flush()
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access


if __name__ == "__main__":
  define_flags()
  writers.run_program(main)
