"""Tests for draem_jax.parallel and draem_jax.data.pipeline (8 simulated CPU devices)."""

import jax
import numpy as np
import pytest

from draem_jax import parallel
from draem_jax.data import pipeline


def _images(n, h=4, w=5, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _reference_stream(seed, num_images, first_epoch, num_epochs):
  """The stream of an epoch written independently: the epochs' permutations back to back."""
  return np.concatenate([
      np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), e), num_images))
      for e in range(first_epoch, first_epoch + num_epochs)])


# ------------------------------------------------------------------------------------------ parallel


def test_mesh_over_given_devices():
  sub = parallel.make_mesh(jax.devices()[:2])
  assert list(sub.devices) == jax.devices()[:2]
  with pytest.raises(ValueError, match="empty"):
    parallel.make_mesh([])


def test_host_slice():
  assert parallel.host_slice(8) == slice(0, 8)  # one real process
  assert [parallel.host_slice(12, i, 3) for i in range(3)] == [slice(0, 4), slice(4, 8),
                                                                slice(8, 12)]
  with pytest.raises(ValueError, match="batch_size=10"):
    parallel.host_slice(10, 0, 4)
  with pytest.raises(ValueError, match="process_index=2"):
    parallel.host_slice(8, 2, 2)


def test_to_global_and_gather_to_host():
  sharding = parallel.data_sharding(parallel.make_mesh())
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  tree = parallel.to_global({"x": x, "i": np.arange(16, dtype=np.int32)}, sharding)
  assert tree["x"].sharding == sharding and tree["x"].shape == (16, 3)
  assert [s.data.shape for s in tree["x"].addressable_shards] == [(2, 3)] * 8
  back = parallel.gather_to_host(tree)
  assert isinstance(back["x"], np.ndarray)
  np.testing.assert_array_equal(back["x"], x)
  np.testing.assert_array_equal(back["i"], np.arange(16))


def test_check_batch_size_names_field_and_device_count():
  with pytest.raises(ValueError, match=r"batch_size=12 .*device count 8"):
    parallel.check_batch_size(12, 8)
  parallel.check_batch_size(16, 8, 2)


# ---------------------------------------------------------------------------------- training stream


@pytest.mark.parametrize("num_images,batch_size", [(12, 4), (10, 4), (3, 8), (7, 7)])
def test_every_image_once_per_epoch(num_images, batch_size):
  seed = 3
  spe = pipeline.steps_per_epoch(num_images, batch_size)
  assert spe == int(np.ceil(num_images / batch_size))
  indices = jax.jit(pipeline.batch_indices, static_argnums=(1, 2, 3))
  for epoch in range(3):
    got = np.concatenate([np.asarray(indices(s, num_images, batch_size, seed))
                          for s in range(epoch * spe, (epoch + 1) * spe)])
    assert got.shape == (spe * batch_size,)
    # The first N slots of the epoch are a permutation: every image exactly once.
    np.testing.assert_array_equal(np.sort(got[:num_images]), np.arange(num_images))
    # Whole epoch = its permutation followed by the head of the next ones (documented filling).
    ref = _reference_stream(seed, num_images, epoch, 1 + -(-batch_size // num_images))
    np.testing.assert_array_equal(got, ref[:spe * batch_size])


def test_stream_is_a_function_of_step_and_seed_only():
  a = [np.asarray(pipeline.batch_indices(s, 50, 50, 0)) for s in range(3)]
  b = np.asarray(pipeline.batch_indices(0, 50, 50, 1))
  assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
  assert not np.array_equal(a[0], b)
  # A restart at step 1 (concrete or traced step) gives the same batch.
  np.testing.assert_array_equal(a[1], pipeline.batch_indices(1, 50, 50, 0))
  traced = jax.jit(lambda s: pipeline.batch_indices(s, 50, 50, 0))(np.int32(1))
  np.testing.assert_array_equal(a[1], traced)


def test_bad_training_images_are_named():
  with pytest.raises(ValueError, match="uint8"):
    pipeline.check_train_images(np.zeros((4, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="empty"):
    pipeline.check_train_images(np.zeros((0, 8, 8, 3), np.uint8))


def test_unit_float_on_device_equals_numpy():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  np.testing.assert_array_equal(np.asarray(pipeline.to_unit_float_device(x)),
                                x.astype(np.float32) / np.float32(255))

# ---------------------------------------------------------------------------------------- evaluation


def _eval_set(n, h=4, w=3):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  masks = (rng.random((n, h, w)) > 0.5).astype(np.uint8) * 255
  labels = rng.integers(0, 2, n)
  return images, masks, labels


def test_eval_batches_pad_and_flag():
  images, masks, labels = _eval_set(10)
  batches = list(pipeline.eval_batches(images, masks, labels, 4))
  assert len(batches) == pipeline.num_eval_batches(10, 4) == 3
  for b in batches:
    assert b["image"].shape == (4, 4, 3, 3) and b["image"].dtype == np.float32
    assert b["mask"].shape == (4, 4, 3) and b["mask"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
    assert b["valid"].dtype == np.bool_
  last = batches[-1]
  np.testing.assert_array_equal(last["valid"], [True, True, False, False])
  np.testing.assert_array_equal(last["index"], [8, 9, -1, -1])
  assert not last["image"][2:].any() and not last["mask"][2:].any() and not last["label"][2:].any()
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  v = cat["valid"]
  np.testing.assert_array_equal(cat["index"][v], np.arange(10))
  np.testing.assert_array_equal(cat["image"][v], images.astype(np.float32) / 255)
  np.testing.assert_array_equal(cat["mask"][v], masks / 255.0)
  np.testing.assert_array_equal(cat["label"][v], labels)


def test_eval_batches_processes_and_sharding():
  images, masks, labels = _eval_set(11)
  one = list(pipeline.eval_batches(images, masks[..., None], labels, 8))
  two = [list(pipeline.eval_batches(images, masks, labels, 8, process_index=p, process_count=2))
         for p in range(2)]
  sharding = parallel.data_sharding(parallel.make_mesh())
  glob = list(pipeline.eval_batches(images, masks, labels, 8, sharding=sharding))
  assert len(one) == len(two[0]) == len(glob) == 2
  for b1, b2a, b2b, bg in zip(one, *two, glob):
    for k in b1:
      np.testing.assert_array_equal(np.concatenate([b2a[k], b2b[k]]), b1[k])
      assert bg[k].sharding.is_equivalent_to(sharding, bg[k].ndim)
      np.testing.assert_array_equal(parallel.gather_to_host(bg[k]), b1[k])
  with pytest.raises(ValueError, match=r"batch_size=6 .*device count 8"):
    pipeline.eval_batches(images, masks, labels, 6, sharding=sharding)
  with pytest.raises(ValueError, match="labels"):
    pipeline.eval_batches(images, masks, labels[:3], 4)
