"""Tests for draem_jax.synthesis: label frequencies, the blend formula, keys, retracing and sharding."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from draem_jax import augment
from draem_jax import prng
from draem_jax import synthesis

H = W = 64
NUM_SOURCES = 3


def invert_stand_in(key, image):
  """Deterministic stand-in for augment.random_augment_one, so the texture is known exactly."""
  del key
  return 1.0 - image


@pytest.fixture
def stand_in_augment(monkeypatch):
  # The real augmenter costs ~10 s of compilation; only test_real_augment uses it.
  monkeypatch.setattr(augment, "random_augment_one", invert_stand_in)


@pytest.fixture(scope="module")
def images():
  # Bright images: a rotated corner (fill 0) is then unmistakable.
  return np.random.default_rng(0).uniform(0.3, 0.9, (512, H, W, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def sources():
  return np.random.default_rng(1).integers(0, 256, (NUM_SOURCES, H, W, 3), dtype=np.uint8)


DEFAULT = synthesis.SynthesisConfig()


def jitted(config=DEFAULT):
  # A fresh function each time: jit caches traces per function object, and the stand-in must not leak.
  return jax.jit(lambda key, x, s: synthesis.synthesize(key, x, s, config=config))


@jax.jit(static_argnums=(1, 2))
def _choices(key, num, config):
  keys = prng.example_keys(key, num)
  return jax.vmap(lambda k: synthesis.sample_choices(k, NUM_SOURCES, config))(keys)


def choices(key, num, config=DEFAULT):
  """The per-example random decisions synthesize makes for a batch of ``num`` (NumPy)."""
  return jax.device_get(_choices(key, num, config)._replace(mask_key=None, augment_key=None))


def rotated_by_corners(target, image):
  """True where any corner pixel changed: rotation with zero fill darkens the corners."""
  corners = (slice(None), [0, 0, -1, -1], [0, -1, 0, -1])
  return np.any(target[corners] != image[corners], axis=(1, 2))


def test_shapes_dtypes_ranges_and_invariants(stand_in_augment, images, sources):
  out = jax.device_get(jitted()(jax.random.key(0), images[:16], sources))
  assert out.target.shape == out.augmented.shape == (16, H, W, 3)
  assert out.mask.shape == (16, H, W, 1) and out.has_anomaly.shape == (16,)
  for x in out:
    assert x.dtype == np.float32
  assert out.augmented.min() >= 0.0 and out.augmented.max() <= 1.0
  assert out.target.min() >= 0.0 and out.target.max() <= 1.0
  assert set(np.unique(out.mask)) <= {0.0, 1.0}
  np.testing.assert_array_equal(out.has_anomaly, out.mask.max(axis=(1, 2, 3)))
  # Outside the mask the input is the target, bit for bit; inside it differs (texture 1 - source).
  outside = np.broadcast_to(out.mask == 0, out.augmented.shape)
  np.testing.assert_array_equal(out.augmented[outside], out.target[outside])
  inside = ~outside
  assert np.mean(out.augmented[inside] != out.target[inside]) > 0.99


def test_label_and_rotation_frequencies(stand_in_augment, images, sources):
  # 512 examples as 32 batches of 16: the same compiled program as the other tests.
  fn = jitted()
  keys = [jax.random.fold_in(jax.random.key(1), i) for i in range(len(images) // 16)]
  parts = [jax.device_get(fn(k, images[16 * i:16 * i + 16], sources)) for i, k in enumerate(keys)]
  out = synthesis.Synthesized(*(np.concatenate(field) for field in zip(*parts)))
  c = jax.tree.map(lambda *x: np.concatenate(x), *[choices(k, 16) for k in keys])
  # VitjanZ/DRAEM data_loader.py L131-141: P(no anomaly) = 0.5 and ~47.6 % of examples carry an anomaly;
  # L148-150: P(rotate) = 0.3 (docs/anomaly_simulation.md).
  # Tolerances are about 3.5 standard errors for n = 512.
  assert abs(np.mean(~c.anomaly) - 0.5) < 0.08
  assert abs(out.has_anomaly.mean() - 0.476) < 0.08
  rotated = rotated_by_corners(out.target, images)
  assert abs(rotated.mean() - 0.3) < 0.07
  np.testing.assert_array_equal(rotated, c.rotate)
  np.testing.assert_array_equal(out.target[~rotated], images[~rotated])
  # The no-anomaly branch is returned clean; the anomaly branch is labelled unless its mask is empty.
  clean = ~c.anomaly
  np.testing.assert_array_equal(out.augmented[clean], out.target[clean])
  assert not out.mask[clean].any() and not out.has_anomaly[clean].any()
  empty_rate = 1.0 - out.has_anomaly[c.anomaly].mean()
  assert 0.0 < empty_rate < 0.15
  # The decisions, checked above to be the ones synthesize acts on, on 20,000 draws (SE ~0.0035).
  many = choices(jax.random.key(1), 20_000)
  assert abs(many.rotate.mean() - 0.3) < 0.015
  assert abs((~many.anomaly).mean() - 0.5) < 0.015
  assert np.abs(many.degrees).max() <= 90.0 and np.abs(many.degrees).max() > 89.0
  np.testing.assert_allclose(np.bincount(many.source_index) / 20_000, 1 / NUM_SOURCES, atol=0.015)


def test_blend_matches_numpy(stand_in_augment, images, sources):
  key = jax.random.key(2)
  out = jax.device_get(jitted()(key, images[:16], sources))
  c = choices(key, 16)
  checked = 0
  for i in np.flatnonzero(out.has_anomaly > 0):
    # Float64 recomputation of I_a = (1 - M) I + (1 - beta) M A + beta M I with texture weight 1 - beta.
    base = out.target[i].astype(np.float64)
    texture = 1.0 - sources[c.source_index[i]].astype(np.float64) / 255.0
    m = out.mask[i].astype(np.float64)
    w = float(c.texture_weight[i])
    want = (1 - m) * base + w * m * texture + (1 - w) * m * base
    np.testing.assert_allclose(out.augmented[i], want, rtol=0, atol=2e-6)
    checked += 1
  assert checked >= 5
  # The code's beta = 0.8 u gives a texture weight 1 - beta in (0.2, 1].
  many = choices(jax.random.key(3), 2000)
  assert many.texture_weight.min() > 0.2 and many.texture_weight.max() <= 1.0
  assert many.texture_weight.min() < 0.21 and many.texture_weight.max() > 0.99
  assert set(np.unique(many.source_index)) == set(range(NUM_SOURCES))


def test_paper_config():
  paper = synthesis.SynthesisConfig.paper()
  assert paper.rotate_degrees == 45.0 and paper.texture_weight_range == (0.1, 1.0)
  assert paper.rotate_prob == 0.3 and paper.no_anomaly_prob == 0.5 and paper.threshold == 0.5
  c = choices(jax.random.key(4), 2000, paper)
  assert c.texture_weight.min() >= 0.1 and c.texture_weight.max() <= 1.0
  assert c.texture_weight.min() < 0.11 and c.texture_weight.max() > 0.99
  assert np.abs(c.degrees).max() <= 45.0 and np.abs(c.degrees).max() > 44.0
  assert synthesis.SynthesisConfig.original() == synthesis.SynthesisConfig()
  # Lists (as a ConfigDict or JSON would give) become tuples so the config stays hashable for jit.
  from_list = synthesis.SynthesisConfig(texture_weight_range=[0.1, 1.0])
  assert from_list.texture_weight_range == (0.1, 1.0) and hash(from_list) is not None


@pytest.mark.parametrize("field, value", [("rotate_prob", 1.5), ("no_anomaly_prob", -0.1),
                                          ("rotate_degrees", -1.0), ("max_log2_res", 0),
                                          ("texture_weight_range", (0.9, 0.1))])
def test_bad_config_raises(field, value):
  with pytest.raises(ValueError, match=field):
    synthesis.SynthesisConfig(**{field: value})


def test_bad_inputs_raise(images, sources):
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="uint8"):
    synthesis.synthesize(key, images[:2], sources.astype(np.float32))
  with pytest.raises(ValueError, match="resize"):
    synthesis.synthesize(key, images[:2], sources[:, :32])
  with pytest.raises(ValueError, match="float"):
    synthesis.synthesize(key, (images[:2] * 255).astype(np.uint8), sources)
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    synthesis.synthesize(key, images[0], sources)


def test_example_independent_of_batch_size(stand_in_augment, images, sources):
  fn = jitted()
  key = jax.random.key(5)
  eight = jax.device_get(fn(key, images[:8], sources))
  sixteen = jax.device_get(fn(key, images[:16], sources))
  for a, b in zip(eight, sixteen):
    np.testing.assert_array_equal(a, b[:8])


def test_compiles_once(stand_in_augment, images, sources):
  fn = jax.jit(chex.assert_max_traces(
      lambda key, x, s: synthesis.synthesize(key, x, s), n=1))
  for seed in range(4):
    out = fn(jax.random.key(seed), images[16 * seed:16 * seed + 16], sources)
  assert out.augmented.shape == (16, H, W, 3)


def _mesh(n):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


@pytest.mark.numerics
def test_sharded_batch_matches_single_device(stand_in_augment, images, sources):
  key = jax.random.key(6)
  results = []
  for n in (1, 8):
    mesh = _mesh(n)
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    fn = jax.jit(lambda k, x, s: synthesis.synthesize(k, x, s),
                 in_shardings=(repl, data, repl), out_shardings=data)
    out = fn(key, jax.device_put(images[:16], data), jax.device_put(sources, repl))
    assert out.augmented.sharding.is_equivalent_to(data, 4)
    results.append(jax.device_get(out))
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_real_augment(images, sources):
  # The real augment.random_augment_one (3 of the 10 augmenters) inside the full pipeline.
  key = jax.random.key(7)
  out = jax.device_get(jitted()(key, images[:8], sources))
  c = choices(key, 8)
  for x in out:
    assert np.all(np.isfinite(x))
  assert out.augmented.min() >= 0.0 and out.augmented.max() <= 1.0
  np.testing.assert_array_equal(out.has_anomaly, out.mask.max(axis=(1, 2, 3)))
  outside = np.broadcast_to(out.mask == 0, out.augmented.shape)
  np.testing.assert_array_equal(out.augmented[outside], out.target[outside])
  np.testing.assert_array_equal(out.augmented[~c.anomaly], out.target[~c.anomaly])
