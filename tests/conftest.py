"""Test set-up: CPU only, 8 simulated devices, persistent compilation cache.

Everything here must run before JAX initialises its backend, which is why it sits at the top of
conftest (pytest imports it before any test module).
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent cache outside the checkout makes re-runs of the suite (and CI's fresh clones on the same
# machine) much cheaper on 2 cores.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
        / "draem_jax" / "jax_compilation_cache"),
)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_numpy_rank_promotion", "raise")
# Compile time dominates the CPU suite: without XLA's optimisation passes the train step compiles ~3x
# faster (48 s -> 18 s for a small DRAEM) and runs ~30% slower, with the same numbers to rounding.
# DRAEM_XLA_OPTIMIZATIONS=1 keeps them on: CI runs the tests marked `numerics` (comparisons with
# independent references at tight tolerances) that way once more, as users' programs compile.
XLA_OPTIMIZATIONS = os.environ.get("DRAEM_XLA_OPTIMIZATIONS", "0") == "1"
jax.config.update("jax_disable_most_optimizations", not XLA_OPTIMIZATIONS)

import pytest  # noqa: E402

# Real data shipped beside the repository (never inside it). Tests that need it skip where absent.
SHARED_DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data; skips the test with a reason when the folder is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real test data not found at {SHARED_DATA} (only present in CI and dev checkouts)")
  return SHARED_DATA


@pytest.fixture
def conv_table_variable(monkeypatch):
  """Sets ``DRAEM_CPU_CONV_TABLE`` for this test: ``set_table(name)``, with ``conv.cpu_table_name``'s
  cache cleared each time and again, the variable removed, after the test."""
  from draem_jax import conv  # pylint: disable=g-import-not-at-top

  def set_table(name: str) -> None:
    monkeypatch.setenv("DRAEM_CPU_CONV_TABLE", name)
    conv.cpu_table_name.cache_clear()

  yield set_table
  monkeypatch.delenv("DRAEM_CPU_CONV_TABLE", raising=False)
  conv.cpu_table_name.cache_clear()
