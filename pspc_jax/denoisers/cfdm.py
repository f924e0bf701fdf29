"""Smoothed closed-form diffusion model (σ-CFDM) of Scarvelis, Borde & Solomon as a denoiser.

Scarvelis, Sáez de Ocáriz Borde & Solomon, "Closed-form diffusion models" (arXiv 2310.12395v3, TMLR
05/2025). What this module takes from the paper, in its notation (ρ_1 the data, ρ_t the perturbed target,
t: 0 → 1 from noise to data):

* Interpolant: x_t = t·x_1 + (1 − t)·x_0, x_1 ~ ρ̂_1 (the training set {x_i}, N points), x_0 ~ N(0, I),
  so ρ̂_t is the Gaussian mixture (1/N) Σ_i N(t·x_i, (1 − t)² I).
* Closed-form score (§1: "a vector pointing from x toward a distance-weighted average of all rescaled
  training points"):

      s(x, t) = (k_t(x) − x) / (1 − t)²,   k_t(x) = Σ_i softmax_i(−‖x − t·x_i‖² / (2(1 − t)²)) · t·x_i.

  Its flow only reproduces training points.
* Velocity of the sampler: v_t(x) = (x + (1 − t)·s(x, t)) / t, integrated by Euler steps from t = 0 (or
  from a start time T > 0, sampling ρ̂_T directly); the posterior mean of x_1 given x_t = x is
  E[x_1 | x_t = x] = (x + (1 − t)²·s(x, t)) / t = k_t(x) / t.
* σ-CFDM: the score is smoothed by a Gaussian perturbation of the *query point* (not of the data, not of
  ρ_1) with the smoothing parameter σ, in the units of x_t:

      s_σ(x, t) = E_{ε ~ N(0, I)}[ s(x + σ·ε, t) ] = (E_ε[k_t(x + σ·ε)] − x) / (1 − t)².

  Equivalently (the i-independent terms of ‖x + σε − t·x_i‖² cancel in the softmax) the logits are
  perturbed: k_t(x + σε) = Σ_i softmax_i(−‖x − t·x_i‖²/(2(1 − t)²) + σ·t·⟨ε, x_i⟩/(1 − t)²) · t·x_i.
  Its flows end on barycentres of nearby training points instead of on the points themselves, and
  σ = 0 gives back the closed-form score.
* The expectation over ε has no closed form (a logistic-normal integral over the training set). The
  paper estimates it by Monte Carlo, averaging k_t over M noise draws, and makes each k_t cheap with a
  nearest-neighbour estimator (the softmax restricted to the K nearest training points of the
  perturbed query plus L random others, reweighted). Both are approximations of s_σ.

What this module computes. In EDM units (z = x_t / t = x + σ_edm·n, σ_edm = (1 − t)/t, i.e.
t = 1/(1 + σ_edm)) the posterior-mean denoiser of s_σ is x̂ = (x_t + (1 − t)² s_σ(x_t, t)) / t =
E_ε[k_t(x_t + σε)] / t, i.e.

    x̂(z) = E_ε[ Σ_i softmax_i(−‖z + λ(1 + σ_edm)·ε − x_i‖² / (2σ_edm²)) · x_i ],    λ = `smoothing`,

the optimal empirical denoiser (`empirical_denoise`) averaged over Gaussian perturbations of the query
of std λ/t = λ(1 + σ_edm): the paper's σ carried from x_t units into z units. With λ = 0 it *is* the
optimal empirical denoiser (exactly: the call is delegated to `empirical_denoise`).

Choices and approximations (all ours, none changes what is being estimated):
* Monte Carlo over ε, as in the paper, with `num_noise` = M fixed draws ε_1 … ε_M ~ N(0, I) of image
  shape from `jax.random.key(noise_seed)`, in antithetic pairs (ε, −ε) when M is even (the estimate
  then has no odd-order error terms, and the draws average to exactly 0, so it does not matter whether
  the score subtracts x or the perturbed x + σε). This is the paper's M-sample estimator with common
  random numbers: the draws are the same for every query, step and σ, so the denoiser is a
  deterministic function of (z, σ) (a deterministic PF-ODE); the paper redraws the noise.
* No nearest-neighbour truncation: each of the M softmaxes runs over the whole training set, exactly
  (streamed over the dataset, online logsumexp via `SoftminStats`, direct differences, float32), so the
  result is the M-sample Monte-Carlo estimate of the paper's s_σ to float32 rounding, for any chunk
  size.
* λ is in the paper's units (those of x_t, which at t = 1 are image units, here [-1, 1]). The default
  `DEFAULT_SMOOTHING` = 0.3 is our choice for [-1, 1] images (at small σ_edm, perturbations of norm
  ≈ 0.3·√D = 2.4 on 8×8 digits, about their mean nearest-neighbour distance 2.1); the paper tunes σ
  per data set. The start time T and step count belong to the sampler, not to the denoiser.

Cost: M optimal-denoiser passes, O(M·B·N·H·W·C); memory as `empirical_denoise` with M·B queries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pspc_jax import conventions, validation
from pspc_jax.denoisers.empirical import empirical_denoise

DEFAULT_SMOOTHING = 0.3
DEFAULT_NUM_NOISE = 8


def cfdm_noise(image_shape, num_noise: int = DEFAULT_NUM_NOISE, noise_seed: int = 0,
               antithetic: bool = True) -> jax.Array:
  """The M fixed smoothing draws ε_m ~ N(0, I): (M, H, W, C) float32.

  With `antithetic` and M even, draws M/2 and appends their negatives.
  """
  num_noise = validation.positive_int(num_noise, "num_noise")
  key = jax.random.key(validation.positive_int(noise_seed, "noise_seed", minimum=0))
  if antithetic and num_noise % 2 == 0:
    half = jax.random.normal(key, (num_noise // 2,) + tuple(image_shape), jnp.float32)
    return jnp.concatenate([half, -half])
  return jax.random.normal(key, (num_noise,) + tuple(image_shape), jnp.float32)


def cfdm_denoise(z: jax.Array, sigma, data: jax.Array, smoothing=DEFAULT_SMOOTHING, *,
                 num_noise: int = DEFAULT_NUM_NOISE, noise_seed: int = 0, antithetic: bool = True,
                 chunk_size: int | None = None) -> jax.Array:
  """σ-CFDM denoiser: x̂(z) = (1/M) Σ_m Σ_i softmax_i(−‖z + λ(1+σ)ε_m − x_i‖²/(2σ²)) x_i.

  See the module docstring for the equations, units and choices.

  Args:
    z: (B, H, W, C) float32 noisy images (EDM units).
    sigma: scalar or (B,) noise levels (EDM σ); a batch may mix levels.
    data: (N, H, W, C) training images, uint8 in [0, 255] or float in [-1, 1].
    smoothing: the paper's smoothing parameter σ ≥ 0 (λ above; default `DEFAULT_SMOOTHING` = 0.3), a
      finite real scalar (Python or NumPy number, 0-d array; checked unless traced). A Python 0 gives
      exactly the optimal empirical denoiser.
    num_noise: M, the number of fixed smoothing draws (default 8).
    noise_seed: seed of the draws (`cfdm_noise`), an integer ≥ 0.
    antithetic: draw the ε in pairs (ε, −ε) when M is even.
    chunk_size: dataset rows per streamed chunk (see `empirical_denoise`).

  Returns:
    (B, H, W, C) float32 denoised images; B = 0 gives an empty (0, H, W, C) array.

  Raises:
    ValueError: bad shapes, dtypes or concrete values of z, sigma or data
      (`conventions.check_query_and_data`; a traced σ that is negative or not finite gives NaN), a negative
      or non-finite smoothing, or num_noise, noise_seed, chunk_size that are not integers in range.
  """
  conventions.check_query_and_data(z, data)
  sigma = conventions.sigma_per_sample(sigma, z.shape[0])
  validation.check_non_negative(smoothing, "smoothing")
  if isinstance(smoothing, (int, float)) and smoothing == 0:
    return empirical_denoise(z, sigma, data, chunk_size=chunk_size)
  batch = z.shape[0]
  noise = cfdm_noise(z.shape[1:], num_noise, noise_seed, antithetic)  # (M, H, W, C)
  num = noise.shape[0]
  spread = (jnp.asarray(smoothing, jnp.float32) * (1.0 + sigma)).reshape(batch, 1, 1, 1, 1)
  queries = z.astype(jnp.float32)[:, None] + spread * noise[None]  # (B, M, H, W, C)
  denoised = empirical_denoise(queries.reshape((batch * num,) + z.shape[1:]),
                               jnp.repeat(sigma, num), data, chunk_size=chunk_size)
  return jnp.mean(denoised.reshape((batch, num) + z.shape[1:]), axis=1)
