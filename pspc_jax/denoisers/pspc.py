"""Patch-based denoisers: patch posterior means composed over a set of masks (Eq. 9-11).

For every mask C and training image i the patch posterior weight is
w_i(C) = softmax_i(−‖C z − C x_i‖² / (2σ²)), and the PSPC composite is

    x̂[p] = (1/n_p) Σ_{C ∋ p} Σ_i w_i(C) x_i[p]                                          (Eq. 11)

computed with the fast exact algorithm of docs/design.md §3: no loop over masks, two streaming passes over the
dataset. Pass 1 accumulates the log-normaliser of every mask (online logsumexp); pass 2 forms the exact
normalised weights, spreads them back to pixels and accumulates Σ_i W_i ⊙ x_i. A single pass would need
one running numerator per (mask, pixel of the mask): s²·C values per window, a batched matmul that
measured as slow as the whole of pass 2 at s = 3 on CPU (tiny matrices) and slower beyond; two passes
keep the cost a constant times one read of the data, and peak memory independent of N.

Layout (what makes it fast on CPU). Every per-chunk array is pixel-major with the (query, dataset row)
pairs minor: squared differences e (H, W, B, n), patch distances d (masks, B, n), weights likewise. Then

* the chunk is converted to float32 and transposed to (pixels, channels, n) once per chunk, one chunk
  ahead, and handed over in the loop carry (`softmin.scan_chunks`), so XLA cannot fuse the transposed
  uint8 reads into every query's computation; with a `PixelMajorData` copy of the dataset (a leaf of
  the denoiser value, `values.with_pixel_major`) the transpose is done once for all calls and a chunk
  is a contiguous slice;
* the distances of a chunk (`dists_major` of the mask set) end in one non-fusible, stored operation:
  window sums along H and W are adds of contiguous rows of length B·n (`lax.reduce_window`) or, for
  large windows, 0/1 matmuls; narrow windows (s ≤ 3) add their columns' differences inside the loop that
  forms them and store only the column sums. So every distance is computed once per pass, and the
  minimum and the exponentials read the same stored numbers (no `softmin.same_values` guard needed,
  except for single-pixel windows);
* the exponentials of both passes are one plain elementwise loop each (`SoftminStats.add_finite`,
  whose weights are only summed, and `softmin.exp_gap_finite`), without `exp_gap`'s handling of +inf.
  Both need finite distances: with padding rows (+inf) the general `SoftminStats.add` / `exp_gap`
  run instead;
* the softmax reductions run over the minor (dataset) axis, and exp runs on long contiguous rows;
* the pass-2 accumulation Σ_i W_i[p] x_i[p, c] is one batched matmul over pixels,
  (P, B, n) × (P, C, n) → (P, B, C), with no transposes.

Where the time goes (2-core CPU, CIFAR-10, B = 16, s = 3, per 64-row chunk and both passes, measured
with the XLA profiler): window sums and spreads (`reduce_window`) ≈ 25 %, the squared differences
≈ 15 %, the exponentials ≈ 25 % (pass 1 and pass 2), the accumulation matmul ≈ 13 %, the chunk
transposes ≈ 10 % (0 with a `PixelMajorData` copy), minimum and loop overheads the rest. A call costs
about 4.5-5.5 optimal-denoiser calls (one fused pass that never stores e).

Pass-1 weights cache. When there are few masks compared with pixels (3·masks ≤ pixels, i.e. s ≳ H/2 for
squares), pass 2 costs much more than reading back pass 1's weights u = exp((d − m_k)·scale) (m_k: the
running minimum after chunk k, as returned by `SoftminStats.add`). Up to `cache_bytes` of them are kept
(the first chunks; the rest are recomputed), and pass 2 uses w = u · exp((m_k − m)·scale) / total, which
is the SoftminStats merge rule: both exponents are ≤ 0, the nearest patch still gets exactly 1·1, and
pass 2 sees pass 1's own numbers. The budget bounds the memory whatever N is.

Sharded datasets (docs/design.md §3, `pspc_jax.distributed`). Inside `jax.shard_map`, with `axis_name` the mesh
axis over which the dataset is sharded, each device runs both passes over its own shard; pass 1's
per-mask states are merged across the axis (`SoftminStats.merge_across`: pmin, then psum of the rescaled
totals), so every device normalises pass 2 with the global (min, total), and pass 2's per-device
numerators are summed with one psum. Padding rows (global row ≥ `valid_rows`) get distance +inf after
the window sums, i.e. weight exactly 0 at every σ.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pspc_jax import conventions, validation
from pspc_jax.denoisers.empirical import default_chunk_size, empirical_denoise, logit_scale
from pspc_jax.denoisers.masks import PixelMasks, SquareWindows, pixel_sq_dists, pixel_sq_dists_major
from pspc_jax.softmin import (SoftminStats, exp_gap, exp_gap_finite, fold_chunks, mask_padding,
                             same_values, scan_chunks, shard_valid_rows)

# Default memory budget of the pass-1 weights cache (bytes); `cache_bytes=0` disables it.
DEFAULT_CACHE_BYTES = 256 << 20

# Default rows per chunk for B = 1 query and 32×32 images; see `pixel_major_chunk_size`.
_MAJOR_CHUNK_ROWS = 256

# Dataset rows per block of a `PixelMajorData` copy; chunks read from it are whole numbers of blocks.
MAJOR_BLOCK_ROWS = 64

_HIGHEST = lax.Precision.HIGHEST


def pixel_major_chunk_size(batch_size: int, height: int, width: int) -> int:
  """Dataset rows per chunk of the pixel-major PSPC passes.

  n ≈ 256/√B for 32×32 images (B = 1, 4, 16, 64 → 256, 128, 64, 32 rows), scaled by 1024/(H·W) and
  rounded to a power of two. Measured on a 2-core AMD EPYC (L2 1 MB/core, L3 32 MB): a compromise
  between long minor (dataset) rows, which the softmax reductions and exp vectorise along, and per-chunk
  intermediates (H·W·B·n floats: 1-8 MB) that stay in cache.
  """
  rows = _MAJOR_CHUNK_ROWS / math.sqrt(max(1, batch_size)) * 1024 / (height * width)
  return int(min(4096, max(8, 2 ** round(math.log2(max(rows, 1.0))))))


class PixelMajorData(NamedTuple):
  """A training set laid out once for the pixel-major passes (`pixel_major_data`).

  Every call otherwise transposes each chunk to the pixel-major layout twice (once per pass), which costs
  about a tenth of a PSPC-Square call on CPU; a denoiser value can hold this copy as a leaf instead.

  Attributes:
    blocks: (T, H·W·C, MAJOR_BLOCK_ROWS) in the dataset's dtype, T = N // MAJOR_BLOCK_ROWS:
      blocks[t, p·C + c, j] is channel c of pixel p of row t·MAJOR_BLOCK_ROWS + j. The last
      N mod MAJOR_BLOCK_ROWS rows are not in it; the kernels read them from the dataset.
  """
  blocks: jax.Array


def pixel_major_data(data) -> PixelMajorData:
  """The `PixelMajorData` copy of a (N, H, W, C) uint8 or float training set (same dtype, ≈ same size).

  Raises:
    ValueError: data that is not (N, H, W, C).
  """
  if jnp.ndim(data) != 4:
    raise ValueError(f"data must have shape (N, H, W, C), got {jnp.shape(data)}")
  num = data.shape[0] // MAJOR_BLOCK_ROWS
  rows = jnp.asarray(data[:num * MAJOR_BLOCK_ROWS]).reshape(num, MAJOR_BLOCK_ROWS,
                                                           math.prod(data.shape[1:]))
  return PixelMajorData(jnp.transpose(rows, (0, 2, 1)))


def _check_major(data_major, data) -> None:
  """ValueError unless `data_major` is None or the `PixelMajorData` of `data`'s shape and dtype."""
  if data_major is None:
    return
  expected = (data.shape[0] // MAJOR_BLOCK_ROWS, math.prod(data.shape[1:]), MAJOR_BLOCK_ROWS)
  blocks = getattr(data_major, "blocks", None)
  if blocks is None or tuple(blocks.shape) != expected or blocks.dtype != data.dtype:
    raise ValueError(f"data_major must be pixel_major_data(data): blocks of shape {expected} and "
                     f"dtype {data.dtype}, got {getattr(blocks, 'shape', type(data_major).__name__)}")


def composite_denoise(z: jax.Array, sigma, data: jax.Array, masks, *,
                      chunk_size: int | None = None, cache_bytes: int | None = None,
                      axis_name=None, valid_rows: int | None = None,
                      data_major: PixelMajorData | None = None) -> jax.Array:
  """PSPC composite (Eq. 11) for any mask set with `sums`, `spread`, `coverage`, `mask_shape`.

  Mask sets that also have `dists_major` / `spread_major` (`SquareWindows`, `PixelMasks`,
  `IndexMasks`) take the fast pixel-major path described in the module docstring; others the generic
  (B, n, H, W) path.

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels.
    data: (N, H, W, C) uint8 or float training images.
    masks: a `SquareWindows`, `PixelMasks` or `IndexMasks` (or any object with the same four
      members).
    chunk_size: dataset rows per streamed chunk (default: `pixel_major_chunk_size`).
    cache_bytes: memory budget of the pass-1 weights cache (default `DEFAULT_CACHE_BYTES`; 0 disables
      it). Used only when there are few masks compared with pixels; changes speed and memory, not the
      result beyond float32 rounding.
    axis_name: inside `jax.shard_map`, the mesh axis (or axes) of the dataset shards; `data` is then
      this device's shard (see the module docstring). None: one device.
    valid_rows: the number of real rows of the global dataset; later rows are padding. None: none.
    data_major: `pixel_major_data(data)`, or None. Speed only: when the chunk size is a multiple of
      MAJOR_BLOCK_ROWS (the default is for 32×32 images and B ≤ 16 queries, if N is at least one
      chunk) and there are no padding rows, the full chunks are read from it instead of being
      transposed in every pass; the result is the same, bit for bit. It saves most when a chunk is
      one block (B = 16 on 32×32 images); a chunk of several blocks still costs a cheaper transpose.

  Returns:
    (B, H, W, C) float32; B = 0 gives an empty (0, H, W, C) array.

  Raises:
    ValueError: bad shapes, dtypes or concrete values of z, sigma or data
      (`conventions.check_query_and_data`; a traced σ that is negative or not finite gives NaN),
      chunk_size / cache_bytes that are not integers ≥ 1 / ≥ 0, or a data_major of another dataset
      shape or dtype.
  """
  conventions.check_query_and_data(z, data)
  sigma = conventions.sigma_per_sample(sigma, z.shape[0])
  chunk_size = validation.positive_int(chunk_size, "chunk_size", optional=True)
  cache_bytes = validation.positive_int(cache_bytes, "cache_bytes", minimum=0, optional=True)
  _check_major(data_major, data)
  if z.shape[0] == 0:
    return jnp.zeros(z.shape, jnp.float32)
  if not (hasattr(masks, "dists_major") and hasattr(masks, "spread_major")):
    return _composite_denoise_generic(z, sigma, data, masks, chunk_size=chunk_size,
                                      axis_name=axis_name, valid_rows=valid_rows)
  kernel = _MajorKernel.build(z, sigma, data, masks, chunk_size, axis_name, valid_rows, data_major)
  # Pass-1 weights cache: the first `num_cached` full chunks (see the module docstring).
  num_full = kernel.full_chunks(data)
  num_cached = 0
  if 3 * kernel.num_masks <= kernel.pixels and num_full:
    budget = DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
    num_cached = min(num_full, budget // (4 * kernel.num_masks * z.shape[0] * kernel.chunk_size))
  stats, cache = _normaliser_pass(kernel, data, num_cached)
  if axis_name is not None:
    stats = stats.merge_across(kernel.scale, axis_name)  # every device: the global (min, total)
  numerator = _mean_pass(kernel, data, stats, num_cached, cache)
  if axis_name is not None:
    numerator = lax.psum(numerator, axis_name)
  out = jnp.transpose(numerator, (1, 0, 2)).reshape(z.shape)
  return out / jnp.asarray(masks.coverage)[..., None]


class _MajorKernel(NamedTuple):
  """What both passes of the pixel-major `composite_denoise` share (one call, static shapes)."""
  masks: Any
  z_major: jax.Array    # (P, C, B) float32 queries
  scale: jax.Array      # (1, B): −1/(2σ²) against (masks, B) states
  chunk_size: int
  local_valid: Any      # None: no padding row, every distance finite
  blocks: Any           # None, or the `PixelMajorData` blocks the full chunks are read from

  @classmethod
  def build(cls, z, sigma, data, masks, chunk_size, axis_name, valid_rows,
            data_major=None) -> "_MajorKernel":
    batch, height, width, channels = z.shape
    z_major = jnp.transpose(z.astype(jnp.float32), (1, 2, 3, 0)).reshape(-1, channels, batch)
    chunk_size = max(1, min(int(chunk_size or pixel_major_chunk_size(batch, height, width)),
                            data.shape[0]))
    local_valid = shard_valid_rows(data.shape[0], axis_name, valid_rows)
    use_blocks = (data_major is not None and local_valid is None
                  and chunk_size % MAJOR_BLOCK_ROWS == 0)
    return cls(masks, z_major, logit_scale(sigma)[None, :], chunk_size, local_valid,
               data_major.blocks if use_blocks else None)

  @property
  def num_masks(self) -> int:
    return math.prod(self.masks.mask_shape)

  @property
  def pixels(self) -> int:
    return self.z_major.shape[0]

  @property
  def guard(self) -> bool:
    """Whether the distances need `same_values` (the mask set does not store them once itself)."""
    return not getattr(self.masks, "sums_stored", False)

  def prepare(self, chunk):
    """(n, H, W, C) raw rows → (P·C·n,) float32 with the dataset axis minor. Flat, so that no choice
    of physical layout of the loop carry can turn the transpose into a mere relabelling (XLA would
    then move it into every consumer)."""
    x = conventions.to_model_range(chunk).reshape(chunk.shape[0], self.pixels, -1)
    return jnp.transpose(x, (1, 2, 0)).reshape(-1)

  def prepare_blocks(self, blocks):
    """(m, P·C, MAJOR_BLOCK_ROWS) rows of the pixel-major copy → `prepare`'s (P·C·n,) layout."""
    x = conventions.to_model_range(jnp.transpose(blocks, (1, 0, 2)))
    return x.reshape(-1)

  def full_chunks(self, data) -> int:
    """Full chunks of the source the passes read first (the pixel-major blocks, or the dataset)."""
    if self.blocks is None:
      return data.shape[0] // self.chunk_size
    return self.blocks.shape[0] // (self.chunk_size // MAJOR_BLOCK_ROWS)

  def scan(self, step, init, data, num_chunks: int, xs=None, with_offset: bool = False):
    """`scan_chunks` over the first `num_chunks` full chunks: `step(carry, prepared[, x][, offset])`
    (offsets only from the dataset, i.e. without blocks: the blocks are never used with padding)."""
    if self.blocks is None:
      return scan_chunks(step, init, data, self.chunk_size, num_chunks, xs=xs,
                         prepare=self.prepare, with_offset=with_offset)
    return scan_chunks(step, init, self.blocks, self.chunk_size // MAJOR_BLOCK_ROWS, num_chunks,
                       xs=xs, prepare=self.prepare_blocks)

  def fold(self, step, init, data, start_chunk: int):
    """Folds `step(carry, prepared[, offset])` over every chunk from full chunk `start_chunk` on."""
    if self.blocks is None:
      return fold_chunks(step, init, data, self.chunk_size, prepare=self.prepare,
                         start=start_chunk * self.chunk_size,
                         with_offset=self.local_valid is not None)
    count = self.full_chunks(data)
    if count > start_chunk:
      blocks_per_chunk = self.chunk_size // MAJOR_BLOCK_ROWS
      init, _ = scan_chunks(lambda carry, prepared: (step(carry, prepared), None), init,
                            self.blocks, blocks_per_chunk, count - start_chunk,
                            start=start_chunk * blocks_per_chunk, prepare=self.prepare_blocks)
    # The rows after the blocks' whole chunks, from the dataset.
    return fold_chunks(step, init, data, self.chunk_size, prepare=self.prepare,
                       start=max(start_chunk, count) * self.chunk_size)

  def unflatten(self, prepared):
    return prepared.reshape(self.pixels, self.z_major.shape[1], -1)  # (P, C, n)

  def dists(self, prepared, offset=None):
    """(masks, B, n) distances of a prepared chunk; the same code in both passes, so that pass 2 sees
    pass 1's values. Padding rows → +inf after the window sums (a 0/1 matmul of +inf gives NaN)."""
    d = self.masks.dists_major(self.z_major, self.unflatten(prepared))
    d = d.reshape((self.num_masks,) + d.shape[-2:])
    d = mask_padding(d, offset, self.local_valid, axis=2)
    return same_values(d) if self.guard and self.local_valid is None else d

  def weights(self, prepared, offset, stats: SoftminStats, inv_total):
    """Exact normalised weights exp((d − min)·scale) / total, (masks, B, n)."""
    dists = self.dists(prepared, offset)
    if self.local_valid is None:
      weights = exp_gap_finite(dists, stats.min_dist[..., None], self.scale[..., None])
    else:  # +inf padding rows: weight exactly 0 (the global min is finite, N ≥ 1)
      weights = SoftminStats.weights(dists, stats.min_dist, self.scale, axis=2)
    return weights * inv_total[..., None]

  def accumulate(self, numerator, weights, prepared):
    """numerator (P, B, C) + Σ_i W[p, b, i] x[p, c, i], W the weights (masks, B, n) spread to pixels:
    one batched matmul over pixels."""
    mask_weights = weights.reshape(self.masks.mask_shape + weights.shape[1:])
    pixel_weights = self.masks.spread_major(mask_weights).reshape((self.pixels,) + weights.shape[1:])
    return numerator + lax.dot_general(pixel_weights, self.unflatten(prepared),
                                       (((2,), (2,)), ((0,), (0,))), precision=_HIGHEST)


def _normaliser_pass(kernel: _MajorKernel, data, num_cached: int):
  """Pass 1: per-mask running (min, total), and the weights of the first `num_cached` chunks."""
  padded = kernel.local_valid is not None
  stats = SoftminStats.empty((kernel.num_masks, kernel.z_major.shape[2]))
  cache = None
  if num_cached:
    def caching_step(stats, prepared, offset=None):
      stats, weights, _ = stats.add(kernel.dists(prepared, offset), kernel.scale, axis=2)
      return stats, (weights, stats.min_dist)

    stats, cache = kernel.scan(caching_step, stats, data, num_cached, with_offset=padded)

  def normaliser_step(stats, prepared, offset=None):
    dists = kernel.dists(prepared, offset)
    if padded:
      return stats.add(dists, kernel.scale, axis=2)[0]
    return stats.add_finite(dists, kernel.scale, axis=2, guard=False)  # `dists` guarded already

  return kernel.fold(normaliser_step, stats, data, num_cached), cache


def _mean_pass(kernel: _MajorKernel, data, stats: SoftminStats, num_cached: int, cache):
  """Pass 2: exact normalised weights, spread to pixels, weighted sum of the images (P, B, C)."""
  inv_total = 1.0 / stats.total  # (masks, B)
  numerator = jnp.zeros((kernel.pixels, kernel.z_major.shape[2], kernel.z_major.shape[1]),
                        jnp.float32)
  if num_cached:
    def cached_step(numerator, prepared, cached):
      # A chunk of padding only was cached with min +inf and weights 0: factor exactly 0 (`exp_gap`).
      weights, chunk_min = cached
      factor = exp_gap(chunk_min, stats.min_dist, kernel.scale) * inv_total  # (masks, B), ≤ 1/total
      return kernel.accumulate(numerator, weights * factor[..., None], prepared), None

    numerator, _ = kernel.scan(cached_step, numerator, data, num_cached, xs=cache)

  def mean_step(numerator, prepared, offset=None):
    weights = kernel.weights(prepared, offset, stats, inv_total)
    return kernel.accumulate(numerator, weights, prepared)

  return kernel.fold(mean_step, numerator, data, num_cached)


def _composite_denoise_generic(z, sigma, data, masks, *, chunk_size=None, axis_name=None,
                               valid_rows=None):
  """Eq. 11 in the (B, n, H, W) layout for mask objects with only `sums` and `spread`; sigma (B,)."""
  batch, height, width, _ = z.shape
  z = z.astype(jnp.float32)
  scale = logit_scale(sigma)
  scale = scale.reshape((batch,) + (1,) * len(masks.mask_shape))
  chunk_size = chunk_size or default_chunk_size(batch, height, width)
  local_valid = shard_valid_rows(data.shape[0], axis_name, valid_rows)
  padded = local_valid is not None

  def dists_and_images(chunk, offset):
    # The same code computes the distances in both passes; pass 2 relies on seeing pass 1's values.
    x = conventions.to_model_range(chunk)
    dists = mask_padding(masks.sums(pixel_sq_dists(z, x)), offset, local_valid, axis=1)
    return dists, x  # (B, n, *mask_shape)

  def normaliser_step(stats, chunk, offset=None):
    return stats.add(dists_and_images(chunk, offset)[0], scale, axis=1)[0]

  stats = fold_chunks(normaliser_step, SoftminStats.empty((batch,) + masks.mask_shape), data,
                      chunk_size, with_offset=padded)
  if axis_name is not None:
    stats = stats.merge_across(scale, axis_name)
  inv_total = jnp.expand_dims(1.0 / stats.total, 1)

  def mean_step(numerator, chunk, offset=None):
    dists, x = dists_and_images(chunk, offset)
    weights = SoftminStats.weights(dists, stats.min_dist, scale, axis=1) * inv_total
    pixel_weights = masks.spread(weights)  # (B, n, H, W)
    return numerator + jnp.sum(pixel_weights[..., None] * x[None], axis=1)

  numerator = fold_chunks(mean_step, jnp.zeros_like(z), data, chunk_size, with_offset=padded)
  if axis_name is not None:
    numerator = lax.psum(numerator, axis_name)
  return numerator / masks.coverage[..., None]


def pspc_square_denoise(z: jax.Array, sigma, data: jax.Array, patch_size: int, *,
                        chunk_size: int | None = None, cache_bytes: int | None = None,
                        axis_name=None, valid_rows: int | None = None,
                        data_major: PixelMajorData | None = None) -> jax.Array:
  """PSPC-Square: Eq. 11 over all s×s windows fully inside the image (no padding).

  On an H×W rectangle the windows are min(s, H) × min(s, W) (`SquareWindows`): squares while
  s ≤ min(H, W), full-height or full-width bands up to max(H, W). For s ≥ max(H, W) the single window is
  the whole image and the call is delegated to the (single-pass) optimal empirical denoiser, which it
  equals exactly. Cost O(B·N·H·W·C) whatever s.

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels (EDM σ).
    data: (N, H, W, C) uint8 or float training images.
    patch_size: s, a static int (Python or NumPy integer, not a float or bool) ≥ 1; every s ≥ max(H, W)
      is the whole image.
    chunk_size: dataset rows per streamed chunk (default: `pixel_major_chunk_size`, about 4 MB per
      intermediate).
    cache_bytes: memory budget of the pass-1 weights cache, used for large s (see the module
      docstring; default `DEFAULT_CACHE_BYTES` = 256 MiB, 0 disables it).
    axis_name, valid_rows: dataset sharded over a mesh axis inside `jax.shard_map`, and padding rows
      (see `composite_denoise`); None: one device, no padding.
    data_major: `pixel_major_data(data)` or None (speed only; see `composite_denoise`). The whole
      image (optimal denoiser) does not use it.

  Returns:
    (B, H, W, C) float32 denoised images.

  Raises:
    ValueError: as `composite_denoise`, or a patch_size that is not an integer ≥ 1.
  """
  if z.ndim != 4:
    raise ValueError(f"z must have shape (B, H, W, C), got {z.shape}")
  patch_size = validation.positive_int(patch_size, "patch_size")
  if patch_size >= max(z.shape[1], z.shape[2]):
    _check_major(data_major, data)
    return empirical_denoise(z, sigma, data, chunk_size=chunk_size, axis_name=axis_name,
                             valid_rows=valid_rows)
  windows = SquareWindows(z.shape[1], z.shape[2], patch_size)
  return composite_denoise(z, sigma, data, windows, chunk_size=chunk_size, cache_bytes=cache_bytes,
                           axis_name=axis_name, valid_rows=valid_rows, data_major=data_major)


def pspc_denoise(z: jax.Array, sigma, data: jax.Array, masks, *,
                 chunk_size: int | None = None, cache_bytes: int | None = None,
                 axis_name=None, valid_rows: int | None = None,
                 data_major: PixelMajorData | None = None) -> jax.Array:
  """PSPC with arbitrary cropping masks (Eq. 11).

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels.
    data: (N, H, W, C) uint8 or float training images.
    masks: bool (M, H, W) with M ≥ 1, any array-like (a nested list too); a concrete array of another
      dtype is accepted when it holds only 0 and 1 (other values, e.g. weights, raise ValueError; a
      traced array must be bool). Every pixel must be covered by at least one mask (checked when
      `masks` is concrete, i.e. not traced under `jit`).
    chunk_size: dataset rows per streamed chunk.
    cache_bytes: memory budget of the pass-1 weights cache (used when 3·M ≤ H·W; see the module
      docstring).
    axis_name, valid_rows: dataset sharded over a mesh axis inside `jax.shard_map`, and padding rows
      (see `composite_denoise`); None: one device, no padding.
    data_major: `pixel_major_data(data)` or None (speed only; see `composite_denoise`).

  Returns:
    (B, H, W, C) float32 denoised images.

  Raises:
    ValueError: as `composite_denoise`, or bad masks (`validation.mask_array`, e.g. no masks at all,
      or a pixel covered by none).
  """
  pixel_masks = PixelMasks(validation.mask_array(masks))
  if pixel_masks.image_shape != tuple(z.shape[1:3]):
    raise ValueError(f"masks cover {pixel_masks.image_shape} images, z has {tuple(z.shape[1:3])}")
  return composite_denoise(z, sigma, data, pixel_masks, chunk_size=chunk_size,
                           cache_bytes=cache_bytes, axis_name=axis_name, valid_rows=valid_rows,
                           data_major=data_major)


# Elements of the (n, Kh, Kw, s, s, C) gathered patches of one chunk in `patch_posterior_means`.
_PATCH_CHUNK_ELEMENTS = 1 << 22


def patch_posterior_means(z: jax.Array, sigma, data: jax.Array, patch_size: int, *,
                          chunk_size: int | None = None) -> jax.Array:
  """The posterior mean of every s×s window on its own (Eq. 9-10), before any overlap averaging.

  For the window C at (i, j) (rows i … i+s−1, columns j … j+s−1), with
  w_k(C) = softmax_k(−‖C z − C x_k‖² / (2σ²)) over the training images k, the patch posterior mean is

      m[i, j] = Σ_k w_k(C) x_k[i:i+s, j:j+s]                                               (Eq. 10)

  PSPC-Square (Eq. 11) is the average, at each pixel, of the m of the windows covering it; here the
  windows are kept apart (paper Fig. 4: patch error vs σ per patch size). On an H×W rectangle the
  windows are s_h × s_w = min(s, H) × min(s, W) (`SquareWindows`); for s ≥ max(H, W) the single window
  is the whole image and m is the optimal empirical denoiser's output (Eq. 6-7).

  Two streaming passes over the dataset (per-window online logsumexp, then the normalised weighted sum
  of the gathered patches), in the (B, n, Kh, Kw) layout: direct differences, exact window sums
  (`SquareWindows.sums`), memory independent of N. The output itself has Kh·Kw·s²·C values per query
  and each is a sum over the dataset, so the cost is O(B·N·Kh·Kw·s²·C): fine for small images or few
  queries, s² times a PSPC-Square call in general.

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels (EDM σ).
    data: (N, H, W, C) uint8 or float training images.
    patch_size: s, a static int ≥ 1 (windows of min(s, H) × min(s, W)).
    chunk_size: dataset rows per streamed chunk (default: about 4M gathered patch values per chunk).

  Returns:
    (B, Kh, Kw, s_h, s_w, C) float32 with Kh = H − s_h + 1, Kw = W − s_w + 1: [b, i, j] is the
    posterior mean of the window at (i, j). B = 0 gives an empty array.

  Raises:
    ValueError: as `composite_denoise`, or a patch_size that is not an integer ≥ 1.
  """
  conventions.check_query_and_data(z, data)
  sigma = conventions.sigma_per_sample(sigma, z.shape[0])
  chunk_size = validation.positive_int(chunk_size, "chunk_size", optional=True)
  batch, height, width, channels = z.shape
  size = validation.positive_int(patch_size, "patch_size")
  windows = SquareWindows(height, width, size)
  kh, kw = windows.mask_shape
  size_h, size_w = windows.window
  if batch == 0:
    return jnp.zeros((0, kh, kw, size_h, size_w, channels), jnp.float32)
  z = z.astype(jnp.float32)
  scale = logit_scale(sigma)  # (B,)
  # Pixel rows/columns of every window: (Kh, s_h) and (Kw, s_w).
  rows = jnp.arange(kh)[:, None] + jnp.arange(size_h)[None, :]
  cols = jnp.arange(kw)[:, None] + jnp.arange(size_w)[None, :]
  if chunk_size is None:
    per_row = kh * kw * size_h * size_w * channels
    chunk_size = min(default_chunk_size(batch, height, width),
                     max(1, _PATCH_CHUNK_ELEMENTS // max(per_row, batch * kh * kw)))
  chunk_size = max(1, min(int(chunk_size), data.shape[0]))
  state_scale = scale[:, None, None]  # against the (B, Kh, Kw) state

  def dists_and_images(chunk):
    # The same code computes the distances in both passes; pass 2 relies on seeing pass 1's values.
    x = conventions.to_model_range(chunk)
    return windows.sums(pixel_sq_dists(z, x)), x  # (B, n, Kh, Kw)

  def normaliser_step(stats, chunk):
    return stats.add(dists_and_images(chunk)[0], state_scale, axis=1)[0]

  stats = fold_chunks(normaliser_step, SoftminStats.empty((batch, kh, kw)), data, chunk_size)
  inv_total = 1.0 / stats.total  # (B, Kh, Kw)

  def mean_step(numerator, chunk):
    dists, x = dists_and_images(chunk)
    weights = SoftminStats.weights(dists, stats.min_dist, state_scale, axis=1)
    weights = weights * inv_total[:, None]  # (B, n, Kh, Kw)
    patches = x[:, rows[:, None, :, None], cols[None, :, None, :], :]  # (n, Kh, Kw, s_h, s_w, C)
    return numerator + jnp.einsum("bnij,nijuvc->bijuvc", weights, patches, precision=_HIGHEST)

  init = jnp.zeros((batch, kh, kw, size_h, size_w, channels), jnp.float32)
  return fold_chunks(mean_step, init, data, chunk_size)


def window_posterior_means(z: jax.Array, sigma, data: jax.Array, patch_size: int, positions, *,
                           chunk_size: int | None = None) -> jax.Array:
  """The posterior mean (Eq. 10) of the s×s windows at `positions` only, each computed exactly.

  The window at (i, j) is its own denoising problem: its posterior mean is the optimal empirical
  denoiser (Eq. 6-7) of the cropped query z[:, i:i+s, j:j+s] over the cropped training set
  x[:, i:i+s, j:j+s]. Each window costs one single-pass `empirical_denoise` of s²·C values per pair
  (query, training image), so K windows cost about K·s²·C / (H·W·C) optimal-denoiser calls, where
  `patch_posterior_means` (every window) costs (H−s+1)·(W−s+1)·s²·C / (H·W·C) of them. The windows
  are processed one after the other (`lax.map`), so one cropped copy of the training set is alive at
  a time.

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels (EDM σ).
    data: (N, H, W, C) uint8 or float training images.
    patch_size: s, a static int ≥ 1 (windows of min(s, H) × min(s, W), as `patch_posterior_means`).
    positions: static sequence of K ≥ 1 (row, column) window corners, 0 ≤ row ≤ H − s_h and
      0 ≤ column ≤ W − s_w (`window_grid` makes an even grid of them).
    chunk_size: dataset rows per streamed chunk (as `empirical_denoise`).

  Returns:
    (B, K, s_h, s_w, C) float32: [b, k] is the posterior mean of the window at positions[k]; it
    equals `patch_posterior_means(...)[b, i, j]` up to float32 rounding.

  Raises:
    ValueError: as `empirical_denoise`, a patch_size that is not an integer ≥ 1, or positions empty or
      outside the image.
  """
  conventions.check_query_and_data(z, data)
  _, height, width, channels = z.shape
  windows = SquareWindows(height, width, validation.positive_int(patch_size, "patch_size"))
  size_h, size_w = windows.window
  corners = np.asarray(positions)
  if corners.dtype.kind not in "iu" or corners.ndim != 2 or corners.shape[1] != 2:
    raise ValueError(f"positions must be a sequence of integer (row, column) window corners, got "
                     f"{positions!r}")
  if (len(corners) == 0 or corners.min() < 0 or corners[:, 0].max() > height - size_h
      or corners[:, 1].max() > width - size_w):
    raise ValueError(f"positions must be 1 or more window corners (row, column) with 0 ≤ row ≤ "
                     f"{height - size_h} and 0 ≤ column ≤ {width - size_w}, got {list(positions)}")
  z = z.astype(jnp.float32)

  def one_window(corner):
    z_crop = lax.dynamic_slice(z, (0, corner[0], corner[1], 0), (z.shape[0], size_h, size_w, channels))
    x_crop = lax.dynamic_slice(data, (0, corner[0], corner[1], 0),
                               (data.shape[0], size_h, size_w, channels))
    return empirical_denoise(z_crop, sigma, x_crop, chunk_size=chunk_size)

  means = lax.map(one_window, jnp.asarray(corners, jnp.int32))  # (K, B, s_h, s_w, C)
  return jnp.moveaxis(means, 0, 1)
