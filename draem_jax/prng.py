"""Per-example PRNG keys, and multi-dimensional draws that compile fast on the CPU.

Every random draw in draem_jax is made from a key that belongs to one example, derived from the step key
and the example's *global* index in the batch. The result for an example therefore does not depend on the
batch size, on how the batch is split over devices, or on the number of processes.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp


def example_keys(key: jax.Array, num: int, offset: int | jax.Array = 0) -> jax.Array:
  """Keys for examples ``offset .. offset + num - 1``.

  Args:
    key: a typed PRNG key (``jax.random.key``), scalar.
    num: static number of examples.
    offset: global index of the first example.

  Returns:
    Typed key array of shape (num,); entry i is ``fold_in(key, offset + i)``.
  """
  idx = jnp.arange(num, dtype=jnp.uint32) + jnp.asarray(offset, jnp.uint32)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)


def draw_flat(draw: Callable[..., jax.Array], key: jax.Array, shape: tuple[int, ...], *args,
              **kwargs) -> jax.Array:
  """``draw(key, shape, *args, **kwargs)``, drawn as a vector of ``prod(shape)`` and reshaped.

  The values are the same: JAX's threefry counters run over the row-major flat index of the shape (with
  ``jax_threefry_partitionable`` on or off), and the samplers (uniform, normal) transform the bits
  element by element. The compile time is not: XLA:CPU took ~5.5 s to compile one rank-4 draw (a 3x3
  kernel, 2,304 values) and ~0.5 s for the same draw flat, and a model's initialiser makes one draw per
  kernel (tests/test_models.py checks the values against ``flax.linen.initializers``).

  Args:
    draw: a ``jax.random`` sampler taking ``(key, shape, ...)``, e.g. ``jax.random.normal``.
    key: a typed PRNG key, scalar.
    shape: the static output shape.
    *args, **kwargs: passed to ``draw`` after the shape (dtype, bounds).

  Returns:
    The array of ``shape`` that ``draw`` returns.
  """
  return draw(key, (math.prod(shape),), *args, **kwargs).reshape(shape)
