"""The optimal empirical denoiser (Eq. 6-7) and the logit convention shared by the patch denoisers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pspc_jax import conventions, validation
from pspc_jax.softmin import SoftminStats, fold_chunks, mask_padding, shard_valid_rows

# σ is floored here before dividing by 2σ², so σ = 0 selects the nearest neighbour (up to exact ties,
# which share the weight) instead of producing 0/0.
SIGMA_FLOOR = 1e-12

# Elements of one (B, n, H, W) intermediate per dataset chunk (float32: 4 bytes each).
_CHUNK_ELEMENTS = 1 << 20


def logit_scale(sigma: jax.Array) -> jax.Array:
  """−1/(2σ²) with σ floored at SIGMA_FLOOR; logits are squared distances times this (Eq. 7, 10)."""
  return -0.5 / jnp.square(jnp.maximum(sigma, SIGMA_FLOOR))


def default_chunk_size(batch_size: int, height: int, width: int) -> int:
  """Dataset rows per chunk so that one (B, n, H, W) float32 intermediate stays near 4 MB (fits in cache)."""
  return int(max(8, min(4096, _CHUNK_ELEMENTS // (batch_size * height * width))))


def empirical_denoise(z: jax.Array, sigma, data: jax.Array, *, chunk_size: int | None = None,
                      axis_name=None, valid_rows: int | None = None) -> jax.Array:
  """Optimal empirical denoiser: the posterior mean under the training set as the data distribution.

  x̂(z) = Σ_i w_i x_i with w = softmax_i(−‖z − x_i‖² / (2σ²))  (Eq. 6-7). One streaming pass over the
  dataset with the online softmax merge; exact in float32 down to σ = 0.002 (direct differences).

  Args:
    z: (B, H, W, C) noisy images, float32 in model units.
    sigma: scalar or (B,) noise levels (EDM σ), finite and ≥ 0; a batch may mix levels. σ = 0 gives
      the nearest training image. A traced σ cannot be checked: a sample with a negative or non-finite
      σ gets a NaN output (`conventions.sigma_per_sample`).
    data: (N, H, W, C) training images, uint8 in [0, 255] or float in [-1, 1]. With `axis_name`, this
      device's shard of the dataset.
    chunk_size: dataset rows per streamed chunk (default: from `default_chunk_size`); changes speed
      and memory, not the result beyond float32 rounding.
    axis_name: inside `jax.shard_map`, the mesh axis (or axes) over which the dataset is sharded: each
      device streams its shard, and the (min distance, total, numerator) states are merged across the
      axis with the flash-attention rule (`SoftminStats.merge_values_across`). None: one device, the
      whole dataset.
    valid_rows: the number of real rows of the global dataset; later rows are padding
      (`pspc_jax.distributed.shard_dataset`) and get weight exactly 0. None: no padding.

  Returns:
    (B, H, W, C) float32 denoised images; B = 0 gives an empty (0, H, W, C) array.

  Raises:
    ValueError: bad shapes, dtypes or concrete values of z, sigma or data
      (`conventions.check_query_and_data`, `conventions.sigma_per_sample`), or a chunk_size that is not a positive integer.
  """
  conventions.check_query_and_data(z, data)
  sigma = conventions.sigma_per_sample(sigma, z.shape[0])
  chunk_size = validation.positive_int(chunk_size, "chunk_size", optional=True)
  if z.shape[0] == 0:
    return jnp.zeros(z.shape, jnp.float32)
  batch = z.shape[0]
  scale = logit_scale(sigma)
  flat_z = z.astype(jnp.float32).reshape(batch, -1)
  chunk_size = chunk_size or 4 * default_chunk_size(batch, *z.shape[1:3])
  local_valid = shard_valid_rows(data.shape[0], axis_name, valid_rows)

  def step(carry, chunk, offset=None):
    stats, numerator = carry
    x = conventions.to_model_range(chunk).reshape(chunk.shape[0], -1)
    sq_dists = jnp.sum(jnp.square(flat_z[:, None, :] - x[None, :, :]), axis=-1)  # (B, n)
    sq_dists = mask_padding(sq_dists, offset, local_valid, axis=1)
    stats, weights, rescale = stats.add(sq_dists, scale, axis=1)
    numerator = numerator * rescale[:, None] + jnp.dot(weights, x, precision=lax.Precision.HIGHEST)
    return stats, numerator

  init = (SoftminStats.empty((batch,)), jnp.zeros_like(flat_z))
  stats, numerator = fold_chunks(step, init, data, chunk_size, with_offset=local_valid is not None)
  if axis_name is not None:
    stats, numerator = stats.merge_values_across(scale, axis_name, numerator)
  return (numerator / stats.total[:, None]).reshape(z.shape)
