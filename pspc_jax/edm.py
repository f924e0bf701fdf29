"""EDM noise-level grid and network preconditioning (Karras et al. 2022; docs/design.md §2, §4).

Noise levels are EDM's sigma (the paper's t, with sigma(t) = t): the forward process is
z = x + sigma * eps.

Preconditionings of a raw network F, D(z, σ) = c_skip z + c_out F(c_in z, c_noise), as hashable values
(static fields of `pspc_jax.NetworkDenoiser`, records in checkpoint sidecars): `EDMPrecond` (EDM's
own), `VPPrecond` and `VEPrecond` (EDM's baselines, Table 1's VP and VE columns).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
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
  """EDM preconditioning coefficients (Karras et al. 2022, Table 1; docs/design.md §2 "Network").

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


# ---------------------------------------------------------------------------------------------------
# EDM's baseline preconditionings (Karras et al. 2022, Table 1): VP (Song et al.'s DDPM++ training) and
# VE (NCSN++), beside EDM's own. Each is written in σ: D(z, σ) = c_skip z + c_out F(c_in z, c_noise).


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1) -> jnp.ndarray:
  """The VP noise level of time t (Table 1): σ(t) = sqrt(exp(½ β_d t² + β_min t) − 1).

  Computed with expm1, so small t keep their relative precision (σ(1e-5) ≈ 1e-3).

  Args:
    t: times in [0, 1], any shape.
    beta_d, beta_min: the schedule's extent and initial slope (EDM's defaults).

  Returns:
    float32 σ with the shape of t.
  """
  t = jnp.asarray(t, jnp.float32)
  return jnp.sqrt(jnp.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1) -> jnp.ndarray:
  """The time of a VP noise level, the inverse of `vp_sigma` (Table 1's σ⁻¹):
  t = (sqrt(β_min² + 2 β_d ln(1 + σ²)) − β_min) / β_d.

  Evaluated as 2 L / (sqrt(β_min² + 2 β_d L) + β_min) with L = log1p(σ²), the same number without the
  cancellation of the difference of square roots, so it keeps float32's relative precision at small σ
  (EDM evaluates the first form in float32, whose 1 + σ² rounds: at σ = 0.002 its t is 1.3 % off,
  at σ = 0.01 0.02 %).

  Args:
    sigma: noise levels ≥ 0, any shape.
    beta_d, beta_min: as `vp_sigma`.

  Returns:
    float32 t with the shape of sigma (0 at σ = 0).
  """
  log_var = jnp.log1p(jnp.asarray(sigma, jnp.float32) ** 2)
  return 2.0 * log_var / (jnp.sqrt(beta_min**2 + 2.0 * beta_d * log_var) + beta_min)


def vp_preconditioning(sigma, beta_d: float = 19.9, beta_min: float = 0.1,
                       M: int = 1000) -> EDMPreconditioning:
  """VP preconditioning (Table 1, EDM's VPPrecond): c_skip = 1, c_out = −σ, c_in = 1 / sqrt(σ² + 1),
  c_noise = (M − 1) σ⁻¹(σ) (`vp_sigma_inv`).

  Args:
    sigma: noise levels ≥ 0, any shape.
    beta_d, beta_min: the VP schedule (`vp_sigma`).
    M: the number of timesteps of the original DDPM formulation.

  Returns:
    EDMPreconditioning of float32 arrays with the shape of sigma.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  return EDMPreconditioning(c_skip=jnp.ones_like(sigma), c_out=-sigma,
                            c_in=jax.lax.rsqrt(sigma**2 + 1.0),
                            c_noise=(M - 1) * vp_sigma_inv(sigma, beta_d, beta_min))


def ve_preconditioning(sigma) -> EDMPreconditioning:
  """VE preconditioning (Table 1, EDM's VEPrecond): c_skip = 1, c_out = σ, c_in = 1,
  c_noise = ln(σ / 2) (−inf at σ = 0). VE's time is t = σ² (σ(t) = √t); the network sees σ only.

  Args:
    sigma: noise levels ≥ 0, any shape.

  Returns:
    EDMPreconditioning of float32 arrays with the shape of sigma.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  return EDMPreconditioning(c_skip=jnp.ones_like(sigma), c_out=sigma, c_in=jnp.ones_like(sigma),
                            c_noise=jnp.log(0.5 * sigma))


def _check_positive(name: str, value: float) -> float:
  value = float(value)
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be positive and finite, got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class EDMPrecond:
  """EDM's own preconditioning (`edm_preconditioning`) as a hashable value.

  Attributes:
    sigma_data: the data's standard deviation (0.5 for images in [-1, 1]).
  """
  sigma_data: float = 0.5
  name: ClassVar[str] = "edm"

  def __post_init__(self):
    object.__setattr__(self, "sigma_data", _check_positive("sigma_data", self.sigma_data))

  def coefficients(self, sigma) -> EDMPreconditioning:
    """The coefficients at `sigma` (any shape; float32)."""
    return edm_preconditioning(sigma, self.sigma_data)


@dataclasses.dataclass(frozen=True)
class VPPrecond:
  """The VP preconditioning of EDM's VPPrecond (`vp_preconditioning`) as a hashable value; fields as
  EDM's constructor arguments (its defaults here).

  Attributes:
    beta_d, beta_min: the VP schedule σ(t) (`vp_sigma`).
    M: DDPM's number of timesteps (c_noise = (M − 1) t).
    epsilon_t: the smallest training time; the network was trained on σ ∈ [σ(epsilon_t), σ(1)]
      (`noise_range`).
  """
  beta_d: float = 19.9
  beta_min: float = 0.1
  M: int = 1000
  epsilon_t: float = 1e-5
  name: ClassVar[str] = "vp"

  def __post_init__(self):
    for field in ("beta_d", "beta_min", "epsilon_t"):
      object.__setattr__(self, field, _check_positive(field, getattr(self, field)))
    object.__setattr__(self, "M", validation.positive_int(self.M, "M", minimum=2))

  def coefficients(self, sigma) -> EDMPreconditioning:
    """The coefficients at `sigma` (any shape; float32)."""
    return vp_preconditioning(sigma, self.beta_d, self.beta_min, self.M)

  def noise_range(self) -> tuple[float, float]:
    """(σ(epsilon_t), σ(1)): the noise levels the network was trained on (EDM's sigma_min/max; EDM
    evaluates σ(epsilon_t) in float32 and stores 9.77e-4 for the defaults, 2.4 % under 1.0005e-3)."""
    with jax.ensure_compile_time_eval():
      low, high = vp_sigma(jnp.asarray([self.epsilon_t, 1.0]), self.beta_d, self.beta_min)
    return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class VEPrecond:
  """The VE preconditioning of EDM's VEPrecond (`ve_preconditioning`) as a hashable value.

  Attributes:
    sigma_min, sigma_max: the noise levels the network was trained on (EDM's defaults 0.02, 100); the
      coefficients do not depend on them.
  """
  sigma_min: float = 0.02
  sigma_max: float = 100.0
  name: ClassVar[str] = "ve"

  def __post_init__(self):
    for field in ("sigma_min", "sigma_max"):
      object.__setattr__(self, field, _check_positive(field, getattr(self, field)))

  def coefficients(self, sigma) -> EDMPreconditioning:
    """The coefficients at `sigma` (any shape; float32)."""
    return ve_preconditioning(sigma)

  def noise_range(self) -> tuple[float, float]:
    """(sigma_min, sigma_max)."""
    return self.sigma_min, self.sigma_max


Preconditioning = EDMPrecond | VPPrecond | VEPrecond
_PRECONDITIONINGS = {cls.name: cls for cls in (EDMPrecond, VPPrecond, VEPrecond)}


def preconditioning_record(precond: Preconditioning) -> dict:
  """A JSON record of a preconditioning value: {"name": "edm" | "vp" | "ve", its fields}."""
  return {"name": precond.name, **dataclasses.asdict(precond)}


def preconditioning_from_record(record) -> Preconditioning:
  """The preconditioning value of a `preconditioning_record` (as checkpoint sidecars store it).

  Raises:
    ValueError: not a dict, an unknown name, unknown or invalid fields.
  """
  if not isinstance(record, dict) or record.get("name") not in _PRECONDITIONINGS:
    raise ValueError(f"a preconditioning record is {{'name': one of {', '.join(_PRECONDITIONINGS)}, "
                     f"...fields}}, got {record!r}")
  cls = _PRECONDITIONINGS[record["name"]]
  fields = {k: v for k, v in record.items() if k != "name"}
  unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"unknown fields of the {record['name']!r} preconditioning: "
                     f"{', '.join(sorted(unknown))}")
  return cls(**fields)
