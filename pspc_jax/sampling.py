"""Probability-flow ODE samplers: Euler, Heun and EDM's stochastic churn (docs/design.md §5).

The sampler integrates the PF-ODE dz/dsigma = (z - D(z, sigma)) / sigma (Karras et al. 2022, Eq. 1
with sigma(t) = t, s(t) = 1) from z(sigma_0) = sigma_0 * latents down a decreasing grid of noise
levels, usually :func:`pspc_jax.edm.edm_sigmas`. Any denoiser `denoise(z, sigma) -> x_hat`
(docs/design.md §1) can drive it.

Randomness is per image: image k's key is `fold_in(key(0), seed_k)`, so a sample depends only on its own
seed, never on the batch size or the number of devices.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import validation

SOLVERS = ("euler", "heun")
# Seeds are held as int32: one past the largest.
MAX_SEED = 2**31


class Trajectory(NamedTuple):
  """A sampler's path, for figures and reverse-process evaluation sets.

  Attributes:
    z: (N + 1, B, H, W, C) float32 states z(sigma_i) on the grid, from the prior
      z_0 = sigma_0 * latents to the returned samples z_N.
    denoised: (N, B, H, W, C) float32 denoiser outputs D(z_hat_i, sigma_hat_i) of step i's first call
      (z_hat_i = z_i and sigma_hat_i = sigma_i unless the step churns).
  """
  z: jnp.ndarray
  denoised: jnp.ndarray


def seed_keys(seeds) -> jax.Array:
  """One PRNG key per image: `jax.random.fold_in(jax.random.key(0), seed)`.

  Args:
    seeds: (B,) integer seeds in [0, 2³¹), a list or an array; may be traced (then unchecked).

  Returns:
    (B,) typed PRNG key array.

  Raises:
    ValueError: not a 1-D integer array, or a concrete seed outside [0, 2³¹) (JAX holds seeds as
      int32, so 2³² would silently become seed 0 and −1 would share a key with 2³² − 1).
  """
  if validation.is_concrete(seeds):
    values = np.asarray(seeds)
    if values.dtype.kind in "iu" and values.size and (values.min() < 0 or values.max() >= MAX_SEED):
      raise ValueError(f"seeds must lie in [0, {MAX_SEED}), got {int(values.min())} … "
                       f"{int(values.max())}")
  seeds = jnp.asarray(seeds)
  if seeds.ndim != 1 or not jnp.issubdtype(seeds.dtype, jnp.integer):
    raise ValueError(f"seeds must be a 1-D integer array, got {seeds.dtype}{list(seeds.shape)}")
  base = jax.random.key(0)
  return jax.vmap(lambda seed: jax.random.fold_in(base, seed))(seeds)


def latents_from_seeds(seeds, shape) -> jnp.ndarray:
  """Standard normal latents, each drawn from its own seed's key (:func:`seed_keys`).

  :func:`sample` multiplies the latents by sigmas[0] to get the prior z ~ N(0, sigma_0² I).

  Args:
    seeds: (B,) integer seeds.
    shape: the shape of one image, (H, W, C).

  Returns:
    float32 array of shape (B, H, W, C); entry k depends only on seeds[k].
  """
  shape = tuple(validation.positive_int(side, "shape") for side in shape)
  return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(seed_keys(seeds))


def sample(denoise: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray], latents, sigmas, *,
           solver: str = "heun", s_churn: float = 0.0, s_min: float = 0.0,
           s_max: float = float("inf"), s_noise: float = 1.0, keys=None,
           return_trajectory: bool = False,
           progress: Callable[[int, int, float], None] | None = None):
  """Solves the PF-ODE dz/dsigma = (z - D(z, sigma)) / sigma from sigmas[0] down to sigmas[-1].

  Step i goes from sigma_i to sigma_{i+1} (Karras et al. 2022, Alg. 2):
    * churn: gamma = min(s_churn / N, sqrt(2) - 1) if s_min <= sigma_i <= s_max else 0;
      sigma_hat = sigma_i (1 + gamma); z_hat = z_i + sqrt(sigma_hat² - sigma_i²) * s_noise * eps, where
      image b's eps is drawn from `fold_in(keys[b], i)`. Without churn z_hat = z_i, sigma_hat = sigma_i.
    * Euler: d = (z_hat - D(z_hat, sigma_hat)) / sigma_hat;
      z_{i+1} = z_hat + (sigma_{i+1} - sigma_hat) d.
    * Heun: if sigma_{i+1} > 0, also d' = (z_{i+1} - D(z_{i+1}, sigma_{i+1})) / sigma_{i+1} and
      z_{i+1} = z_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2 (the trapezoidal rule). The correction is
      skipped on a step to sigma = 0, so an N-step EDM grid costs 2N - 1 denoiser calls (Euler: N).

  The loop is a `jax.lax.scan`, so the whole sampler can be jitted (with `denoise` closed over);
  sigmas may be traced, while solver, s_churn, return_trajectory and progress must be static. A
  concrete grid is checked (see `sigmas` below); a traced one cannot be: a negative or non-finite σ in
  it makes the denoiser outputs, hence the samples, NaN (`conventions.sigma_per_sample`), and a rising
  traced grid is integrated as given.

  Args:
    denoise: `denoise(z, sigma) -> x_hat` with z (B, H, W, C) and sigma a scalar.
    latents: (B, H, W, C) finite standard normal latents (see :func:`latents_from_seeds`); the prior
      is z_0 = sigmas[0] * latents. B = 0 gives an empty (0, H, W, C) result.
    sigmas: (N + 1,) noise levels, N ≥ 1, non-increasing from σ_max, finite and positive except
      possibly the last (usually 0).
    solver: "euler" or "heun".
    s_churn: EDM's S_churn >= 0, the total amount of churn over the N steps; 0 gives the deterministic
      sampler.
    s_min: churn only steps with sigma_i >= s_min.
    s_max: churn only steps with sigma_i <= s_max.
    s_noise: EDM's S_noise, the scale of the fresh noise.
    keys: (B,) PRNG keys, one per image (see :func:`seed_keys`); required when s_churn > 0.
    return_trajectory: also return the :class:`Trajectory`.
    progress: optional `progress(step_index, num_steps, sigma_i)`, called once per step, in order, from
      inside the scan through `jax.debug.callback`.

  Returns:
    float32 samples z_N of shape (B, H, W, C), or `(samples, Trajectory)` if return_trajectory.

  Raises:
    ValueError: unknown solver; s_churn or s_noise negative or not finite; latents not (B, H, W, C)
      or (concrete) not finite; sigmas not a grid as above (values checked when concrete).
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
  validation.check_non_negative(s_churn, "s_churn")
  validation.check_non_negative(s_noise, "s_noise")
  validation.check_sigma_grid(sigmas)
  latents = jnp.asarray(latents, dtype=jnp.float32)
  sigmas = jnp.asarray(sigmas, dtype=jnp.float32)
  if latents.ndim != 4:
    raise ValueError(f"latents must have shape (B, H, W, C), got {latents.shape}")
  validation.check_finite(latents, "latents")
  num_steps = sigmas.shape[0] - 1
  churn = s_churn > 0
  if churn:
    if keys is None:
      raise ValueError("keys (one per image) are required when s_churn > 0")
    if keys.shape[0] != latents.shape[0]:
      raise ValueError(f"need one key per image: {keys.shape[0]} keys for {latents.shape[0]} images")
    gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

  def step(z, inputs):
    index, sigma, sigma_next = inputs
    if progress is not None:
      jax.debug.callback(lambda i, s: progress(int(i), num_steps, float(s)), index, sigma, ordered=True)
    if churn:
      gamma = jnp.where((sigma >= s_min) & (sigma <= s_max), gamma_max, 0.0)
      sigma_hat = sigma * (1.0 + gamma)
      eps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, index), z.shape[1:]))(keys)
      # sqrt(sigma_hat² - sigma²), without the cancellation that can make it NaN at gamma = 0.
      z_hat = z + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * eps
    else:
      sigma_hat, z_hat = sigma, z
    x_hat = denoise(z_hat, sigma_hat)
    slope = (z_hat - x_hat) / sigma_hat
    z_euler = z_hat + (sigma_next - sigma_hat) * slope
    if solver == "heun":
      def correct():
        slope_next = (z_euler - denoise(z_euler, sigma_next)) / sigma_next
        return z_hat + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)
      z_next = jax.lax.cond(sigma_next > 0, correct, lambda: z_euler)
    else:
      z_next = z_euler
    return z_next, ((z_next, x_hat) if return_trajectory else None)

  z0 = latents * sigmas[0]
  steps = (jnp.arange(num_steps), sigmas[:-1], sigmas[1:])
  samples, path = jax.lax.scan(step, z0, steps)
  if not return_trajectory:
    return samples
  states, denoised = path
  return samples, Trajectory(z=jnp.concatenate([z0[None], states]), denoised=denoised)
