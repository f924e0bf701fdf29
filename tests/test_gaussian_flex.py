"""PSPC-Flex from the Gaussian denoiser's closed-form sensitivity maps (ours): the maps against float64
brute force and the generic VJP estimator, the registered denoiser, its options and its refusals."""

import itertools

import jax
import numpy as np
import pytest
from absl import flags

from pspc_jax import cli, sensitivity
from pspc_jax.denoisers import flex, values
from pspc_jax.denoisers.gaussian import gaussian_stats
from pspc_jax.denoisers.gaussian_flex import cover_every_pixel, gaussian_sensitivity_maps
from pspc_jax.denoisers.registry import make_denoiser
from pspc_jax.edm import edm_sigmas

SIGMAS = (80.0, 1.0, 0.05, 0.002)
SHAPES = ((4, 4, 2), (5, 3, 3))  # square and non-square, more than one channel


def _images(shape, count=10, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count,) + shape, dtype=np.uint8)


def _abs_jacobian_sums(jacobian, shape):
  """G[p, q] = Σ_c Σ_c' |J[(p, c), (q, c')]| by explicit loops over pixels and channels, the flat index
  of (h, w, c) being (h·W + w)·C + c (row-major NHWC)."""
  height, width, channels = shape
  out = np.zeros((height, width, height, width))
  for h, w, i, j in itertools.product(range(height), range(width), range(height), range(width)):
    for c, cc in itertools.product(range(channels), range(channels)):
      out[h, w, i, j] += abs(jacobian[(h * width + w) * channels + c, (i * width + j) * channels + cc])
  return out


@pytest.mark.parametrize("shape", SHAPES)
def test_maps_equal_the_brute_force_jacobian_of_the_posterior_mean(shape):
  images = _images(shape)
  maps = gaussian_sensitivity_maps(gaussian_stats(images), SIGMAS, shape)
  assert maps.maps.dtype == np.float32 and maps.maps.shape == (len(SIGMAS),) + shape[:2] * 2
  np.testing.assert_array_equal(maps.sigmas, SIGMAS)
  # Independent of the eigendecomposition: J = Σ (Σ + σ² I)⁻¹ from the float64 covariance of the data.
  rows = images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1
  cov = np.cov(rows, rowvar=False, bias=True)
  for k, sigma in enumerate(SIGMAS):
    jacobian = np.linalg.solve(cov + sigma ** 2 * np.eye(len(cov)), cov).T  # Σ (Σ + σ²I)⁻¹
    np.testing.assert_allclose(maps.maps[k], _abs_jacobian_sums(jacobian, shape), atol=2e-5)


def test_rank_limited_maps_keep_only_the_top_directions():
  shape, rank = (5, 3, 3), 4
  stats = gaussian_stats(_images(shape), rank=rank)
  maps = gaussian_sensitivity_maps(stats, SIGMAS, shape[:2])  # (H, W) is accepted too
  u, lam = np.asarray(stats.eigvecs, np.float64), np.asarray(stats.eigvals, np.float64)
  assert u.shape[1] == rank
  for k, sigma in enumerate(SIGMAS):
    jacobian = np.zeros((len(u), len(u)))
    for j in range(rank):
      jacobian += lam[j] / (lam[j] + sigma ** 2) * np.outer(u[:, j], u[:, j])
    np.testing.assert_allclose(maps.maps[k], _abs_jacobian_sums(jacobian, shape), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("shape,rank", [((4, 4, 2), None), ((5, 3, 3), None), ((5, 3, 3), 4)])
def test_maps_equal_the_vjp_estimator_since_the_jacobian_is_constant(shape, rank):
  images = _images(shape, seed=1)
  stats = gaussian_stats(images, rank=rank)
  exact = gaussian_sensitivity_maps(stats, SIGMAS, shape)
  estimated = sensitivity.sensitivity_maps(values.GaussianDenoiser(stats), images, SIGMAS, num_z=2,
                                           batch_size=2)
  assert sensitivity.gaussian_sensitivity_maps is gaussian_sensitivity_maps  # re-exported there
  np.testing.assert_array_equal(estimated.sigmas, exact.sigmas)
  np.testing.assert_allclose(estimated.maps, exact.maps, atol=2e-5)


def test_registered_denoiser_is_pspc_flex_over_the_closed_form_maps():
  shape = (5, 3, 3)
  images = _images(shape, count=12, seed=2)
  denoiser = make_denoiser("pspc_flex_gaussian", images)
  grid = np.asarray(edm_sigmas(18))[:-1]
  maps = gaussian_sensitivity_maps(gaussian_stats(images), grid, shape)
  reference = make_denoiser("pspc_flex", images, maps=maps, thresholds="cifar10")
  assert denoiser.map_schedule == reference.map_schedule
  assert denoiser.thresholds == reference.thresholds
  np.testing.assert_array_equal(denoiser.table, reference.table)
  assert jax.tree.leaves(denoiser.masks) and _masks_equal(denoiser, reference)
  z = np.random.default_rng(3).normal(size=(4,) + shape).astype(np.float32)
  sigma = np.float32([80.0, 2.0, 0.3, 0.01])  # full-image and Flex branches in one batch
  out = values.apply_denoiser(denoiser, z, sigma)
  assert out.shape == z.shape and np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, values.apply_denoiser(reference, z, sigma))
  # The full-coverage maps are used as they are.
  assert cover_every_pixel(maps, "cifar10") == (maps, 0)


def _masks_equal(a, b):
  leaves, other = jax.tree.leaves(a.masks), jax.tree.leaves(b.masks)
  return len(leaves) == len(other) and all(np.array_equal(x, y) for x, y in zip(leaves, other))


@pytest.mark.parametrize("rank", [None, 3])
def test_pixels_the_gaussian_ignores_are_put_in_their_own_masks(rank):
  """A constant border (a null direction of Σ) or a very low rank leaves pixels with no sensitivity:
  plain PSPC-Flex refuses such maps; the registered denoiser raises those pixels' own entries only."""
  shape, sigmas, lam = (5, 3, 3), [1.0, 0.05], 0.5
  images = _images(shape, count=12, seed=5)
  if rank is None:
    images[:, 0] = 7  # the top row is constant over the training set
  maps = gaussian_sensitivity_maps(gaussian_stats(images, rank=rank), sigmas, shape)
  with pytest.raises(ValueError, match="covered by no mask"):
    make_denoiser("pspc_flex", images, maps=maps, thresholds=lam)
  repaired, raised = cover_every_pixel(maps, lam)
  changed = np.argwhere(repaired.maps != maps.maps)
  assert len(changed) == raised > 0
  for k, h, w, i, j in changed:
    assert (h, w) == (i, j) and repaired.maps[k, h, w, h, w] == repaired.maps[k, h, w].max()
    assert np.sum(repaired.maps[k, h, w] == repaired.maps[k, h, w, h, w]) == 1  # strictly on top
  for k in range(len(sigmas)):
    assert np.asarray(flex.flex_masks(repaired.maps[k], lam)).any(axis=0).all()
  denoiser = make_denoiser("pspc_flex_gaussian", images, rank=rank, sigmas=sigmas, thresholds=lam)
  assert denoiser.map_schedule.sigmas == tuple(sigmas)
  assert _masks_equal(denoiser, make_denoiser("pspc_flex", images, maps=repaired, thresholds=lam))
  z = np.random.default_rng(6).normal(size=(2,) + shape).astype(np.float32)
  assert np.all(np.isfinite(values.apply_denoiser(denoiser, z, np.float32([1.0, 0.05]))))


@pytest.mark.parametrize("sigmas", [[1.0, -1.0], [0.0], [np.nan], [np.inf], [], [[1.0]], 1.0, ["a"]])
def test_bad_sigmas_are_refused(sigmas):
  stats = gaussian_stats(_images((4, 4, 2)))
  with pytest.raises(ValueError, match="sigmas"):
    gaussian_sensitivity_maps(stats, sigmas, (4, 4, 2))


@pytest.mark.parametrize("image_shape", [(4, 4, 3), (4, 5), (4, 4, 2, 1), (4,), "4x4", None])
def test_image_shapes_that_do_not_match_are_refused(image_shape):
  stats = gaussian_stats(_images((4, 4, 2)))
  with pytest.raises(ValueError, match="image_shape"):
    gaussian_sensitivity_maps(stats, [1.0], image_shape)


def test_registry_refusals():
  images = _images((4, 4, 2))
  for options, name in [({"sigmas": [1.0, -1.0]}, "sigmas"), ({"rank": 0}, "rank"),
                        ({"thresholds": 1.5}, "threshold"), ({"maps": None}, "maps")]:
    with pytest.raises(ValueError, match=name):
      make_denoiser("pspc_flex_gaussian", images, **options)


def test_command_line_options():
  flag_values = flags.FlagValues()
  cli.define_dataset_flags(flag_values=flag_values)
  cli.define_denoiser_flags(flag_values=flag_values)
  # On digits the tuned thresholds belong to the network's maps: the generic ones here.
  flag_values(["prog", "--rank=5"])
  assert cli.denoiser_options("pspc_flex_gaussian", flag_values) == {"rank": 5,
                                                                     "thresholds": "cifar10"}
  flag_values(["prog", "--thresholds=0.4", "--maps=ignored.npz"])  # --maps is pspc_flex's only
  assert cli.denoiser_options("pspc_flex_gaussian", flag_values) == {"rank": 5, "thresholds": "0.4"}
