"""Anomaly maps and image scores from the discriminative network's logits (docs/evaluation.md).

Pixel score = softmax probability of the "anomalous" channel; image score = max of that map after a
21x21 mean filter (original DRAEM, paper Eq. 5), or the max of the raw map (anomalib).
"""

import jax
import jax.numpy as jnp

REDUCTIONS = ("filtered_max", "max")


def anomaly_map(logits: jax.Array) -> jax.Array:
  """Per-pixel anomaly probability.

  Args:
    logits: (N, H, W, C) float logits, C >= 2; channel 1 is the anomalous class.

  Returns:
    (N, H, W) float32: softmax over channels, channel 1.
  """
  if logits.ndim != 4 or logits.shape[-1] < 2:
    raise ValueError(f"anomaly_map: logits must be (N, H, W, C) with C >= 2, got {logits.shape}.")
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)[..., 1]


def box_filter(x: jax.Array, size: int) -> jax.Array:
  """Mean over a size x size window with zero padding, always divided by size**2.

  This is PyTorch's ``avg_pool2d(kernel=size, stride=1, padding=size // 2)`` with its default
  ``count_include_pad=True``. It is computed separably as two windowed sums (2 * size adds per pixel,
  no cancellation, unlike a cumulative-sum difference).

  Args:
    x: (..., H, W) float array (any leading axes, e.g. (N, H, W)).
    size: odd window size >= 1.

  Returns:
    float32 array shaped like ``x``.
  """
  if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
    raise ValueError(f"box_filter: size must be an odd positive int (e.g. 21), got {size!r}.")
  if x.ndim < 2:
    raise ValueError(f"box_filter: expected an array of shape (..., H, W), got {x.shape}.")
  x = jnp.asarray(x, jnp.float32)
  r = size // 2
  lead = (1,) * (x.ndim - 2)
  no_pad = [(0, 0)] * (x.ndim - 2)
  # reduce_window pads with the init value 0, i.e. zero padding.
  x = jax.lax.reduce_window(x, 0.0, jax.lax.add, lead + (size, 1), lead + (1, 1),
                            no_pad + [(r, r), (0, 0)])
  x = jax.lax.reduce_window(x, 0.0, jax.lax.add, lead + (1, size), lead + (1, 1),
                            no_pad + [(0, 0), (r, r)])
  return x / float(size * size)


def image_score(anomaly_map: jax.Array, filter_size: int = 21,
                reduction: str = "filtered_max") -> jax.Array:
  """Image-level anomaly score from a pixel anomaly map.

  Args:
    anomaly_map: (..., H, W) anomaly probabilities, e.g. (N, H, W) from :func:`anomaly_map`.
    filter_size: odd mean-filter size for ``"filtered_max"`` (21 in DRAEM).
    reduction: ``"filtered_max"`` (original DRAEM: max of :func:`box_filter` of the map) or ``"max"``
      (anomalib's score: max of the raw map; ``filter_size`` is then ignored).

  Returns:
    float32 array of shape ``anomaly_map.shape[:-2]``, e.g. (N,).
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"image_score: reduction must be one of {REDUCTIONS}, got {reduction!r}.")
  if anomaly_map.ndim < 2:
    raise ValueError(f"image_score: expected an array of shape (..., H, W), got {anomaly_map.shape}.")
  m = jnp.asarray(anomaly_map, jnp.float32)
  if reduction == "filtered_max":
    m = box_filter(m, filter_size)
  return jnp.max(m, axis=(-2, -1))
