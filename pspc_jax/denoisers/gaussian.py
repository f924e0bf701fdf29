"""The Gaussian denoiser: the posterior mean under a Gaussian fit of the data (DESIGN §2).

If x ~ N(mu, Sigma) and z = x + sigma * eps, then E[x | z] = mu + Sigma (Sigma + sigma² I)^-1 (z - mu)
(Wang & Vastola 2024; Li et al. 2024). With Sigma = U diag(lambda) U^T this is
mu + U diag(lambda / (lambda + sigma²)) U^T (z - mu), applied as two (B, D) x (D, r) products.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pspc_jax.images import sigma_per_sample, to_model_range
from pspc_jax.reduce import fold_chunks

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


def gaussian_stats(data, rank: int | None = None, chunk_size: int = 4096) -> GaussianStats:
  """Population mean and covariance of a dataset, eigendecomposed.

  Two streaming passes over the data (`fold_chunks`), so only one chunk is ever held as float32: the first sums the
  images to get mu, the second sums the centred outer products (x - mu)(x - mu)^T (no E[xx^T] - mu mu^T
  cancellation). Sigma is divided by N (population covariance), decomposed with `jnp.linalg.eigh`, and
  round-off negative eigenvalues are clipped to 0.

  Args:
    data: (N, H, W, C) images, uint8 in [0, 255] or floating point in [-1, 1]; a NumPy or JAX array.
    rank: keep only the top `rank` eigenpairs (1 <= rank <= D); None keeps all D.
    chunk_size: images per chunk; peak memory is about chunk_size * D + 3 D² floats.

  Returns:
    GaussianStats with r = rank (or D) eigenpairs.
  """
  if data.ndim != 4 or data.shape[0] == 0:
    raise ValueError(f"data must have shape (N, H, W, C) with N >= 1, got {data.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  num, dim = data.shape[0], data.shape[1] * data.shape[2] * data.shape[3]
  if rank is not None and not 1 <= rank <= dim:
    raise ValueError(f"rank must be in [1, {dim}], got {rank}")
  data = jnp.asarray(data)

  def add_images(total, chunk):
    return total + jnp.sum(to_model_range(chunk), axis=0)

  mean = fold_chunks(add_images, jnp.zeros(data.shape[1:], jnp.float32), data, chunk_size) / num

  def add_scatter(total, chunk):
    centred = (to_model_range(chunk) - mean).reshape(chunk.shape[0], -1)
    return total + jnp.matmul(centred.T, centred, precision=_HIGHEST)

  cov = fold_chunks(add_scatter, jnp.zeros((dim, dim), jnp.float32), data, chunk_size) / num
  eigvals, eigvecs = jnp.linalg.eigh(cov)
  keep = dim if rank is None else rank
  eigvals = jnp.maximum(eigvals[::-1][:keep], 0.0)
  eigvecs = eigvecs[:, ::-1][:, :keep]
  return GaussianStats(mean=mean, eigvals=eigvals, eigvecs=eigvecs)


def gaussian_denoise(z, sigma, stats: GaussianStats) -> jnp.ndarray:
  """Posterior mean under N(mu, Sigma): x_hat = mu + U diag(lambda / (lambda + sigma²)) U^T (z - mu).

  Works in the r-dimensional eigenbasis, so the cost is O(B * D * r) and no (B, D, D) array is formed.
  At sigma = 0 every kept direction with a positive eigenvalue passes unchanged: the result is the
  projection onto the kept subspace (the identity at full rank). An eigenvalue clipped to 0 gets the
  factor 0 (the sigma -> 0 limit) instead of 0/0. Round-off leaves the null directions of a
  rank-deficient covariance with eigenvalues of order 1e-7 * lambda_max rather than 0, so pass `rank`
  to :func:`gaussian_stats` to project onto the data's span. As sigma -> inf the result tends to mu.

  Args:
    z: (B, H, W, C) noisy images.
    sigma: noise level, a scalar or (B,) (one per sample, may be mixed).
    stats: the Gaussian fit, with mean of shape (H, W, C).

  Returns:
    float32 (B, H, W, C) denoised images.
  """
  z = jnp.asarray(z, dtype=jnp.float32)
  if z.ndim != 4 or z.shape[1:] != stats.mean.shape:
    raise ValueError(f"z must have shape (B, *{stats.mean.shape}), got {z.shape}")
  batch = z.shape[0]
  var = sigma_per_sample(sigma, batch)[:, None] ** 2
  mean = stats.mean.reshape(-1)
  coords = jnp.matmul(z.reshape(batch, -1) - mean, stats.eigvecs, precision=_HIGHEST)
  total = stats.eigvals + var
  shrink = jnp.where(total > 0, stats.eigvals / jnp.where(total > 0, total, 1.0), 0.0)
  x_hat = mean + jnp.matmul(coords * shrink, stats.eigvecs.T, precision=_HIGHEST)
  return x_hat.reshape(z.shape)
