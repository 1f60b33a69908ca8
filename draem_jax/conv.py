"""3x3 "SAME" stride-1 convolution with a fast weight gradient on CPU.

Every convolution in DRAEM is 3x3, stride 1, padding 1 (docs/architecture.md). On the CPU backend XLA's
weight-gradient convolution runs at about half the speed of its forward convolution and is roughly 2/3
of a training step (docs/performance.md). For a stride-1 SAME 3x3 convolution the weight gradient is
nine plain GEMMs, one per tap (i, j):

    dW[i, j] = pad(x)[:, i:i+H, j:j+W, :].reshape(-1, Cin).T @ dy.reshape(-1, Cout),

which XLA's CPU matmul runs near peak. ``conv3x3`` therefore uses, on CPU, a ``jax.custom_vjp`` whose
forward and input gradient are XLA's own convolutions and whose weight gradient is chosen by channel
counts (see ``_weight_grad``): nine GEMMs when a side has more than 64 channels; one GEMM against the nine
windows side by side when a side has at most 16 (first and last layers, where nine skinny GEMMs lose); and
XLA's weight-gradient conv in between (64 -> 64 channels), where it measured fastest. On GPU/TPU, whose
native backward is fast, and whenever ``fast_cpu=False`` it is plain ``lax.conv_general_dilated``.
The custom rule supports reverse mode only (``grad``/``vjp``), not ``jvp``; pass ``fast_cpu=False`` for
forward-mode or higher-order derivatives.

``python -c "from draem_jax import conv; conv.benchmark()"`` times one 256->256 channel conv, native vs custom.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Initializer = Callable[..., jax.Array]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# DRAEM's init (VitjanZ/DRAEM train_DRAEM.py L14-20): conv weights ~ N(0, 0.02).
DEFAULT_KERNEL_INIT: Initializer = nn.initializers.normal(stddev=0.02)


def _native_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="SAME",
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
  # The transpose of a stride-1 SAME 3x3 conv is the same conv with the kernel rotated by 180 degrees
  # and its in/out channels swapped (padding 1 = 3 - 1 - 1 again); this is what XLA itself emits.
  return _native_conv(dy, jnp.swapaxes(kernel[::-1, ::-1], 2, 3))


# Weight-gradient strategy by channel counts, from CPU timings (2 shared cores, batch 8): nine GEMMs win
# 1.5-3x once a side has > 64 channels (256 -> 256 at 64x64: 0.51 s vs XLA's 1.58 s); with <= 16 channels
# on one side a single GEMM against its nine windows wins 2-4x (64 -> 2 at 64x64: 3 ms vs 11 ms); in
# between, 64 -> 64 at 128x128 and above, XLA's own is 20-30% faster.
_SINGLE_GEMM_MAX_CHANNELS = 16
_NATIVE_MAX_CHANNELS = 64
_ROWS = (((0,), (0,)), ((), ()))  # dot_general: contract the N*H*W rows of both operands.


def _shifted(t: jax.Array, offsets) -> list[jax.Array]:
  """Windows of the zero-padded ``t`` (N, H, W, C) at the given (row, col) offsets, each (N, H, W, C)."""
  n, h, w, c = t.shape
  t_pad = jnp.pad(t, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [lax.slice(t_pad, (0, i, j, 0), (n, i + h, j + w, c)) for i, j in offsets]


def _weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """dL/dkernel (3, 3, Cin, Cout) of a stride-1 SAME 3x3 conv as GEMMs over the N*H*W rows.

  dW[i, j] = sum_p pad(x)[p + (i, j)] dy[p]^T = sum_q x[q] pad(dy)[q + (2 - i, 2 - j)]^T: either operand
  can be the shifted one, so the narrower one is (fewer bytes copied). Layers with at most 64 channels on
  both sides and more than 16 on each keep XLA's weight-gradient conv, which is faster there.
  """
  n, h, w, cin = x.shape
  cout = dy.shape[-1]
  if _SINGLE_GEMM_MAX_CHANNELS < min(cin, cout) and max(cin, cout) <= _NATIVE_MAX_CHANNELS:
    zero_kernel = jnp.zeros((3, 3, cin, cout), x.dtype)  # Linear in the kernel: its value is unused.
    return jax.vjp(lambda k: _native_conv(x, k), zero_kernel)[1](dy)[0]
  rows = n * h * w
  taps = [(i, j) for i in range(3) for j in range(3)]
  # Accumulate in float32 even for bfloat16 inputs.
  dot = functools.partial(lax.dot_general, dimension_numbers=_ROWS, preferred_element_type=jnp.float32)
  shift_dy = cout < cin
  if shift_dy:
    fixed, shifted = x.reshape(rows, cin), _shifted(dy, [(2 - i, 2 - j) for i, j in taps])
  else:
    fixed, shifted = dy.reshape(rows, cout), _shifted(x, taps)
  c = shifted[0].shape[-1]
  if c <= _SINGLE_GEMM_MAX_CHANNELS:
    # One GEMM against the nine narrow windows side by side (an im2col of the narrow operand only).
    g = dot(jnp.concatenate(shifted, axis=-1).reshape(rows, 9 * c), fixed)  # (9 c, C_fixed)
    g = g.reshape(3, 3, c, -1)
  else:
    g = jnp.stack([dot(s.reshape(rows, c), fixed) for s in shifted]).reshape(3, 3, c, -1)
  if shift_dy:  # g is (3, 3, Cout, Cin).
    g = jnp.swapaxes(g, 2, 3)
  return g.astype(x.dtype)


@jax.custom_vjp
def _fast_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _native_conv(x, kernel)


def _fast_conv_fwd(x, kernel):
  return _native_conv(x, kernel), (x, kernel)


def _fast_conv_bwd(residuals, dy):
  x, kernel = residuals
  return _input_grad(dy, kernel), _weight_grad(x, dy).astype(kernel.dtype)


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array, *, fast_cpu: bool = True) -> jax.Array:
  """3x3 cross-correlation, stride 1, zero padding 1 ("SAME"), no bias.

  Args:
    x: (N, H, W, Cin) float array.
    kernel: (3, 3, Cin, Cout) HWIO array of the same dtype as ``x``.
    fast_cpu: use the custom-VJP (GEMM weight gradient) path when the default backend is CPU. False forces
      plain ``lax.conv_general_dilated`` everywhere.

  Returns:
    (N, H, W, Cout) array of ``x``'s dtype. Forward values are identical on both paths; gradients agree to
    float rounding (about 1e-6 relative in float32).

  Raises:
    ValueError: if the shapes are not NHWC / 3x3 HWIO with matching Cin, or the dtypes differ.
  """
  if x.ndim != 4:
    raise ValueError(f"conv3x3: x must be NHWC (4-D), got shape {x.shape}.")
  if kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"conv3x3: kernel must be HWIO (3, 3, Cin={x.shape[3]}, Cout), got shape "
                     f"{kernel.shape} for x of shape {x.shape}.")
  if x.dtype != kernel.dtype:
    raise ValueError(f"conv3x3: x ({x.dtype}) and kernel ({kernel.dtype}) must have the same dtype; "
                     "cast them first (Conv3x3 does this for you).")
  if fast_cpu and jax.default_backend() == "cpu":
    return _fast_conv(x, kernel)
  return _native_conv(x, kernel)


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default conv-bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Args:
    fan_in: Cin * kh * kw of the convolution.

  Returns:
    A flax initializer ``(key, shape, dtype) -> array``.
  """
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv3x3(nn.Module):
  """3x3 SAME stride-1 conv with bias; a drop-in for ``nn.Conv(features, (3, 3))`` backed by ``conv3x3``.

  Parameters are ``kernel`` (3, 3, Cin, Cout) HWIO and ``bias`` (Cout,), so the param tree is the same as
  ``nn.Conv``'s.

  Attributes:
    features: Cout.
    use_bias: add a learned bias.
    dtype: compute dtype (None: promote from input and params, as ``nn.Conv``).
    param_dtype: dtype of the stored parameters.
    kernel_init: kernel initializer; default N(0, 0.02) (DRAEM).
    bias_init: bias initializer; None means PyTorch's default U(+-1/sqrt(9 * Cin)), which DRAEM keeps.
    fast_cpu_conv: use the fast custom-VJP backward on CPU (see module docstring); False forces native.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = DEFAULT_KERNEL_INIT
  bias_init: Initializer | None = None
  fast_cpu_conv: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      x: (N, H, W, Cin) array.

    Returns:
      (N, H, W, features) array in the compute dtype.
    """
    if x.ndim != 4:
      raise ValueError(f"Conv3x3 '{self.name}': input must be NHWC (4-D), got shape {x.shape}.")
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (3, 3, cin, self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias_init = self.bias_init or torch_default_bias_init(9 * cin)
      bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv3x3(x, kernel, fast_cpu=self.fast_cpu_conv)
    if bias is not None:
      y = y + bias.reshape(1, 1, 1, self.features)
    return y


def benchmark(batch: int = 8, size: int = 64, channels: int = 256, repeats: int = 3) -> None:
  """Prints forward+backward time of one conv, native vs custom VJP (CPU)."""
  import time  # pylint: disable=g-import-not-at-top

  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (batch, size, size, channels), jnp.float32)
  k = 0.02 * jax.random.normal(kk, (3, 3, channels, channels), jnp.float32)
  gflop = 2 * 9 * batch * size * size * channels * channels / 1e9
  for fast in (False, True):
    step = jax.jit(jax.grad(lambda x, k, f=fast: jnp.sum(conv3x3(x, k, fast_cpu=f) ** 2), (0, 1)))
    jax.block_until_ready(step(x, k))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(step(x, k))
      times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"{'custom' if fast else 'native'}: fwd+bwd {best * 1e3:.0f} ms "
          f"({3 * gflop / best:.0f} GFLOP/s), backend {jax.default_backend()}")
