"""On-device anomaly synthesis: DRAEM's training triples (clean target, anomalous input, mask).

Per example (VitjanZ/DRAEM data_loader.py L107-157; docs/anomaly_simulation.md): optionally rotate the
normal image, draw a Perlin mask, pick and augment an anomaly-source texture, blend it into the image
inside the mask, and with probability 0.5 discard the anomaly. Every random choice comes from the
example's own key (``prng.example_keys``), so an example's result depends neither on the batch size nor
on how the batch is sharded.

Deviations from the reference, all deliberate: images and sources are rotated/augmented in float32
instead of uint8 (no rounding to 1/255 steps), and the reference's wasted work is skipped where the
backend allows: on CPU (a sequential ``lax.map``) the ``lax.cond`` branches run only when taken, so a
clean example computes no noise, texture or blend and an unrotated one no rotation; under ``vmap``
(accelerators) the branches become selects and both are computed, with the same result.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from draem_jax import augment
from draem_jax import geometry
from draem_jax import noise
from draem_jax import prng


EMPTY_MASK_RULES = ("keep", "retry")
# SynthesisConfig.rotate_fill -> geometry.rotate's mode.
ROTATE_FILLS = {"black": "constant", "edge": "edge", "reflect": "reflect"}


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
  """Knobs of the anomaly simulation; the defaults are the original code's ([D] data_loader.py).

  Frozen and hashable, so it can be a static argument of ``jax.jit``.

  Attributes:
    rotate_prob: probability of rotating the normal image (target and blend base).
    rotate_degrees: the normal image is rotated by U(-rotate_degrees, rotate_degrees).
    threshold: Perlin mask = noise > threshold.
    max_log2_res: Perlin resolution per axis is 2^a, a uniform in {0, ..., max_log2_res - 1}.
    noise_rotate_degrees: the Perlin noise is rotated by U(-x, x) before thresholding; 0 disables it.
    texture_weight_range: (lo, hi); inside the mask the texture weight is w = hi - (hi - lo) * u with
      u ~ U[0, 1) and the image weight 1 - w. The code's beta = 0.8 u with texture weight 1 - beta is
      (0.2, 1.0); the paper's texture weight beta ~ U[0.1, 1.0] is (0.1, 1.0).
    no_anomaly_prob: probability that an example is returned clean (input = target, empty mask).
    empty_mask: what an example that drew an anomaly does with an empty Perlin mask (~5 % of them at the
      defaults): "keep" (the original: it trains as a normal example) or "retry" (redraw the noise,
      ``noise.perlin_mask_nonempty``; examples whose first mask is non-empty are unchanged).
    rotate_fill: what the corners of a rotated normal image become: "black" (the original, imgaug's
      constant 0), "edge" (nearest border pixel) or "reflect" (mirrored about the border).
  """

  rotate_prob: float = 0.3
  rotate_degrees: float = 90.0
  threshold: float = 0.5
  max_log2_res: int = 6
  noise_rotate_degrees: float = 90.0
  texture_weight_range: tuple[float, float] = (0.2, 1.0)
  no_anomaly_prob: float = 0.5
  empty_mask: str = "keep"
  rotate_fill: str = "black"

  def __post_init__(self):
    # Configs built from ml_collections / JSON carry lists; the dataclass must stay hashable.
    object.__setattr__(self, "texture_weight_range", tuple(float(v) for v in self.texture_weight_range))
    for name in ("rotate_prob", "no_anomaly_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"SynthesisConfig.{name} must be in [0, 1], got {getattr(self, name)}")
    for name in ("rotate_degrees", "noise_rotate_degrees"):
      if getattr(self, name) < 0:
        raise ValueError(f"SynthesisConfig.{name} is a half-range and must be >= 0, "
                         f"got {getattr(self, name)}")
    if not isinstance(self.max_log2_res, int) or self.max_log2_res < 1:
      raise ValueError(f"SynthesisConfig.max_log2_res must be an int >= 1, got {self.max_log2_res!r}")
    lo_hi = self.texture_weight_range
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
      raise ValueError("SynthesisConfig.texture_weight_range must be (lo, hi) with 0 <= lo <= hi <= 1, "
                       f"got {lo_hi}")
    if self.empty_mask not in EMPTY_MASK_RULES:
      raise ValueError(f"SynthesisConfig.empty_mask must be one of {EMPTY_MASK_RULES}, got "
                       f"{self.empty_mask!r}")
    if self.rotate_fill not in ROTATE_FILLS:
      raise ValueError(f"SynthesisConfig.rotate_fill must be one of {tuple(ROTATE_FILLS)}, got "
                       f"{self.rotate_fill!r}")

  @classmethod
  def original(cls, **overrides) -> "SynthesisConfig":
    """The original code's settings (the defaults), with optional overrides."""
    return cls(**overrides)

  @classmethod
  def paper(cls, **overrides) -> "SynthesisConfig":
    """The paper's settings (docs/paper_vs_code.md) where they differ from the code.

    Normal-image rotation in (-45, 45) degrees and texture weight beta ~ U[0.1, 1.0]. The paper gives no
    rotation probability; we keep the code's 0.3, so that only what the paper states changes (rotating
    every image would also put black corners into every training image). The paper's random threshold
    has no published range, so the threshold stays 0.5.
    """
    return cls(**{"rotate_degrees": 45.0, "texture_weight_range": (0.1, 1.0), **overrides})


class Choices(NamedTuple):
  """The random decisions for one example (scalars), exposed for tests and visualisation."""

  rotate: jax.Array  # bool: rotate the normal image.
  degrees: jax.Array  # float32: its rotation angle.
  source_index: jax.Array  # int32 in [0, S): which anomaly source.
  texture_weight: jax.Array  # float32: weight of the texture inside the mask.
  anomaly: jax.Array  # bool: False is the clean, no-anomaly branch.
  mask_key: jax.Array  # typed key for noise.perlin_mask.
  augment_key: jax.Array  # typed key for augment.random_augment_one.


class Synthesized(NamedTuple):
  """A synthesized batch (all float32).

  Attributes:
    target: (N, H, W, 3) clean (possibly rotated) image in [0, 1]; what the reconstruction should give.
    augmented: (N, H, W, 3) network input in [0, 1].
    mask: (N, H, W, 1) ground-truth anomaly mask in {0, 1}.
    has_anomaly: (N,) 1.0 where the mask is non-empty.
  """

  target: jax.Array
  augmented: jax.Array
  mask: jax.Array
  has_anomaly: jax.Array


def sample_choices(key: jax.Array, num_sources: int,
                   config: SynthesisConfig = SynthesisConfig()) -> Choices:
  """Draws the random decisions of one example from its key.

  Args:
    key: typed PRNG key of the example.
    num_sources: static number S of anomaly sources.
    config: the simulation knobs.

  Returns:
    ``Choices`` of scalars (and two sub-keys); vmap over keys for a batch.
  """
  k_rot, k_deg, k_mask, k_src, k_aug, k_w, k_anom = jax.random.split(key, 7)
  u = jax.random.uniform(k_w, (), jnp.float32)
  lo, hi = config.texture_weight_range
  return Choices(
      rotate=jax.random.uniform(k_rot, ()) < config.rotate_prob,
      degrees=jax.random.uniform(k_deg, (), jnp.float32, -config.rotate_degrees,
                                 config.rotate_degrees),
      source_index=jax.random.randint(k_src, (), 0, num_sources, dtype=jnp.int32),
      # Written as hi - (hi - lo) u so that the defaults reproduce the code's 1 - 0.8 u exactly.
      texture_weight=hi - (hi - lo) * u,
      anomaly=jax.random.uniform(k_anom, ()) >= config.no_anomaly_prob,
      mask_key=k_mask,
      augment_key=k_aug,
  )


def blend(image: jax.Array, texture: jax.Array, mask: jax.Array,
          texture_weight: jax.Array | float) -> jax.Array:
  """DRAEM's blend (data_loader.py L124-129): (1 - M) I + w (M A) + (1 - w) (M I).

  Args:
    image: (H, W, 3) float32 normal image I.
    texture: (H, W, 3) float32 augmented anomaly source A in [0, 1].
    mask: (H, W, 1) float32 mask M in {0, 1}.
    texture_weight: scalar w, the texture's weight inside the mask.

  Returns:
    (H, W, 3) float32; equal to ``image`` outside the mask.
  """
  return ((1.0 - mask) * image + texture_weight * (mask * texture)
          + (1.0 - texture_weight) * (mask * image))


def _synthesize_one(key: jax.Array, image: jax.Array, sources: jax.Array,
                    config: SynthesisConfig) -> Synthesized:
  """One example; ``image`` (H, W, 3) float32, ``sources`` (S, H, W, 3) uint8."""
  c = sample_choices(key, sources.shape[0], config)
  # lax.cond: under the sequential (CPU) map only the taken branch runs -- no rotation for 70% of the
  # images, no noise or augmentation for the 50% clean ones. Under vmap it becomes a select, as before.
  target = image
  if config.rotate_prob > 0:
    mode = ROTATE_FILLS[config.rotate_fill]
    target = jax.lax.cond(c.rotate, lambda: geometry.rotate(image, c.degrees, mode=mode), lambda: image)
  make_mask = noise.perlin_mask_nonempty if config.empty_mask == "retry" else noise.perlin_mask

  def with_anomaly():
    mask = make_mask(c.mask_key, image.shape[:2], threshold=config.threshold,
                     max_log2_res=config.max_log2_res, rotate_degrees=config.noise_rotate_degrees)[..., None]
    source = sources[c.source_index].astype(jnp.float32) / 255.0
    texture = augment.random_augment_one(c.augment_key, source)
    return blend(target, texture, mask, c.texture_weight), mask

  def clean():
    return target, jnp.zeros(image.shape[:2] + (1,), jnp.float32)

  augmented, mask = jax.lax.cond(c.anomaly, with_anomaly, clean)
  return Synthesized(target=target, augmented=augmented, mask=mask,
                     has_anomaly=(jnp.max(mask) > 0).astype(jnp.float32))


def synthesize(key: jax.Array, images: jax.Array, sources: jax.Array, *,
               config: SynthesisConfig = SynthesisConfig(),
               sequential: bool | None = None) -> Synthesized:
  """Simulates anomalies on a batch of normal images (docs/anomaly_simulation.md).

  Jittable with ``config`` static; vmapped over examples, so a batch sharded on its first axis stays
  sharded. Example i uses ``prng.example_keys(key, N)[i]`` only.

  Args:
    key: typed PRNG key of the batch (e.g. the step key).
    images: (N, H, W, 3) float normal images in [0, 1].
    sources: (S, H, W, 3) uint8 anomaly-source textures (e.g. DTD), already resized to (H, W); each
      example draws one uniformly, with replacement.
    config: the simulation knobs; ``SynthesisConfig()`` is the original code, ``.paper()`` the paper.
    sequential: loop over examples with ``lax.map`` (default on CPU) instead of ``vmap`` (default on
      accelerators); same result, different cost.

  Returns:
    ``Synthesized`` with target (N, H, W, 3), augmented (N, H, W, 3), mask (N, H, W, 1) and
    has_anomaly (N,), all float32.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3) RGB, got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 by 255")
  if sources.dtype != jnp.uint8:
    raise ValueError(f"sources must be uint8 textures, got dtype {sources.dtype}")
  if sources.ndim != 4 or sources.shape[0] < 1 or sources.shape[1:] != images.shape[1:]:
    raise ValueError(f"sources must be (S >= 1, H, W, 3) matching images {images.shape[1:]}, got shape "
                     f"{sources.shape}; resize the anomaly sources to the image size")
  keys = prng.example_keys(key, images.shape[0])
  one = functools.partial(_synthesize_one, sources=sources, config=config)
  images = images.astype(jnp.float32)
  if sequential is None:
    sequential = jax.default_backend() == "cpu"
  if sequential:
    # Under vmap the per-example lax.switch of the augmenters becomes a select that evaluates all ten
    # augmenters three times; a sequential map runs only the chosen ones (~20x less work), which is what
    # a CPU wants. Accelerators keep the vectorised form. Both give the same examples.
    return jax.lax.map(lambda args: one(*args), (keys, images))
  return jax.vmap(one)(keys, images)
