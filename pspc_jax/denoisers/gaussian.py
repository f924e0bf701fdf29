"""The Gaussian denoiser: the posterior mean under a Gaussian fit of the data (docs/design.md §2).

If x ~ N(mu, Sigma) and z = x + sigma * eps, then E[x | z] = mu + Sigma (Sigma + sigma² I)^-1 (z - mu)
(Wang & Vastola 2024; Li et al. 2024). With Sigma = U diag(lambda) U^T this is
mu + U diag(lambda / (lambda + sigma²)) U^T (z - mu), applied as two (B, D) x (D, r) products.

Precision. The fit (mean, covariance, eigendecomposition) is a one-off cost and is computed in float64
with NumPy/LAPACK on the host: float32 `eigh` cannot resolve the many small eigenvalues of image data
(1,726 of CIFAR-10's 3,072 are below 1e-4, where float32 round-off is about 1e-5), and at sigma = 0.002
(sigma² = 4e-6) those are exactly the ones that decide the output. The application runs in float32 at
`Precision.HIGHEST`; see `gaussian_denoise` for the form that keeps its error small at every sigma.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import validation
from pspc_jax.conventions import sigma_per_sample

_HIGHEST = jax.lax.Precision.HIGHEST


class GaussianStats(NamedTuple):
  """A Gaussian fit of a dataset of images, with D = H * W * C.

  Attributes:
    mean: (H, W, C) float32 mean image mu.
    eigvals: (r,) float32 eigenvalues of the covariance Sigma, descending and >= 0.
    eigvecs: (D, r) float32 matching orthonormal eigenvectors U as columns, indexed by the flattened
      (H, W, C) pixel order.
  """
  mean: jnp.ndarray
  eigvals: jnp.ndarray
  eigvecs: jnp.ndarray


def _float64_rows(chunk) -> np.ndarray:
  """(n, H, W, C) uint8 in [0, 255] or float in [-1, 1] → (n, D) float64 in [-1, 1] (exact for uint8)."""
  chunk = np.asarray(chunk)
  rows = chunk.reshape(chunk.shape[0], -1).astype(np.float64)
  return rows / 127.5 - 1.0 if chunk.dtype == np.uint8 else rows


def _float64_moments(data, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Float64 mean (D,) and population covariance (D, D), two passes of `chunk_size` rows each.

  Only one chunk is ever converted to float64; the second pass sums the centred outer products
  (x - mu)(x - mu)^T, so there is no E[xx^T] - mu mu^T cancellation.
  """
  num = data.shape[0]
  starts = range(0, num, chunk_size)
  total = sum(_float64_rows(data[s:s + chunk_size]).sum(axis=0) for s in starts)
  mean = total / num
  scatter = 0.0
  for s in starts:
    centred = _float64_rows(data[s:s + chunk_size]) - mean
    scatter = scatter + centred.T @ centred
  return mean, scatter / num


def _descending_eigh(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigenpairs of a float64 covariance, descending, with round-off eigenvalues set to exactly 0.

  The threshold is D * eps64 * lambda_max (eps64 = 2.2e-16; 6.8e-13 * lambda_max for D = 3,072), the
  bound on the round-off of a float64 eigendecomposition (backward error of order D * eps64 *
  ||Sigma||) and, in practice, of the float64 scatter sums. The null directions of a rank-deficient
  covariance (N <= D images span at most N - 1 directions) come out of LAPACK far below it, positive or
  negative, and get exactly 0, so that the denoiser keeps nothing along them. Measured: null
  eigenvalues within 2e-16 * lambda_max of 0 (32 digits) and 1e-17 * lambda_max (3,000 CIFAR-10
  images), whose smallest genuine eigenvalue is 2e-11 * lambda_max, 30 times above the threshold. Data
  in [-1, 1] have lambda_max <= D, so the threshold is at most D² * eps64 (2e-9 for CIFAR-10), below
  1e-3 sigma² even at sigma = 0.002: a genuine eigenvalue that small is shrunk almost to 0 anyway.
  """
  eigvals, eigvecs = np.linalg.eigh(cov)
  eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
  threshold = cov.shape[0] * np.finfo(np.float64).eps * max(eigvals[0], 0.0)
  return np.where(eigvals > threshold, eigvals, 0.0), eigvecs


def gaussian_stats(data, rank: int | None = None, chunk_size: int = 4096) -> GaussianStats:
  """Population mean and covariance of a dataset, eigendecomposed in float64.

  Two streaming passes over the data on the host, `chunk_size` images at a time, accumulate the mean
  and the centred scatter matrix in float64 (so a 100,000-image set never needs a float64 copy);
  Sigma is divided by N (population covariance) and decomposed with float64 LAPACK `eigh`.
  Eigenvalues that are round-off (at most D * eps64 * lambda_max, see `_descending_eigh`) are set to
  exactly 0: with N <= D images the D - N + 1 (or more) null directions of Sigma are exact zeros.
  The result is rounded once to float32. Needs concrete data (not traced under `jit`).

  Args:
    data: (N, H, W, C) images, uint8 in [0, 255] or floating point in [-1, 1]; a NumPy or JAX array.
    rank: keep only the top `rank` eigenpairs (1 <= rank <= D); None keeps all D.
    chunk_size: images per chunk; peak host memory is about chunk_size * D + 3 D² float64 values.

  Returns:
    GaussianStats (float32) with r = rank (or D) eigenpairs.

  Raises:
    ValueError: data not (N, H, W, C) with N >= 1, neither uint8 nor float in [-1, 1]
      (`validation.check_data`), chunk_size not an integer >= 1, or rank not an integer in [1, D].
  """
  if data.ndim != 4 or data.shape[0] == 0:
    raise ValueError(f"data must have shape (N, H, W, C) with N >= 1, got {data.shape}")
  validation.check_data(data)
  chunk_size = validation.positive_int(chunk_size, "chunk_size")
  rank = validation.positive_int(rank, "rank", optional=True)
  dim = data.shape[1] * data.shape[2] * data.shape[3]
  if rank is not None and not 1 <= rank <= dim:
    raise ValueError(f"rank must be in [1, {dim}], got {rank}")
  mean, cov = _float64_moments(data, chunk_size)
  eigvals, eigvecs = _descending_eigh(cov)
  keep = dim if rank is None else rank
  return GaussianStats(mean=jnp.asarray(mean.reshape(data.shape[1:]), jnp.float32),
                       eigvals=jnp.asarray(eigvals[:keep], jnp.float32),
                       eigvecs=jnp.asarray(eigvecs[:, :keep], jnp.float32))


def _shrink_factors(eigvals, var):
  """keep = lambda / (lambda + sigma²) and drop = sigma² / (lambda + sigma²), each to float32 precision.

  Args:
    eigvals: (r,) eigenvalues >= 0.
    var: (B, 1) sigma² in [0, inf] (inf when sigma² overflows float32, sigma > 1.8e19).

  Returns:
    keep, drop: (B, r), keep + drop = 1. A zero eigenvalue gets keep = 0, drop = 1 at every sigma (the
    sigma -> 0 limit at sigma = 0); var = inf gives keep = 0, drop = 1. Every branch is guarded so
    that derivatives in sigma are finite for 0 <= sigma < inf.
  """
  positive = eigvals > 0
  ratio = var / jnp.where(positive, eigvals, 1.0)  # t = sigma² / lambda, in [0, inf]
  small = ratio < 1
  low = jnp.where(small, ratio, 0.0)
  high = jnp.where(small, 1.0, ratio)
  keep = jnp.where(positive, 1.0 / (1.0 + ratio), 0.0)
  drop = jnp.where(small, low / (1.0 + low), 1.0 / (1.0 + 1.0 / high))
  return keep, jnp.where(positive, drop, 1.0)


def gaussian_denoise(z, sigma, stats: GaussianStats) -> jnp.ndarray:
  """Posterior mean under N(mu, Sigma): x_hat = mu + U diag(lambda / (lambda + sigma²)) U^T (z - mu).

  Works in the r-dimensional eigenbasis, so the cost is O(B * D * r) and no (B, D, D) array is formed.
  With c = U^T (z - mu), keep = lambda / (lambda + sigma²) and drop = sigma² / (lambda + sigma²):

  * "from the mean": x_hat = mu + U (keep * c); its float32 error is about eps32 * ||keep * c||, small
    at large sigma (keep -> 0);
  * "from z": x_hat = z - U (drop * c), equal when U is a complete basis (r = D, U U^T = I); its error
    is about eps32 * ||drop * c||, small at small sigma (drop -> 0 for lambda >> sigma²).

  Each sample uses the form whose back-projected vector is shorter, so the error stays near eps32 times
  the smaller of the correction and the estimate's offset from mu. A zero eigenvalue (a null direction
  of a rank-deficient covariance, see `gaussian_stats`) has keep = 0 and drop = 1 at every sigma, so the
  output lies in mu + span{u : lambda > 0} (up to float32 rounding) in both forms. With rank < D only
  the first form exists: the output is projected onto the kept subspace. At sigma = 0 the result is
  the projection onto span{u : lambda > 0}; as sigma -> inf it tends to mu (exactly mu once sigma²
  overflows float32).

  Args:
    z: (B, H, W, C) noisy images.
    sigma: noise level, a scalar or (B,) (one per sample, may be mixed), finite and >= 0 (ValueError
      when concrete; a traced sigma that is negative or not finite gives a NaN output for its sample).
    stats: the Gaussian fit, with mean of shape (H, W, C); may be traced (a `jit` argument).

  Returns:
    float32 (B, H, W, C) denoised images; B = 0 gives an empty (0, H, W, C) array.

  Raises:
    ValueError: z of the wrong shape or (concrete) not finite, or a bad concrete sigma.
  """
  z = jnp.asarray(z, dtype=jnp.float32)
  if z.ndim != 4 or z.shape[1:] != stats.mean.shape:
    raise ValueError(f"z must have shape (B, *{stats.mean.shape}), got {z.shape}")
  validation.check_finite(z, "z")
  var = sigma_per_sample(sigma, z.shape[0])[:, None] ** 2
  if z.shape[0] == 0:
    return z
  batch = z.shape[0]
  mean = stats.mean.reshape(-1)
  flat = z.reshape(batch, -1)
  coords = jnp.matmul(flat - mean, stats.eigvecs, precision=_HIGHEST)  # (B, r)
  keep, drop = _shrink_factors(stats.eigvals, var)
  kept = keep * coords
  step, base = kept, mean
  if stats.eigvecs.shape[0] == stats.eigvecs.shape[1]:
    removed = drop * coords
    from_z = (jnp.sum(jnp.square(removed), axis=1) < jnp.sum(jnp.square(kept), axis=1))[:, None]
    step = jnp.where(from_z, -removed, kept)
    base = jnp.where(from_z, flat, mean)
  x_hat = base + jnp.matmul(step, stats.eigvecs.T, precision=_HIGHEST)
  return x_hat.reshape(z.shape)
