"""Input pipeline: a resumable, multi-process training stream and a padded evaluation iterator.

Training stream (``train_batch_indices``, ``TrainIterator``)
  The training images of one category are few (tens to hundreds), so they stay in host memory as
  uint8 ``(N, H, W, 3)``. Every step's global batch is a pure function of ``(step, seed, N, B)``:

  * Epoch ``e = step // steps_per_epoch`` with ``steps_per_epoch = ceil(N / B)``; its order is a
    permutation drawn from a NumPy Generator seeded with ``SeedSequence(seed, spawn_key=(e,))``.
  * The epoch's ``ceil(N/B) * B`` slots are filled with that permutation, so every image appears
    exactly once in the epoch's first N slots. When B does not divide N, the remaining slots of the
    last batch are *filled* with the head of the following epoch's permutation (and of further
    epochs if B > 2N). The next epoch still starts at its permutation's head, so a few images are
    seen twice around an epoch boundary; in exchange batches keep a static shape and epochs stay
    aligned to steps, which epoch-based schedules rely on.
  * Resuming needs only the step number; no iterator state is checkpointed.

  The reference DRAEM draws every training image with replacement (REFERENCE.md 3.8); sampling
  without replacement per epoch has the same expected exposure and lower variance.

  Each process gathers only its contiguous ``host_slice`` of every global batch and assembles the
  global ``jax.Array`` with ``jax.make_array_from_process_local_data``. Rows travel to the devices as
  uint8 (4x less host-to-device traffic) and become float32 in [0, 1] on device, bit-identical to
  ``np.float32(x) / 255`` (the reference's ``/ 255``).

Evaluation (``eval_batches``)
  Fixed order, last batch padded to full size with ``valid=False`` rows so every batch has one shape
  and the evaluation step compiles once.
"""

import functools
import math
import queue
import threading
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from draem_jax import parallel


class RowSource(Protocol):
  """Anything that holds N images and returns rows for an index array.

  A uint8 NumPy array ``(N, H, W, 3)`` is one; a lazy loader that decodes files on demand is another.
  ``source[indices]`` must return uint8 ``(len(indices), H, W, 3)``.
  """

  def __len__(self) -> int:
    ...

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    ...


def steps_per_epoch(num_images: int, global_batch_size: int) -> int:
  """``ceil(num_images / global_batch_size)``: steps in one epoch (DataLoader with drop_last=False)."""
  return -(-num_images // global_batch_size)


@functools.lru_cache(maxsize=16)
def _epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
  # spawn_key gives each epoch an independent, collision-free child stream of the seed.
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,)))
  perm = rng.permutation(num_images)
  perm.setflags(write=False)  # cached and shared between callers
  return perm


def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
  """The order of the images in one epoch.

  Args:
    seed: non-negative integer data seed.
    epoch: non-negative epoch number.
    num_images: N.

  Returns:
    Read-only int64 array (N,), a permutation of ``0 .. N-1``.
  """
  return _epoch_permutation(int(seed), int(epoch), int(num_images))


def _check_stream_args(step: int, num_images: int, global_batch_size: int, seed: int) -> None:
  if num_images < 1:
    raise ValueError(f"num_images={num_images}: the training set is empty; check the category's "
                     "train/good folder.")
  if global_batch_size < 1:
    raise ValueError(f"batch_size={global_batch_size} must be a positive integer.")
  if step < 0:
    raise ValueError(f"step={step} must be >= 0.")
  if seed < 0:
    raise ValueError(f"seed={seed} must be a non-negative integer.")


def train_batch_indices(step: int, num_images: int, global_batch_size: int,
                        seed: int) -> np.ndarray:
  """Image indices of the global training batch at ``step`` (see the module docstring).

  Args:
    step: global training step, >= 0.
    num_images: N, number of training images.
    global_batch_size: B, summed over all processes.
    seed: data seed.

  Returns:
    int64 array (B,) of indices into the training images.
  """
  step, num_images, global_batch_size, seed = map(int, (step, num_images, global_batch_size, seed))
  _check_stream_args(step, num_images, global_batch_size, seed)
  epoch, within = divmod(step, steps_per_epoch(num_images, global_batch_size))
  # Slot p of this epoch's stream; slots past N continue into the following epochs' permutations.
  slots = within * global_batch_size + np.arange(global_batch_size)
  epochs, pos = np.divmod(slots, num_images)
  out = np.empty(global_batch_size, np.int64)
  for off in np.unique(epochs):  # at most a few epochs per batch
    sel = epochs == off
    out[sel] = epoch_permutation(seed, epoch + int(off), num_images)[pos[sel]]
  return out


def _check_images(images: Any) -> None:
  if isinstance(images, np.ndarray):
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"training images must be uint8 (N, H, W, 3); got {images.dtype} "
                       f"{images.shape}. Load them with draem_jax.data and keep them as uint8.")
  elif not (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
    raise TypeError(f"training images must be a uint8 array (N, H, W, 3) or a loader with __len__ "
                    f"and __getitem__(indices); got {type(images).__name__}.")


def _gather_rows(images: RowSource, indices: np.ndarray) -> np.ndarray:
  rows = images[indices]
  if (not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 4
      or rows.shape[0] != len(indices) or rows.shape[-1] != 3):
    raise ValueError(f"the image loader returned {getattr(rows, 'dtype', type(rows))} "
                     f"{getattr(rows, 'shape', '')} for {len(indices)} indices; expected uint8 "
                     f"({len(indices)}, H, W, 3).")
  return rows


def local_train_rows(images: RowSource, step: int, global_batch_size: int, seed: int,
                     process_index: int | None = None,
                     process_count: int | None = None) -> np.ndarray:
  """This process's rows of the global training batch at ``step``, still uint8.

  Args:
    images: uint8 (N, H, W, 3) array or a ``RowSource`` loader.
    step: global training step.
    global_batch_size: B.
    seed: data seed.
    process_index: default ``jax.process_index()``.
    process_count: default ``jax.process_count()``.

  Returns:
    uint8 array (B // process_count, H, W, 3); only these rows are gathered/decoded.
  """
  idx = train_batch_indices(step, len(images), global_batch_size, seed)
  return _gather_rows(images, idx[parallel.host_slice(global_batch_size, process_index,
                                                      process_count)])


def to_unit_float_host(x: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [0, 1] on the host (the reference's ``/ 255``); floats pass through."""
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255)
  return x.astype(np.float32)


# XLA rewrites division by a constant into multiplication by its reciprocal, which is off by 1 ulp
# for half of the 256 values; a 1 KiB lookup table keeps device batches bit-identical to NumPy's.
_UNIT_FLOAT_TABLE = np.arange(256, dtype=np.float32) / np.float32(255)


@jax.jit
def to_unit_float_device(x: jax.Array) -> jax.Array:
  """uint8 -> float32 in [0, 1] on the device, bit-identical to ``to_unit_float_host``; floats pass."""
  if x.dtype != jnp.uint8:
    return x.astype(jnp.float32)
  # Elementwise gather, so the output keeps the input's sharding.
  return jnp.asarray(_UNIT_FLOAT_TABLE)[x.astype(jnp.int32)]


class _Failure:
  """Carries an exception from the producer thread to the consumer."""

  def __init__(self, exc: BaseException):
    self.exc = exc


_END = object()


def _make_train_batch(images: RowSource, batch_size: int, seed: int, rows: slice,
                      sharding: jax.sharding.Sharding | None, step: int) -> Any:
  idx = train_batch_indices(step, len(images), batch_size, seed)
  local = _gather_rows(images, idx[rows])
  if sharding is None:
    return to_unit_float_host(local)
  global_shape = (batch_size,) + local.shape[1:]
  return to_unit_float_device(
      jax.make_array_from_process_local_data(sharding, local, global_shape))


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
  # Poll so that close() can stop a producer blocked on a full queue.
  while not stop.is_set():
    try:
      q.put(item, timeout=0.05)
      return True
    except queue.Full:
      pass
  return False


def _produce(make_batch: Callable[[int], Any], step: int, end_step: int | None, q: queue.Queue,
             stop: threading.Event) -> None:
  """Prefetch-thread body: batches for step, step + 1, ... then _END, or a _Failure."""
  try:
    while end_step is None or step < end_step:
      if stop.is_set() or not _put(q, stop, make_batch(step)):
        return
      step += 1
    _put(q, stop, _END)
  except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
    _put(q, stop, _Failure(e))


class TrainIterator:
  """Infinite (or ``end_step``-bounded) training stream with background prefetching.

  Yields, for steps ``start_step, start_step + 1, ...``, either

  * with ``sharding``: a global ``jax.Array`` float32 (B, H, W, 3) in [0, 1], sharded as given
    (normally ``parallel.data_sharding(mesh)``), built from this process's rows; or
  * without ``sharding`` ("host mode"): this process's rows as NumPy float32
    (B // process_count, H, W, 3). Host mode also lets tests simulate several processes in one.

  A daemon thread gathers rows, ships them as uint8 and converts them on device while the consumer
  runs the previous step, keeping at most ``prefetch`` batches ready. An exception in the thread is
  re-raised by the next ``next()``. Call ``close()`` (or use ``with``) to stop the thread.

  Attributes:
    next_step: the step of the batch the next ``next()`` returns.
  """

  def __init__(self, images_uint8_or_loader: RowSource, global_batch_size: int, seed: int,
               start_step: int = 0, process_index: int | None = None,
               process_count: int | None = None,
               sharding: jax.sharding.Sharding | None = None, *, end_step: int | None = None,
               prefetch: int = 2):
    """Validates the set-up and starts the prefetch thread.

    Args:
      images_uint8_or_loader: uint8 (N, H, W, 3) array, or a ``RowSource`` loader.
      global_batch_size: B over all processes; divisible by the device count when ``sharding`` is
        given, and by ``process_count``.
      seed: data seed (the permutation of each epoch derives from it).
      start_step: first step to yield; resuming at step k reproduces the stream from k exactly.
      process_index: this process; default ``jax.process_index()``.
      process_count: number of processes; default ``jax.process_count()``. With ``sharding`` it
        must equal ``jax.process_count()``.
      sharding: target sharding of the global batch, or None for host mode.
      end_step: stop before this step; None for an endless stream.
      prefetch: queue depth, >= 1.
    """
    images = images_uint8_or_loader
    _check_images(images)
    self._images = images
    self._num_images = len(images)
    self._batch_size = int(global_batch_size)
    self._seed = int(seed)
    self._process_index = jax.process_index() if process_index is None else int(process_index)
    self._process_count = jax.process_count() if process_count is None else int(process_count)
    self._sharding = sharding
    _check_stream_args(int(start_step), self._num_images, self._batch_size, self._seed)
    if sharding is not None:
      parallel.check_batch_size(self._batch_size, parallel.num_devices(sharding),
                                self._process_count)
      if self._process_count != jax.process_count():
        raise ValueError(f"process_count={self._process_count} differs from jax.process_count()="
                         f"{jax.process_count()}; simulated processes need sharding=None.")
    # Validates process_index / process_count against the batch size up front.
    self._rows = parallel.host_slice(self._batch_size, self._process_index, self._process_count)
    if prefetch < 1:
      raise ValueError(f"prefetch={prefetch} must be >= 1.")
    self.next_step = int(start_step)
    self._end_step = end_step
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._done = False
    # The thread must not reference `self`: then dropping the iterator runs __del__, which stops it.
    make_batch = functools.partial(_make_train_batch, images, self._batch_size, self._seed,
                                   self._rows, sharding)
    self._thread = threading.Thread(target=_produce,
                                    args=(make_batch, int(start_step), end_step, self._queue,
                                          self._stop),
                                    name="draem_jax-train-prefetch", daemon=True)
    self._thread.start()

  def make_batch(self, step: int) -> Any:
    """The batch of ``step``, computed synchronously (what the thread runs)."""
    return _make_train_batch(self._images, self._batch_size, self._seed, self._rows,
                             self._sharding, step)

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    while True:
      try:
        item = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          # Only reachable after close(): the producer always leaves _END or a _Failure otherwise.
          self._done = True
          raise StopIteration from None
    if item is _END:
      self.close()
      raise StopIteration
    if isinstance(item, _Failure):
      self.close()
      raise item.exc
    self.next_step += 1
    return item

  def close(self, timeout: float = 10.0) -> None:
    """Stops the prefetch thread and drops queued batches; idempotent."""
    self._done = True
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    """Whether the prefetch thread is still running."""
    return self._thread.is_alive()

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    # A dropped iterator (e.g. at the end of training) stops its thread without an explicit close().
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()


def _as_unit_float_mask(masks: np.ndarray) -> np.ndarray:
  if masks.ndim == 4 and masks.shape[-1] == 1:
    masks = masks[..., 0]
  if masks.dtype == np.bool_:
    return masks.astype(np.float32)
  return to_unit_float_host(masks)


def eval_batches(images: np.ndarray, masks: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 process_index: int | None = None, process_count: int | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> Iterator[dict[str, Any]]:
  """Test-set batches in index order, the last one padded to ``batch_size``.

  Args:
    images: (N, H, W, 3) uint8 (divided by 255) or float in [0, 1].
    masks: (N, H, W) or (N, H, W, 1) ground truth; uint8 0..255 (divided by 255, like the
      reference), bool, or float in [0, 1].
    labels: (N,) image labels, 0 good / 1 defect.
    batch_size: global batch size B; divisible by the device count when ``sharding`` is given, and
      by the process count.
    process_index: default ``jax.process_index()``.
    process_count: default ``jax.process_count()``.
    sharding: if given, yield global ``jax.Array``s with this sharding; otherwise NumPy arrays of
      this process's rows (the whole batch in a single process).

  Yields:
    ``ceil(N / B)`` dicts, rows = this process's share b of the batch (b = B without sharding in
    one process; global arrays always have B rows):
      image float32 (b, H, W, 3); mask float32 (b, H, W); label int32 (b,);
      valid bool (b,), False on padding rows; index int32 (b,), the test-set index, -1 on padding.
    Padding rows are all-zero images and masks with label 0.

  Raises:
    ValueError: on inconsistent lengths/shapes or a batch size that does not divide evenly.
  """
  images, masks, labels = np.asarray(images), np.asarray(masks), np.asarray(labels)
  n = len(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"eval images must be (N, H, W, 3); got {images.shape}.")
  if masks.shape[:1] != (n,) or masks.shape[1:3] != images.shape[1:3] or not (
      masks.ndim == 3 or (masks.ndim == 4 and masks.shape[-1] == 1)):
    raise ValueError(f"eval masks must be (N, H, W) or (N, H, W, 1) matching images "
                     f"{images.shape}; got {masks.shape}.")
  if labels.shape != (n,):
    raise ValueError(f"eval labels must be ({n},); got {labels.shape}.")
  if n == 0:
    raise ValueError("the test set is empty; check the category's test/ folder.")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if sharding is not None:
    parallel.check_batch_size(batch_size, parallel.num_devices(sharding), process_count)
  rows = parallel.host_slice(batch_size, process_index, process_count)
  return _eval_batches(images, masks, labels, int(batch_size), rows, sharding)


def _eval_batches(images, masks, labels, batch_size, rows, sharding):
  n = len(images)
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)[rows]
    valid = index < n
    take = np.where(valid, index, 0)
    valid_4d = valid[:, None, None, None]
    image = np.where(valid_4d, images[take], np.zeros((), images.dtype))
    mask = np.where(valid_4d[..., 0], _as_unit_float_mask(masks[take]), np.float32(0))
    batch = {
        "mask": mask.astype(np.float32),
        "label": np.where(valid, labels[take], 0).astype(np.int32),
        "valid": valid,
        "index": np.where(valid, index, -1).astype(np.int32),
    }
    if sharding is None:
      batch["image"] = to_unit_float_host(image)
      yield batch
      continue
    batch = parallel.to_global(batch, sharding)
    if image.dtype == np.uint8:  # ship uint8 and divide on device, as in training
      batch["image"] = to_unit_float_device(parallel.to_global(image, sharding))
    else:
      batch["image"] = parallel.to_global(to_unit_float_host(image), sharding)
    yield batch


def num_eval_batches(num_images: int, batch_size: int) -> int:
  """``ceil(num_images / batch_size)``: batches ``eval_batches`` yields."""
  return math.ceil(num_images / batch_size)
