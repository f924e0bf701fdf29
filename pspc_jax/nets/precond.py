"""Preconditioning around a raw network F (Karras et al. 2022, Table 1; docs/design.md §2 "Network").

D(z, sigma) = c_skip(sigma) · z + c_out(sigma) · F(c_in(sigma) · z, c_noise(sigma)), with the
coefficients of a preconditioning value of `pspc_jax.edm`: `EDMPrecond(sigma_data)` (EDM's own,
the default: c_skip = sd² / (sigma² + sd²), c_out = sigma · sd / sqrt(sigma² + sd²),
c_in = 1 / sqrt(sigma² + sd²), c_noise = ln(sigma) / 4), `VPPrecond` or `VEPrecond` (EDM's
baselines). sigma ≥ 0: at sigma = 0, D = z for all three (the limit c_out → 0).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pspc_jax.edm import EDMPrecond, Preconditioning


def _preconditioning(sigma_data: float | None, precond: Preconditioning | None) -> Preconditioning:
  if precond is not None and sigma_data is not None:
    raise ValueError("give sigma_data (EDM's preconditioning) or precond, not both")
  return precond if precond is not None else EDMPrecond(0.5 if sigma_data is None else sigma_data)


def precond_apply(module: nn.Module, params, z: jnp.ndarray, sigma, *, sigma_data: float | None = None,
                  precond: Preconditioning | None = None, class_labels: jnp.ndarray | None = None,
                  augment_labels: jnp.ndarray | None = None, train: bool = False,
                  rngs: dict[str, jax.Array] | None = None) -> jnp.ndarray:
  """The preconditioned denoiser output D(z, sigma).

  Args:
    module: a network from `pspc_jax.nets.make_network` (called as in `pspc_jax.nets`).
    params: its params (the "params" collection).
    z: (B, H, W, C) noisy images.
    sigma: noise levels, a scalar or (B,).
    sigma_data: the data's standard deviation for EDM's preconditioning (default 0.5).
    precond: the preconditioning (`pspc_jax.edm.EDMPrecond`, `VPPrecond`, `VEPrecond`); default
      `EDMPrecond(sigma_data)`.
    class_labels: passed to the network (None: the network's default, zeros for SongUNet).
    augment_labels: passed to the network (None: no augmentation).
    train: run the network in training mode (dropout).
    rngs: PRNG streams for training mode, e.g. {"dropout": key}.

  Returns:
    (B, H, W, C) float32 denoised images.

  Raises:
    ValueError: both sigma_data and precond given.
  """
  precond = _preconditioning(sigma_data, precond)
  z = jnp.asarray(z, jnp.float32)
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), z.shape[:1])
  coef = precond.coefficients(sigma)
  c_skip, c_out, c_in = (c[:, None, None, None] for c in (coef.c_skip, coef.c_out, coef.c_in))
  # σ = 0 gives D = z exactly (c_skip = 1, c_out = 0); F then runs at σ = 1 rather than at a c_noise
  # such as ln 0 = −inf, whose NaN would survive the product with c_out = 0.
  c_noise = precond.coefficients(jnp.where(sigma > 0, sigma, 1.0)).c_noise
  out = module.apply({"params": params}, c_in * z, c_noise, class_labels=class_labels,
                     augment_labels=augment_labels, train=train, rngs=rngs)
  return c_skip * z + c_out * out.astype(jnp.float32)


def edm_denoiser(module: nn.Module, params, *, sigma_data: float | None = None,
                 precond: Preconditioning | None = None,
                 class_labels: jnp.ndarray | None = None) -> Callable[[jnp.ndarray, Any], jnp.ndarray]:
  """A `denoise(z, sigma) -> x_hat` (pure, jit-compatible) of a preconditioned network.

  Args:
    module: the network.
    params: its params.
    sigma_data: the data's standard deviation for EDM's preconditioning (default 0.5 for images in
      [-1, 1]).
    precond: the preconditioning; default `EDMPrecond(sigma_data)` (see `precond_apply`).
    class_labels: fixed class labels for every call, (B, label_dim) or (1, label_dim); None for an
      unconditional network.

  Returns:
    denoise(z (B, H, W, C), sigma scalar or (B,)) -> (B, H, W, C) float32, in evaluation mode.

  Raises:
    ValueError: both sigma_data and precond given.
  """
  precond = _preconditioning(sigma_data, precond)

  def denoise(z: jnp.ndarray, sigma) -> jnp.ndarray:
    return precond_apply(module, params, z, sigma, precond=precond, class_labels=class_labels)

  return denoise
