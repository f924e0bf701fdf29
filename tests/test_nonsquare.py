"""Patch sizes on non-square images: a size s means min(s, H) × min(s, W) windows, s ≥ max(H, W) the
whole image (`SquareWindows`, `pspc_square_denoise`, `patch_schedule_for`)."""

import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax import schedules
from pspc_jax.denoisers.masks import SquareWindows
from reference import make_problem, pspc_reference, square_masks, to_float64

SHAPES = ((6, 10), (10, 6))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", (1, 8, 13))
def test_windows_of_a_size_on_a_rectangle(shape, size):
  windows = SquareWindows(*shape, size)
  expected = square_masks(*shape, size)
  assert windows.window == (min(size, shape[0]), min(size, shape[1]))
  assert np.prod(windows.mask_shape) == len(expected)
  np.testing.assert_array_equal(windows.coverage, np.sum(expected, axis=0))
  e = np.random.default_rng(0).uniform(size=(2,) + shape).astype(np.float32)
  sums = np.asarray(windows.sums(e)).reshape(2, -1)
  major = np.asarray(windows.sums_major(np.moveaxis(e, 0, -1))).reshape(-1, 2).T
  by_mask = np.stack([e[:, m].sum(axis=1) for m in expected], axis=1)
  np.testing.assert_allclose(sums, by_mask, rtol=1e-6)
  np.testing.assert_allclose(major, by_mask, rtol=1e-6)


@pytest.mark.parametrize("shape,size,sigma", [((6, 10), 4, 0.3), ((6, 10), 8, 2.0), ((10, 6), 8, 0.5)])
def test_pspc_square_on_a_rectangle_matches_the_per_window_loop(shape, size, sigma):
  """s = 8 on 6×10 images: 6×8 windows (3 of them), against the float64 loop over those masks."""
  z, data = make_problem(*shape, 2, num=30, batch=3, sigma=sigma)
  got = pj.pspc_square_denoise(z, sigma, data, size)
  expected = pspc_reference(z, sigma, data, square_masks(*shape, size))
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,size", [((6, 10), 10), ((10, 6), 64)])
def test_sizes_from_the_longer_side_up_are_the_whole_image(shape, size):
  z, data = make_problem(*shape, 2, num=20, batch=2, sigma=1.0)
  np.testing.assert_array_equal(pj.pspc_square_denoise(z, 1.0, data, size),
                                pj.empirical_denoise(z, 1.0, data))


@pytest.mark.parametrize("shape", SHAPES)
def test_auto_schedule_at_sigma_80_is_the_optimal_denoiser(shape):
  """Was 1.4e-2 (this data) / 2.5e-4 (the issue's) off: the 'full image' entries used 6×6 windows."""
  z, data = make_problem(*shape, 2, num=40, batch=3, sigma=80.0)
  denoise = pj.make_denoiser("pspc_square", data)
  np.testing.assert_allclose(denoise(z, 80.0), pj.empirical_denoise(z, 80.0, data), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_auto_schedule_on_a_rectangle(shape):
  """Full-image entries (32 on CIFAR-10) become max(H, W); the others squares in [3, min(H, W)]."""
  schedule = schedules.patch_schedule_for(shape)
  cifar = schedules.CIFAR10_PATCH_SIZES
  assert [s for s, c in zip(schedule.values, cifar) if c == 32] == [max(shape)] * cifar.count(32)
  assert all(3 <= s <= min(shape) for s, c in zip(schedule.values, cifar) if c < 32)
  assert schedules.parse_patch_schedule("auto", shape) == schedule


def test_square_schedules_are_unchanged():
  assert schedules.patch_schedule_for((32, 32)) == schedules.patch_schedule_for(32)
  assert schedules.patch_schedule_for(32).values == schedules.CIFAR10_PATCH_SIZES


def test_parse_patch_schedule_bounds_on_a_rectangle():
  assert schedules.parse_patch_schedule("10", (6, 10)).values == (10,)
  with pytest.raises(ValueError, match="patch size 11 does not fit 6×10 images"):
    schedules.parse_patch_schedule("11", (6, 10))
  with pytest.raises(ValueError, match="image width"):
    schedules.parse_patch_schedule("3", (6, 0))


def test_patch_posterior_means_of_rectangular_windows():
  """s = 8 on 6×10: three 6×8 windows, each the float64 softmax-weighted mean of its crops."""
  sigma = 0.7
  z, data = make_problem(6, 10, 2, num=25, batch=2, sigma=sigma)
  got = np.asarray(pj.patch_posterior_means(z, sigma, data, 8))
  assert got.shape == (2, 1, 3, 6, 8, 2)
  x, zz = to_float64(data), np.asarray(z, np.float64)
  for left in range(3):
    crops = x[:, :, left:left + 8]
    dist = ((zz[:, None, :, left:left + 8] - crops[None]) ** 2).sum(axis=(2, 3, 4))
    logits = -dist / (2 * sigma**2)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got[:, 0, left], np.einsum("bn,nhwc->bhwc", weights, crops),
                               atol=1e-5, rtol=0)
