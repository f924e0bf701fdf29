"""EDM noise-level grid and network preconditioning (Karras et al. 2022; DESIGN §2, §4).

Noise levels are EDM's sigma (the paper's t, with sigma(t) = t): the forward process is
z = x + sigma * eps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from pspc_jax import validation


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> jnp.ndarray:
  """The EDM sampling grid (Karras et al. 2022, Eq. 5) followed by a final sigma = 0.

  sigma_i = (sigma_max^(1/rho) + i / (n - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
  i = 0 … n - 1, so sigma_0 = sigma_max and sigma_{n-1} = sigma_min; sigma_n = 0. With a single step
  the grid is [sigma_max, 0]. Computed in float64 and rounded once to float32.

  Args:
    num_steps: n >= 1, the number of sampler steps.
    sigma_min: smallest non-zero noise level, 0 < sigma_min < sigma_max.
    sigma_max: largest noise level (the prior's standard deviation).
    rho: the grid's curvature; larger values put more steps at small sigma.

  Returns:
    float32 array of shape (num_steps + 1,), strictly decreasing, ending in 0.
  """
  num_steps = validation.positive_int(num_steps, "num_steps")
  if not 0.0 < sigma_min < sigma_max:
    raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                     f"sigma_max={sigma_max}")
  if rho <= 0.0:
    raise ValueError(f"rho must be positive, got {rho}")
  if num_steps == 1:
    sigmas = np.array([sigma_max], dtype=np.float64)
  else:
    frac = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
  return jnp.asarray(np.append(sigmas, 0.0), dtype=jnp.float32)


class EDMPreconditioning(NamedTuple):
  """EDM's preconditioning coefficients, each with the shape of sigma.

  The denoiser is D(z, sigma) = c_skip * z + c_out * F(c_in * z, c_noise) for a raw network F.
  """
  c_skip: jnp.ndarray
  c_out: jnp.ndarray
  c_in: jnp.ndarray
  c_noise: jnp.ndarray


def edm_preconditioning(sigma, sigma_data: float = 0.5) -> EDMPreconditioning:
  """EDM preconditioning coefficients (Karras et al. 2022, Table 1; DESIGN §2 "Network").

  With sd = sigma_data: c_skip = sd² / (sigma² + sd²), c_out = sigma * sd / sqrt(sigma² + sd²),
  c_in = 1 / sqrt(sigma² + sd²), c_noise = ln(sigma) / 4.

  Args:
    sigma: noise levels, any shape (scalar or (B,)); c_noise is -inf at sigma = 0.
    sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).

  Returns:
    EDMPreconditioning of float32 arrays with the shape of sigma.
  """
  sigma = jnp.asarray(sigma, dtype=jnp.float32)
  var = sigma**2 + sigma_data**2
  return EDMPreconditioning(
      c_skip=sigma_data**2 / var,
      c_out=sigma * sigma_data / jnp.sqrt(var),
      c_in=1.0 / jnp.sqrt(var),
      c_noise=jnp.log(sigma) / 4.0,
  )
