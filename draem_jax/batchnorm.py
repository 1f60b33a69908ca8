"""BatchNorm over NHWC activations, PyTorch's BatchNorm2d semantics, with a hand-written training backward.

The forward values, the parameters ("scale", "bias"), the running statistics ("mean", "var" in
'batch_stats') and their update are those of ``flax.linen.BatchNorm(use_fast_variance=False)`` operation
for operation, so checkpoints, converted weights and evaluation are unchanged. What differs is the
gradient in training mode: autodiff through the two-pass mean and variance gives XLA a graph of several
elementwise passes and reductions over the activation per layer, which XLA:CPU then fuses into many
separate loops; the closed form of the BatchNorm gradient needs one reduction pass (reading x and dy)
and one elementwise pass (docs/performance.md):

    x^ = (x - mean) / sqrt(var + eps),    M = N H W,
    dbias = sum(dy),    dscale = sum(dy x^),
    dx = scale / sqrt(var + eps) (dy - dbias / M - x^ dscale / M)  (+ the terms of d mean, d var).

It agrees with autodiff to float rounding (tests/test_batchnorm.py, float64 and float32).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_AXES = (0, 1, 2)  # N, H, W: statistics per channel.


def _bc(v: jax.Array) -> jax.Array:
  """(C,) -> (1, 1, 1, C), broadcastable against NHWC (no implicit rank promotion)."""
  return v.reshape(1, 1, 1, -1)


def _stats(xf: jax.Array) -> tuple[jax.Array, jax.Array]:
  # flax's use_fast_variance=False: var = mean(|x - mean|^2), never the cancelling E[x^2] - E[x]^2.
  mean = xf.mean(_AXES)
  return mean, jnp.square(xf - _bc(mean)).mean(_AXES)


def _normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array,
               epsilon: float) -> jax.Array:
  # flax.linen.normalization._normalize's order of operations (so the values are bit-identical).
  return (x - _bc(mean)) * _bc(lax.rsqrt(var + epsilon) * scale) + _bc(bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm: normalizes ``x`` with its own batch statistics.

  Args:
    x: (N, H, W, C) float array (any float dtype; statistics and result in at least float32).
    scale: (C,) float32 gamma.
    bias: (C,) float32 beta.
    epsilon: added to the variance.

  Returns:
    (y, mean, var): y (N, H, W, C) in the promoted dtype of ``x`` and float32, mean and var (C,) (the
    biased variance, as flax's and as PyTorch normalizes with).
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean, var = _stats(xf)
  y = _normalize(x, mean, var, scale, bias, epsilon)
  return (y, mean, var), (x, mean, var, scale)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
  x, mean, var, scale = residuals
  gy, gmean, gvar = cotangents
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xc = x.astype(dtype) - _bc(mean)
  inv = lax.rsqrt(var + epsilon)
  gy = gy.astype(dtype)
  m = x.shape[0] * x.shape[1] * x.shape[2]
  dbias = gy.sum(_AXES)
  dscale_hat = (gy * xc).sum(_AXES)  # sum(dy x^) = inv * sum(dy (x - mean))
  dscale = dscale_hat * inv
  # mean and var are outputs too (the running statistics' update): their cotangents are zero in a train
  # step, whose loss does not read the updated statistics, but are honoured for any other caller.
  dx = (_bc(scale * inv) * (gy - _bc(dbias / m) - xc * _bc(inv * inv * dscale_hat / m))
        + _bc(gmean / m) + _bc(gvar * (2.0 / m)) * xc)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _ones_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


class BatchNorm(nn.Module):
  """Drop-in for ``nn.BatchNorm(axis=-1, use_fast_variance=False)`` on NHWC inputs (no axis_name, no mask).

  Attributes:
    use_running_average: normalize with the running statistics (evaluation) instead of the batch's.
    momentum: running-average decay (flax convention: 0.9 = PyTorch's momentum 0.1).
    epsilon: added to the variance.
    dtype: result dtype (None: promoted from the input and the float32 statistics, as flax).
    param_dtype: dtype of scale and bias.
    scale_init: initializer of scale (gamma), default ones.
    bias_init: initializer of bias (beta), default zeros.
  """
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable[..., jax.Array] = _ones_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    """Normalizes (N, H, W, C) ``x``; in training mode also updates 'batch_stats' (unless initializing).

    Returns:
      (N, H, W, C) array of ``dtype`` (default: x's dtype promoted with float32).
    """
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    if x.ndim != 4:
      raise ValueError(f"BatchNorm: expects NHWC (4-D) input, got shape {x.shape}.")
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    if use_running_average:
      y = _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    dtype = self.dtype or jnp.result_type(y, x)
    return jnp.asarray(y, dtype)
