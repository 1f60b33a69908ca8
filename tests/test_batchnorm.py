"""batchnorm.BatchNorm against flax.linen.BatchNorm(use_fast_variance=False) and autodiff of its formula."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draem_jax import batchnorm
from draem_jax import models


def _flax_bn(**kw):
  return nn.BatchNorm(momentum=models.BN_MOMENTUM, epsilon=models.BN_EPSILON, use_fast_variance=False, **kw)


def _ours(**kw):
  return batchnorm.BatchNorm(momentum=models.BN_MOMENTUM, epsilon=models.BN_EPSILON, **kw)


def _data(shape=(3, 5, 4, 6), dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  # Channel means far from zero (conv outputs with large biases), where a one-pass variance cancels.
  x = rng.normal(size=shape) * rng.uniform(0.1, 3, shape[-1]) + rng.uniform(-20, 20, shape[-1])
  return jnp.asarray(x, dtype)


def _variables(x, seed=1):
  rng = np.random.default_rng(seed)
  c = x.shape[-1]
  return {"params": {"scale": jnp.asarray(rng.normal(1, 0.3, c), jnp.float32),
                     "bias": jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.normal(0, 1, c), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("train", [True, False])
def test_values_and_statistics_bit_identical_to_flax(dtype, train):
  x = _data().astype(dtype)
  variables = _variables(x)
  out = {}
  for name, bn in (("flax", _flax_bn(dtype=dtype)), ("ours", _ours(dtype=dtype))):
    y, stats = jax.jit(lambda v, x, bn=bn: bn.apply(v, x, use_running_average=not train,
                                                     mutable=["batch_stats"]))(variables, x)
    out[name] = (y, stats)
  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  np.testing.assert_array_equal(f32(out["ours"][0]), f32(out["flax"][0]))
  assert out["ours"][0].dtype == out["flax"][0].dtype == dtype
  for k in ("mean", "var"):
    np.testing.assert_array_equal(out["ours"][1]["batch_stats"][k], out["flax"][1]["batch_stats"][k])
  if not train:
    np.testing.assert_array_equal(out["ours"][1]["batch_stats"]["mean"], variables["batch_stats"]["mean"])


def test_init_creates_flax_variables():
  x = _data()
  theirs = _flax_bn().init(jax.random.key(0), x, use_running_average=False)
  ours = _ours().init(jax.random.key(0), x, use_running_average=False)
  layout = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
  assert layout(ours) == layout(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)  # init does not update the running statistics


def _loss(bn, variables, x, weights):
  # A loss that is not linear in y, through the ReLU that follows every BN in DRAEM.
  y, _ = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  return jnp.sum(weights * jax.nn.relu(y) ** 2) + jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 8, 8, 16)])
def test_gradients_equal_autodiff_float64(shape):
  with jax.enable_x64(True):
    x = _data(shape, np.float64)
    v = jax.tree.map(lambda a: a.astype(jnp.float64), _variables(x))
    w = jnp.asarray(np.random.default_rng(2).normal(size=shape))
    ours = jax.grad(_loss, argnums=(1, 2))(_ours(dtype=jnp.float64, param_dtype=jnp.float64), v, x, w)
    ref = jax.grad(_loss, argnums=(1, 2))(_flax_bn(dtype=jnp.float64, param_dtype=jnp.float64), v, x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(b))))


def test_gradients_close_to_autodiff_float32():
  x = _data((4, 16, 16, 8))
  v = _variables(x)
  w = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
  ours = jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=0)(_ours(), v, x, w)
  with jax.enable_x64(True):
    ref = jax.grad(_loss, argnums=(1, 2))(_flax_bn(dtype=jnp.float64, param_dtype=jnp.float64),
                                          jax.tree.map(lambda a: a.astype(jnp.float64), v),
                                          x.astype(jnp.float64), w.astype(jnp.float64))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      b = np.asarray(b)
      assert float(np.max(np.abs(np.asarray(a, np.float64) - b))) <= 1e-4 * float(np.max(np.abs(b)))


def test_statistics_outputs_have_their_own_gradient():
  # The running-statistics outputs carry zero cotangents in a train step, but any caller's are honoured.
  with jax.enable_x64(True):
    x = _data((2, 3, 4, 5), np.float64)
    scale, bias = jnp.ones(5, jnp.float64) * 1.3, jnp.zeros(5, jnp.float64) + 0.2
    wm, wv = jnp.arange(5.0) - 2, jnp.arange(5.0) * 0.1 + 0.3

    def f(stats_fn, x):
      y, mean, var = stats_fn(x)
      return jnp.sum(y ** 3) * 1e-3 + jnp.sum(wm * mean) + jnp.sum(wv * var ** 2)

    def reference(x):
      mean = x.mean((0, 1, 2), keepdims=True)
      var = jnp.square(x - mean).mean((0, 1, 2), keepdims=True)
      y = (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale.reshape(1, 1, 1, -1)) + bias.reshape(1, 1, 1, -1)
      return y, mean.reshape(-1), var.reshape(-1)

    ours = jax.grad(lambda x: f(lambda x: batchnorm.batch_norm_train(x, scale, bias, 1e-5), x))(x)
    np.testing.assert_allclose(ours, jax.grad(lambda x: f(reference, x))(x), rtol=1e-10, atol=1e-13)


def test_model_gradients_close_to_flax_batchnorm():
  # The whole DRAEM with this BatchNorm vs flax's: the same loss, gradients to float32 rounding.
  x = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 32, 32, 3)), jnp.float32)
  block = models.DoubleConv(8, 8)
  variables = block.init(jax.random.key(0), x, train=False)
  grads = {}
  flax_norm = lambda **kw: _flax_bn(scale_init=models._bn_scale_init, **kw)  # noqa: E731  # pylint: disable=protected-access
  for name, norm in (("ours", models.BatchNorm), ("flax", flax_norm)):
    conv, norm = models.layers(jnp.float32, norm=norm)
    b = models.DoubleConv(8, 8, conv=conv, norm=norm)

    def loss(params, b=b):
      y, _ = b.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                     mutable=["batch_stats"])
      return jnp.mean(jnp.square(y - 0.5))

    grads[name] = jax.jit(jax.grad(loss))(variables["params"])
  # Relative to the largest gradient: the conv biases before each BN have zero gradient in exact
  # arithmetic (BN removes them), so theirs are rounding noise on both sides.
  top = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(grads["flax"]))
  for a, b in zip(jax.tree.leaves(grads["ours"]), jax.tree.leaves(grads["flax"])):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * top


def test_rejects_non_nhwc():
  with pytest.raises(ValueError, match="NHWC"):
    _ours().init(jax.random.key(0), jnp.zeros((4, 3)), use_running_average=False)
