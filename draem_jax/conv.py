"""3x3 "SAME" stride-1 convolution whose weight gradient on CPU is chosen per layer shape.

Every convolution in DRAEM is 3x3, stride 1, padding 1 (docs/architecture.md). On the CPU backend XLA's
weight-gradient convolution is the slowest part of a training step at large channel counts
(docs/performance.md). For a stride-1 SAME 3x3 convolution the weight gradient is nine plain GEMMs, one
per tap (i, j):

    dW[i, j] = pad(x)[:, i:i+H, j:j+W, :].reshape(-1, Cin).T @ dy.reshape(-1, Cout),

which XLA's CPU matmul runs near peak. ``conv3x3`` computes the forward and the input gradient with XLA's
own convolutions and, on CPU, picks the weight gradient for each layer shape from this CPU's table in
``CPU_WEIGHT_GRAD_TABLES`` (measured: the entry nearest in (rows, Cin, Cout) on a log scale wins):

* ``"native"``: XLA's weight-gradient convolution (fastest at small and medium widths, e.g. 16-64
  channels at 64-128 px);
* ``"taps"``: the nine GEMMs above, one shifted window at a time inside a ``fori_loop`` (so only one
  window is ever materialised: the same activation memory as the native path), 1.5-3x faster than XLA's
  from about 128 channels on both sides;
* ``"im2col"``: one GEMM against the nine windows of the narrow operand side by side, for layers with a
  few channels on one side (the first and last convs: 3 -> 128, 64 -> 2).

GPUs and TPUs, whose native backward is fast, always get plain ``lax.conv_general_dilated``. The custom
rule supports reverse mode only; ``weight_grad="native"`` gives forward-mode and higher-order derivatives.
``python -m benchmarks.conv_table`` measures the table again on the machine at hand.
"""

import functools
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from draem_jax import prng

Initializer = Callable[..., jax.Array]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def normal_init(stddev: float) -> Initializer:
  """N(0, stddev^2): ``nn.initializers.normal(stddev)`` itself, called on the flat shape and reshaped
  (``prng.draw_flat``: the same numbers, compiled ~10x faster on the CPU for a rank-4 kernel).

  Its own arithmetic, not a copy of it: JAX 0.12 computes ``(sqrt(2) stddev) erf_inv(u)`` where JAX 0.10
  computes ``normal(u) stddev``, which differ in the last bit for ~30 % of the values.

  Returns:
    A flax initializer ``(key, shape, dtype) -> array`` of ``shape`` and ``dtype`` (default float32).
  """
  flat_init = nn.initializers.normal(stddev)

  def init(key, shape, dtype=jnp.float32):
    return prng.draw_flat(flat_init, key, shape, dtype)

  return init


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's default conv-weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), fan_in = kh kw Cin.

  The values of ``nn.initializers.variance_scaling(1/3, "fan_in", "uniform")`` for an HWIO kernel (its
  arithmetic, step for step), drawn flat (``prng.draw_flat``).

  Args:
    key: typed PRNG key.
    shape: (kh, kw, Cin, Cout).
    dtype: float dtype of the kernel.
  """
  variance = jnp.array((1.0 / 3.0) / math.prod(shape[:-1]), dtype=dtype)
  return prng.draw_flat(jax.random.uniform, key, shape, dtype, -1) * jnp.sqrt(3 * variance)


# DRAEM's init (VitjanZ/DRAEM train_DRAEM.py L14-20): conv weights ~ N(0, 0.02).
DEFAULT_KERNEL_INIT: Initializer = normal_init(0.02)
WEIGHT_GRAD_METHODS = ("native", "taps", "im2col")

# (rows = N * H * W, Cin, Cout) -> fastest weight gradient, forward + backward of one conv, batch 8, medians
# of interleaved repeats (``python -m benchmarks.conv_table``), one table per kind of x86-64 core: the
# winners differ between them (docs/performance.md). The shapes are DRAEM's layers at the benchmark's
# train sizes.
_WeightGradTable = tuple[tuple[tuple[int, int, int], str], ...]
CPU_WEIGHT_GRAD_TABLES: dict[str, _WeightGradTable] = {
    # 2 shared Intel Xeon cores with AVX-512; widths 16/16 at 128 px and 128/64 at 64 px.
    "avx512": (
        # widths 16/16 at 128x128: XLA's own wins up to 128 channels.
        ((131072, 3, 16), "native"), ((131072, 16, 16), "native"), ((131072, 32, 16), "native"),
        ((131072, 16, 2), "native"), ((32768, 16, 32), "native"), ((32768, 32, 32), "native"),
        ((32768, 64, 32), "native"), ((8192, 32, 64), "native"), ((8192, 64, 64), "native"),
        ((2048, 64, 128), "im2col"), ((2048, 128, 128), "im2col"), ((512, 128, 128), "native"),
        # widths 128/64 at 64x64.
        ((32768, 3, 128), "im2col"), ((32768, 128, 128), "taps"), ((32768, 128, 3), "im2col"),
        ((8192, 128, 256), "taps"), ((8192, 256, 256), "taps"), ((8192, 256, 128), "taps"),
        ((2048, 256, 512), "taps"), ((2048, 512, 512), "taps"), ((512, 512, 1024), "im2col"),
        ((512, 1024, 1024), "taps"), ((128, 1024, 1024), "taps"), ((32768, 6, 64), "im2col"),
        ((32768, 64, 64), "native"), ((32768, 128, 64), "taps"), ((32768, 64, 2), "im2col"),
        ((8192, 192, 64), "native"), ((2048, 384, 128), "im2col"), ((512, 768, 256), "im2col"),
        ((128, 1024, 512), "im2col"),
    ),
    # 2 idle AMD EPYC cores without AVX-512 (AVX2); widths 16/16 and 32/16 at 64 and 128 px, 128/64 at 64 px
    # (geometric mean where a shape occurs in several). The GEMMs beat XLA's own weight gradient at most
    # shapes here: the train step is 1.03-1.40x faster with this table than with the "avx512" one.
    "avx2": (
        ((131072, 32, 32), "taps"), ((131072, 32, 16), "taps"), ((131072, 32, 3), "im2col"),
        ((131072, 16, 16), "taps"), ((131072, 16, 3), "taps"), ((131072, 16, 2), "taps"),
        ((131072, 6, 16), "taps"), ((131072, 3, 32), "im2col"), ((131072, 3, 16), "native"),
        ((32768, 128, 128), "taps"), ((32768, 128, 64), "taps"), ((32768, 128, 3), "im2col"),
        ((32768, 64, 64), "taps"), ((32768, 64, 32), "taps"), ((32768, 64, 2), "im2col"),
        ((32768, 48, 16), "native"), ((32768, 32, 64), "taps"), ((32768, 32, 32), "taps"),
        ((32768, 32, 16), "native"), ((32768, 32, 3), "im2col"), ((32768, 16, 32), "taps"),
        ((32768, 16, 16), "native"), ((32768, 16, 3), "taps"), ((32768, 16, 2), "im2col"),
        ((32768, 6, 64), "im2col"), ((32768, 6, 16), "native"), ((32768, 3, 128), "im2col"),
        ((32768, 3, 32), "taps"), ((32768, 3, 16), "native"), ((8192, 256, 256), "taps"),
        ((8192, 256, 128), "taps"), ((8192, 192, 64), "taps"), ((8192, 128, 256), "taps"),
        ((8192, 128, 128), "taps"), ((8192, 128, 64), "taps"), ((8192, 96, 32), "im2col"),
        ((8192, 64, 128), "im2col"), ((8192, 64, 64), "im2col"), ((8192, 64, 32), "im2col"),
        ((8192, 48, 16), "native"), ((8192, 32, 64), "im2col"), ((8192, 32, 32), "taps"),
        ((8192, 32, 16), "taps"), ((8192, 16, 32), "taps"), ((8192, 16, 16), "native"),
        ((2048, 512, 512), "taps"), ((2048, 512, 256), "im2col"), ((2048, 384, 128), "taps"),
        ((2048, 256, 512), "im2col"), ((2048, 256, 256), "im2col"), ((2048, 256, 128), "im2col"),
        ((2048, 192, 64), "taps"), ((2048, 128, 256), "im2col"), ((2048, 128, 128), "taps"),
        ((2048, 128, 64), "im2col"), ((2048, 96, 32), "im2col"), ((2048, 64, 128), "im2col"),
        ((2048, 64, 64), "im2col"), ((2048, 64, 32), "im2col"), ((2048, 32, 64), "im2col"),
        ((2048, 32, 32), "native"), ((512, 1024, 1024), "im2col"), ((512, 1024, 512), "im2col"),
        ((512, 768, 256), "im2col"), ((512, 512, 1024), "im2col"), ((512, 512, 512), "native"),
        ((512, 512, 256), "im2col"), ((512, 256, 512), "taps"), ((512, 256, 256), "im2col"),
        ((512, 256, 128), "im2col"), ((512, 192, 64), "im2col"), ((512, 128, 256), "im2col"),
        ((512, 128, 128), "taps"), ((512, 128, 64), "im2col"), ((512, 64, 128), "im2col"),
        ((512, 64, 64), "native"), ((128, 1024, 1024), "im2col"), ((128, 1024, 512), "im2col"),
        ((128, 512, 512), "im2col"), ((128, 256, 256), "im2col"), ((128, 256, 128), "im2col"),
        ((128, 128, 128), "im2col"), ((32, 512, 512), "im2col"), ((32, 128, 128), "im2col"),
    ),
    # 2 idle AMD EPYC cores with AVX-512 (family 25: Zen 4); the same five sizes as "avx2". XLA's own weight
    # gradient wins most full-width layers here, where the Intel table picks the GEMMs.
    "avx512_amd": (
        ((131072, 32, 32), "native"), ((131072, 32, 16), "taps"), ((131072, 32, 3), "im2col"),
        ((131072, 16, 16), "taps"), ((131072, 16, 3), "im2col"), ((131072, 16, 2), "taps"),
        ((131072, 6, 16), "taps"), ((131072, 3, 32), "native"), ((131072, 3, 16), "native"),
        ((32768, 128, 128), "taps"), ((32768, 128, 64), "native"), ((32768, 128, 3), "im2col"),
        ((32768, 64, 64), "native"), ((32768, 64, 32), "native"), ((32768, 64, 2), "im2col"),
        ((32768, 48, 16), "taps"), ((32768, 32, 64), "native"), ((32768, 32, 32), "native"),
        ((32768, 32, 16), "taps"), ((32768, 32, 3), "im2col"), ((32768, 16, 32), "native"),
        ((32768, 16, 16), "native"), ((32768, 16, 3), "taps"), ((32768, 16, 2), "im2col"),
        ((32768, 6, 64), "taps"), ((32768, 6, 16), "native"), ((32768, 3, 128), "im2col"),
        ((32768, 3, 32), "native"), ((32768, 3, 16), "native"), ((8192, 256, 256), "native"),
        ((8192, 256, 128), "native"), ((8192, 192, 64), "native"), ((8192, 128, 256), "native"),
        ((8192, 128, 128), "native"), ((8192, 128, 64), "im2col"), ((8192, 96, 32), "native"),
        ((8192, 64, 128), "native"), ((8192, 64, 64), "native"), ((8192, 64, 32), "native"),
        ((8192, 48, 16), "taps"), ((8192, 32, 64), "native"), ((8192, 32, 32), "native"),
        ((8192, 32, 16), "taps"), ((8192, 16, 32), "native"), ((8192, 16, 16), "native"),
        ((2048, 512, 512), "native"), ((2048, 512, 256), "native"), ((2048, 384, 128), "native"),
        ((2048, 256, 512), "native"), ((2048, 256, 256), "native"), ((2048, 256, 128), "native"),
        ((2048, 192, 64), "im2col"), ((2048, 128, 256), "native"), ((2048, 128, 128), "native"),
        ((2048, 128, 64), "im2col"), ((2048, 96, 32), "native"), ((2048, 64, 128), "native"),
        ((2048, 64, 64), "native"), ((2048, 64, 32), "native"), ((2048, 32, 64), "native"),
        ((2048, 32, 32), "native"), ((512, 1024, 1024), "im2col"), ((512, 1024, 512), "native"),
        ((512, 768, 256), "native"), ((512, 512, 1024), "taps"), ((512, 512, 512), "native"),
        ((512, 512, 256), "native"), ((512, 256, 512), "im2col"), ((512, 256, 256), "native"),
        ((512, 256, 128), "im2col"), ((512, 192, 64), "im2col"), ((512, 128, 256), "native"),
        ((512, 128, 128), "im2col"), ((512, 128, 64), "native"), ((512, 64, 128), "native"),
        ((512, 64, 64), "native"), ((128, 1024, 1024), "im2col"), ((128, 1024, 512), "native"),
        ((128, 512, 512), "taps"), ((128, 256, 256), "native"), ((128, 256, 128), "im2col"),
        ((128, 128, 128), "native"), ((32, 512, 512), "im2col"), ((32, 128, 128), "im2col"),
    ),
}


@functools.cache
def cpu_table_name() -> str:
  """Which ``CPU_WEIGHT_GRAD_TABLES`` entry this host uses: ``$DRAEM_CPU_CONV_TABLE`` if set, else from
  Linux ``/proc/cpuinfo`` (``table_name_from_cpuinfo``); "avx2" where it cannot be read (e.g. macOS; on ARM
  no table was measured).

  The choice changes only speed and float rounding: set the variable to make two machines run the same
  methods (their results can still differ in the last bits where XLA compiles for different vector units).
  """
  name = os.environ.get("DRAEM_CPU_CONV_TABLE", "")
  if name:
    if name not in CPU_WEIGHT_GRAD_TABLES:
      raise ValueError(f"DRAEM_CPU_CONV_TABLE={name!r}: use one of {sorted(CPU_WEIGHT_GRAD_TABLES)}")
    return name
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return table_name_from_cpuinfo(f.read())
  except OSError:
    return "avx2"


def table_name_from_cpuinfo(text: str) -> str:
  """The table for /proc/cpuinfo ``text``: "avx512_amd" where the ``flags`` list avx512f and the
  ``vendor_id`` is AuthenticAMD, "avx512" for other CPUs with avx512f (measured on an Intel Xeon), else
  "avx2". The first processor's lines decide."""
  fields = {}
  for line in text.splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  if "avx512f" not in fields.get("flags", "").split():
    return "avx2"
  return "avx512_amd" if fields.get("vendor_id") == "AuthenticAMD" else "avx512"


def cpu_weight_grad_method(rows: int, cin: int, cout: int, table: str | None = None) -> str:
  """The method of the measured shape nearest to (rows, Cin, Cout) (log scale) in
  ``CPU_WEIGHT_GRAD_TABLES[table]`` (default: this host's, ``cpu_table_name()``)."""
  entries = CPU_WEIGHT_GRAD_TABLES[table or cpu_table_name()]
  key = np.log2([rows, cin, cout])
  dist = [float(np.sum((np.log2(shape) - key)**2)) for shape, _ in entries]
  return entries[int(np.argmin(dist))][1]


def _native_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="SAME",
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
  # The transpose of a stride-1 SAME 3x3 conv is the same conv with the kernel rotated by 180 degrees
  # and its in/out channels swapped (padding 1 = 3 - 1 - 1 again); this is what XLA itself emits.
  return _native_conv(dy, jnp.swapaxes(kernel[::-1, ::-1], 2, 3))


_ROWS = (((0,), (0,)), ((), ()))  # dot_general: contract the N*H*W rows of both operands.
_TAPS = tuple((i, j) for i in range(3) for j in range(3))


def _weight_grad(x: jax.Array, dy: jax.Array, method: str) -> jax.Array:
  """dL/dkernel (3, 3, Cin, Cout) of a stride-1 SAME 3x3 conv, accumulated in float32 (float64 for float64).

  dW[i, j] = sum_p pad(x)[p + (i, j)] dy[p]^T = sum_q x[q] pad(dy)[q + (2 - i, 2 - j)]^T: either operand
  can be the shifted one, so the narrower one is (fewer bytes copied).
  """
  n, h, w, cin = x.shape
  cout = dy.shape[-1]
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  if method == "native":
    zero_kernel = jnp.zeros((3, 3, cin, cout), x.dtype)  # Linear in the kernel: its value is unused.
    return jax.vjp(lambda k: _native_conv(x, k), zero_kernel)[1](dy)[0].astype(acc_dtype)
  rows = n * h * w
  dot = functools.partial(lax.dot_general, dimension_numbers=_ROWS, preferred_element_type=acc_dtype)
  shift_dy = cout < cin
  narrow, fixed = (dy, x.reshape(rows, cin)) if shift_dy else (x, dy.reshape(rows, cout))
  c = narrow.shape[-1]
  padded = jnp.pad(narrow, ((0, 0), (1, 1), (1, 1), (0, 0)))
  offsets = [(2 - i, 2 - j) if shift_dy else (i, j) for i, j in _TAPS]
  if method == "im2col":
    windows = [lax.slice(padded, (0, i, j, 0), (n, i + h, j + w, c)) for i, j in offsets]
    g = dot(jnp.concatenate(windows, axis=-1).reshape(rows, 9 * c), fixed).reshape(9, c, -1)
  elif method == "taps":
    offs = jnp.asarray(offsets, jnp.int32)
    zero = jnp.zeros((), jnp.int32)  # dynamic_slice wants one index dtype (a Python 0 is int64 under x64)

    def tap(t, acc):
      window = lax.dynamic_slice(padded, (zero, offs[t, 0], offs[t, 1], zero), (n, h, w, c))
      return acc.at[t].set(dot(window.reshape(rows, c), fixed))

    g = lax.fori_loop(0, 9, tap, jnp.zeros((9, c, fixed.shape[-1]), acc_dtype))
  else:
    raise ValueError(f"conv3x3: weight_grad must be one of {WEIGHT_GRAD_METHODS}, got {method!r}.")
  g = g.reshape(3, 3, c, -1)
  return jnp.swapaxes(g, 2, 3) if shift_dy else g  # shifted dy: g was (3, 3, Cout, Cin).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _custom_conv(x: jax.Array, kernel: jax.Array, method: str) -> jax.Array:
  del method
  return _native_conv(x, kernel)


def _custom_conv_fwd(x, kernel, method):
  del method
  return _native_conv(x, kernel), (x, kernel)


def _custom_conv_bwd(method, residuals, dy):
  x, kernel = residuals
  return _input_grad(dy, kernel), _weight_grad(x, dy, method).astype(kernel.dtype)


_custom_conv.defvjp(_custom_conv_fwd, _custom_conv_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array, *, weight_grad: str = "auto") -> jax.Array:
  """3x3 cross-correlation, stride 1, zero padding 1 ("SAME"), no bias.

  Args:
    x: (N, H, W, Cin) float array.
    kernel: (3, 3, Cin, Cout) HWIO array of the same dtype as ``x``.
    weight_grad: "auto" (on CPU this host's ``CPU_WEIGHT_GRAD_TABLES`` choice for this shape, elsewhere
      XLA's), or one of ``WEIGHT_GRAD_METHODS`` to force one (on any backend; for tests and measurements).

  Returns:
    (N, H, W, Cout) array of ``x``'s dtype. Forward values are identical on every path; gradients agree to
    float rounding (about 1e-6 relative in float32).

  Raises:
    ValueError: if the shapes are not NHWC / 3x3 HWIO with matching Cin, the dtypes differ, or
      ``weight_grad`` is unknown.
  """
  if x.ndim != 4:
    raise ValueError(f"conv3x3: x must be NHWC (4-D), got shape {x.shape}.")
  if kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"conv3x3: kernel must be HWIO (3, 3, Cin={x.shape[3]}, Cout), got shape "
                     f"{kernel.shape} for x of shape {x.shape}.")
  if x.dtype != kernel.dtype:
    raise ValueError(f"conv3x3: x ({x.dtype}) and kernel ({kernel.dtype}) must have the same dtype; "
                     "cast them first (Conv3x3 does this for you).")
  method = weight_grad
  if method == "auto":
    method = "native"
    # Symbolic shapes (jax.export with a dynamic batch) have no row count to look up: native then.
    if jax.default_backend() == "cpu" and all(isinstance(d, int) for d in x.shape):
      method = cpu_weight_grad_method(int(np.prod(x.shape[:3])), x.shape[3], kernel.shape[3])
  elif method not in WEIGHT_GRAD_METHODS:
    raise ValueError(f"conv3x3: weight_grad must be 'auto' or one of {WEIGHT_GRAD_METHODS}, got "
                     f"{weight_grad!r}.")
  if method == "native":
    return _native_conv(x, kernel)
  return _custom_conv(x, kernel, method)


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
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = DEFAULT_KERNEL_INIT
  bias_init: Initializer | None = None

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
    y = conv3x3(x, kernel)
    if bias is not None:
      y = y + bias.reshape(1, 1, 1, self.features)
    return y
