"""The streaming softmin over a dataset held in memory, chunk by chunk (docs/design.md §3).

The denoisers never materialise anything of size N (the dataset size) beyond the dataset itself: they
fold a step function over fixed-size chunks of the data with `lax.scan`, and the softmax normalisers are
kept as running (min distance, sum) pairs merged with the flash-attention rule

    m = min(m_a, m_b),    s = s_a·exp((m_a − m)·scale) + s_b·exp((m_b − m)·scale),   scale = −1/(2σ²),

which is exact in float32 whatever the spread of the logits (at σ = 0.002 the logits are distances
divided by 8e-6).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

Carry = TypeVar("Carry")


def fold_chunks(step: Callable[..., Carry], init: Carry, data: jax.Array, chunk_size: int, *,
                with_offset: bool = False, prepare: Callable[[jax.Array], Any] | None = None,
                start: int = 0) -> Carry:
  """Folds `step` over consecutive chunks of `data[start:]` along axis 0.

  The full chunks go through one `lax.scan`; a final partial chunk (N mod chunk_size rows) is passed to
  `step` once with its own static shape, so nothing is padded or copied and no row is counted twice.

  Args:
    step: `step(carry, chunk) -> carry`, chunk of shape (n, ...) with n ≤ chunk_size; with
      `with_offset`, `step(carry, chunk, offset)` where offset is the chunk's first row index (int32).
    init: initial carry (any pytree).
    data: array of shape (N, ...), N ≥ 1, in any dtype (converted by `step`).
    chunk_size: rows per chunk, ≥ 1.
    with_offset: pass each chunk's first row index to `step`.
    prepare: optional `prepare(raw_chunk) -> prepared` (any pytree); `step` then receives the prepared
      chunk instead of the raw rows. See `scan_chunks` for why this is more than a convenience.
    start: first row folded (static); rows before it are skipped without copying `data`.

  Returns:
    The final carry (`init` if start = N).
  """
  num_rows = data.shape[0]
  if not 0 <= start <= num_rows:
    raise ValueError(f"start row {start} is outside [0, {num_rows}]")
  chunk_size = max(1, min(int(chunk_size), max(1, num_rows - start)))
  num_full = (num_rows - start) // chunk_size
  prepare_fn = prepare if prepare is not None else (lambda chunk: chunk)

  def call(carry, chunk, offset):
    return (step(carry, chunk, offset) if with_offset else step(carry, chunk)), None

  carry = init
  if num_full:
    carry, _ = scan_chunks(call, carry, data, chunk_size, num_full, start=start, prepare=prepare,
                           with_offset=True)
  tail = start + num_full * chunk_size
  if tail < num_rows:
    carry, _ = call(carry, prepare_fn(data[tail:]), jnp.int32(tail))
  return carry


def scan_chunks(step: Callable[..., tuple[Carry, Any]], init: Carry, data: jax.Array, chunk_size: int,
                num_chunks: int, *, start: int = 0, xs: Any = None,
                prepare: Callable[[jax.Array], Any] | None = None, with_offset: bool = False):
  """Scans `step` over `num_chunks` full chunks data[start + k·chunk_size : start + (k+1)·chunk_size].

  `step(carry, chunk[, x_k][, offset]) -> (carry, y_k)`; the y_k are stacked like `lax.scan` outputs,
  `x_k` are the slices of `xs` along its leading axis (given only when `xs` is not None) and `offset` the
  chunk's first row (int32, with `with_offset`).

  With `prepare`, chunk k+1 is prepared during iteration k and handed over in the loop carry. A loop
  carry is always a materialised buffer, so the prepared chunk (e.g. converted to float32 and transposed
  so that the dataset axis is minor) is computed once per chunk; computed inside `step`, XLA would fuse
  the conversion and the transposed reads into every consumer, i.e. redo them for every query. (The last
  iteration prepares the first chunk again and drops it, so every step runs inside the loop and the
  outputs are stacked without a copy.)

  Returns:
    (final carry, stacked outputs).
  """
  if num_chunks < 1 or start + num_chunks * chunk_size > data.shape[0]:
    raise ValueError(f"{num_chunks} chunks of {chunk_size} rows from row {start} do not fit in "
                     f"{data.shape[0]} rows")
  prepare_fn = prepare if prepare is not None else (lambda chunk: chunk)
  starts = start + jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size

  def rows(begin):
    return lax.dynamic_slice_in_dim(data, begin, chunk_size)

  def call(carry, chunk, x, begin):
    args = (carry, chunk) + ((x,) if xs is not None else ()) + ((begin,) if with_offset else ())
    return step(*args)

  if prepare is None:
    def body(carry, inputs):
      begin, x = inputs
      return call(carry, rows(begin), x, begin)

    return lax.scan(body, init, (starts, xs))

  def pipelined_body(carry, inputs):
    state, prepared = carry
    begin, following, x = inputs
    state, out = call(state, prepared, x, begin)
    return (state, prepare_fn(rows(following))), out

  following = jnp.roll(starts, -1)
  first = prepare_fn(lax.slice_in_dim(data, start, start + chunk_size))
  (carry, _), outs = lax.scan(pipelined_body, (init, first), (starts, following, xs))
  return carry, outs


def same_values(dists: jax.Array) -> jax.Array:
  """Distances as every consumer (minimum, exponentials, this pass and the next) must see them.

  Two guards, both exact no-ops on the values: `lax.optimization_barrier` materialises the distances
  once where the compiler keeps barriers through fusion (GPU, TPU), and max(d, 0) fixes their last
  rounding where it does not (XLA CPU drops barriers before fusing and recomputes the distances inside
  every consumer). Without the max, LLVM contracts a distance that ends in a product (one channel and
  one-pixel windows: d = a·a) with the gap subtraction into fma(a, a, −m) in the exp fusion, i.e. uses
  the exact a² there and the rounded a² in the min fusion; it cannot contract through the max.
  """
  return jnp.maximum(lax.optimization_barrier(dists), 0.0)


def exp_gap(values: jax.Array, reference: jax.Array, scale: jax.Array) -> jax.Array:
  """exp((values − reference) · scale) for values ≥ reference and scale < 0, safe to differentiate.

  A +inf value (padding, a masked pair, the minimum of an empty stream) gives exactly 0, and its
  derivatives are 0 rather than 0·inf = NaN (the gap fed to exp is replaced by 0 there, so no
  infinite factor reaches the chain rule). A value below the reference, which only a rounding mismatch
  between two computations of the same distance could produce, counts as the reference (weight 1, never
  > 1). At values = reference the gap keeps its derivative (d values), as a stopped reference needs.
  """
  present = values < jnp.inf
  gap = jnp.where(present & (values >= reference), values - reference, 0.0)
  return jnp.where(present, jnp.exp(gap * scale), 0.0)


def exp_gap_finite(values: jax.Array, reference: jax.Array, scale: jax.Array) -> jax.Array:
  """`exp_gap` for finite values (no padding row, no empty state): exp(max(values − reference, 0)·scale).

  The same numbers as `exp_gap` wherever the values are finite, without its two selects, so that the
  exponentials of a large chunk compile to one plain elementwise loop. A value below the reference (only
  a rounding mismatch between two computations of the same distance could produce one) counts as the
  reference, weight 1. Derivatives: those of exp((values − reference)·scale), i.e. the gap keeps its
  derivative (the clamp is a stopped correction that is 0 unless that mismatch occurs).
  """
  gap = values - reference
  gap = gap + lax.stop_gradient(jnp.maximum(gap, 0.0) - gap)
  return jnp.exp(gap * scale)


class SoftminStats(NamedTuple):
  """Running normaliser of a softmax over a stream of squared distances d_i with logits d_i · scale.

  `min_dist` is the smallest distance so far and `total` = Σ_i exp((d_i − min_dist) · scale), so that
  log Σ_i exp(d_i · scale) = min_dist · scale + log(total). Weights are formed as
  exp((d − min_dist) · scale): the subtraction comes first and is exact for nearby distances, and there is
  no product for the compiler to contract into a fused multiply-add with the subtraction. Forming
  exp(d·scale − max) instead lets XLA round d·scale in one place and not in another; at σ = 1e-6 that
  one rounding is hundreds of nats.

  The same values feed the minimum and the exponentials (`same_values`): XLA recomputes cheap
  producers inside each consumer fusion, and a distance that differs by one rounding between the min
  fusion and the exp fusion is fatal at small σ (at σ = 1e-3 and distances near 1e4, one ulp is about
  500 nats: the nearest weight becomes exp(−500) = 0 instead of 1, and the output 0/0).

  Derivatives. `min_dist` is a stopped value (`lax.stop_gradient`): the softmax does not depend on the
  shift, so the exact derivative through the minimum is 0, and the derivatives in z and σ flow through
  the distances and the scale only. The empty state (min +inf) and +inf distances contribute exactly 0
  to values and derivatives (`exp_gap`).

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

    Args:
      dists: the chunk's distances; +inf marks a padding row or a left-out entry (weight exactly 0). A
        chunk of +inf only, added to an empty state, leaves it empty (min +inf, total 0).
      scale: −1/(2σ²), broadcasting against the state.
      axis: the dataset axis of `dists`.

    Returns:
      (new_state, weights, rescale): weights = exp((dists − new min) · scale), shaped like `dists`, and
      rescale = exp((old min − new min) · scale) (0 for an empty old state), shaped like the state, by
      which running numerators must be multiplied before adding Σ weights · values of this chunk.
    """
    dists = same_values(dists)
    new_min = lax.stop_gradient(jnp.minimum(self.min_dist, jnp.min(dists, axis=axis)))
    weights = exp_gap(dists, jnp.expand_dims(new_min, axis), jnp.expand_dims(scale, axis))
    rescale = exp_gap(self.min_dist, new_min, scale)
    return SoftminStats(new_min, self.total * rescale + jnp.sum(weights, axis=axis)), weights, rescale

  def add_finite(self, dists: jax.Array, scale: jax.Array, axis: int, *,
                 guard: bool = True) -> "SoftminStats":
    """`add` for a chunk of finite distances, returning only the new state (no weights).

    Since the new minimum is taken over these very distances no gap is negative and no +inf needs
    care, so the exponentials are one elementwise loop. `guard=False` skips `same_values` when the
    caller knows the distances are stored once by a non-fusible operation (a window sum by
    `reduce_window`, a matmul or a loop), so that the minimum and the exponentials read the same
    numbers anyway. (The select on gap ≥ 0, always true, keeps the exponentials in XLA's own loop:
    fused into the sum, XLA CPU hands exp-and-sum to YNNPACK in some programs and not in others, e.g.
    not inside `jax.shard_map`, and YNNPACK's exp differs in the last bit, so a one-device mesh would
    not reproduce the unsharded bits.)
    """
    if guard:
      dists = same_values(dists)
    new_min = lax.stop_gradient(jnp.minimum(self.min_dist, jnp.min(dists, axis=axis)))
    gaps = dists - jnp.expand_dims(new_min, axis)
    weights = jnp.where(gaps >= 0, jnp.exp(gaps * jnp.expand_dims(scale, axis)), 0.0)
    chunk_total = jnp.sum(weights, axis=axis)
    rescale = exp_gap(self.min_dist, new_min, scale)
    return SoftminStats(new_min, self.total * rescale + chunk_total)

  @staticmethod
  def weights(dists, min_dist, scale, axis):
    """exp((dists − min_dist) · scale) with min_dist and scale expanded at the dataset axis, from
    `same_values(dists)`: a later pass over the same code sees the values `add` saw."""
    return exp_gap(same_values(dists), jnp.expand_dims(min_dist, axis),
                   jnp.expand_dims(scale, axis))

  def merge_across(self, scale: jax.Array, axis_name) -> "SoftminStats":
    """Merges the states held by the devices of mesh axis `axis_name` (inside `jax.shard_map`).

    The flash-attention rule across devices: the global minimum (pmin), then the sum (psum) of every
    device's total rescaled by exp((own min − global min) · scale) ≤ 1. Every device of the axis gets
    the global state. A device that saw only padding (min +inf, total 0) contributes exactly 0.
    """
    return self.merge_values_across(scale, axis_name)[0]

  def merge_values_across(self, scale: jax.Array, axis_name, values=None):
    """`merge_across`, also merging running numerators `values` (a pytree of arrays whose leading
    axes are the state's shape) with the same per-device rescale, as a single-pass softmax needs.

    Returns:
      (global state, psum of values · rescale) — the values `None` when none are given.
    """
    new_min = lax.stop_gradient(lax.pmin(self.min_dist, axis_name))
    rescale = exp_gap(self.min_dist, new_min, scale)
    merged = SoftminStats(new_min, lax.psum(self.total * rescale, axis_name))
    if values is None:
      return merged, None

    def merge(value):
      factor = rescale.reshape(rescale.shape + (1,) * (value.ndim - rescale.ndim))
      return lax.psum(value * factor, axis_name)

    return merged, jax.tree_util.tree_map(merge, values)

  def log_normaliser(self, scale: jax.Array) -> jax.Array:
    """log Σ_i exp(d_i · scale)."""
    return self.min_dist * scale + jnp.log(self.total)


def shard_valid_rows(local_rows: int, axis_name=None, valid_rows: int | None = None):
  """How many rows of this device's dataset shard are real, or None when none is padding.

  The global dataset of `local_rows · shards` rows is split into equal consecutive shards along mesh
  axis `axis_name` (None: one shard, the whole array), and rows from `valid_rows` on are padding
  (`pspc_jax.distributed.shard_dataset` pads at the end). Decided statically where possible: no
  padding at all gives None, and the denoisers then run exactly their unpadded code.

  Returns:
    None, or a traced int32 scalar in [0, local_rows] (0 for a shard of padding only).

  Raises:
    ValueError: `valid_rows` < 1 or larger than the global row count.
  """
  if valid_rows is None:
    return None
  shards = 1 if axis_name is None else int(lax.axis_size(axis_name))
  total = local_rows * shards
  valid_rows = int(valid_rows)
  if not 1 <= valid_rows <= total:
    raise ValueError(f"valid_rows={valid_rows} must be between 1 and the {total} rows of the "
                     f"(padded) dataset")
  if valid_rows == total:
    return None
  index = 0 if axis_name is None else lax.axis_index(axis_name)
  return jnp.clip(valid_rows - index * local_rows, 0, local_rows).astype(jnp.int32)


def mask_padding(dists: jax.Array, offset, local_valid, axis: int) -> jax.Array:
  """`dists` with the chunk rows at or after `local_valid` (row offset + i along `axis`) set to +inf,
  so that they get weight exactly 0 whatever σ (`SoftminStats.add`, `exp_gap`)."""
  if local_valid is None:
    return dists
  rows = offset + lax.broadcasted_iota(jnp.int32, (dists.shape[axis],), 0)
  shape = [1] * dists.ndim
  shape[axis] = dists.shape[axis]
  return jnp.where((rows < local_valid).reshape(shape), dists, jnp.inf)
