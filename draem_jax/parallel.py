"""Data parallelism: the 1-D ``data`` mesh, shardings, per-process batch slices, host transfers.

The whole project runs one program over a 1-D mesh whose single axis ``"data"`` spans every device of
every process. Batches are sharded along that axis and parameters are replicated, so ``jax.jit`` with
these shardings is all the parallel machinery the training step needs.

The axis is ``AxisType.Auto`` (GSPMD propagation) rather than ``jax.make_mesh``'s default
``Explicit``: with Explicit axes, vmapping replicated per-example keys against a sharded batch fails
("Mapped away dimension ... should be sharded the same").
"""

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D ``("data",)`` mesh with an ``Auto`` axis.

  Args:
    devices: devices in mesh order; default ``jax.devices()`` (every device of every process, in
      process order, so each process's devices form one contiguous block of the batch).

  Returns:
    ``jax.sharding.Mesh`` of shape ``(len(devices),)``.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh: `devices` is empty; pass at least one device or None for all.")
  return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) dimension over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (parameters, keys, scalar metrics)."""
  return NamedSharding(mesh, P())


def num_devices(sharding: jax.sharding.Sharding) -> int:
  """Number of devices a sharding spans (all processes)."""
  return len(sharding.device_set)


def check_batch_size(batch_size: int, device_count: int, process_count: int = 1,
                     name: str = "batch_size") -> None:
  """Raises a ValueError unless ``batch_size`` splits evenly over devices and processes.

  Args:
    batch_size: the global batch size.
    device_count: devices of the data axis (all processes).
    process_count: number of processes sharing each global batch.
    name: the config field to name in the error message.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"{name}={batch_size!r} must be a positive integer.")
  if batch_size % device_count:
    raise ValueError(
        f"{name}={batch_size} is not divisible by the device count {device_count}: every device "
        f"must get the same number of examples. Use a multiple of {device_count}, e.g. "
        f"{name}={-(-batch_size // device_count) * device_count}.")
  if batch_size % process_count:
    raise ValueError(
        f"{name}={batch_size} is not divisible by the process count {process_count}: every "
        f"process must feed the same number of rows.")


def host_slice(global_batch_size: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
  """This process's contiguous share of a global batch.

  Process ``i`` of ``n`` owns rows ``[i * B/n, (i+1) * B/n)``, which matches the device order of
  ``make_mesh()`` and the row order ``jax.make_array_from_process_local_data`` assumes.

  Args:
    global_batch_size: B, divisible by the process count.
    process_index: default ``jax.process_index()``.
    process_count: default ``jax.process_count()``.

  Returns:
    A ``slice`` into the global batch's leading dimension.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"batch_size={global_batch_size} is not divisible by the process count "
                     f"{process_count}.")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def to_global(host_batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Assembles each process's rows into global ``jax.Array``s.

  Args:
    host_batch: pytree of NumPy arrays whose leading dimension is this process's share
      (``global_batch_size // process_count``) of the global batch, in ``host_slice`` order.
    sharding: the target sharding, normally ``data_sharding(mesh)``.

  Returns:
    The same pytree of global arrays with leading dimension ``global_batch_size``.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


def replicate(host_array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array that every process holds whole, as a global array with a full copy on every device.

  Built from each device's slice (``make_array_from_callback``) rather than ``jax.device_put``, which
  on multi-process runs first checks with a collective that all processes passed equal values: a
  collective that times out when one process reaches it much later than another (the training set
  and the anomaly sources are decoded by every process from the same files anyway).
  """
  host_array = np.asarray(host_array)
  return jax.make_array_from_callback(host_array.shape, replicated(mesh), lambda index: host_array[index])


def gather_to_host(x: Any) -> Any:
  """Fetches a pytree of (possibly process-sharded) arrays as full NumPy arrays on every process.

  Arrays that span devices of other processes cannot be read with ``device_get``; those go through
  ``process_allgather(tiled=True)``. Fully addressable leaves (single process, or replicated) are
  read directly, since ``process_allgather`` would concatenate one copy per process.

  Args:
    x: pytree of ``jax.Array`` / NumPy arrays.

  Returns:
    Pytree of NumPy arrays holding the global values.
  """
  def fetch(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(jax.device_get(leaf))
  return jax.tree.map(fetch, x)
