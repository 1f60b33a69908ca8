"""Checkpoint round trips through draem_jax.checkpointing: bit-equal trees, typed keys, int32 steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from draem_jax import checkpointing
from draem_jax import parallel


def _trees():
  """A model item and a train item shaped like a run's, with awkward leaves (bfloat16, NaN, -0.0)."""
  k1, k2 = jax.random.split(jax.random.key(7))
  params = {"reconstructive": {"conv": {"kernel": jax.random.normal(k1, (3, 3, 3, 4)),
                                        "bias": jnp.array([np.nan, -0.0, np.inf, 1e-38])}},
            "discriminative": {"bn": {"scale": jax.random.normal(k2, (4,), jnp.bfloat16)}}}
  batch_stats = {"reconstructive": {"bn": {"mean": jnp.arange(4.0), "var": jnp.full((4,), 0.5)}}}
  tx = optax.adam(1e-3)
  opt_state = tx.update(params, tx.init(params), params)[1]  # non-zero moments and count
  train = {"step": jnp.asarray(123_456, jnp.int32), "opt_state": opt_state,
           "key": jax.random.fold_in(jax.random.key(42), 5)}
  return {"params": params, "batch_stats": batch_stats}, train


def _assert_bit_equal(got, want):
  got_leaves, got_def = jax.tree.flatten(got)
  want_leaves, want_def = jax.tree.flatten(want)
  assert got_def == want_def
  for g, w in zip(got_leaves, want_leaves):
    assert g.dtype == w.dtype and g.shape == w.shape
    if jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(g) == jax.random.key_impl(w)
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    # Compare the bytes: NaN payloads and the sign of zero count, and == would call NaN != NaN.
    assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


def test_round_trip_is_bit_equal_with_typed_key_and_int32_step(tmp_path):
  model, train = _trees()
  with checkpointing.manager(tmp_path, keep=2) as mngr:
    assert checkpointing.save(mngr, 10, model, train)
    mngr.wait_until_finished()
  assert checkpointing.latest_step(tmp_path) == 10 and checkpointing.has_train_state(tmp_path, 10)
  with checkpointing.manager(tmp_path, read_only=True) as mngr:
    got_model, got_train, _ = checkpointing.restore(mngr, 10, checkpointing.abstract_like(model),
                                                 checkpointing.abstract_like(train))
  _assert_bit_equal(got_model, model)
  _assert_bit_equal(got_train, train)
  assert got_train["step"].dtype == jnp.int32 and int(got_train["step"]) == 123_456
  # The restored key draws what the saved one draws.
  np.testing.assert_array_equal(jax.random.uniform(got_train["key"], (4,)),
                                jax.random.uniform(train["key"], (4,)))


def test_restore_into_a_sharding_and_model_only(tmp_path):
  model, train = _trees()
  with checkpointing.manager(tmp_path, keep=None, async_save=False) as mngr:
    checkpointing.save(mngr, 1, model, train)
    checkpointing.save(mngr, 2, model)  # model only, like converted weights
  assert checkpointing.all_steps(tmp_path) == [1, 2]
  assert not checkpointing.has_train_state(tmp_path, 2)
  repl = parallel.replicated(parallel.make_mesh())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), model)
  step, got, got_train, _ = checkpointing.restore_intact(tmp_path, abstract)
  assert step == 2 and got_train is None
  _assert_bit_equal(got, model)
  assert all(leaf.sharding == repl and len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(got))
  with pytest.raises(checkpointing.NoCheckpointError, match="model-only weights"):
    checkpointing.restore_intact(tmp_path, abstract, checkpointing.abstract_like(train))


def test_a_damaged_ema_item_falls_back_when_resuming_and_is_ignored_when_not_asked_for(tmp_path):
  model, train = _trees()
  ema = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, model)
  with checkpointing.manager(tmp_path, keep=None) as mngr:
    checkpointing.save(mngr, 1, model, train, ema)
    checkpointing.save(mngr, 2, model, train, ema)
    mngr.wait_until_finished()
  # Evaluation (no EMA asked for) uses step 2 whatever its EMA item holds; resuming needs all three.
  (tmp_path / "checkpoints" / "2" / checkpointing.EMA_ITEM / "_METADATA").write_text("")
  step, _, _, none = checkpointing.restore_intact(tmp_path, checkpointing.abstract_like(model))
  assert step == 2 and none is None
  step, got_model, got_train, got_ema = checkpointing.restore_intact(
      tmp_path, checkpointing.abstract_like(model), checkpointing.abstract_like(train),
      abstract_ema=checkpointing.abstract_like(ema))
  assert step == 1
  _assert_bit_equal(got_ema, ema)
  _assert_bit_equal(got_train, train)
  assert checkpointing.all_steps(tmp_path) == [1]
  assert [p.name.split(".")[0] for p in (tmp_path / checkpointing.DAMAGED_DIR).iterdir()] == ["2"]
