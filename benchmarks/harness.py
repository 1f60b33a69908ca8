"""Shared benchmark machinery: process set-up, interleaved timing, machine facts, inputs, memory."""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import threading
import time
from typing import Any, Callable, Mapping

from absl import logging
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Setup:
  """What ``configure_process`` decided: cores, host devices and the XLA flags in effect."""
  threads: int
  cpu_devices: int
  xla_flags: str


def configure_process(threads: int, cpu_devices: int, min_devices: int = 1,
                      compilation_cache_dir: str = "") -> Setup:
  """Pins cores and host devices; must run before JAX's backend starts.

  ``threads`` cores (0 = all usable) bound both XLA's and PyTorch's pools (affinity). ``cpu_devices``
  host devices (0 = one per core): with more than one, each runs its share of a batch single-threaded
  (``--xla_cpu_multi_thread_eigen=false``); faster than one device on an idle machine, much slower on a
  loaded one (BENCHMARKS.md). Where the backend is already up (under pytest) only the cache changes.
  """
  available = sorted(os.sched_getaffinity(0))
  if threads < 0 or cpu_devices < 0:
    raise ValueError(f"config.threads={threads} and config.cpu_devices={cpu_devices} must be >= 0")
  if threads and threads < len(available):
    os.sched_setaffinity(0, available[:threads])
  used = threads or len(available)
  devices = cpu_devices or used
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    if devices > 1 or used == 1:
      flags = os.environ.get("XLA_FLAGS", "")
      if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    wanted = max(devices, min_devices)
    if wanted > max(jax.config.jax_num_cpu_devices, 1):
      jax.config.update("jax_num_cpu_devices", wanted)
  else:
    devices = min(devices, len(jax.devices()))
  if compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return Setup(threads=used, cpu_devices=devices, xla_flags=os.environ.get("XLA_FLAGS", ""))


def _stats(wall: list[float], cpu: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall),
          "cpu_median_s": statistics.median(cpu), "repeats": len(wall)}


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, dict]:
  """Times each ``fn()`` (which must block until done) in turns: a, b, a, b, ...

  Both sides see the same machine load over the same minutes, which on a shared machine matters more
  than the number of repeats. Returns per side the median / min / max wall seconds and the median process
  CPU seconds of one call (CPU time is less sensitive to other jobs than wall time).
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      fn()
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return {k: _stats(wall[k], cpu[k]) for k in fns}


def load_average() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def machine_info(setup: Setup) -> dict[str, Any]:
  """CPU, cores, devices, versions and load, for the report header."""
  import jax  # pylint: disable=g-import-not-at-top
  model = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    pass
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  for name in ("jaxlib", "flax", "optax", "numpy", "torch", "anomalib"):
    try:
      versions[name] = __import__(name).__version__
    except Exception:  # pylint: disable=broad-except  # optional packages
      pass
  return {"cpu_model": model or platform.processor(), "cpu_count": os.cpu_count(),
          "threads": setup.threads, "cpu_devices": setup.cpu_devices, "xla_flags": setup.xla_flags,
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "versions": versions, "load_average_before": load_average()}


def guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """Runs an optional measurement (anomalib's side); a failure is recorded, not raised."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("optional measurement failed")
    return {"error": f"{type(e).__name__}: {e}"}


def ratio(ours: float | None, theirs: float | None, reason: str = "") -> dict[str, Any]:
  """draem_jax / anomalib (> 1: draem_jax faster), or None with the reason."""
  if ours is None or not theirs:
    return {"ratio": None, "ratio_reason": reason or "anomalib side not measured"}
  return {"ratio": ours / theirs}


def texture_dir(config) -> str:
  return config.texture_dir or os.path.join(REPO_ROOT, "..", "shared", "data", "dtd_subset", "images")


def data_dir(config) -> str:
  return config.data_dir or os.path.join(REPO_ROOT, "..", "shared", "data", "piped_mvtec")


def textures(config, size: int) -> np.ndarray:
  """uint8 (S, size, size, 3) anomaly sources: the DTD folder, or procedural ones where it is absent."""
  from draem_jax.data import sources  # pylint: disable=g-import-not-at-top
  folder = texture_dir(config)
  if os.path.isdir(folder):
    return sources.load_sources(folder, (size, size), max_sources=config.max_textures or None)
  logging.warning("no texture folder at %s: procedural anomaly sources", folder)
  return sources.procedural_sources(max(config.max_textures, 4), (size, size), seed=0)


def normal_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """uint8 (n, size, size, 3) blocky random images (content does not change the speed)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
  reps = -(-size // 8)
  return np.repeat(np.repeat(coarse, reps, 1), reps, 2)[:, :size, :size]


def _rss_bytes() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
  """Samples the resident set every 2 ms; ``peak_delta_mb`` is the peak above the level at entry."""

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
  def peak_delta_mb(self) -> float:
    return (self.peak - self.start) / 2**20


def process_peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def device_memory() -> dict[str, Any]:
  """``memory_stats()`` of the first device in MB, or the reason it is missing."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    stats = None
  if not stats:
    return {"reason": f"memory_stats() unavailable on {jax.default_backend()}"}
  return {k.replace("bytes", "mb"): v / 2**20 for k, v in stats.items()
          if k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}
