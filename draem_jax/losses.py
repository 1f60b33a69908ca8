"""DRAEM training losses: L2, SSIM and focal, as in the original ``loss.py`` (docs/losses.md).

Total loss = L2(recon, image) + (1 - SSIM(recon, image)) + focal(softmax(logits), mask), all weights 1.
Everything is NHWC float32, pure and jittable; reductions are plain means, so under a data-parallel
``jit`` they are means over the *global* batch, like the single-GPU original.
"""

from collections.abc import Sequence
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The objective's weights (``config.loss``; hashable, a static argument of the step).

  Attributes:
    weights: (l2, ssim, focal) term weights; (1, 1, 1) in the original.
    focal_normal_weight: weight of the normal (class 0) pixels' focal terms, the anomalous ones' being 1;
      1 in the original. 0 with ``weights[2] = 0.5`` is what anomalib's DRAEM trains with under kornia
      >= 0.9, whose ``FocalLoss(alpha=1)`` gives class 0 the weight 1 - alpha and averages over both
      classes' slices (docs/recipe.md).
  """

  weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
  focal_normal_weight: float = 1.0


ORIGINAL_LOSS = LossConfig()


def _gaussian_taps(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """Normalised 1-D Gaussian weights exp(-(k - size//2)^2 / (2 sigma^2)), float32, shape (size,)."""
  k = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-k**2 / (2.0 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _shifted(x: jax.Array, axis: int, radius: int) -> list[jax.Array]:
  """The 2 radius + 1 zero-padded shifts x[p + k - radius] along ``axis``, each shaped like ``x``."""
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  xp = jnp.pad(x, pad)
  return [jax.lax.slice_in_dim(xp, k, k + n, axis=axis) for k in range(2 * radius + 1)]


def _window_mean(x: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
  """Zero-padded 'same' weighted window mean along ``axis``: sum_k taps[k] x[p + k - r]."""
  out = 0.0
  for g, xk in zip(taps, _shifted(x, axis, len(taps) // 2)):
    out = out + g * xk
  return out


def _window_mean_var(w: jax.Array, taps: np.ndarray, axis: int) -> tuple[jax.Array, jax.Array]:
  """Weighted window mean and variance of ``w`` along ``axis``, from differences to the window's centre.

  With d_k = w_k - w_p: mean = w_p + sum_k g_k d_k and var = sum_k g_k d_k^2 - (sum_k g_k d_k)^2, which
  equal E[w] and E[w^2] - E[w]^2 for weights summing to 1 (zero padding counts as data) without the
  catastrophic cancellation: in float32, E[w^2] - E[w]^2 leaves errors of ~1e-7 |w|^2, i.e. up to ~1e-4
  in SSIM on flat regions where the variance is compared with C2 = 9e-4.
  """
  s = ss = 0.0
  for g, wk in zip(taps, _shifted(w, axis, len(taps) // 2)):
    d = wk - w
    s = s + g * d
    ss = ss + g * d * d
  return w + s, ss - s * s


def _materialize(t: jax.Array, one: jax.Array) -> jax.Array:
  """``t`` unchanged (``one`` is a runtime 1.0), but computed once: a performance hint for XLA:CPU.

  XLA fuses a cheap elementwise producer into every consumer, even one that reads each element 11 times
  (the next pass's shifted windows), recomputing the previous pass per tap (SSIM 2-5x slower on CPU).
  A division is "expensive" to its fusion heuristic, so the producer is materialized instead;
  ``optimization_barrier`` is removed before fusion on CPU and does not help.
  """
  return t / one


def _runtime_one(big_l: jax.Array) -> jax.Array:
  """1.0 for every L (0 and inf included) that XLA cannot constant-fold."""
  return jnp.maximum(jnp.sign(jnp.abs(big_l)), 1.0)


def _dynamic_range(x: jax.Array) -> jax.Array:
  """The original's data-dependent L, from the whole batch of the FIRST SSIM argument.

  max_val = 255 if max(x) > 128 else 1; min_val = -1 if min(x) < -0.5 else 0; L = max_val - min_val.
  Comparisons carry no gradient, so this needs no stop_gradient.
  """
  max_val = jnp.where(jnp.max(x) > 128, 255.0, 1.0)
  min_val = jnp.where(jnp.min(x) < -0.5, -1.0, 0.0)
  return (max_val - min_val).astype(jnp.float32)


def _check_images(x: jax.Array, y: jax.Array, what: str) -> None:
  if x.ndim != 4 or x.shape != y.shape:
    raise ValueError(f"{what}: expected two NHWC arrays of the same shape (N, H, W, C), got "
                     f"{x.shape} and {y.shape}; add the batch/channel axes (e.g. x[None], x[..., None]).")


def _window_mean_2d(q: jax.Array, one: jax.Array) -> jax.Array:
  """The zero-padded 'same' 11x11 Gaussian window mean over axes 1 and 2 (separable)."""
  taps = _gaussian_taps()
  return _window_mean(_materialize(_window_mean(q, taps, axis=2), one), taps, axis=1)


def _ssim_moments(x: jax.Array, y: jax.Array, one: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Window means and variances of u = x + y and v = x - y, stacked: (mu, var), each (N, H, W, 2C).

  SSIM needs only mu_x mu_y, mu_x^2 + mu_y^2, var_x + var_y and cov_xy, i.e. the means and variances of
  u and v (``_ssim_factors``): two quantities per pixel instead of five. The 2-D statistics are separable
  by the law of total variance: the 2-D window variance is the H-window mean of the W-window variances
  plus the H-window variance of the W-window means.
  """
  taps = _gaussian_taps()
  w = jnp.concatenate([x + y, x - y], axis=-1)
  row_mean, row_var = (_materialize(t, one) for t in _window_mean_var(w, taps, axis=2))
  mu, between = _window_mean_var(row_mean, taps, axis=1)
  return mu, _window_mean(row_var, taps, axis=1) + between


def _ssim_factors(mu: jax.Array, var: jax.Array, big_l: jax.Array):
  """(A1, A2, B1, B2) of S = A1 A2 / (B1 B2), each (N, H, W, C), from ``_ssim_moments``.

  A1 = 2 mu_x mu_y + C1 = (mu_u^2 - mu_v^2) / 2 + C1, B1 = mu_x^2 + mu_y^2 + C1 = (mu_u^2 + mu_v^2) / 2
  + C1, A2 = 2 cov + C2 = (var_u - var_v) / 2 + C2, B2 = var_x + var_y + C2 = (var_u + var_v) / 2 + C2.
  """
  c = mu.shape[-1] // 2
  mu2 = mu * mu
  c1 = (0.01 * big_l)**2
  c2 = (0.03 * big_l)**2
  a1 = 0.5 * (mu2[..., :c] - mu2[..., c:]) + c1
  b1 = 0.5 * (mu2[..., :c] + mu2[..., c:]) + c1
  a2 = 0.5 * (var[..., :c] - var[..., c:]) + c2
  b2 = 0.5 * (var[..., :c] + var[..., c:]) + c2
  return a1, a2, b1, b2


# A hand-written reverse rule: autodiff through the 3 x 11 shifted slices of the centred moments
# produces hundreds of full-size pads and adds (2.4 s per backward at 8x128x128x3 on 2 CPU cores, 30x
# the forward). The gradient of the same function written with plain window means, mu_u = G[u] and
# var_u = G[u^2] - mu_u^2 (G is symmetric, so it is its own adjoint), is
#   dS/du = G[dS/dmu_u - 2 mu_u dS/dvar_u] + 2 u G[dS/dvar_u], likewise for v,
# i.e. one 2-D window mean of a stacked (N, H, W, 4C) array.
@jax.custom_vjp
def _ssim_map_core(x: jax.Array, y: jax.Array, big_l: jax.Array) -> jax.Array:
  return _ssim_map_fwd(x, y, big_l)[0]


def _ssim_map_fwd(x, y, big_l):
  one = _runtime_one(big_l)
  mu, var = (_materialize(t, one) for t in _ssim_moments(x, y, one))
  a1, a2, b1, b2 = _ssim_factors(mu, var, big_l)
  return (a1 * a2) / (b1 * b2), (x, y, big_l, mu, var)


def _ssim_map_bwd(residuals, g):
  x, y, big_l, mu, var = residuals
  c = x.shape[-1]
  a1, a2, b1, b2 = _ssim_factors(mu, var, big_l)
  g_inv = g / (b1 * b2)
  gs_b1 = g * (a1 * a2) / (b1 * b2 * b1)  # g S / B1
  gs_b2 = g * (a1 * a2) / (b1 * b2 * b2)  # g S / B2
  mu_u, mu_v = mu[..., :c], mu[..., c:]
  # g dS/dmu and g dS/dvar for u and v (A1 and B1 hold mu, A2 and B2 hold var).
  d_mu_u = mu_u * (a2 * g_inv - gs_b1)
  d_mu_v = -mu_v * (a2 * g_inv + gs_b1)
  d_var_u = 0.5 * (a1 * g_inv - gs_b2)
  d_var_v = -0.5 * (a1 * g_inv + gs_b2)
  d_var = jnp.concatenate([d_var_u, d_var_v], axis=-1)
  d_mu = jnp.concatenate([d_mu_u, d_mu_v], axis=-1)
  f = _window_mean_2d(jnp.concatenate([d_mu - 2.0 * mu * d_var, d_var], axis=-1), _runtime_one(big_l))
  w = jnp.concatenate([x + y, x - y], axis=-1)
  dw = f[..., :2 * c] + 2.0 * w * f[..., 2 * c:]
  du, dv = dw[..., :c], dw[..., c:]
  # C1 = (0.01 L)^2, C2 = (0.03 L)^2; dS/dC1 = A2 / (B1 B2) - S / B1, dS/dC2 = A1 / (B1 B2) - S / B2.
  d_l = jnp.sum((a2 * g_inv - gs_b1) * (2e-4 * big_l) + (a1 * g_inv - gs_b2) * (1.8e-3 * big_l))
  return du + dv, du - dv, d_l.astype(big_l.dtype)


_ssim_map_core.defvjp(_ssim_map_fwd, _ssim_map_bwd)


# The public losses are jitted so that eager callers compile once instead of dispatching ~400 small ops;
# inside a caller's jit this is a no-op.
@jax.jit
def ssim_map(x: jax.Array, y: jax.Array, *, data_range: float | jax.Array | None = None) -> jax.Array:
  """Per-pixel SSIM with DRAEM's conventions.

  11x11 Gaussian window (sigma 1.5, separable, per channel), zero padding of 5 so the map has the
  input's size (border values are computed on zero-padded statistics, as in the original),
  sigma^2 = E[x^2] - mu^2 (population covariance; evaluated from centred sums, see
  ``_window_mean_var``), C1 = (0.01 L)^2, C2 = (0.03 L)^2. No clamping. Matches a float64 evaluation to
  ~1e-7 (a direct float32 E[x^2] - mu^2, as in the PyTorch original, is off by up to ~1e-4).
  Differentiable in ``x``, ``y`` and an array ``data_range`` (reverse mode only: a custom VJP).

  Args:
    x: (N, H, W, C) float array; the reconstruction in DRAEM. Unless ``data_range`` is given, the
      dynamic range L is derived from this argument's whole batch on every call: max_val = 255 if
      max(x) > 128 else 1, min_val = -1 if min(x) < -0.5 else 0, L = max_val - min_val.
    y: (N, H, W, C) float array; the clean image.
    data_range: optional fixed L (Python float or scalar array) that replaces the rule above.

  Returns:
    (N, H, W, C) float32 SSIM map.
  """
  _check_images(x, y, "ssim_map")
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  big_l = _dynamic_range(x) if data_range is None else jnp.asarray(data_range, jnp.float32)
  return _ssim_map_core(x, y, big_l)


def ssim(x: jax.Array, y: jax.Array, *, data_range: float | jax.Array | None = None) -> jax.Array:
  """Mean of :func:`ssim_map` over N, H, W and C (border included). Scalar float32."""
  return jnp.mean(ssim_map(x, y, data_range=data_range))


def ssim_loss(x: jax.Array, y: jax.Array, *,
              data_range: float | jax.Array | None = None) -> jax.Array:
  """DRAEM's SSIM loss, 1 - :func:`ssim` (x = reconstruction, y = clean image). Scalar float32."""
  return 1.0 - ssim(x, y, data_range=data_range)


@jax.jit
def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error over all elements (PyTorch ``MSELoss()``). Scalar float32."""
  if x.shape != y.shape:
    raise ValueError(f"l2_loss: shapes differ, {x.shape} vs {y.shape}.")
  d = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
  return jnp.mean(d * d)


@functools.partial(jax.jit, static_argnames=("gamma", "alpha", "smooth", "normal_weight"))
def focal_loss(logits: jax.Array, mask: jax.Array, gamma: float = 2.0, alpha: float = 1.0,
               smooth: float = 1e-5, normal_weight: float = 1.0) -> jax.Array:
  """DRAEM's focal loss on the softmax of the segmentation logits.

  With p = softmax(logits) over channels and a one-hot target clamped to
  [smooth / (C - 1), 1 - smooth]: p_t = sum_c onehot_c p_c + smooth and
  loss = -alpha (1 - p_t)^gamma log(p_t), averaged over N*H*W.

  The formula is kept exactly, but evaluated from quantities that keep their relative precision:
  p_t = (1 - smooth) p_true + smooth/(C-1) q + smooth and 1 - p_t = q (1 - smooth - smooth/(C-1)),
  where q = 1 - p_true is summed from the other classes' softmax probabilities (never formed as
  1 - p_true, which would round to 0 for confident pixels). p_t >= smooth, so the log is finite.

  Args:
    logits: (N, H, W, C) float logits, C >= 2 (C = 2 in DRAEM: channel 1 = anomalous).
    mask: (N, H, W, 1) or (N, H, W) target; values > 0.5 are class 1 (DRAEM's masks are exactly 0/1).
    gamma: focusing exponent (2 in DRAEM).
    alpha: scalar class weight (the original uses all-ones weights, i.e. 1).
    smooth: target clamping and p_t offset (1e-5 in DRAEM).
    normal_weight: factor on the terms of class-0 (normal) pixels, still averaged over all N*H*W
      (1 in DRAEM; ``LossConfig.focal_normal_weight``).

  Returns:
    Scalar float32 loss.
  """
  if logits.ndim != 4 or logits.shape[-1] < 2:
    raise ValueError(f"focal_loss: logits must be (N, H, W, C) with C >= 2, got {logits.shape}.")
  if mask.ndim == 4:
    if mask.shape[-1] != 1:
      raise ValueError(f"focal_loss: mask must be (N, H, W, 1) or (N, H, W), got {mask.shape}.")
    mask = mask[..., 0]
  if mask.shape != logits.shape[:-1]:
    raise ValueError(f"focal_loss: mask {mask.shape} does not match logits {logits.shape[:-1]}.")
  num_classes = logits.shape[-1]
  p = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  target = (mask > 0.5).astype(jnp.int32)
  is_true = jax.nn.one_hot(target, num_classes, dtype=jnp.bool_)
  p_true = jnp.sum(jnp.where(is_true, p, 0.0), axis=-1)
  q = jnp.sum(jnp.where(is_true, 0.0, p), axis=-1)
  low = smooth / (num_classes - 1)
  p_t = (1.0 - smooth) * p_true + low * q + smooth
  one_minus_pt = q * (1.0 - smooth - low)
  # Integer exponents lower to a multiply chain (exact and with a finite gradient at 0).
  if isinstance(gamma, (int, float)) and float(gamma).is_integer() and gamma >= 0:
    focus = jax.lax.integer_pow(one_minus_pt, int(gamma))
  else:
    focus = one_minus_pt**gamma
  terms = -alpha * focus * jnp.log(p_t)
  if normal_weight != 1.0:
    terms = jnp.where(target == 0, normal_weight * terms, terms)
  return jnp.mean(terms)


def draem_loss(reconstruction: jax.Array, target: jax.Array, logits: jax.Array, mask: jax.Array,
               *, weights: Sequence[float] = (1.0, 1.0, 1.0),
               focal_normal_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DRAEM objective: w0 L2 + w1 (1 - SSIM) + w2 focal.

  Args:
    reconstruction: (N, H, W, 3) output of the reconstructive network.
    target: (N, H, W, 3) clean (anomaly-free) image.
    logits: (N, H, W, 2) output of the discriminative network.
    mask: (N, H, W, 1) synthetic-anomaly mask in {0, 1}.
    weights: (l2, ssim, focal) weights; all 1 in the original.
    focal_normal_weight: ``focal_loss``'s ``normal_weight`` (1 in the original).

  Returns:
    (total, {"l2": ..., "ssim": ..., "focal": ...}); the dict holds the unweighted terms, "ssim" being
    the SSIM *loss* 1 - SSIM. All scalar float32.
  """
  if len(weights) != 3:
    raise ValueError(f"draem_loss: weights must be (l2, ssim, focal), got {weights!r}.")
  terms = {
      "l2": l2_loss(reconstruction, target),
      "ssim": ssim_loss(reconstruction, target),
      "focal": focal_loss(logits, mask, normal_weight=float(focal_normal_weight)),
  }
  total = weights[0] * terms["l2"] + weights[1] * terms["ssim"] + weights[2] * terms["focal"]
  return total, terms
