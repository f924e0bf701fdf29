"""Tests for the EDM grid, preconditioning and the PF-ODE samplers (exact on Gaussian data)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax.denoisers.gaussian import GaussianStats, gaussian_denoise
from pspc_jax.edm import edm_preconditioning, edm_sigmas
from pspc_jax.sampling import latents_from_seeds, sample, seed_keys

SHAPE = (4, 4, 1)
DIM = 16


def _gaussian():
  """A Gaussian with non-zero mean and distinct eigenvalues spanning two decades."""
  rng = np.random.default_rng(0)
  vecs, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  lam = np.geomspace(2.0, 0.02, DIM)
  mean = rng.uniform(-0.5, 0.5, SHAPE)
  stats = GaussianStats(jnp.asarray(mean, jnp.float32), jnp.asarray(lam, jnp.float32),
                        jnp.asarray(vecs, jnp.float32))
  return stats, mean.ravel(), lam, vecs


STATS, MEAN, LAM, VECS = _gaussian()


def _denoise(z, sigma):
  return gaussian_denoise(z, sigma, STATS)


def _exact_flow(z0, sigma0, sigma1):
  """Exact PF-ODE flow of N(mu, U diag(lam) U^T) data from sigma0 to sigma1.

  z(sigma1) = mu + U diag(sqrt((lam + sigma1²) / (lam + sigma0²))) U^T (z(sigma0) - mu).
  """
  z0 = np.asarray(z0, np.float64)
  coords = (z0.reshape(len(z0), -1) - MEAN) @ VECS
  coords *= np.sqrt((LAM + sigma1**2) / (LAM + sigma0**2))
  return (MEAN + coords @ VECS.T).reshape(z0.shape)


def test_edm_sigmas_formula():
  n = 18
  sigmas = edm_sigmas(n)
  assert sigmas.shape == (n + 1,) and sigmas.dtype == jnp.float32
  i = np.arange(n)
  expected = (80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  np.testing.assert_allclose(sigmas[:n], expected, rtol=1e-6)
  assert sigmas[0] == np.float32(80.0) and sigmas[n - 1] == np.float32(0.002) and sigmas[n] == 0.0
  assert np.all(np.diff(np.asarray(sigmas)) < 0)
  np.testing.assert_array_equal(edm_sigmas(1), [80.0, 0.0])
  np.testing.assert_allclose(edm_sigmas(2, 0.1, 10.0, 1.0), [10.0, 0.1, 0.0], rtol=1e-7)


@pytest.mark.parametrize("kwargs", [dict(num_steps=0), dict(num_steps=5, sigma_min=0.0),
                                    dict(num_steps=5, sigma_min=2.0, sigma_max=1.0),
                                    dict(num_steps=5, rho=0.0)])
def test_edm_sigmas_validation(kwargs):
  with pytest.raises(ValueError):
    edm_sigmas(**kwargs)


def test_edm_preconditioning():
  sigma = np.array([0.002, 0.5, 3.0, 80.0])
  pre = edm_preconditioning(sigma)
  sd = 0.5
  np.testing.assert_allclose(pre.c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(pre.c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(pre.c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(pre.c_noise, np.log(sigma) / 4, rtol=1e-6)
  # Unit-variance network input and training target (Karras et al. 2022, App. B.6).
  np.testing.assert_allclose(pre.c_in**2 * (sd**2 + sigma**2), 1.0, rtol=1e-5)
  target_var = (1 - pre.c_skip)**2 * sd**2 + pre.c_skip**2 * sigma**2
  np.testing.assert_allclose(target_var / pre.c_out**2, 1.0, rtol=1e-5)


@pytest.mark.parametrize("solver, steps, low, high", [("euler", (8, 16, 32, 64), 0.8, 1.2),
                                                      ("heun", (8, 16, 32, 64), 1.8, 2.3)])
def test_convergence_order_on_gaussian_data(solver, steps, low, high):
  sigma0, sigma1 = 10.0, 0.1
  latents = latents_from_seeds(np.arange(8), SHAPE)
  exact = _exact_flow(latents * sigma0, sigma0, sigma1)
  errors = []
  for n in steps:
    sigmas = np.geomspace(sigma0, sigma1, n + 1)
    out = sample(_denoise, latents, sigmas, solver=solver)
    errors.append(np.abs(np.asarray(out, np.float64) - exact).max())
  order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert low < order < high, (order, errors)
  assert errors[-1] < (0.05 if solver == "euler" else 0.005)


@pytest.mark.parametrize("solver, final_zero, calls", [("euler", True, 6), ("heun", True, 11),
                                                       ("heun", False, 12)])
def test_denoiser_call_count(solver, final_zero, calls):
  count = []

  def counting_denoise(z, sigma):
    jax.debug.callback(lambda: count.append(1))
    return _denoise(z, sigma)

  sigmas = edm_sigmas(6) if final_zero else np.geomspace(10.0, 0.1, 7)
  jax.jit(lambda lat: sample(counting_denoise, lat, sigmas, solver=solver))(
      latents_from_seeds([0, 1], SHAPE)).block_until_ready()
  jax.effects_barrier()
  assert len(count) == calls


def test_heun_final_step_to_zero_is_a_denoiser_call():
  latents = latents_from_seeds([0, 1, 2], SHAPE)
  out, path = sample(_denoise, latents, edm_sigmas(4), return_trajectory=True)
  np.testing.assert_allclose(out, path.denoised[-1], atol=1e-6)


def test_latents_batch_invariant_and_deterministic():
  both = latents_from_seeds([3, 7], SHAPE)
  alone = latents_from_seeds(jnp.asarray([7]), SHAPE)
  assert both.shape == (2, *SHAPE) and both.dtype == jnp.float32
  np.testing.assert_array_equal(both[1], alone[0])
  np.testing.assert_array_equal(both, latents_from_seeds([3, 7], SHAPE))
  assert not np.allclose(both[0], both[1])
  jitted = jax.jit(latents_from_seeds, static_argnums=1)
  np.testing.assert_array_equal(jitted(jnp.asarray([3, 7]), SHAPE), both)
  with pytest.raises(ValueError, match="integer"):
    seed_keys([1.5])


def _churn_sample(seeds, **kwargs):
  latents = latents_from_seeds(seeds, SHAPE)
  return sample(_denoise, latents, edm_sigmas(8), keys=seed_keys(seeds), **kwargs)


def test_churn_reproducible_and_batch_invariant():
  churn = dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.007)
  big = _churn_sample([3, 7, 11], **churn)
  np.testing.assert_array_equal(big, _churn_sample([3, 7, 11], **churn))
  np.testing.assert_allclose(big[1], _churn_sample([7], **churn)[0], atol=1e-5)
  np.testing.assert_allclose(big[2], _churn_sample([5, 11], **churn)[1], atol=1e-5)
  assert not np.allclose(big, _churn_sample([3, 7, 11]), atol=1e-3)


def test_no_churn_equals_deterministic_path():
  plain = _churn_sample([3, 7])
  np.testing.assert_array_equal(_churn_sample([3, 7], s_churn=0.0), plain)
  # Churn restricted to a sigma range containing no grid point adds no noise.
  np.testing.assert_allclose(_churn_sample([3, 7], s_churn=40.0, s_min=100.0), plain, atol=1e-6)


def test_churn_step_matches_algorithm_2():
  seeds = [4, 9]
  latents = latents_from_seeds(seeds, SHAPE)
  keys = seed_keys(seeds)
  out = sample(_denoise, latents, jnp.asarray([2.0, 1.0]), solver="euler", s_churn=0.3, s_noise=1.1,
               keys=keys)
  sigma_hat = 2.0 * 1.3  # gamma = min(0.3 / 1, sqrt(2) - 1).
  eps = jnp.stack([jax.random.normal(jax.random.fold_in(k, 0), SHAPE) for k in keys])
  z_hat = 2.0 * latents + math.sqrt(sigma_hat**2 - 4.0) * 1.1 * eps
  expected = z_hat + (1.0 - sigma_hat) * (z_hat - _denoise(z_hat, sigma_hat)) / sigma_hat
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_trajectory_shapes_and_ends():
  latents = latents_from_seeds([0, 1, 2], SHAPE)
  sigmas = edm_sigmas(5)
  out, path = sample(_denoise, latents, sigmas, solver="heun", return_trajectory=True)
  assert path.z.shape == (6, 3, *SHAPE) and path.denoised.shape == (5, 3, *SHAPE)
  np.testing.assert_array_equal(path.z[0], latents * sigmas[0])
  np.testing.assert_array_equal(path.z[-1], out)
  np.testing.assert_array_equal(out, sample(_denoise, latents, sigmas))
  for i in range(5):
    np.testing.assert_allclose(path.denoised[i], _denoise(path.z[i], sigmas[i]), atol=1e-5)


def test_progress_called_once_per_step_in_order():
  seen = []
  sigmas = edm_sigmas(7)
  run = jax.jit(lambda lat, sig: sample(_denoise, lat, sig, progress=lambda *a: seen.append(a)))
  run(latents_from_seeds([0], SHAPE), sigmas).block_until_ready()
  jax.effects_barrier()
  assert [(i, n) for i, n, _ in seen] == [(i, 7) for i in range(7)]
  np.testing.assert_allclose([s for _, _, s in seen], sigmas[:-1], rtol=1e-6)


def test_validation():
  latents = latents_from_seeds([0], SHAPE)
  with pytest.raises(ValueError, match="solver"):
    sample(_denoise, latents, edm_sigmas(3), solver="rk4")
  with pytest.raises(ValueError, match="keys"):
    sample(_denoise, latents, edm_sigmas(3), s_churn=1.0)
  with pytest.raises(ValueError, match="sigmas"):
    sample(_denoise, latents, jnp.asarray([1.0]))
  with pytest.raises(ValueError, match="latents"):
    sample(_denoise, latents[0], edm_sigmas(3))
