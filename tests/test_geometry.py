"""geometry.rotate at arbitrary angles against scipy.ndimage.rotate (float64).

The convention is imgaug's ``Affine(rotate=...)`` as DRAEM uses it (bilinear, order 1; centre
((W-1)/2, (H-1)/2); constant fill, which bilinear sampling blends in at the border as OpenCV's warpAffine
does): scipy's ``rotate(reshape=False, order=1, mode="grid-constant", prefilter=False)`` with the angle
negated, i.e. a positive angle turns the image clockwise as displayed (row 0 at the top).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from draem_jax import geometry

ANGLES = (17.3, -63.9, 90.0, 137.5, 0.7, -179.0)


def _scipy(image, degrees, fill):
  return scipy.ndimage.rotate(np.asarray(image, np.float64), -degrees, reshape=False, order=1,
                              mode="grid-constant", cval=fill, prefilter=False)


def _interior(shape, degrees):
  """Pixels whose four bilinear neighbours all lie inside the image (by scipy's own rotation of ones)."""
  ones = _scipy(np.ones(shape), degrees, 0.0)
  return scipy.ndimage.binary_erosion(ones > 1 - 1e-9)


@pytest.mark.numerics
@pytest.mark.parametrize("shape", [(37, 52), (64, 64), (33, 20)])
def test_rotate_matches_scipy_at_arbitrary_angles(shape):
  rng = np.random.default_rng(sum(shape))
  image = rng.random(shape).astype(np.float32)
  rotate = jax.jit(geometry.rotate)
  seen_outside = False
  for degrees in ANGLES:
    got = np.asarray(rotate(image, degrees))
    want = _scipy(image, degrees, 0.0)
    inside = _interior(shape, degrees)
    assert 0.4 < inside.mean() < 1.0  # a real interior and real rotated-in corners
    np.testing.assert_allclose(got[inside], want[inside], rtol=0, atol=1e-5, err_msg=f"{degrees} deg")
    # The border too: fill blended in by the bilinear weights, exactly fill further out.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{degrees} deg, whole image")
    outside = _scipy(np.ones(shape), degrees, 0.0) == 0  # all four neighbours rotated in from outside
    assert not got[outside].any()
    seen_outside |= outside.any()
  assert seen_outside


@pytest.mark.numerics
def test_rotate_channels_fill_and_vmapped_angles():
  rng = np.random.default_rng(1)
  images = rng.random((len(ANGLES), 24, 40, 3)).astype(np.float32)
  got = np.asarray(jax.vmap(lambda x, d: geometry.rotate(x, d, fill=0.25))(images, jnp.asarray(ANGLES)))
  for i, degrees in enumerate(ANGLES):
    for c in range(3):
      np.testing.assert_allclose(got[i, ..., c], _scipy(images[i, ..., c], degrees, 0.25), rtol=0,
                                 atol=1e-5, err_msg=f"example {i}, channel {c}")


def test_rotate_direction_and_identity():
  image = np.zeros((5, 5), np.float32)
  image[0, 0] = 1.0  # top-left corner
  # Clockwise as displayed: a quarter turn takes the top-left corner to the top-right.
  np.testing.assert_allclose(np.asarray(geometry.rotate(image, 90.0))[0, 4], 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(geometry.rotate(image, 0.0)), image)
  assert geometry.rotate(image.astype(jnp.bfloat16), 30.0).dtype == jnp.bfloat16


@pytest.mark.numerics
@pytest.mark.parametrize("mode, scipy_mode", [("edge", "nearest"), ("reflect", "reflect")])
def test_rotate_border_modes_match_scipy(mode, scipy_mode):
  # Far corners included: at 45 degrees a corner's source lies ~0.2 image sizes outside, and the
  # reflection must fold such indices back (period 2 * size), not just clamp them.
  rng = np.random.default_rng(2)
  image = rng.random((29, 40, 3)).astype(np.float32)
  for degrees in (45.0, -120.0, 17.3):
    got = np.asarray(geometry.rotate(image, degrees, mode=mode))
    for c in range(3):
      want = scipy.ndimage.rotate(image[..., c].astype(np.float64), -degrees, reshape=False, order=1,
                                  mode=scipy_mode, prefilter=False)
      np.testing.assert_allclose(got[..., c], want, rtol=0, atol=1e-5, err_msg=f"{mode} {degrees}")
