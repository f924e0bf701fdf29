"""Tests for the Gaussian denoiser against dense float64 NumPy references."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax.data import load_dataset
from pspc_jax.denoisers.gaussian import GaussianStats, gaussian_denoise, gaussian_stats

SHAPE = (3, 4, 2)  # D = 24.
SIGMAS = (0.002, 0.05, 1.0, 80.0)


def _uint8_data(num, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (num, *SHAPE), dtype=np.uint8)


def _float_data(num, seed=0):
  """Correlated data in [-1, 1] with a non-zero mean."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(24, 24)) / 24
  flat = np.tanh(0.3 + rng.normal(size=(num, 24)) @ mix * 3)
  return flat.reshape(num, *SHAPE).astype(np.float32)


def _moments(data):
  """Float64 mean (D,) and population covariance (D, D) of data in model range."""
  x = data.astype(np.float64)
  if data.dtype == np.uint8:
    x = x / 127.5 - 1.0
  x = x.reshape(len(x), -1)
  mean = x.mean(axis=0)
  return mean, (x - mean).T @ (x - mean) / len(x)


def _dense_denoise(z, sigma, mean, cov):
  """mu + Sigma (Sigma + sigma² I)^-1 (z - mu), one sample at a time, in float64."""
  z = np.asarray(z, np.float64).reshape(len(z), -1)
  sigma = np.broadcast_to(sigma, (len(z),))
  eye = np.eye(len(mean))
  out = [mean + cov @ np.linalg.solve(cov + s**2 * eye, zi - mean) for zi, s in zip(z, sigma)]
  return np.stack(out).reshape(len(z), -1)


def _queries(data, num=6, seed=1):
  """Training images plus Gaussian noise of standard deviation 0.01, 0.3 or 3 (random per query)."""
  rng = np.random.default_rng(seed)
  x = data[:num].reshape(num, -1).astype(np.float64)
  if data.dtype == np.uint8:
    x = x / 127.5 - 1.0
  z = x + rng.normal(size=x.shape) * rng.choice([0.01, 0.3, 3.0], size=(num, 1))
  return z.reshape(num, *SHAPE).astype(np.float32)


@pytest.mark.parametrize("make_data", [_uint8_data, _float_data])
@pytest.mark.parametrize("chunk_size", [7, 103, 4096])
def test_stats_match_numpy(make_data, chunk_size):
  data = make_data(103)
  mean, cov = _moments(data)
  stats = gaussian_stats(data, chunk_size=chunk_size)
  assert stats.mean.shape == SHAPE and stats.mean.dtype == jnp.float32
  assert stats.eigvals.shape == (24,) and stats.eigvecs.shape == (24, 24)
  np.testing.assert_allclose(np.asarray(stats.mean).ravel(), mean, atol=1e-6)
  lam = np.asarray(stats.eigvals, np.float64)
  vecs = np.asarray(stats.eigvecs, np.float64)
  assert np.all(np.diff(lam) <= 0) and np.all(lam >= 0)
  np.testing.assert_allclose(lam, np.linalg.eigvalsh(cov)[::-1], atol=1e-7)
  np.testing.assert_allclose(vecs.T @ vecs, np.eye(24), atol=3e-7)
  np.testing.assert_allclose(vecs @ np.diag(lam) @ vecs.T, cov, atol=1e-7)


def test_stats_accept_jax_arrays():
  data = _uint8_data(50)
  a = gaussian_stats(data, chunk_size=16)
  b = gaussian_stats(jnp.asarray(data), chunk_size=16)
  np.testing.assert_allclose(a.mean, b.mean, atol=1e-7)
  np.testing.assert_allclose(a.eigvals, b.eigvals, atol=1e-6)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_denoise_matches_dense_formula(sigma):
  data = _float_data(200)
  mean, cov = _moments(data)
  stats = gaussian_stats(data, chunk_size=64)
  z = _queries(data)
  out = gaussian_denoise(z, sigma, stats)
  assert out.shape == z.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _dense_denoise(z, sigma, mean, cov).reshape(z.shape), atol=2e-6)


def test_mixed_sigma_batch_equals_per_sample_calls():
  data = _uint8_data(150)
  stats = gaussian_stats(data)
  z = _queries(data, num=len(SIGMAS))
  mixed = gaussian_denoise(z, jnp.asarray(SIGMAS), stats)
  for b, sigma in enumerate(SIGMAS):
    np.testing.assert_allclose(mixed[b], gaussian_denoise(z[b:b + 1], sigma, stats)[0], atol=1e-6)


@pytest.mark.parametrize("sigma", (0.05, 1.0))
def test_rank_truncation_matches_truncated_covariance(sigma):
  data = _float_data(200)
  mean, cov = _moments(data)
  full = gaussian_stats(data)
  stats = gaussian_stats(data, rank=5)
  assert stats.eigvals.shape == (5,) and stats.eigvecs.shape == (24, 5)
  np.testing.assert_allclose(stats.eigvals, full.eigvals[:5], rtol=1e-6)
  lam, vecs = np.linalg.eigh(cov)
  top = vecs[:, ::-1][:, :5]
  cov_5 = top @ np.diag(lam[::-1][:5]) @ top.T
  z = _queries(data)
  np.testing.assert_allclose(gaussian_denoise(z, sigma, stats),
                             _dense_denoise(z, sigma, mean, cov_5).reshape(z.shape), atol=2e-6)


def test_large_sigma_gives_the_mean():
  data = _uint8_data(80)
  stats = gaussian_stats(data)
  z = _queries(data, num=3)
  expected = np.broadcast_to(stats.mean, z.shape)
  np.testing.assert_allclose(gaussian_denoise(z, 1e5, stats), expected, atol=1e-5)
  # sigma² overflows float32 to inf: exactly the mean, no inf/inf NaN.
  np.testing.assert_array_equal(gaussian_denoise(z, 1e30, stats), expected)


def test_zero_sigma_projects_onto_the_kept_subspace():
  full = gaussian_stats(_float_data(200))
  z = _queries(_float_data(200))
  np.testing.assert_allclose(gaussian_denoise(z, 0.0, full), z, atol=1e-5)
  # 10 images span a 9-dimensional affine subspace: keeping 9 eigenpairs projects onto it.
  small = _float_data(10)
  mean, cov = _moments(small)
  lam, vecs = np.linalg.eigh(cov)
  basis = vecs[:, lam > 1e-8 * lam.max()]
  assert basis.shape[1] == 9
  proj = mean + (z.reshape(len(z), -1) - mean) @ basis @ basis.T
  out = gaussian_denoise(z, 0.0, gaussian_stats(small, rank=9))
  np.testing.assert_allclose(np.asarray(out).reshape(len(z), -1), proj, atol=1e-5)
  # Keeping all 24: the 15 null directions have eigenvalue exactly 0, so sigma = 0 projects as well.
  stats = gaussian_stats(small)
  assert np.sum(np.asarray(stats.eigvals) == 0) == 15
  out = gaussian_denoise(z, 0.0, stats)
  np.testing.assert_allclose(np.asarray(out).reshape(len(z), -1), proj, atol=1e-5)


def test_jit_matches_eager():
  data = _uint8_data(60)
  stats = gaussian_stats(data, rank=12)
  z = _queries(data, num=4)
  sigma = jnp.asarray([0.002, 0.5, 2.0, 80.0])
  jitted = jax.jit(gaussian_denoise)(z, sigma, stats)
  np.testing.assert_allclose(jitted, gaussian_denoise(z, sigma, stats), atol=1e-6)


@functools.cache
def _digits(num):
  """The first `num` 8×8 digits, uint8 (num, 8, 8, 1): D = 64."""
  return load_dataset("digits", max_images=num).images


def _tiny_spectrum_data(num=300, shape=(4, 4, 2), seed=4):
  """float32 data with covariance eigenvalues 0.05 … 1e-12 (most far below float32 eigh's reach)."""
  rng = np.random.default_rng(seed)
  dim = int(np.prod(shape))
  basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  scales = np.sqrt(np.geomspace(0.05, 1e-12, dim))
  flat = rng.uniform(-0.1, 0.1, dim) + (rng.normal(size=(num, dim)) * scales) @ basis.T
  return np.clip(flat, -1, 1).reshape(num, *shape).astype(np.float32)


def _noisy(data, sigma, num=6, seed=2):
  """z = x + sigma * eps around training images, the second half moved off the data by 0.3 * eps'."""
  rng = np.random.default_rng(seed)
  x = data[:num].reshape(num, -1).astype(np.float64)
  if data.dtype == np.uint8:
    x = x / 127.5 - 1.0
  z = x + sigma * rng.normal(size=x.shape)
  z[num // 2:] += 0.3 * rng.normal(size=z[num // 2:].shape)
  return z.reshape(data[:num].shape).astype(np.float32)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("make_data", [lambda: _digits(32), lambda: _digits(200), _tiny_spectrum_data],
                         ids=["digits32_N<D", "digits200_N>D", "tiny_eigenvalues"])
def test_matches_float64_at_every_sigma(make_data, sigma):
  """Was 2.3e-2 off with 32 digits at sigma = 0.002 (float32 eigh of the covariance)."""
  data = make_data()
  mean, cov = _moments(data)
  z = _noisy(data, sigma)
  out = np.asarray(gaussian_denoise(z, sigma, gaussian_stats(data, chunk_size=50)))
  np.testing.assert_allclose(out.reshape(len(z), -1), _dense_denoise(z, sigma, mean, cov), atol=1e-5,
                             rtol=0)


def test_null_directions_are_exactly_zero_and_stay_out_of_the_output():
  data = _digits(32)
  mean, _ = _moments(data)
  x = data.reshape(len(data), -1) / 127.5 - 1.0
  _, singular, vt = np.linalg.svd(x - mean)
  rank = int(np.sum(singular > 1e-10 * singular[0]))
  stats = gaussian_stats(data)
  lam = np.asarray(stats.eigvals)
  assert rank == 31 and np.all(lam[:rank] > 0) and np.all(lam[rank:] == 0)
  for sigma in SIGMAS:
    out = np.asarray(gaussian_denoise(_noisy(data, sigma), sigma, stats)).reshape(-1, 64)
    assert np.abs((out - mean) @ vt[rank:].T).max() < 1e-6, sigma


CIFAR_ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                         "cifar10-train-32x32-jpeg.zip")


@pytest.mark.skipif(not os.path.exists(CIFAR_ZIP), reason="shared CIFAR-10 zip not present")
def test_real_cifar10_crops_match_float64():
  """Central 16×16 crops of the first 500 CIFAR-10 images (N = 500 < D = 768): 9.2e-4 off at sigma =
  0.002 with float32 statistics (all 3,072 pixels of the first 3,000 images: 2.6e-3 before, 8e-8 after,
  but the float64 eigh of a 3,072² covariance takes 5-20 s here)."""
  data = np.ascontiguousarray(load_dataset(CIFAR_ZIP, max_images=500).images[:, 8:24, 8:24])
  stats = gaussian_stats(data)
  x = data.reshape(len(data), -1) / 127.5 - 1.0
  centred = x - x.mean(axis=0)
  gram = centred @ centred.T
  rng = np.random.default_rng(5)
  for sigma in SIGMAS:
    z = (x[[7, 123, 400]] + sigma * rng.normal(size=(3, x.shape[1]))).astype(np.float32)
    # Sigma (Sigma + s² I)^-1 = Xc^T (Xc Xc^T + N s² I)^-1 Xc for Sigma = Xc^T Xc / N: an N × N solve.
    solved = np.linalg.solve(gram + len(x) * sigma**2 * np.eye(len(x)), centred @ (z - x.mean(axis=0)).T)
    expected = x.mean(axis=0) + solved.T @ centred
    out = np.asarray(gaussian_denoise(z.reshape(3, 16, 16, 3), sigma, stats)).reshape(3, -1)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0, err_msg=f"sigma = {sigma}")


def test_validation():
  data = _uint8_data(20)
  with pytest.raises(ValueError, match="rank"):
    gaussian_stats(data, rank=25)
  with pytest.raises(ValueError, match="shape"):
    gaussian_stats(data[0])
  stats = GaussianStats(jnp.zeros(SHAPE), jnp.ones(24), jnp.eye(24))
  with pytest.raises(ValueError, match="shape"):
    gaussian_denoise(jnp.zeros((2, 4, 3, 2)), 1.0, stats)
  with pytest.raises(ValueError, match="sigma"):
    gaussian_denoise(jnp.zeros((2, *SHAPE)), jnp.ones(3), stats)
