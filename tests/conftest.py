"""Test set-up: CPU only, 8 simulated devices, persistent compilation cache.

Everything here must run before JAX initialises its backend, which is why it sits at the top of
conftest (pytest imports it before any test module).
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent cache makes re-runs of the suite much cheaper on the 2-core CI machine.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"),
)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402

# Real data shipped beside the repository (never inside it). Tests that need it skip where absent.
SHARED_DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data; skips the test with a reason when the folder is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real test data not found at {SHARED_DATA} (only present in CI and dev checkouts)")
  return SHARED_DATA
