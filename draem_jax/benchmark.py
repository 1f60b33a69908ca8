r"""Benchmarks draem_jax against anomalib's DRAEM on the same machine, in the same process.

  python -m draem_jax.benchmark --quick                  # about a minute on a 2-core CPU
  python -m draem_jax.benchmark --output=bench.json      # the default (CPU-sized) sections
  python -m draem_jax.benchmark --sections=train --train_image_size=256 --recon_width=128 \
      --disc_width=64                                    # full DRAEM (minutes per step on a CPU)

Sections (``--sections``, comma separated):

* ``synthesis``: anomaly synthesis images/s, jitted ``synthesis.synthesize`` vs anomalib's
  ``PerlinAnomalyGenerator`` with the same texture folder.
* ``train``: one training step (synthesis + both nets + losses + Adam) images/s, vs anomalib's
  ``PerlinAnomalyGenerator`` + ``DraemModel`` + ``DraemLoss`` + ``torch.optim.Adam``; FLOPs per image from
  the layer tables (``conv_macs``) and from XLA's cost analysis, achieved TFLOP/s, MFU when a peak is known.
* ``infer``: inference images/s and peak memory (device ``memory_stats`` where the backend has it; host
  RSS sampled during the section, and the process's ``getrusage`` peak).
* ``scaling``: train-step images/s on 1, 2, 4, 8 devices with a fixed per-device batch (host-platform
  devices on a CPU: ``jax_num_cpu_devices`` is raised before JAX starts).
* ``quality``: ``train.train_and_evaluate`` on a real category for a fixed budget, and anomalib's
  ``DraemModel`` trained by a hand loop with the same budget and scored by the same metric code.

Every timing is the median over ``--repeats`` timed calls after ``--warmup`` untimed ones; the compile
time (``jit(...).lower(...).compile()``) is reported separately. anomalib is optional (the ``bench``
extra): without it only draem_jax's numbers are reported, each ratio replaced by the reason.

Threads: ``--threads=N`` restricts the whole process (XLA's and PyTorch's thread pools alike) to N cores with
``os.sched_setaffinity`` before JAX starts, calls ``torch.set_num_threads(N)``, and for N = 1 also turns off
XLA's multi-threaded Eigen. The default uses every core this process may run on, for both sides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

SECTIONS = ("synthesis", "train", "infer", "scaling", "quality")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-image cost of DRAEM at full size (docs/architecture.md): forward conv FLOPs at 256x256.
FULL_FORWARD_FLOPS = 395.91e9
FULL_TRAIN_FLOPS_PER_IMAGE = 1.19e12
# Dense bf16 matrix peak per device, for MFU (docs/performance.md). Matched against the device kind.
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}


@dataclasses.dataclass
class BenchConfig:
  """What to run. Defaults are sized for a CPU; ``quick()`` is about a minute on 2 cores.

  Attributes:
    sections: which of ``SECTIONS`` to run, in that order.
    repeats: timed calls per measurement (the median is reported).
    warmup: untimed calls after compilation.
    threads: cores for both sides (0 = all this process may use).
    synth_image_size: side of the synthesis images.
    synth_batch_sizes: batch sizes of the synthesis section.
    texture_dir: anomaly-source folder (DTD layout); "" = ``<repo>/../shared/data/dtd_subset/images``.
    max_textures: cap on the texture pool loaded for draem_jax (anomalib reads the folder itself).
    train_image_size: side of train/infer/scaling images.
    recon_width: reconstructive-net base width (DRAEM: 128).
    disc_width: discriminative-net base width (DRAEM: 64).
    train_batch_size: global batch of the train section.
    infer_batch_size: batch of the infer section.
    scaling_devices: device counts of the scaling section (those above the device count are skipped).
    scaling_per_device_batch: per-device batch of the scaling section.
    data_dir: MVTec-layout root of the quality section; "" = ``<repo>/../shared/data/piped_mvtec``.
    category: category of the quality section.
    quality_steps: training steps of the quality section (both sides).
    quality_image_size: image side of the quality section.
    quality_batch_size: batch of the quality section.
    use_anomalib: False skips anomalib even where it is installed.
    peak_tflops: per-device peak for MFU; 0 = look the device kind up in ``PEAK_TFLOPS``.
    compilation_cache_dir: JAX persistent compilation cache ("" = off). With a warm cache the reported
      compile times are cache loads.
    fast_cpu_conv: draem_jax's custom CPU conv weight gradient (``conv.py``; faster, ~2.3x activation
      memory); False = XLA's native conv, the project default.
  """
  sections: Sequence[str] = SECTIONS
  repeats: int = 5
  warmup: int = 1
  threads: int = 0
  synth_image_size: int = 256
  synth_batch_sizes: Sequence[int] = (8, 64)
  texture_dir: str = ""
  max_textures: int = 0
  train_image_size: int = 64
  recon_width: int = 32
  disc_width: int = 16
  train_batch_size: int = 8
  infer_batch_size: int = 8
  scaling_devices: Sequence[int] = (1, 2, 4, 8)
  scaling_per_device_batch: int = 2
  data_dir: str = ""
  category: str = "piped_pa_bdp01_tl"
  quality_steps: int = 200
  quality_image_size: int = 64
  quality_batch_size: int = 8
  use_anomalib: bool = True
  peak_tflops: float = 0.0
  compilation_cache_dir: str = ""
  fast_cpu_conv: bool = False

  @classmethod
  def quick(cls, **overrides) -> "BenchConfig":
    """A smoke run: synthesis, train and infer only, small sizes, 3 repeats.

    Compiling dominates on a CPU (each train-step program is ~30 s on 2 busy cores), so the scaling and
    quality sections, which add 2-3 more such compiles, run only when named in ``sections``; then with
    1-2 devices and a 20-step quality run.
    """
    base = dict(sections=("synthesis", "train", "infer"), repeats=3, synth_batch_sizes=(8,),
                train_image_size=64, recon_width=16, disc_width=8, infer_batch_size=8,
                scaling_devices=(1, 2), scaling_per_device_batch=2, quality_steps=20,
                quality_image_size=64, max_textures=32)
    base.update(overrides)
    return cls(**base)

  def validate(self) -> None:
    unknown = [s for s in self.sections if s not in SECTIONS]
    if unknown:
      raise ValueError(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if self.repeats < 1 or self.warmup < 0:
      raise ValueError(f"--repeats={self.repeats} must be >= 1 and --warmup={self.warmup} >= 0")
    for name in ("train_image_size", "quality_image_size"):
      if getattr(self, name) < 32 or getattr(self, name) % 32:
        raise ValueError(f"--{name}={getattr(self, name)} must be a positive multiple of 32 (five "
                         "poolings in the discriminative net)")
    for name in ("recon_width", "disc_width", "train_batch_size", "infer_batch_size",
                 "scaling_per_device_batch", "quality_steps", "quality_batch_size", "synth_image_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} must be a positive integer")
    if not self.synth_batch_sizes or min(self.synth_batch_sizes) < 1:
      raise ValueError(f"--synth_batch_sizes={list(self.synth_batch_sizes)} must be positive integers")
    if not self.scaling_devices or min(self.scaling_devices) < 1:
      raise ValueError(f"--scaling_devices={list(self.scaling_devices)} must be positive integers")

  def resolved_texture_dir(self) -> str:
    return self.texture_dir or os.path.join(_REPO_ROOT, "..", "shared", "data", "dtd_subset", "images")

  def resolved_data_dir(self) -> str:
    return self.data_dir or os.path.join(_REPO_ROOT, "..", "shared", "data", "piped_mvtec")


# ----------------------------------------------------------------------------------------------------
# Analytic FLOPs from the layer tables (docs/architecture.md).
# ----------------------------------------------------------------------------------------------------

def _reconstructive_convs(w: int) -> list[tuple[int, int, int]]:
  """(level, Cin, Cout) of the 23 convs; level l runs at resolution H / 2^l."""
  return [(0, 3, w), (0, w, w), (1, w, 2 * w), (1, 2 * w, 2 * w), (2, 2 * w, 4 * w), (2, 4 * w, 4 * w),
          (3, 4 * w, 8 * w), (3, 8 * w, 8 * w), (4, 8 * w, 8 * w), (4, 8 * w, 8 * w),
          (3, 8 * w, 8 * w), (3, 8 * w, 8 * w), (3, 8 * w, 4 * w),   # up1, db1
          (2, 4 * w, 4 * w), (2, 4 * w, 4 * w), (2, 4 * w, 2 * w),   # up2, db2
          (1, 2 * w, 2 * w), (1, 2 * w, 2 * w), (1, 2 * w, w),       # up3, db3
          (0, w, w), (0, w, w), (0, w, w), (0, w, 3)]                # up4, db4, fin_out


def _discriminative_convs(w: int) -> list[tuple[int, int, int]]:
  """(level, Cin, Cout) of the 28 convs (6 inputs, 2 outputs, concat skips in the decoder)."""
  return [(0, 6, w), (0, w, w), (1, w, 2 * w), (1, 2 * w, 2 * w), (2, 2 * w, 4 * w), (2, 4 * w, 4 * w),
          (3, 4 * w, 8 * w), (3, 8 * w, 8 * w), (4, 8 * w, 8 * w), (4, 8 * w, 8 * w),
          (5, 8 * w, 8 * w), (5, 8 * w, 8 * w),
          (4, 8 * w, 8 * w), (4, 16 * w, 8 * w), (4, 8 * w, 8 * w),  # up_b, db_b
          (3, 8 * w, 4 * w), (3, 12 * w, 4 * w), (3, 4 * w, 4 * w),  # up1, db1
          (2, 4 * w, 2 * w), (2, 6 * w, 2 * w), (2, 2 * w, 2 * w),   # up2, db2
          (1, 2 * w, w), (1, 3 * w, w), (1, w, w),                   # up3, db3
          (0, w, w), (0, 2 * w, w), (0, w, w), (0, w, 2)]            # up4, db4, fin_out


def conv_macs(recon_width: int, disc_width: int, height: int, width: int) -> tuple[int, int]:
  """Forward multiply-adds of all 3x3 convs for one image: (reconstructive, discriminative).

  At widths 128 / 64 and 256 x 256 these are docs/architecture.md's 159,903,645,696 and 38,050,725,888.
  """
  def count(layers):
    return sum(9 * cin * cout * (height >> lvl) * (width >> lvl) for lvl, cin, cout in layers)
  return count(_reconstructive_convs(recon_width)), count(_discriminative_convs(disc_width))


def train_flops_per_image(recon_width: int, disc_width: int, height: int, width: int) -> float:
  """Training FLOPs per image: 3 x forward conv FLOPs (forward, input grad, weight grad)."""
  return 3.0 * 2.0 * sum(conv_macs(recon_width, disc_width, height, width))


# ----------------------------------------------------------------------------------------------------
# Timing and memory helpers.
# ----------------------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], repeats: int, warmup: int) -> dict[str, float]:
  """Median / min / max wall seconds of ``fn()`` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "repeats": repeats}


def _rss_bytes() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
  """Samples this process's resident set every 2 ms; ``peak_delta`` is the peak above the start.

  ``getrusage``'s peak is monotone over the process's life, so it cannot separate two sides measured
  one after the other; sampling can (it may miss spikes shorter than the interval).
  """

  def __init__(self, interval_s: float = 0.002):
    self.interval_s = interval_s
    self.start = self.peak = 0
    self._stop = threading.Event()
    self._thread = None

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(self.interval_s)

  def __enter__(self):
    self.start = self.peak = _rss_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())

  @property
  def peak_delta(self) -> int:
    return self.peak - self.start


def _ru_maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# Environment: threads, devices, anomalib.
# ----------------------------------------------------------------------------------------------------

def configure_process(threads: int, num_cpu_devices: int, compilation_cache_dir: str = "") -> int:
  """Pins threads and host devices; call before JAX's backend starts. Returns the thread count used.

  Affinity bounds both XLA's thread pool (sized from the schedulable CPUs when the CPU client is made) and
  PyTorch's; ``torch.set_num_threads`` is set by the anomalib side. Where the backend is already up (e.g.
  under pytest), device count and XLA flags stay as they are.
  """
  available = sorted(os.sched_getaffinity(0))
  if threads < 0:
    raise ValueError(f"--threads={threads} must be >= 0 (0 = all {len(available)} usable cores)")
  if threads and threads < len(available):
    os.sched_setaffinity(0, available[:threads])
  used = threads or len(available)
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    if used == 1:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    # Only ever raised: a caller (e.g. a test session) may have asked for more already.
    if num_cpu_devices > max(jax.config.jax_num_cpu_devices, 1):
      jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  if compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return used


@dataclasses.dataclass
class Anomalib:
  """anomalib's pieces, or why they are missing."""
  available: bool
  reason: str = ""
  version: str = ""
  torch: Any = None
  generator_cls: Any = None
  model_cls: Any = None
  recon_cls: Any = None
  disc_cls: Any = None
  loss_cls: Any = None


def load_anomalib(enabled: bool, threads: int) -> Anomalib:
  """Imports anomalib's DRAEM parts if installed (the ``bench`` extra) and sets torch's thread count."""
  if not enabled:
    return Anomalib(False, "anomalib disabled (--noanomalib)")
  try:
    import anomalib  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from anomalib.data.utils.generators import perlin  # pylint: disable=g-import-not-at-top
    from anomalib.models.image.draem import loss as draem_loss  # pylint: disable=g-import-not-at-top
    from anomalib.models.image.draem import torch_model  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except  # ImportError, or a broken torch/torchvision pair
    return Anomalib(False, f"anomalib not importable ({type(e).__name__}: {e}); install the 'bench' "
                           "extra (see BENCHMARKS.md) to compare")
  torch.set_num_threads(threads)
  return Anomalib(True, version=f"anomalib {anomalib.__version__}, torch {torch.__version__}",
                  torch=torch, generator_cls=perlin.PerlinAnomalyGenerator,
                  model_cls=torch_model.DraemModel, recon_cls=torch_model.ReconstructiveSubNetwork,
                  disc_cls=torch_model.DiscriminativeSubNetwork, loss_cls=draem_loss.DraemLoss)


def machine_info(threads: int) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  model = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  flags_in_effect = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                     "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir or "",
                     "jax_disable_most_optimizations":
                         bool(jax.config.values.get("jax_disable_most_optimizations"))}
  for name in ("jaxlib", "flax", "optax", "numpy", "torch", "anomalib"):
    try:
      versions[name] = __import__(name).__version__
    except Exception:  # pylint: disable=broad-except
      pass
  return {"cpu_model": model or platform.processor(), "cpu_count": os.cpu_count(), "threads": threads,
          "load_average_1_5_15": load, "backend": jax.default_backend(),
          "devices": [str(d.device_kind) for d in jax.devices()], "versions": versions,
          "jax_settings": flags_in_effect}


def _peak_tflops(cfg: BenchConfig) -> float | None:
  import jax  # pylint: disable=g-import-not-at-top
  if cfg.peak_tflops > 0:
    return cfg.peak_tflops
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def _ratio(jax_value: float | None, other: dict[str, Any] | None, key: str,
           anomalib: Anomalib) -> dict[str, Any]:
  if other is None or not anomalib.available:
    return {"ratio": None, "ratio_reason": anomalib.reason or "anomalib side not measured"}
  if "error" in other:
    return {"ratio": None, "ratio_reason": f"anomalib side failed: {other['error']}"}
  return {"ratio": jax_value / other[key]}


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """Runs one anomalib measurement; a failure is recorded, not raised (anomalib is optional)."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("anomalib measurement failed")
    return {"error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------------

def _textures(cfg: BenchConfig, size: int) -> np.ndarray:
  from draem_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.load_sources(cfg.resolved_texture_dir(), (size, size),
                              max_sources=cfg.max_textures or None)


def _normal_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """uint8 (n, size, size, 3) smooth random images (stand-ins for normal images; content is irrelevant
  to speed)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float32)
  reps = -(-size // 8)
  return np.repeat(np.repeat(coarse, reps, 1), reps, 2)[:, :size, :size].astype(np.uint8)


def _random_variables(model, image_size: int, seed: int = 0) -> dict[str, Any]:
  """Model variables shaped by ``jax.eval_shape`` and filled on the host like DRAEM's init.

  Conv kernels N(0, 0.02), biases and BN shifts 0, BN scales and running variances 1. Speed does not
  depend on the values, and this avoids compiling ``model.init`` (as long as a train step on a CPU).
  """
  import jax  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda k: model.init(k, jax.numpy.zeros((1, image_size, image_size, 3)),
                                               train=False), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      return jax.device_put(rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype))
    value = 1.0 if name in ("scale", "var") else 0.0
    return jax.device_put(np.full(leaf.shape, value, leaf.dtype))
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _to_torch(anomalib: Anomalib, images: np.ndarray):
  return anomalib.torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0


def _anomalib_model(anomalib: Anomalib, recon_width: int, disc_width: int):
  """DraemModel with the given widths (its constructor fixes 128 / 64, so the sub-networks are replaced)."""
  model = anomalib.model_cls()  # builds the full-width nets first; they are freed on replacement
  model.reconstructive_subnetwork = anomalib.recon_cls(in_channels=3, out_channels=3,
                                                       base_width=recon_width)
  model.discriminative_subnetwork = anomalib.disc_cls(in_channels=6, out_channels=2,
                                                      base_width=disc_width)
  return model


# ----------------------------------------------------------------------------------------------------
# Sections.
# ----------------------------------------------------------------------------------------------------

def bench_synthesis(cfg: BenchConfig, anomalib: Anomalib, threads: int) -> list[dict[str, Any]]:
  """Anomaly synthesis images/s at ``synth_image_size`` for each batch size."""
  import jax  # pylint: disable=g-import-not-at-top
  from draem_jax import synthesis  # pylint: disable=g-import-not-at-top
  size = cfg.synth_image_size
  textures = jax.device_put(_textures(cfg, size))
  rows = []
  for batch in cfg.synth_batch_sizes:
    images = jax.device_put(_normal_images(batch, size).astype(np.float32) / 255.0)
    fn = jax.jit(synthesis.synthesize)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = fn.lower(key, images, textures).compile()
    compile_s = time.perf_counter() - t0
    counter = iter(range(1 << 30))

    def run_jax(compiled=compiled, key=key, counter=counter, images=images):  # bound per batch size
      out = compiled(jax.random.fold_in(key, next(counter)), images, textures)
      jax.block_until_ready(out)

    t = time_calls(run_jax, cfg.repeats, cfg.warmup)
    ips = batch / t["median_s"]
    row = {"batch": batch, "image_size": size,
           "draem_jax": {"compile_s": compile_s, **t, "images_per_s": ips,
                         "images_per_s_per_core": ips / threads}}
    other = None
    if anomalib.available:
      def run_anomalib(batch=batch):
        torch = anomalib.torch
        gen = anomalib.generator_cls(anomaly_source_path=cfg.resolved_texture_dir(), probability=0.5)
        x = _to_torch(anomalib, _normal_images(batch, size))

        def call():
          with torch.no_grad():
            gen(x)
        ta = time_calls(call, cfg.repeats, cfg.warmup)
        a_ips = batch / ta["median_s"]
        return {**ta, "images_per_s": a_ips, "images_per_s_per_core": a_ips / threads}
      other = _guard(run_anomalib)
      row["anomalib"] = other
    row.update(_ratio(ips, other, "images_per_s", anomalib))
    rows.append(row)
  return rows


def _jax_train_setup(cfg: BenchConfig, image_size: int, global_batch: int, devices=None):
  """Model, state, jitted step and inputs of a DRAEM train step on a ``devices`` mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  from draem_jax import models, parallel, steps, synthesis  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(devices)
  repl = parallel.replicated(mesh)
  model = models.DRAEM(recon_width=cfg.recon_width, disc_width=cfg.disc_width)
  schedule = optax.constant_schedule(1e-4)
  tx = steps.make_optimizer(schedule)
  variables = _random_variables(model, image_size)
  state = jax.device_put(steps.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
      key=jax.random.key(1)), repl)
  # The library's own jitted step; the batch is the whole (global-batch-sized) image set on the devices.
  step = steps.jit_train_step(mesh, model=model, tx=tx, synthesis_config=synthesis.SynthesisConfig(),
                              schedule=schedule, batch_size=global_batch, data_seed=0)
  images = parallel.replicate(_normal_images(global_batch, image_size), mesh)
  textures = parallel.replicate(_textures(cfg, image_size), mesh)
  return state, step, images, textures


def _time_jax_train(cfg: BenchConfig, image_size: int, global_batch: int, devices=None):
  import jax  # pylint: disable=g-import-not-at-top
  state, step, images, textures = _jax_train_setup(cfg, image_size, global_batch, devices)
  t0 = time.perf_counter()
  compiled = step.lower(state, images, textures).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  xla_flops = float((cost or {}).get("flops", 0.0)) or None
  box = [state]

  def run():
    box[0], metrics = compiled(box[0], images, textures)
    jax.block_until_ready(metrics["loss"])

  t = time_calls(run, cfg.repeats, cfg.warmup)
  return {"compile_s": compile_s, **t, "images_per_s": global_batch / t["median_s"]}, xla_flops


def bench_train(cfg: BenchConfig, anomalib: Anomalib, threads: int) -> list[dict[str, Any]]:
  """Train-step images/s (synthesis + both nets + losses + Adam) and FLOP rates."""
  size, batch = cfg.train_image_size, cfg.train_batch_size
  import jax  # pylint: disable=g-import-not-at-top
  # One device: multi-device runs are the scaling section's business.
  j, xla_flops = _time_jax_train(cfg, size, batch, devices=jax.devices()[:1])
  flops_img = train_flops_per_image(cfg.recon_width, cfg.disc_width, size, size)
  j["flops_per_image_analytic"] = flops_img
  j["flops_per_image_xla"] = xla_flops / batch if xla_flops else None
  j["tflops_per_s"] = flops_img * j["images_per_s"] / 1e12
  peak = _peak_tflops(cfg)
  j["mfu"] = j["tflops_per_s"] / peak if peak else None
  j["mfu_reason"] = None if peak else (
      f"no peak FLOP/s known for device kind {jax.devices()[0].device_kind!r}; pass --peak_tflops")
  row = {"batch": batch, "image_size": size, "recon_width": cfg.recon_width,
         "disc_width": cfg.disc_width, "draem_jax": j}
  other = None
  if anomalib.available:
    def run_anomalib():
      torch = anomalib.torch
      model = _anomalib_model(anomalib, cfg.recon_width, cfg.disc_width)
      model.train()
      loss_fn = anomalib.loss_cls()
      gen = anomalib.generator_cls(anomaly_source_path=cfg.resolved_texture_dir(), probability=0.5)
      opt = torch.optim.Adam(model.parameters(), lr=1e-4)
      x = _to_torch(anomalib, _normal_images(batch, size))

      def step():
        # As anomalib's Draem.training_step: synthesis, both nets, DraemLoss; then Adam.
        augmented, mask = gen(x)
        recon, prediction = model(augmented)
        loss = loss_fn(x, recon, mask, prediction)
        opt.zero_grad()
        loss.backward()
        opt.step()
      ta = time_calls(step, cfg.repeats, cfg.warmup)
      a_ips = batch / ta["median_s"]
      return {**ta, "images_per_s": a_ips, "tflops_per_s": flops_img * a_ips / 1e12}
    other = _guard(run_anomalib)
    row["anomalib"] = other
  row.update(_ratio(j["images_per_s"], other, "images_per_s", anomalib))
  return [row]


def bench_infer(cfg: BenchConfig, anomalib: Anomalib, threads: int) -> list[dict[str, Any]]:
  """Inference images/s (both nets, eval BN, anomaly map and image score) and peak memory."""
  del threads
  import jax  # pylint: disable=g-import-not-at-top
  from draem_jax import models, steps  # pylint: disable=g-import-not-at-top
  size, batch = cfg.train_image_size, cfg.infer_batch_size
  model = models.DRAEM(recon_width=cfg.recon_width, disc_width=cfg.disc_width)
  images_np = _normal_images(batch, size)
  variables = _random_variables(model, size)
  images = jax.device_put(images_np)
  # Peak above the level with the model in memory: compile, warm-up and timed calls.
  with PeakRss() as rss:
    fn = jax.jit(steps.make_infer_fn(model))
    t0 = time.perf_counter()
    compiled = fn.lower(variables, images).compile()
    compile_s = time.perf_counter() - t0
    t = time_calls(lambda: jax.block_until_ready(compiled(variables, images)), cfg.repeats,
                   cfg.warmup)
  stats = None
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    stats = None
  j = {"compile_s": compile_s, **t, "images_per_s": batch / t["median_s"],
       "host_rss_peak_delta_mb": rss.peak_delta / 2**20,
       "device_peak_mb": (stats["peak_bytes_in_use"] / 2**20
                          if stats and "peak_bytes_in_use" in stats else None),
       "device_peak_reason": None if stats else f"memory_stats() unavailable on {jax.default_backend()}",
       "process_peak_rss_mb": _ru_maxrss_bytes() / 2**20}
  row = {"batch": batch, "image_size": size, "recon_width": cfg.recon_width,
         "disc_width": cfg.disc_width, "draem_jax": j}
  other = None
  if anomalib.available:
    def run_anomalib():
      torch = anomalib.torch
      model = _anomalib_model(anomalib, cfg.recon_width, cfg.disc_width).eval()
      x = _to_torch(anomalib, images_np)
      with PeakRss() as arss:
        def call():
          with torch.inference_mode():
            model(x)
        ta = time_calls(call, cfg.repeats, cfg.warmup)
      return {**ta, "images_per_s": batch / ta["median_s"],
              "host_rss_peak_delta_mb": arss.peak_delta / 2**20,
              "process_peak_rss_mb": _ru_maxrss_bytes() / 2**20}
    other = _guard(run_anomalib)
    row["anomalib"] = other
  row.update(_ratio(j["images_per_s"], other, "images_per_s", anomalib))
  return [row]


def bench_scaling(cfg: BenchConfig, anomalib: Anomalib, threads: int) -> list[dict[str, Any]]:
  """Train-step images/s on the first k devices, per-device batch fixed (weak scaling)."""
  del anomalib, threads
  import jax  # pylint: disable=g-import-not-at-top
  rows = []
  base = None
  for k in cfg.scaling_devices:
    if k > jax.device_count():
      rows.append({"devices": k, "skipped": f"only {jax.device_count()} devices"})
      continue
    batch = k * cfg.scaling_per_device_batch
    j, _ = _time_jax_train(cfg, cfg.train_image_size, batch, devices=jax.devices()[:k])
    base = base or (j["images_per_s"], k)
    rows.append({"devices": k, "global_batch": batch, "image_size": cfg.train_image_size,
                 "draem_jax": j, "speedup": j["images_per_s"] / base[0],
                 "efficiency": j["images_per_s"] / base[0] * base[1] / k})
  return rows


def _load_mvtec_config(cfg: BenchConfig):
  """The recipe of configs/mvtec.py (``recipes.mvtec``) with the quality section's overrides."""
  from draem_jax import recipes  # pylint: disable=g-import-not-at-top
  c = recipes.mvtec(cfg.category)
  c.dataset = "folder"
  c.data_dir = cfg.resolved_data_dir()
  c.anomaly_source_path = cfg.resolved_texture_dir()
  c.max_sources = cfg.max_textures
  c.image_size = cfg.quality_image_size
  c.model.recon_width, c.model.disc_width = cfg.recon_width, cfg.disc_width
  c.batch_size = cfg.quality_batch_size
  c.lr_decay_fractions = ()  # constant learning rate over the short budget
  c.log_every_steps = max(cfg.quality_steps // 4, 1)
  c.checkpoint_every_steps = 10**9  # the final step is saved anyway
  c.eval.num_visualizations = 0
  c.eval.batch_size = cfg.quality_batch_size
  return c


_QUALITY_KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def bench_quality(cfg: BenchConfig, anomalib: Anomalib, threads: int) -> list[dict[str, Any]]:
  """Detection quality after a fixed training budget on a real category."""
  del threads
  from draem_jax import metrics as metrics_lib, steps, train  # pylint: disable=g-import-not-at-top
  from draem_jax.data import datasets  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="draem_bench_") as workdir:
    c = _load_mvtec_config(cfg)
    num_train = len(datasets.load_train_images(c, workdir))
    spe = steps.steps_per_epoch(num_train, c.batch_size)
    c.num_epochs = max(1, -(-cfg.quality_steps // spe))
    total = c.num_epochs * spe
    t0 = time.perf_counter()
    results = train.train_and_evaluate(c, workdir)
    wall = time.perf_counter() - t0
  j = {k: results[k] for k in _QUALITY_KEYS}
  j.update(wall_s=wall, steps=total)
  row = {"category": cfg.category, "image_size": cfg.quality_image_size, "batch": c.batch_size,
         "recon_width": cfg.recon_width, "disc_width": cfg.disc_width, "steps": total,
         "draem_jax": j}
  if anomalib.available:
    def run_anomalib():
      torch = anomalib.torch
      t0 = time.perf_counter()
      train_images = datasets.load_train_images(c, "")
      test = datasets.load_test_split(c, "")
      model = _anomalib_model(anomalib, cfg.recon_width, cfg.disc_width)
      loss_fn = anomalib.loss_cls()
      gen = anomalib.generator_cls(anomaly_source_path=cfg.resolved_texture_dir(), probability=0.5)
      opt = torch.optim.Adam(model.parameters(), lr=1e-4)
      rng = np.random.default_rng(0)
      model.train()
      for _ in range(total):
        idx = rng.choice(len(train_images), c.batch_size, replace=len(train_images) < c.batch_size)
        x = _to_torch(anomalib, train_images[idx])
        augmented, mask = gen(x)
        recon, prediction = model(augmented)
        loss = loss_fn(x, recon, mask, prediction)
        opt.zero_grad()
        loss.backward()
        opt.step()
      model.eval()
      maps, scores = [], []
      with torch.inference_mode():
        for s in range(0, len(test.images), c.batch_size):
          out = model(_to_torch(anomalib, test.images[s:s + c.batch_size]))
          maps.append(out.anomaly_map.reshape(-1, *test.images.shape[1:3]).numpy())
          scores.append(out.pred_score.reshape(-1).numpy())
      m = metrics_lib.compute_all(image_labels=test.labels, image_scores=np.concatenate(scores),
                                  masks=test.masks, anomaly_maps=np.concatenate(maps),
                                  fpr_limit=c.eval.aupro_fpr_limit)
      return {**{k: float(m[k]) for k in _QUALITY_KEYS}, "wall_s": time.perf_counter() - t0,
              "steps": total}
    row["anomalib"] = _guard(run_anomalib)
    if "error" in row["anomalib"]:
      row["anomalib_reason"] = row["anomalib"]["error"]
  else:
    row["anomalib_reason"] = anomalib.reason
  return [row]


_BENCHES = {"synthesis": bench_synthesis, "train": bench_train, "infer": bench_infer,
            "scaling": bench_scaling, "quality": bench_quality}


def run(cfg: BenchConfig) -> dict[str, Any]:
  """Runs the configured sections; returns the report (JSON-serialisable)."""
  cfg.validate()
  threads = configure_process(cfg.threads, max(cfg.scaling_devices) if "scaling" in cfg.sections else 1,
                              cfg.compilation_cache_dir)
  anomalib = load_anomalib(cfg.use_anomalib, threads)
  report = {"machine": machine_info(threads), "config": dataclasses.asdict(cfg),
            "anomalib": {"available": anomalib.available, "version": anomalib.version,
                         "reason": anomalib.reason}, "sections": {}}
  for name in SECTIONS:
    if name in cfg.sections:
      logging.info("benchmark section %s", name)
      t0 = time.perf_counter()
      report["sections"][name] = _BENCHES[name](cfg, anomalib, threads)
      logging.info("section %s took %.1f s", name, time.perf_counter() - t0)
  report["machine"]["load_average_after"] = os.getloadavg()
  report["machine"]["process_peak_rss_mb"] = _ru_maxrss_bytes() / 2**20
  return report


# ----------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------

def _f(v, digits=3) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
      return f"{v:.{digits}g}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(digits - 2, 1)}f}"
  return str(v)


def markdown(report: dict[str, Any]) -> str:
  """The report as Markdown tables (one per section)."""
  m, a = report["machine"], report["anomalib"]
  out = [f"draem_jax fast_cpu_conv: {report['config']['fast_cpu_conv']}",
         f"machine: {m['cpu_model']}, {m['threads']} threads of {m['cpu_count']} cores, backend "
         f"{m['backend']} ({len(m['devices'])} devices), load average {m['load_average_1_5_15']}; "
         f"jax {m['versions'].get('jax')}",
         f"jax settings: {m['jax_settings']}",
         f"anomalib: {a['version'] if a['available'] else 'absent - ' + a['reason']}", ""]
  s = report["sections"]

  def side(row, name, key):
    return (row.get(name) or {}).get(key)

  def ratio(row):
    return _f(row["ratio"]) if row.get("ratio") is not None else f"- ({row.get('ratio_reason')})"

  if "synthesis" in s:
    out += ["### Anomaly synthesis", "",
            "| size | batch | draem_jax img/s | compile s | anomalib img/s | ratio |",
            "|---|---|---|---|---|---|"]
    for r in s["synthesis"]:
      out.append(f"| {r['image_size']} | {r['batch']} | {_f(r['draem_jax']['images_per_s'])} | "
                 f"{_f(r['draem_jax']['compile_s'])} | {_f(side(r, 'anomalib', 'images_per_s'))} | "
                 f"{ratio(r)} |")
    out.append("")
  if "train" in s:
    out += ["### Train step (synthesis + both nets + losses + Adam)", "",
            "| size | batch | widths | draem_jax img/s | compile s | TFLOP/s | MFU | anomalib img/s "
            "| ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in s["train"]:
      j = r["draem_jax"]
      out.append(f"| {r['image_size']} | {r['batch']} | {r['recon_width']}/{r['disc_width']} | "
                 f"{_f(j['images_per_s'])} | {_f(j['compile_s'])} | {_f(j['tflops_per_s'])} | "
                 f"{_f(j['mfu'])} | {_f(side(r, 'anomalib', 'images_per_s'))} | {ratio(r)} |")
    out.append("")
  if "infer" in s:
    out += ["### Inference", "",
            "| size | batch | widths | draem_jax img/s | compile s | RSS peak +MB | device peak MB | "
            "anomalib img/s | anomalib RSS peak +MB | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["infer"]:
      j = r["draem_jax"]
      out.append(f"| {r['image_size']} | {r['batch']} | {r['recon_width']}/{r['disc_width']} | "
                 f"{_f(j['images_per_s'])} | {_f(j['compile_s'])} | {_f(j['host_rss_peak_delta_mb'])} | "
                 f"{_f(j['device_peak_mb'])} | {_f(side(r, 'anomalib', 'images_per_s'))} | "
                 f"{_f(side(r, 'anomalib', 'host_rss_peak_delta_mb'))} | {ratio(r)} |")
    out.append("")
  if "scaling" in s:
    out += ["### Scaling (train step, fixed per-device batch)", "",
            "| devices | global batch | img/s | speedup | efficiency |", "|---|---|---|---|---|"]
    for r in s["scaling"]:
      if "skipped" in r:
        out.append(f"| {r['devices']} | - | skipped: {r['skipped']} | | |")
      else:
        out.append(f"| {r['devices']} | {r['global_batch']} | {_f(r['draem_jax']['images_per_s'])} | "
                   f"{_f(r['speedup'])} | {_f(r['efficiency'])} |")
    out.append("")
  if "quality" in s:
    out += ["### Detection quality after a fixed budget", "",
            "| category | side | steps | image AUROC | pixel AUROC | pixel AP | AUPRO | wall s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in s["quality"]:
      for name in ("draem_jax", "anomalib"):
        q = r.get(name)
        if q and "error" not in q:
          out.append(f"| {r['category']} | {name} | {q['steps']} | {_f(q['image_auroc'])} | "
                     f"{_f(q['pixel_auroc'])} | {_f(q['pixel_ap'])} | {_f(q['aupro'])} | "
                     f"{_f(q['wall_s'])} |")
      if r.get("anomalib_reason"):
        out.append(f"| {r['category']} | anomalib | - | - ({r['anomalib_reason']}) | | | | |")
    out.append("")
  return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------

def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The benchmark's flags, on ``fv`` (tests pass their own ``FlagValues``)."""
  d = BenchConfig()
  flags.DEFINE_bool("quick", False, "Smoke run: synthesis, train, infer at small sizes and widths "
                    "(~1.5 min on a busy 2-core CPU, mostly compiling); explicit flags still override.",
                    flag_values=fv)
  flags.DEFINE_list("sections", list(SECTIONS), f"Sections to run, of {','.join(SECTIONS)} (--quick: "
                    "the first three).", flag_values=fv)
  flags.DEFINE_integer("repeats", d.repeats, "Timed calls per measurement (median reported).",
                       flag_values=fv)
  flags.DEFINE_integer("warmup", d.warmup, "Untimed calls after compilation.", flag_values=fv)
  flags.DEFINE_integer("threads", d.threads, "Cores for both sides (0 = all usable).", flag_values=fv)
  flags.DEFINE_integer("synth_image_size", d.synth_image_size, "Synthesis image side.", flag_values=fv)
  flags.DEFINE_list("synth_batch_sizes", [str(b) for b in d.synth_batch_sizes],
                    "Synthesis batch sizes.", flag_values=fv)
  flags.DEFINE_string("texture_dir", d.texture_dir, "Anomaly-source folder (DTD layout); default "
                      "../shared/data/dtd_subset/images relative to the repository.", flag_values=fv)
  flags.DEFINE_integer("max_textures", d.max_textures, "Cap on textures loaded by draem_jax (0 = all).",
                       flag_values=fv)
  flags.DEFINE_integer("train_image_size", d.train_image_size, "Image side of train/infer/scaling "
                       "(multiple of 32; DRAEM: 256).", flag_values=fv)
  flags.DEFINE_integer("recon_width", d.recon_width, "Reconstructive base width (DRAEM: 128).",
                       flag_values=fv)
  flags.DEFINE_integer("disc_width", d.disc_width, "Discriminative base width (DRAEM: 64).",
                       flag_values=fv)
  flags.DEFINE_integer("train_batch_size", d.train_batch_size, "Train-step batch.", flag_values=fv)
  flags.DEFINE_integer("infer_batch_size", d.infer_batch_size, "Inference batch.", flag_values=fv)
  flags.DEFINE_list("scaling_devices", [str(k) for k in d.scaling_devices], "Device counts.",
                    flag_values=fv)
  flags.DEFINE_integer("scaling_per_device_batch", d.scaling_per_device_batch, "Per-device batch.",
                       flag_values=fv)
  flags.DEFINE_string("data_dir", d.data_dir, "MVTec-layout root for the quality section; default "
                      "../shared/data/piped_mvtec relative to the repository.", flag_values=fv)
  flags.DEFINE_string("category", d.category, "Quality-section category.", flag_values=fv)
  flags.DEFINE_integer("quality_steps", d.quality_steps, "Quality-section training steps (rounded up "
                       "to whole epochs).", flag_values=fv)
  flags.DEFINE_integer("quality_image_size", d.quality_image_size, "Quality-section image side.",
                       flag_values=fv)
  flags.DEFINE_integer("quality_batch_size", d.quality_batch_size, "Quality-section batch.",
                       flag_values=fv)
  flags.DEFINE_bool("anomalib", True, "Compare with anomalib where it is installed.", flag_values=fv)
  flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s for MFU (0 = by device kind).",
                     flag_values=fv)
  flags.DEFINE_string("compilation_cache_dir", "", "JAX persistent compilation cache ('' = off; "
                      "warm, it turns compile times into cache loads).", flag_values=fv)
  flags.DEFINE_bool("fast_cpu_conv", False, "draem_jax's custom CPU conv weight gradient (conv.py); "
                    "default XLA's native conv, as the project's configs.", flag_values=fv)
  flags.DEFINE_string("output", "benchmark.json", "Where to write the JSON report ('' = nowhere).",
                      flag_values=fv)
  flags.DEFINE_string("markdown_output", "", "Also write the Markdown report here.", flag_values=fv)


_INT_LISTS = ("synth_batch_sizes", "scaling_devices")


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> BenchConfig:
  """``BenchConfig`` from parsed flags: ``--quick`` defaults, then every flag given explicitly."""
  fields = {f.name for f in dataclasses.fields(BenchConfig)}
  explicit = {}
  for name in fields | {"anomalib"}:
    if name in fv and fv[name].present:
      value = fv[name].value
      if name in _INT_LISTS:
        try:
          value = tuple(int(v) for v in value)
        except ValueError:
          raise ValueError(f"--{name}={','.join(value)} must be comma-separated integers") from None
      explicit["use_anomalib" if name == "anomalib" else name] = value
  if "sections" in explicit:
    explicit["sections"] = tuple(explicit["sections"])
  cfg = BenchConfig.quick(**explicit) if fv.quick else BenchConfig(**explicit)
  cfg.validate()
  return cfg


def run_from_flags(fv: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
  """Runs the benchmark described by parsed flags, prints the Markdown, writes the files."""
  report = run(config_from_flags(fv))
  text = markdown(report)
  print(text)
  if fv.output:
    with open(fv.output, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, default=float)
    logging.info("wrote %s", fv.output)
  if fv.markdown_output:
    with open(fv.markdown_output, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from draem_jax import writers  # pylint: disable=g-import-not-at-top
  writers.quiet_library_logs()
  try:
    run_from_flags()
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  define_flags()
  app.run(main)
