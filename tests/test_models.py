"""Tests for draem_jax.models against docs/architecture.md (the original model_unet.py) and float64 NumPy.

Full-size models are only traced (jax.eval_shape). Computations run at width 8 with parameters filled
by NumPy, because compiling flax's init (one threefry draw per parameter) costs far more CPU than the
networks themselves at these sizes.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draem_jax import conv as conv_lib
from draem_jax import models
from draem_jax import prng

# ----------------------------------------------------------------------------------------------------
# Independent references.


def _np_upsample_loops(x):
  """torch bilinear x2 with align_corners=True, written pixel by pixel (float64)."""
  n, h, w, c = x.shape
  out = np.zeros((n, 2 * h, 2 * w, c))
  for i in range(2 * h):
    for j in range(2 * w):
      # align_corners=True: source = dst * (in - 1) / (out - 1).
      sy = i * (h - 1) / (2 * h - 1)
      sx = j * (w - 1) / (2 * w - 1)
      y0, x0 = int(np.floor(sy)), int(np.floor(sx))
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      fy, fx = sy - y0, sx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


def _np_upsample(x):
  """Same as _np_upsample_loops, vectorised per axis (for the whole-network reference)."""
  for axis in (1, 2):
    n = x.shape[axis]
    src = np.arange(2 * n) * (n - 1) / (2 * n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    f = (src - lo).reshape((1, -1, 1, 1) if axis == 1 else (1, 1, -1, 1))
    x = np.take(x, lo, axis) * (1 - f) + np.take(x, hi, axis) * f
  return x


def _np_conv(x, p):
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = np.asarray(p["kernel"], np.float64)
  out = np.zeros((n, h, w, k.shape[3])) + np.asarray(p["bias"], np.float64)
  for i in range(3):
    for j in range(3):
      out += np.einsum("nhwc,cd->nhwd", xp[:, i:i + h, j:j + w], k[i, j])
  return out


class _NpNet:
  """Float64 NumPy DRAEM written from the tables of docs/architecture.md.

  BatchNorm in train mode normalises with the biased batch statistics and records the running-stat update
  with PyTorch momentum 0.1; in eval mode it uses the stored running statistics.
  """

  def __init__(self, params, stats, train):
    self.params, self.stats, self.train, self.new_stats = params, stats, train, {}

  def bn(self, x, path):
    p, s = _get(self.params, path), _get(self.stats, path)
    if self.train:
      mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
      self.new_stats[path + ("mean",)] = 0.9 * np.asarray(s["mean"]) + 0.1 * mean
      self.new_stats[path + ("var",)] = 0.9 * np.asarray(s["var"]) + 0.1 * var
    else:
      mean, var = np.asarray(s["mean"], np.float64), np.asarray(s["var"], np.float64)
    return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])

  def cbr(self, x, path, conv_name, bn_name):
    x = _np_conv(x, _get(self.params, path + (conv_name,)))
    return np.maximum(self.bn(x, path + (bn_name,)), 0.0)

  def double(self, x, path):
    return self.cbr(self.cbr(x, path, "conv_0", "bn_1"), path, "conv_3", "bn_4")

  def up(self, x, path):
    return self.cbr(_np_upsample(x), path, "conv_1", "bn_2")

  @staticmethod
  def pool(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max((2, 4))

  def recon(self, x, root):
    enc, dec = root + ("encoder",), root + ("decoder",)
    x = self.double(x, enc + ("block1",))
    for k in range(2, 6):
      x = self.double(self.pool(x), enc + (f"block{k}",))
    for k in range(1, 5):  # No skip connections.
      x = self.double(self.up(x, dec + (f"up{k}",)), dec + (f"db{k}",))
    return _np_conv(x, _get(self.params, dec + ("fin_out", "conv_0")))

  def disc(self, x, root):
    enc, dec = root + ("encoder_segment",), root + ("decoder_segment",)
    skips = [self.double(x, enc + ("block1",))]
    for k in range(2, 7):
      skips.append(self.double(self.pool(skips[-1]), enc + (f"block{k}",)))
    x = skips[5]
    for level, skip in zip(("_b", "1", "2", "3", "4"), skips[4::-1]):
      x = np.concatenate([self.up(x, dec + (f"up{level}",)), skip], -1)  # [up, skip]
      x = self.double(x, dec + (f"db{level}",))
    return _np_conv(x, _get(self.params, dec + ("fin_out", "conv_0")))


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _shapes(model, x_shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape), train=False))


def _np_variables(model, x_shape, seed=0):
  """Random float32 variables with the model's tree, drawn by NumPy (no init compile)."""
  rng = np.random.default_rng(seed)
  draw = {"kernel": lambda s: rng.normal(0, 0.1, s), "bias": lambda s: rng.normal(0, 0.1, s),
          "scale": lambda s: 1 + rng.normal(0, 0.1, s), "mean": lambda s: rng.normal(0, 0.1, s),
          "var": lambda s: rng.uniform(0.5, 1.5, s)}
  flat = flax.traverse_util.flatten_dict(_shapes(model, x_shape))
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(draw[k[-1]](v.shape), jnp.float32) for k, v in flat.items()})


def _count(tree, leaf=None):
  flat = flax.traverse_util.flatten_dict(tree)
  return sum(int(np.prod(v.shape)) for k, v in flat.items() if leaf is None or k[-1] == leaf)


def _num_leaves(tree, leaf):
  return sum(k[-1] == leaf for k in flax.traverse_util.flatten_dict(tree))


# ----------------------------------------------------------------------------------------------------
# Structure at the default widths (traced only).


def test_parameter_counts_default_widths():
  # docs/architecture.md: the counts of the original model_unet.py's layer lists.
  recon = _shapes(models.ReconstructiveSubNetwork(), (1, 256, 256, 3))
  disc = _shapes(models.DiscriminativeSubNetwork(), (1, 256, 256, 6))
  assert _count(recon["params"]) == 69_048_579
  assert _count(disc["params"]) == 28_374_146
  assert _count(recon["batch_stats"]) == 21_504 and _count(disc["batch_stats"]) == 14_080
  assert _num_leaves(recon["params"], "kernel") == 23 and _num_leaves(disc["params"], "kernel") == 28
  assert _num_leaves(recon["params"], "scale") == 22 and _num_leaves(disc["params"], "scale") == 27
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((recon, disc)))

  both = _shapes(models.DRAEM(dtype=jnp.bfloat16), (1, 256, 256, 3))
  assert set(both["params"]) == {"reconstructive", "discriminative"}
  assert _count(both["params"]) == 97_422_725
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(both))  # float32 params even for bf16.


# Conv (Cin, Cout) per torch Sequential, transcribed from the tables of docs/architecture.md.
_RECON_CONVS = {
    "encoder.block1": [(3, 128), (128, 128)], "encoder.block2": [(128, 256), (256, 256)],
    "encoder.block3": [(256, 512), (512, 512)], "encoder.block4": [(512, 1024), (1024, 1024)],
    "encoder.block5": [(1024, 1024), (1024, 1024)],
    "decoder.up1": [(1024, 1024)], "decoder.db1": [(1024, 1024), (1024, 512)],
    "decoder.up2": [(512, 512)], "decoder.db2": [(512, 512), (512, 256)],
    "decoder.up3": [(256, 256)], "decoder.db3": [(256, 256), (256, 128)],
    "decoder.up4": [(128, 128)], "decoder.db4": [(128, 128), (128, 128)],
    "decoder.fin_out": [(128, 3)],
}
_DISC_CONVS = {
    "encoder_segment.block1": [(6, 64), (64, 64)], "encoder_segment.block2": [(64, 128), (128, 128)],
    "encoder_segment.block3": [(128, 256), (256, 256)], "encoder_segment.block4": [(256, 512), (512, 512)],
    "encoder_segment.block5": [(512, 512), (512, 512)], "encoder_segment.block6": [(512, 512), (512, 512)],
    "decoder_segment.up_b": [(512, 512)], "decoder_segment.db_b": [(1024, 512), (512, 512)],
    "decoder_segment.up1": [(512, 256)], "decoder_segment.db1": [(768, 256), (256, 256)],
    "decoder_segment.up2": [(256, 128)], "decoder_segment.db2": [(384, 128), (128, 128)],
    "decoder_segment.up3": [(128, 64)], "decoder_segment.db3": [(192, 64), (64, 64)],
    "decoder_segment.up4": [(64, 64)], "decoder_segment.db4": [(128, 64), (64, 64)],
    "decoder_segment.fin_out": [(64, 2)],
}


def _torch_state_dict_shapes(convs):
  """{torch key: torch shape} of a sub-network: Sequential indices as in model_unet.py."""
  out = {}
  for prefix, layers in convs.items():
    if prefix.endswith("fin_out"):
      indices = [(0, None)]
    elif prefix.split(".")[1].startswith("up"):
      indices = [(1, 2)]  # 0 is the Upsample.
    else:
      indices = [(0, 1), (3, 4)]
    for (cin, cout), (ci, bi) in zip(layers, indices):
      out[f"{prefix}.{ci}.weight"] = (cout, cin, 3, 3)
      out[f"{prefix}.{ci}.bias"] = (cout,)
      if bi is not None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
          out[f"{prefix}.{bi}.{leaf}"] = (cout,)
        out[f"{prefix}.{bi}.num_batches_tracked"] = ()
  return out


@pytest.mark.parametrize("model,in_channels,convs,num_tensors", [
    (models.ReconstructiveSubNetwork(), 3, _RECON_CONVS, 156),
    (models.DiscriminativeSubNetwork(), 6, _DISC_CONVS, 191),
])
def test_param_tree_mirrors_torch_state_dict(model, in_channels, convs, num_tensors):
  torch_shapes = _torch_state_dict_shapes(convs)
  assert len(torch_shapes) == num_tensors  # state_dict tensors, docs/architecture.md.
  flat = flax.traverse_util.flatten_dict(_shapes(model, (1, 64, 64, in_channels)))
  mapped = {}
  for key, shape in torch_shapes.items():
    target = models.torch_key_to_flax(key)
    if target is None:
      assert key.endswith("num_batches_tracked")
      continue
    collection, path = target
    flax_shape = flat[(collection,) + path].shape
    expected = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape  # OIHW -> HWIO
    assert flax_shape == expected, (key, flax_shape, expected)
    mapped[(collection,) + path] = key
  assert set(mapped) == set(flat)  # Every flax variable has exactly one torch tensor.


def test_torch_key_to_flax_examples_and_errors():
  assert models.torch_key_to_flax("encoder.block1.0.weight") == (
      "params", ("encoder", "block1", "conv_0", "kernel"))
  assert models.torch_key_to_flax("decoder_segment.up_b.2.running_var") == (
      "batch_stats", ("decoder_segment", "up_b", "bn_2", "var"))
  assert models.torch_key_to_flax("decoder.fin_out.0.bias") == (
      "params", ("decoder", "fin_out", "conv_0", "bias"))
  assert models.torch_key_to_flax("encoder.block2.4.num_batches_tracked") is None
  for bad in ("encoder.block1.2.weight", "decoder.up1.0.weight", "encoder.block1.weight",
              "encoder.block1.1.foo"):
    with pytest.raises(ValueError, match="torch_key_to_flax"):
      models.torch_key_to_flax(bad)


def test_output_shapes_traced():
  for model, x_shape, outs in [
      (models.DRAEM(8, 8), (2, 64, 64, 3), [(2, 64, 64, 3), (2, 64, 64, 2)]),
      (models.DRAEM(), (1, 256, 256, 3), [(1, 256, 256, 3), (1, 256, 256, 2)]),
      (models.DRAEM(8, 8), (1, 96, 160, 3), [(1, 96, 160, 3), (1, 96, 160, 2)]),
      (models.ReconstructiveSubNetwork(8), (1, 48, 80, 3), [(1, 48, 80, 3)]),
      (models.DiscriminativeSubNetwork(8), (1, 32, 64, 6), [(1, 32, 64, 2)]),
  ]:
    variables = _shapes(model, x_shape)
    y = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct(x_shape, jnp.float32))
    y = y if isinstance(y, tuple) else (y,)
    assert [o.shape for o in y] == outs and all(o.dtype == jnp.float32 for o in y)


def test_bad_input_raises():
  with pytest.raises(ValueError, match=r"divisible by 32.*\(1, 48, 48, 3\)"):
    _shapes(models.DRAEM(8, 8), (1, 48, 48, 3))
  with pytest.raises(ValueError, match=r"divisible by 16.*\(1, 40, 32, 3\)"):
    _shapes(models.ReconstructiveSubNetwork(8), (1, 40, 32, 3))
  with pytest.raises(ValueError, match=r"divisible by 32"):
    _shapes(models.DiscriminativeSubNetwork(8), (1, 48, 64, 6))
  with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
    _shapes(models.DRAEM(8, 8), (1, 32, 32, 1))
  with pytest.raises(ValueError, match="NHWC"):
    _shapes(models.DRAEM(8, 8), (32, 32, 3))
  with pytest.raises(ValueError, match="disc_input_order"):
    _shapes(models.DRAEM(8, 8, disc_input_order="bgr"), (1, 32, 32, 3))


# ----------------------------------------------------------------------------------------------------
# Building blocks.


@pytest.mark.numerics
def test_upsample_matches_numpy_align_corners():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3))
  y = models.upsample2x_align_corners(jnp.asarray(x, jnp.float32))
  assert y.shape == (2, 10, 14, 3) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, _np_upsample_loops(x), atol=1e-5)
  np.testing.assert_allclose(_np_upsample(x), _np_upsample_loops(x), atol=1e-12)
  # Hand check, n = 2 -> 4: samples at 0, 1/3, 2/3, 1 (corners kept; half-pixel resize would differ).
  a, b = 3.0, 9.0
  row = models.upsample2x_align_corners(jnp.asarray([a, b], jnp.float32).reshape(1, 1, 2, 1))
  np.testing.assert_allclose(row[0, 0, :, 0], [a, a + (b - a) / 3, a + 2 * (b - a) / 3, b], rtol=1e-6)
  np.testing.assert_allclose(row[0, 1, :, 0], row[0, 0, :, 0])
  one = models.upsample2x_align_corners(jnp.full((1, 1, 1, 2), 4.0))  # n = 1: replicate.
  np.testing.assert_array_equal(one, np.full((1, 2, 2, 2), 4.0))


def test_max_pool_matches_flax_values_and_first_max_gradient():
  # Forward = nn.max_pool; backward = select-and-scatter (the first maximum of each window in row-major
  # order takes the gradient, as PyTorch's MaxPool2d), ties and all-equal windows included.
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 8, 6, 3)).astype(np.float32)
  x[0, :2, :2, 0] = 0.0  # a window of four equal values
  x[0, 2:4, 0:2, 1] = [[1.0, 2.0], [2.0, 0.0]]  # a tie between positions (0, 1) and (1, 0)
  x[1] = np.maximum(x[1], 0.0)  # ReLU-like zeros
  g = jnp.asarray(rng.normal(size=(2, 4, 3, 3)), jnp.float32)

  def flax_pool(v):
    return flax.linen.max_pool(v, (2, 2), strides=(2, 2), padding="VALID")

  np.testing.assert_array_equal(models.max_pool2x2(x), flax_pool(x))
  got = jax.vjp(models.max_pool2x2, jnp.asarray(x))[1](g)[0]
  np.testing.assert_array_equal(got, jax.vjp(flax_pool, jnp.asarray(x))[1](g)[0])
  # Brute force: each window's first maximum gets the window's gradient.
  want = np.zeros_like(x)
  for n, i, j, c in np.ndindex(2, 4, 3, 3):
    window = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c].reshape(-1)
    k = int(np.argmax(window))  # numpy: the first maximum
    want[n, 2 * i + k // 2, 2 * j + k % 2, c] = g[n, i, j, c]
  np.testing.assert_array_equal(got, want)
  assert got[0, 0, 0, 0] == g[0, 0, 0, 0] and got[0, 2, 1, 1] == g[0, 1, 0, 1]


@pytest.mark.numerics
@pytest.mark.parametrize("block", ["double", "up"])
def test_blocks_match_numpy_train_and_eval(block):
  x = np.random.default_rng(1).normal(1.0, 2.0, size=(2, 8, 6, 5))
  model = models.DoubleConv(7, 4) if block == "double" else models.UpBlock(4)
  variables = _np_variables(model, x.shape, seed=2)
  xj = jnp.asarray(x, jnp.float32)
  for train in (True, False):
    net = _NpNet(variables["params"], variables["batch_stats"], train)
    expected = net.double(x, ()) if block == "double" else net.up(x, ())
    if train:
      y, updated = model.apply(variables, xj, train=True, mutable=["batch_stats"])
      flat = flax.traverse_util.flatten_dict(updated["batch_stats"])
      assert set(flat) == set(net.new_stats)
      for path, value in net.new_stats.items():  # r <- 0.9 r + 0.1 batch (PyTorch momentum 0.1)
        np.testing.assert_allclose(flat[path], value, rtol=1e-5, atol=1e-6)
    else:
      y = model.apply(variables, xj, train=False)  # Eval mode needs no mutable collection.
    assert y.shape == expected.shape
    assert _rel(y, expected) < 1e-5


def test_init_statistics():
  # Every conv and BN of the networks is made by the same helpers as DoubleConv / OutConv.
  block = models.DoubleConv(256, 256)
  variables = jax.jit(lambda k: block.init(k, jnp.zeros((1, 4, 4, 256)), train=False))(jax.random.key(0))
  p = variables["params"]
  kernel = np.asarray(p["conv_3"]["kernel"])  # 589,824 draws.
  assert abs(kernel.std() - 0.02) < 0.0004 and abs(kernel.mean()) < 1e-4
  bound = 1 / np.sqrt(9 * 256)  # PyTorch default conv bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  biases = np.concatenate([np.asarray(p[c]["bias"]) for c in ("conv_0", "conv_3")])
  assert np.all(np.abs(biases) <= bound) and np.max(np.abs(biases)) > 0.95 * bound
  assert abs(biases.std() - bound / np.sqrt(3)) < 0.1 * bound
  scales = np.concatenate([np.asarray(p[b]["scale"]) for b in ("bn_1", "bn_4")])
  assert abs(scales.mean() - 1) < 0.005 and abs(scales.std() - 0.02) < 0.003  # N(1, 0.02)
  for b in ("bn_1", "bn_4"):
    np.testing.assert_array_equal(p[b]["bias"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"][b]["mean"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"][b]["var"], 1.0)
  head = models.OutConv(2).init(jax.random.key(1), jnp.zeros((1, 4, 4, 64)))["params"]["conv_0"]
  assert np.max(np.abs(head["bias"])) <= 1 / np.sqrt(9 * 64)



@pytest.mark.numerics
@pytest.mark.parametrize("partitionable", [True, False])
def test_flat_initialisers_equal_flax_initialisers(partitionable):
  # The kernels are drawn flat (prng.draw_flat, ~10x faster to compile on the CPU); the values must be
  # flax's own, bit for bit, eager against eager and jitted against jitted (flax's normal itself differs
  # between the two in the last bit, the erf_inv being fused), in both of JAX's threefry counter schemes.
  cases = [(conv_lib.normal_init(0.02), flax.linen.initializers.normal(0.02)),
           (conv_lib.torch_default_kernel_init,
            flax.linen.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))]
  with jax.threefry_partitionable(partitionable):
    for ours, theirs in cases:
      for shape in [(3, 3, 5, 7), (3, 3, 16, 2), (3, 3, 1, 1)]:
        key = jax.random.key(sum(shape))
        for jit in (lambda f: f, lambda f: jax.jit(f, static_argnums=(1, 2))):
          got = np.asarray(jit(ours)(key, shape, jnp.float32))
          assert got.shape == shape and got.dtype == np.float32
          np.testing.assert_array_equal(got, jit(theirs)(key, shape, jnp.float32))
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        prng.draw_flat(jax.random.uniform, key, (4, 5, 6), jnp.float32, -2.0, 3.0),
        jax.random.uniform(key, (4, 5, 6), jnp.float32, -2.0, 3.0))
    np.testing.assert_array_equal(prng.draw_flat(jax.random.bits, key, (2, 3, 4)),
                                  jax.random.bits(key, (2, 3, 4)))


# ----------------------------------------------------------------------------------------------------
# The whole DRAEM at small widths.

_X_SHAPE = (2, 64, 64, 3)
_LOGIT_TOL = 5e-3  # See test_draem_matches_numpy_reference.


@pytest.fixture(scope="module")
def small():
  """DRAEM(8, 8) variables, an input batch and the float32 train-mode outputs."""
  model = models.DRAEM(8, 8)
  variables = _np_variables(model, _X_SHAPE)
  x = jnp.asarray(np.random.default_rng(3).uniform(0, 1, _X_SHAPE), jnp.float32)
  outs, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  return variables, x, outs, updated["batch_stats"]


@pytest.mark.numerics
def test_draem_matches_numpy_reference(small):
  variables, x, (recon, logits), stats = small
  assert recon.shape == (2, 64, 64, 3) and logits.shape == (2, 64, 64, 2)
  assert recon.dtype == jnp.float32 and logits.dtype == jnp.float32
  net = _NpNet(variables["params"], variables["batch_stats"], train=True)
  xn = np.asarray(x, np.float64)
  ref_recon = net.recon(xn, ("reconstructive",))
  # The discriminator sees [reconstruction, image] (train_DRAEM.py L67) and gets the network's own
  # reconstruction (no detach).
  ref_logits = net.disc(np.concatenate([ref_recon, xn], -1), ("discriminative",))
  # Train-mode BN over the few values at the 2x2 bottleneck makes the logits ill-conditioned: a 1e-7
  # relative input perturbation moves the float64 reference by 2.6e-4, so float32 lands within ~6e-4.
  # Any wiring error (e.g. swapped concat order, below) is O(1).
  assert _rel(recon, ref_recon) < 2e-4 and _rel(logits, ref_logits) < _LOGIT_TOL
  flat = flax.traverse_util.flatten_dict(stats)
  assert set(flat) == set(net.new_stats) and len(flat) == 2 * (22 + 27)
  for path, value in net.new_stats.items():
    assert _rel(flat[path], value) < _LOGIT_TOL, path  # Exact momentum: test_blocks_match_numpy...
  # Feeding [image, reconstruction] instead changes the logits: the check above can fail.
  swapped = _NpNet(variables["params"], variables["batch_stats"], True).disc(
      np.concatenate([xn, ref_recon], -1), ("discriminative",))
  assert _rel(swapped, ref_logits) > 0.3


def test_draem_image_first_order(small):
  variables, x, (recon, _), _ = small
  model = models.DRAEM(8, 8, disc_input_order="image_recon")
  (recon2, logits), _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  np.testing.assert_allclose(recon2, recon, rtol=1e-6, atol=1e-6)
  net = _NpNet(variables["params"], variables["batch_stats"], train=True)
  ref = net.disc(np.concatenate([np.asarray(x, np.float64), np.asarray(recon, np.float64)], -1),
                 ("discriminative",))
  assert _rel(logits, ref) < _LOGIT_TOL


def test_eval_mode_uses_running_stats(small):
  variables, x, _, _ = small
  model = models.DRAEM(8, 8)
  recon, logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  net = _NpNet(variables["params"], variables["batch_stats"], train=False)
  xn = np.asarray(x, np.float64)
  ref_recon = net.recon(xn, ("reconstructive",))
  ref_logits = net.disc(np.concatenate([ref_recon, xn], -1), ("discriminative",))
  assert _rel(recon, ref_recon) < 1e-4 and _rel(logits, ref_logits) < 1e-4

  # bfloat16 compute with the same float32 variables stays close (eval mode: train-mode BN on a random
  # 95-layer net at this size is chaotic, so bf16 rounding there grows to O(1) by design, not by bug).
  model16 = models.DRAEM(8, 8, dtype=jnp.bfloat16)
  recon16, logits16 = jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables, x)
  assert recon16.dtype == jnp.float32 and logits16.dtype == jnp.float32
  assert _rel(recon16, recon) < 0.1 and _rel(logits16, logits) < 0.1
  assert _rel(recon16, recon) > 1e-4  # It really computed in bfloat16.
  _, stats16 = jax.eval_shape(lambda v, x: model16.apply(v, x, train=True, mutable=["batch_stats"]),
                              variables, x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(stats16))


def test_bfloat16_block_close_to_float32():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 16, 8)), jnp.float32)
  variables = _np_variables(models.DoubleConv(16, 16), x.shape)
  outs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    conv, norm = models.layers(dtype)
    block = models.DoubleConv(16, 16, conv=conv, norm=norm)
    outs[dtype], stats = block.apply(variables, x, train=True, mutable=["batch_stats"])
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(stats))
  assert outs[jnp.bfloat16].dtype == jnp.bfloat16
  assert _rel(outs[jnp.bfloat16], outs[jnp.float32]) < 2e-2


def test_gradient_reaches_reconstructive_net(small):
  # The original does not detach the reconstruction before the discriminator (train_DRAEM.py L66-76),
  # so a loss of the logits alone has a gradient on the reconstructive net's output layer. Only that
  # layer is differentiated to keep the compile small.
  variables, x, _, _ = small
  model = models.DRAEM(8, 8)
  path = ("reconstructive", "decoder", "fin_out", "conv_0")

  def loss(fin_out):
    params = flax.traverse_util.flatten_dict(variables["params"])
    params.update({path + (k,): v for k, v in fin_out.items()})
    (_, logits), _ = model.apply(
        {"params": flax.traverse_util.unflatten_dict(params), "batch_stats": variables["batch_stats"]},
        x, train=True, mutable=["batch_stats"])
    return jnp.mean(jax.nn.log_softmax(logits)[..., 1])

  grads = jax.jit(jax.grad(loss))(_get(variables["params"], path))
  assert np.all(np.abs(np.asarray(grads["bias"])) > 0)
  assert np.mean(np.abs(np.asarray(grads["kernel"])) > 0) > 0.9
