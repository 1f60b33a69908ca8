"""Input pipeline: which training images each step uses, and the padded evaluation batches.

Training stream (``batch_indices``)
  The training images of one category are few (tens to hundreds: <= 391 images, 77 MB at 256x256 for
  the largest MVTec AD category), so they are put on every device once as uint8 ``(N, H, W, 3)`` and the
  train step picks its batch there. Every step's global batch is a pure function of
  ``(step, seed, N, B)``, computed inside the jitted step:

  * Epoch ``e = step // steps_per_epoch`` with ``steps_per_epoch = ceil(N / B)``; its order is
    ``jax.random.permutation(fold_in(key(seed), e), N)``.
  * The epoch's ``ceil(N/B) * B`` slots are filled with that permutation, so every image appears
    exactly once in the epoch's first N slots. When B does not divide N, the remaining slots of the
    last batch are *filled* with the head of the following epoch's permutation (and of further
    epochs if B > 2N). The next epoch still starts at its permutation's head, so a few images are
    seen twice around an epoch boundary; in exchange batches keep a static shape and epochs stay
    aligned to steps, which epoch-based schedules rely on.
  * Resuming needs only the step number; no iterator state is checkpointed, and the batch does not
    depend on the number of devices or processes.

  The original draws every training image independently with replacement (``MVTecDRAEMTrainDataset``
  of VitjanZ/DRAEM, ``data_loader.py``, picks ``torch.randint`` per item); sampling without replacement
  per epoch has the same expected exposure and lower variance.

  Multi-host: every process holds the whole (small) training set on its devices, so no host ever
  ships batches; the gathered batch is then sharded over the ``data`` axis like any other.

Evaluation (``eval_batches``)
  Fixed order, last batch padded to full size with ``valid=False`` rows so every batch has one shape
  and the evaluation step compiles once.
"""

import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from draem_jax import parallel


def steps_per_epoch(num_images: int, global_batch_size: int) -> int:
  """``ceil(num_images / global_batch_size)``: steps in one epoch (DataLoader with drop_last=False)."""
  return -(-num_images // global_batch_size)


def check_train_images(images: Any) -> None:
  """Raises ValueError unless ``images`` is a non-empty uint8 (N, H, W, 3) array."""
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"training images must be uint8 (N, H, W, 3); got {images.dtype} "
                     f"{images.shape}. Load them with draem_jax.data and keep them as uint8.")
  if len(images) < 1:
    raise ValueError("the training set is empty; check the category's train/good folder.")


def epoch_permutation(seed: int, epoch: jax.Array, num_images: int) -> jax.Array:
  """The order of the images in one epoch: int32 (N,), a permutation of ``0 .. N-1``.

  Args:
    seed: static non-negative data seed.
    epoch: int32 scalar (traced or concrete), the epoch number.
    num_images: static N.
  """
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return jax.random.permutation(key, num_images).astype(jnp.int32)


def batch_indices(step: jax.Array, num_images: int, global_batch_size: int, seed: int) -> jax.Array:
  """Image indices of the global training batch at ``step`` (see the module docstring).

  Args:
    step: int32 scalar, the global step (traced inside the train step).
    num_images: static N, number of training images.
    global_batch_size: static B, summed over all processes.
    seed: static data seed.

  Returns:
    int32 array (B,) of indices into the training images.
  """
  spe = steps_per_epoch(num_images, global_batch_size)
  step = jnp.asarray(step, jnp.int32)
  epoch, within = step // spe, step % spe
  # Slot p of this epoch's stream; slots past N continue into the following epochs' permutations.
  slots = within * global_batch_size + jnp.arange(global_batch_size, dtype=jnp.int32)
  offsets, pos = slots // num_images, slots % num_images
  max_offset = (spe * global_batch_size - 1) // num_images  # static: how many epochs a batch may touch
  perms = jnp.stack([epoch_permutation(seed, epoch + k, num_images) for k in range(max_offset + 1)])
  return perms[offsets, pos]


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
