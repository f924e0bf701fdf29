"""Streaming reductions over a dataset held in memory, chunk by chunk (DESIGN §3).

The denoisers never materialise anything of size N (the dataset size) beyond the dataset itself: they
fold a step function over fixed-size chunks of the data with `lax.scan`, and the softmax normalisers are
kept as running (min distance, sum) pairs merged with the flash-attention rule

    m = min(m_a, m_b),    s = s_a·exp((m_a − m)·scale) + s_b·exp((m_b − m)·scale),   scale = −1/(2σ²),

which is exact in float32 whatever the spread of the logits (at σ = 0.002 the logits are distances
divided by 8e-6).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

Carry = TypeVar("Carry")


def fold_chunks(step: Callable[..., Carry], init: Carry, data: jax.Array, chunk_size: int, *,
                with_offset: bool = False) -> Carry:
  """Folds `step` over consecutive chunks of `data` along axis 0.

  The full chunks go through one `lax.scan`; a final partial chunk (N mod chunk_size rows) is passed to
  `step` once with its own static shape, so nothing is padded or copied and no row is counted twice.

  Args:
    step: `step(carry, chunk) -> carry`, chunk of shape (n, ...) with n ≤ chunk_size; with
      `with_offset`, `step(carry, chunk, offset)` where offset is the chunk's first row index (int32).
    init: initial carry (any pytree).
    data: array of shape (N, ...), N ≥ 1, in any dtype (converted by `step`).
    chunk_size: rows per chunk, ≥ 1.

  Returns:
    The final carry.
  """
  num_rows = data.shape[0]
  chunk_size = max(1, min(int(chunk_size), num_rows))
  num_full = num_rows // chunk_size

  def call(carry, chunk, start):
    return step(carry, chunk, start) if with_offset else step(carry, chunk)

  def body(carry, start):
    return call(carry, lax.dynamic_slice_in_dim(data, start, chunk_size), start), None

  carry, _ = lax.scan(body, init, jnp.arange(num_full, dtype=jnp.int32) * chunk_size)
  if num_full * chunk_size < num_rows:
    carry = call(carry, data[num_full * chunk_size:], jnp.int32(num_full * chunk_size))
  return carry


class SoftminStats(NamedTuple):
  """Running normaliser of a softmax over a stream of squared distances d_i with logits d_i · scale.

  `min_dist` is the smallest distance so far and `total` = Σ_i exp((d_i − min_dist) · scale), so that
  log Σ_i exp(d_i · scale) = min_dist · scale + log(total). Weights are formed as
  exp((d − min_dist) · scale): the subtraction comes first and is exact for nearby distances, and there is
  no product for the compiler to contract into a fused multiply-add with the subtraction. Forming
  exp(d·scale − max) instead lets XLA round d·scale in one place and not in another; at σ = 1e-6 that
  one rounding is hundreds of nats.

  `scale` = −1/(2σ²) < 0 must broadcast against the state (e.g. (B, 1, 1) for a (B, Kh, Kw) state).
  """
  min_dist: jax.Array
  total: jax.Array

  @classmethod
  def empty(cls, shape) -> "SoftminStats":
    """The state of an empty stream (min_dist = +inf, total 0)."""
    return cls(jnp.full(shape, jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32))

  def add(self, dists: jax.Array, scale: jax.Array, axis: int):
    """Merges a chunk of distances along its dataset axis `axis`.

    Returns:
      (new_state, weights, rescale): weights = exp((dists − new min) · scale), shaped like `dists`, and
      rescale = exp((old min − new min) · scale), shaped like the state, by which running numerators
      must be multiplied before adding Σ weights · values of this chunk.
    """
    new_min = jnp.minimum(self.min_dist, jnp.min(dists, axis=axis))
    weights = self.weights(dists, new_min, scale, axis)
    # (inf − finite) · negative scale = −inf → rescale 0 for the empty initial state.
    rescale = jnp.exp((self.min_dist - new_min) * scale)
    return SoftminStats(new_min, self.total * rescale + jnp.sum(weights, axis=axis)), weights, rescale

  @staticmethod
  def weights(dists, min_dist, scale, axis):
    """exp((dists − min_dist) · scale) with min_dist and scale expanded at the dataset axis."""
    gap = jnp.maximum(dists - jnp.expand_dims(min_dist, axis), 0.0)
    return jnp.exp(gap * jnp.expand_dims(scale, axis))

  def merge_across(self, scale: jax.Array, axis_name) -> "SoftminStats":
    """Merges the states held by the devices of mesh axis `axis_name` (inside `jax.shard_map`)."""
    new_min = lax.pmin(self.min_dist, axis_name)
    rescale = jnp.exp((self.min_dist - new_min) * scale)
    return SoftminStats(new_min, lax.psum(self.total * rescale, axis_name))

  def log_normaliser(self, scale: jax.Array) -> jax.Array:
    """log Σ_i exp(d_i · scale)."""
    return self.min_dist * scale + jnp.log(self.total)
