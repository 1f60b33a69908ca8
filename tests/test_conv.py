"""Tests for draem_jax.conv: every weight-gradient path against XLA's native conv and NumPy float64."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from draem_jax import conv


def _np_conv3x3(x, k):
  """Float64 NumPy cross-correlation, zero padding 1: (N,H,W,I) x (3,3,I,O) -> (N,H,W,O)."""
  x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, k.shape[3]))
  for i in range(3):
    for j in range(3):
      out += np.einsum("nhwc,cd->nhwd", xp[:, i:i + h, j:j + w], k[i, j])
  return out


def _np_conv3x3_grads(x, k, g):
  """Float64 gradients of sum(conv(x, k) * g) with respect to x and k."""
  x, k, g = (np.asarray(a, np.float64) for a in (x, k, g))
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dxp = np.zeros_like(xp)
  dk = np.zeros_like(k)
  for i in range(3):
    for j in range(3):
      dk[i, j] = np.einsum("nhwc,nhwd->cd", xp[:, i:i + h, j:j + w], g)
      dxp[:, i:i + h, j:j + w] += np.einsum("nhwd,cd->nhwc", g, k[i, j])
  return dxp[:, 1:-1, 1:-1], dk


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _data(shape=(2, 12, 10, 8), cout=16, dtype=jnp.float32, seed=0):
  kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, shape, dtype)
  k = (0.1 * jax.random.normal(kk, (3, 3, shape[3], cout))).astype(dtype)
  g = jax.random.normal(kg, shape[:3] + (cout,), dtype)
  return x, k, g


def _grads(method, x, k, g):
  def loss(x, k):
    return jnp.sum(conv.conv3x3(x, k, weight_grad=method) * g)

  return jax.jit(jax.grad(loss, (0, 1)))(x, k)


def test_forward_equals_lax_and_numpy():
  x, k, _ = _data()
  native = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for method in ("auto",) + conv.WEIGHT_GRAD_METHODS:
    y = jax.jit(lambda x, k, m=method: conv.conv3x3(x, k, weight_grad=m))(x, k)
    assert y.shape == (2, 12, 10, 16) and y.dtype == jnp.float32
    np.testing.assert_array_equal(y, native)
    assert _rel(y, _np_conv3x3(x, k)) < 1e-6


# (Cin, Cout): the narrower side is the shifted one (dy when Cout < Cin), both orders for each method.
@pytest.mark.numerics
@pytest.mark.parametrize("method", ["taps", "im2col"])
@pytest.mark.parametrize("cin,cout", [(8, 16), (16, 8), (3, 96), (96, 2), (72, 80), (80, 72)])
def test_gradients_equal_native_and_numpy(method, cin, cout):
  x, k, g = _data(shape=(2, 6, 5, cin), cout=cout)
  dx_custom, dk_custom = _grads(method, x, k, g)
  dx_nat, dk_nat = _grads("native", x, k, g)
  dx_np, dk_np = _np_conv3x3_grads(x, k, g)
  assert dx_custom.shape == x.shape and dk_custom.shape == k.shape
  assert _rel(dx_custom, dx_nat) < 1e-5 and _rel(dk_custom, dk_nat) < 1e-5
  assert _rel(dx_custom, dx_np) < 1e-5 and _rel(dk_custom, dk_np) < 1e-5
  assert _rel(dx_nat, dx_np) < 1e-5 and _rel(dk_nat, dk_np) < 1e-5



@pytest.mark.parametrize("method", conv.WEIGHT_GRAD_METHODS)
def test_float64_gradients_stay_float64(method):
  # Under x64 a Python index is int64 (the taps loop's slice offsets once mixed int32 and int64), and a
  # float64 weight gradient must not be accumulated in float32 (float64 checks of whole steps rely on it).
  with jax.enable_x64(True):
    x, k, g = (a.astype(jnp.float64) for a in _data(shape=(2, 6, 5, 8), cout=4))
    dx, dk = _grads(method, x, k, g)
    assert dx.dtype == dk.dtype == jnp.float64
    dx_np, dk_np = _np_conv3x3_grads(x, k, g)
    assert _rel(dx, dx_np) < 1e-12 and _rel(dk, dk_np) < 1e-12

def test_auto_uses_the_table_on_cpu():
  # Each measured shape maps to its own entry; a shape between entries takes the nearest (log scale).
  for name, table in conv.CPU_WEIGHT_GRAD_TABLES.items():
    for (rows, cin, cout), method in table:
      assert conv.cpu_weight_grad_method(rows, cin, cout, name) == method
    assert {m for _, m in table} <= set(conv.WEIGHT_GRAD_METHODS)
  # The two CPUs' tables disagree on shapes the demo trains (widths 16/16 at 128 px, full resolution).
  assert conv.cpu_weight_grad_method(131072, 16, 16, "avx512") == "native"
  assert conv.cpu_weight_grad_method(131072, 16, 16, "avx2") == "taps"
  assert conv.cpu_weight_grad_method(8192, 128, 256, "avx512") == "taps"
  assert conv.cpu_weight_grad_method(8192, 128, 256, "avx512_amd") == "native"
  # What "auto" lowers to: native has no dot_general in its backward, im2col one, taps a loop of them.
  x, k, g = _data(shape=(2, 6, 5, 8), cout=16)

  def jaxpr(method):
    def loss(x, k):
      return jnp.sum(conv.conv3x3(x, k, weight_grad=method) * g)

    return str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, k))

  assert jaxpr("native").count("dot_general") == 0
  assert jaxpr("im2col").count("dot_general") == 1
  loops = ("scan[", "while[")
  assert any(p in jaxpr("taps") for p in loops) and not any(p in jaxpr("im2col") for p in loops)
  expected = conv.cpu_weight_grad_method(2 * 6 * 5, 8, 16)
  assert jaxpr("auto") == jaxpr(expected)
  with pytest.raises(ValueError, match="weight_grad"):
    conv.conv3x3(x, k, weight_grad="fast")


def test_the_cpu_table_follows_the_cpu_flags_and_the_variable(conv_table_variable):
  intel = ("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
           "bugs\t\t: spectre_v1\n")
  amd = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\n"
         "bugs\t\t: avx512f_not_a_flag\n")
  amd_avx512 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: fpu avx2 avx512f\n"
  assert conv.table_name_from_cpuinfo(intel) == "avx512"
  assert conv.table_name_from_cpuinfo(amd) == "avx2"
  assert conv.table_name_from_cpuinfo(amd_avx512) == "avx512_amd"
  assert conv.table_name_from_cpuinfo(amd_avx512.replace("AuthenticAMD", "GenuineIntel")) == "avx512"
  assert conv.table_name_from_cpuinfo("") == "avx2"
  for name in conv.CPU_WEIGHT_GRAD_TABLES:
    conv_table_variable(name)
    assert conv.cpu_table_name() == name
    assert conv.cpu_weight_grad_method(131072, 16, 16) == conv.cpu_weight_grad_method(131072, 16, 16, name)
  conv_table_variable("neon")
  with pytest.raises(ValueError, match="DRAEM_CPU_CONV_TABLE='neon'"):
    conv.cpu_table_name()


@pytest.mark.parametrize("method", conv.WEIGHT_GRAD_METHODS)
def test_bfloat16_gradients(method):
  x, k, g = _data(dtype=jnp.bfloat16)
  dx, dk = _grads(method, x, k, g)
  assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
  dx_np, dk_np = _np_conv3x3_grads(x.astype(jnp.float32), k.astype(jnp.float32), g.astype(jnp.float32))
  assert _rel(dx, dx_np) < 2e-2 and _rel(dk, dk_np) < 2e-2


@pytest.mark.numerics
def test_sharded_batch_gradients_match_single_device():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  x, k, g = _data(shape=(8, 8, 8, 4), cout=8)
  data = NamedSharding(mesh, P("data"))
  dx_np, dk_np = _np_conv3x3_grads(x, k, g)
  for method in conv.WEIGHT_GRAD_METHODS:
    def loss(x, k, g, m=method):
      return jnp.sum(conv.conv3x3(x, k, weight_grad=m) * g)

    dx, dk = jax.jit(jax.grad(loss, (0, 1)))(jax.device_put(x, data), k, jax.device_put(g, data))
    assert _rel(dx, dx_np) < 1e-5 and _rel(dk, dk_np) < 1e-5, method


def test_module_matches_nn_conv():
  x, _, _ = _data()
  module = conv.Conv3x3(16)
  variables = module.init(jax.random.key(1), x)
  reference = nn.Conv(16, (3, 3), padding="SAME")
  ref_vars = reference.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref_vars)
  y = module.apply(variables, x)
  np.testing.assert_allclose(y, reference.apply(variables, x), rtol=1e-6, atol=1e-6)
  # Parameter gradients through the module agree with nn.Conv's (native XLA) gradients.
  g_fast = jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))(variables)
  g_ref = jax.grad(lambda v: jnp.sum(reference.apply(v, x) ** 2))(variables)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    assert _rel(a, b) < 1e-5


def test_module_init_and_dtypes():
  x = jnp.ones((1, 4, 4, 4), jnp.float32)
  params = conv.Conv3x3(512).init(jax.random.key(0), x)["params"]
  bound = 1.0 / np.sqrt(9 * 4)  # PyTorch default bias init, fan_in = Cin * 3 * 3.
  bias = np.asarray(params["bias"])
  assert np.all(np.abs(bias) <= bound) and np.max(np.abs(bias)) > 0.95 * bound
  assert abs(np.std(bias) - bound / np.sqrt(3)) < 0.1 * bound
  assert abs(np.std(params["kernel"]) - 0.02) < 0.002

  no_bias = conv.Conv3x3(8, use_bias=False).init(jax.random.key(0), x)["params"]
  assert set(no_bias) == {"kernel"}

  module = conv.Conv3x3(8, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert module.apply(variables, x).dtype == jnp.bfloat16


def test_bad_input_raises():
  x = jnp.ones((1, 4, 4, 3))
  with pytest.raises(ValueError, match="HWIO"):
    conv.conv3x3(x, jnp.ones((5, 5, 3, 2)))
  with pytest.raises(ValueError, match="HWIO"):
    conv.conv3x3(x, jnp.ones((3, 3, 4, 2)))
  with pytest.raises(ValueError, match="NHWC"):
    conv.conv3x3(jnp.ones((4, 4, 3)), jnp.ones((3, 3, 3, 2)))
  with pytest.raises(ValueError, match="same dtype"):
    conv.conv3x3(x, jnp.ones((3, 3, 3, 2), jnp.bfloat16))
