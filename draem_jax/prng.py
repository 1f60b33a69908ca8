"""Per-example PRNG keys.

Every random draw in draem_jax is made from a key that belongs to one example, derived from the step key
and the example's *global* index in the batch. The result for an example therefore does not depend on the
batch size, on how the batch is split over devices, or on the number of processes.
"""

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
