r"""Tiny: the demo at 32x32 with 4-channel networks and 8 steps; what the test suite trains.

  python -m draem_jax.train --config=configs/tiny.py --workdir=/tmp/tiny

Seconds of training after compilation; the metrics mean nothing, the run exercises every part.
"""

from draem_jax import recipes


def get_config(arg: str | None = None):
  del arg
  return recipes.tiny()
