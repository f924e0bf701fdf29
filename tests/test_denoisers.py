"""Empirical and PSPC denoisers against float64 brute force and analytic limits."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax.data import load_dataset
from pspc_jax import softmin
from pspc_jax.denoisers.masks import SquareWindows
from pspc_jax.denoisers.pspc import composite_denoise, pixel_major_data
from pspc_jax.denoisers.values import with_pixel_major
from reference import (empirical_reference, make_problem, pspc_reference, square_masks,
                       to_float64)

SIGMAS = (0.002, 0.05, 1.0, 80.0)
TOL = 1e-4


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("shape,patch_size", [((7, 5, 3), 1), ((7, 5, 3), 3), ((7, 5, 3), 4),
                                              ((6, 6, 1), 2), ((6, 6, 1), 5), ((5, 9, 1), 3)])
def test_pspc_square_matches_float64_per_mask_loop(sigma, shape, patch_size):
  z, data = make_problem(*shape, num=41, batch=3, sigma=sigma)
  expected = pspc_reference(z, sigma, data, square_masks(shape[0], shape[1], patch_size))
  got = pj.pspc_square_denoise(z, sigma, data, patch_size, chunk_size=8)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_empirical_matches_float64_reference(sigma):
  z, data = make_problem(6, 4, 3, num=53, batch=4, sigma=sigma)
  got = pj.empirical_denoise(z, sigma, data, chunk_size=10)
  np.testing.assert_allclose(got, empirical_reference(z, sigma, data), atol=TOL, rtol=0)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_arbitrary_masks_match_float64_reference(sigma):
  rng = np.random.default_rng(1)
  masks = rng.random((9, 6, 5)) < 0.3
  masks[0] = True  # guarantees coverage; the other masks are irregular and overlapping
  masks[1] = False
  masks[1, 2, :] = True  # a single row
  z, data = make_problem(6, 5, 3, num=30, batch=3, sigma=sigma, seed=2)
  got = pj.pspc_denoise(z, sigma, data, masks, chunk_size=7)
  np.testing.assert_allclose(got, pspc_reference(z, sigma, data, list(masks)), atol=TOL, rtol=0)


def test_float_data_gives_same_result_as_uint8():
  z, data = make_problem(6, 6, 3, num=20, batch=2, sigma=0.3)
  as_float = jnp.asarray(data, jnp.float32) / 127.5 - 1.0
  np.testing.assert_allclose(pj.pspc_square_denoise(z, 0.3, data, 3),
                             pj.pspc_square_denoise(z, 0.3, as_float, 3), atol=1e-6)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_full_image_window_equals_empirical(sigma):
  z, data = make_problem(6, 6, 3, num=25, batch=3, sigma=sigma)
  generic = composite_denoise(z, sigma, data, SquareWindows(6, 6, 6), chunk_size=6)
  np.testing.assert_allclose(generic, pj.empirical_denoise(z, sigma, data), atol=1e-5, rtol=0)
  np.testing.assert_allclose(pj.pspc_square_denoise(z, sigma, data, 6),
                             pj.empirical_denoise(z, sigma, data), atol=0, rtol=0)


@pytest.mark.parametrize("denoise", [
    lambda z, s, d: pj.empirical_denoise(z, s, d),
    lambda z, s, d: pj.pspc_square_denoise(z, s, d, 3),
])
def test_small_sigma_gives_nearest_training_patch(denoise):
  """σ → 0: each patch posterior puts all weight on the nearest training patch (here, the image)."""
  z, data = make_problem(6, 6, 3, num=30, batch=4, sigma=0.0)
  z = z + 0.01 * jax.random.normal(jax.random.key(0), z.shape)
  x = to_float64(data)
  nearest = x[np.argmin(((np.asarray(z)[:, None] - x[None]) ** 2).sum(axis=(2, 3, 4)), axis=1)]
  for sigma in (1e-4, 0.0):
    np.testing.assert_allclose(denoise(z, sigma, data), nearest, atol=1e-6)


@pytest.mark.parametrize("patch_size", [2, 6])
def test_large_sigma_gives_dataset_mean(patch_size):
  z, data = make_problem(6, 6, 1, num=30, batch=2, sigma=1.0)
  got = pj.pspc_square_denoise(z, 1e5, data, patch_size)
  mean = to_float64(data).mean(axis=0)
  np.testing.assert_allclose(got, np.broadcast_to(mean, got.shape), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 29, 1000])
def test_chunk_size_does_not_change_results(chunk_size):
  z, data = make_problem(6, 6, 3, num=29, batch=3, sigma=0.05)
  base = pj.pspc_square_denoise(z, 0.05, data, 3, chunk_size=29)
  np.testing.assert_allclose(pj.pspc_square_denoise(z, 0.05, data, 3, chunk_size=chunk_size), base,
                             atol=1e-6)
  np.testing.assert_allclose(pj.empirical_denoise(z, 0.05, data, chunk_size=chunk_size),
                             pj.empirical_denoise(z, 0.05, data, chunk_size=29), atol=1e-6)


@pytest.mark.parametrize("name", ["empirical", "pspc_square"])
def test_mixed_sigma_batch_equals_per_sample_calls(name):
  sigmas = np.array([80.0, 2.0, 0.5, 0.05, 0.002, 1.0], np.float32)
  z, data = make_problem(8, 8, 1, num=40, batch=6, sigma=sigmas)
  denoise = pj.make_denoiser(name, data)
  mixed = jax.jit(denoise)(z, jnp.asarray(sigmas))
  for b, sigma in enumerate(sigmas):
    np.testing.assert_allclose(mixed[b], denoise(z[b:b + 1], float(sigma))[0], atol=1e-5)


def test_scheduled_pspc_uses_each_samples_patch_size():
  sigmas = np.array([80.0, 0.5, 0.002], np.float32)
  z, data = make_problem(8, 8, 1, num=40, batch=3, sigma=sigmas)
  schedule = pj.SigmaSchedule((80.0, 0.5, 0.002), (8, 5, 3))
  got = pj.make_denoiser("pspc_square", data, patch_schedule=schedule)(z, jnp.asarray(sigmas))
  for b, (sigma, size) in enumerate(zip(sigmas, (8, 5, 3))):
    expected = pspc_reference(z[b:b + 1], sigma, data, square_masks(8, 8, size))
    np.testing.assert_allclose(got[b:b + 1], expected, atol=TOL)


def test_denoisers_are_jittable_with_traced_sigma():
  z, data = make_problem(6, 6, 3, num=20, batch=2, sigma=0.5)
  sigma = jnp.array([0.5, 0.7])
  for fn in (lambda z, s: pj.pspc_square_denoise(z, s, data, 3),
             lambda z, s: pj.empirical_denoise(z, s, data),
             lambda z, s: pj.pspc_denoise(z, s, data, np.ones((1, 6, 6), bool))):
    np.testing.assert_allclose(jax.jit(fn)(z, sigma), fn(z, sigma), atol=1e-6)


def test_bad_inputs_raise_clear_errors():
  z, data = make_problem(6, 6, 3, num=5, batch=2, sigma=0.5)
  with pytest.raises(ValueError, match="patch_size must be an integer >= 1"):
    pj.pspc_square_denoise(z, 0.5, data, 0)  # 7 ≥ max(H, W) is the whole image (tests/test_nonsquare)
  with pytest.raises(ValueError, match="covered by no mask"):
    masks = np.zeros((2, 6, 6), bool)
    masks[:, :3] = True
    pj.pspc_denoise(z, 0.5, data, masks)
  with pytest.raises(ValueError, match="empty"):
    pj.empirical_denoise(z, 0.5, data[:0])
  with pytest.raises(ValueError, match="differ in shape"):
    pj.pspc_square_denoise(z[..., :1], 0.5, data, 3)
  with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
    pj.empirical_denoise(z, jnp.ones(3), data)
  with pytest.raises(ValueError, match="unknown denoiser 'nope'"):
    pj.make_denoiser("nope", data)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("num,chunk_size", [(150, 64), (150, 128), (75, None), (75, 32), (40, 64)])
def test_pixel_major_copy_gives_the_same_bits(dtype, num, chunk_size):
  """`data_major` is read for the full chunks (one or two 64-row blocks) and the dataset for the rest;
  a chunk size that is no multiple of a block (32, or the default 75 = N), or fewer rows than a block
  (40), ignores it."""
  z, data = make_problem(6, 7, 3, num=num, batch=3, sigma=0.3, dtype=dtype)
  major = pixel_major_data(data)
  for masks in (SquareWindows(6, 7, 1), SquareWindows(6, 7, 3), SquareWindows(6, 7, 5)):
    fn = jax.jit(lambda z, d, m, masks=masks: composite_denoise(
        z, 0.3, d, masks, chunk_size=chunk_size, data_major=m))
    np.testing.assert_array_equal(fn(z, data, major), fn(z, data, None))
  cached = jax.jit(lambda z, d, m: composite_denoise(
      z, 0.3, d, SquareWindows(6, 7, 5), data_major=m, chunk_size=chunk_size, cache_bytes=3000))
  np.testing.assert_array_equal(cached(z, data, major), cached(z, data, None))


def test_pixel_major_copy_must_match_the_dataset():
  z, data = make_problem(6, 6, 3, num=70, batch=2, sigma=0.5)
  with pytest.raises(ValueError, match="data_major must be pixel_major_data"):
    pj.pspc_square_denoise(z, 0.5, data, 3, data_major=pixel_major_data(data[:40]))
  with pytest.raises(ValueError, match="data_major must be pixel_major_data"):
    pj.pspc_square_denoise(z, 0.5, data, 3,
                           data_major=pixel_major_data(jnp.asarray(data, jnp.float32)))
  with pytest.raises(ValueError, match="data_major must be pixel_major_data"):
    pj.pspc_square_denoise(z, 0.5, data, 6, data_major=data)  # checked for the whole image too


def test_with_pixel_major_holds_a_copy_under_the_budget():
  z, data = make_problem(6, 6, 3, num=70, batch=2, sigma=0.5)
  denoiser = pj.make_denoiser("pspc_square", data, patch_schedule=3, chunk_size=64)
  with_copy = with_pixel_major(denoiser)
  assert with_copy.data_major is not None and denoiser.data_major is None
  np.testing.assert_array_equal(with_copy.data_major.blocks, pixel_major_data(data).blocks)
  run = jax.jit(lambda d, z: d(z, 0.5))
  np.testing.assert_array_equal(run(with_copy, z), run(denoiser, z))
  assert with_pixel_major(denoiser, max_bytes=data.size - 1).data_major is None
  assert with_pixel_major(with_copy) is with_copy
  with pytest.raises(ValueError, match="takes no pixel-major dataset copy"):
    with_pixel_major(pj.make_denoiser("empirical", data))
  with pytest.raises(ValueError, match="max_bytes"):
    with_pixel_major(denoiser, max_bytes=-1)


def test_finite_softmin_path_matches_the_general_one():
  """`SoftminStats.add_finite` and `exp_gap_finite` give `add`'s and `exp_gap`'s values and
  derivatives for finite distances (the pass-1 and pass-2 fast paths of the pixel-major kernel)."""
  rng = np.random.default_rng(4)
  dists = jnp.asarray(rng.uniform(0.0, 5.0, (2, 6, 7)), jnp.float32)
  scale = jnp.asarray([[-0.7, -3.0]], jnp.float32).T  # (2, 1) against (2, 6) states
  state = softmin.SoftminStats.empty((2, 6)).add(dists[..., :3], scale, axis=2)[0]
  general = state.add(dists[..., 3:], scale, axis=2)[0]
  finite = state.add_finite(dists[..., 3:], scale, axis=2)
  np.testing.assert_array_equal(finite.min_dist, general.min_dist)
  np.testing.assert_allclose(finite.total, general.total, rtol=1e-6)
  reference = general.min_dist[..., None]

  def weights(fn, d):
    return jnp.sum(fn(d, reference, scale[..., None]) * jnp.arange(7.0))

  for fn in (softmin.exp_gap, softmin.exp_gap_finite):
    np.testing.assert_allclose(weights(fn, dists), weights(softmin.exp_gap, dists), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(weights, argnums=1)(fn, dists),
                               jax.grad(weights, argnums=1)(softmin.exp_gap, dists), rtol=1e-6)


CIFAR_ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                         "cifar10-train-32x32-jpeg.zip")


@pytest.mark.skipif(not os.path.exists(CIFAR_ZIP), reason="shared CIFAR-10 zip not present")
@pytest.mark.parametrize("sigma,patch_size", [(0.002, 3), (0.05, 5), (1.0, 15), (80.0, 23)])
def test_pspc_square_on_real_cifar10_with_flips_matches_float64(sigma, patch_size):
  """Real images with their mirrors: many exactly tied patches (symmetric or flat regions)."""
  data = jnp.asarray(load_dataset(CIFAR_ZIP, flip=True, max_images=60).images)
  rng = np.random.default_rng(3)
  x = to_float64(data)[[5, 70]]
  z = jnp.asarray((x + sigma * rng.standard_normal(x.shape)).astype(np.float32))
  got = pj.pspc_square_denoise(z, sigma, data, patch_size)
  expected = pspc_reference(z, sigma, data, square_masks(32, 32, patch_size))
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
