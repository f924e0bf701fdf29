"""Exact nearest training images, streamed over the dataset (the memorisation view of a sample)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pspc_jax import conventions
from pspc_jax.softmin import fold_chunks


def nearest_neighbours(queries: jax.Array, data: jax.Array, k: int = 2, *, chunk_size: int = 1024):
  """The k training images closest in Euclidean distance to each query.

  A running top-k is merged chunk by chunk, so memory does not grow with N. Distances come from direct
  differences.

  Args:
    queries: (B, H, W, C) float32 images in [-1, 1].
    data: (N, H, W, C) uint8 or float training images, N ≥ k.
    k: neighbours per query.
    chunk_size: dataset rows per chunk.

  Returns:
    (distances, indices): (B, k) float32 Euclidean distances ‖q − x_i‖ in model units, ascending, and
    (B, k) int32 dataset indices.
  """
  conventions.check_query_and_data(queries, data)
  if not 1 <= k <= data.shape[0]:
    raise ValueError(f"k must be between 1 and the dataset size {data.shape[0]}, got {k}")
  batch = queries.shape[0]
  flat_q = queries.astype(jnp.float32).reshape(batch, -1)

  def step(carry, chunk, offset):
    best_neg, best_idx = carry
    x = conventions.to_model_range(chunk).reshape(chunk.shape[0], -1)
    sq = jnp.sum(jnp.square(flat_q[:, None, :] - x[None]), axis=-1)  # (B, n)
    idx = offset + jnp.arange(chunk.shape[0], dtype=jnp.int32)
    neg = jnp.concatenate([best_neg, -sq], axis=1)
    all_idx = jnp.concatenate([best_idx, jnp.broadcast_to(idx, sq.shape)], axis=1)
    best_neg, pos = lax.top_k(neg, k)
    return best_neg, jnp.take_along_axis(all_idx, pos, axis=1)

  init = (jnp.full((batch, k), -jnp.inf, jnp.float32), jnp.zeros((batch, k), jnp.int32))
  neg, idx = fold_chunks(step, init, data, chunk_size, with_offset=True)
  return jnp.sqrt(-neg), idx
