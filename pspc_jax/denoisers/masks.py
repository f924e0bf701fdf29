"""Cropping masks as linear maps between pixels and masks (docs/design.md §3, steps 2 and 4).

A set of M cropping masks is a 0/1 matrix between the H·W pixel positions and the masks. Two operations
are all the PSPC denoisers need:

* `sums(e)`: for per-pixel squared distances e (..., H, W), the distance restricted to every mask,
  ‖C z − C x‖² = Σ_{p ∈ C} e[p] (Eq. 9).
* `spread(w)`: for per-mask weights w (..., masks), the per-pixel total Σ_{C ∋ p} w[C] (the inner sum of
  Eq. 11).

Both are sums of non-negative terms with no subtraction (0/1 matrix products at `Precision.HIGHEST`,
or `lax.reduce_window` sums), so they keep full float32 relative precision even when a patch distance is
1e-6 and the logit divides it by 2σ² = 8e-6. `coverage` is n_p, the number of masks covering each pixel.

Each mask set offers the two maps in two layouts:

* `sums` / `spread` act on trailing (H, W) / mask axes: (..., H, W) → (..., masks).
* `sums_major` / `spread_major` act on *leading* axes: (H, W, ...) → (*mask_shape, ...). This is the
  layout of the fast denoisers (docs/design.md §3): pixels major, (query, dataset row) minor, so every window sum
  is a vectorised add of long contiguous rows, and the per-mask softmax reduces over the minor axis.
  `dists_major(z, x)` gives the mask distances straight from pixel-major queries and data (direct
  differences, then `sums_major`, or for narrow windows column sums formed with the differences), and
  `sums_stored` says whether they end in a non-fusible operation that stores them once.

`SquareWindows` exploits the separable structure of all s×s windows (min(s, H) × min(s, W) on an H×W
rectangle; a window sum along W, then along H), so its cost does not depend much on s; `PixelMasks`
holds arbitrary masks as the dense 0/1 matrix (traceable: the masks may be computed under `jit`);
`IndexMasks` holds concrete arbitrary masks as padded index lists, whose gathers cost ∝ the mask sizes
instead of ∝ the number of pixels (PSPC-Flex).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST

# Initial value of the window sums. A NumPy scalar stays a compile-time constant under every trace, so
# `lax.reduce_window` becomes the linear `reduce_window_sum`, which has a transpose (reverse mode); a
# `jnp.float32(0)` is a traced constant inside `lax.scan` and gives the generic reduction, which has none.
_ZERO = np.float32(0)


def pixel_sq_dists(z: jax.Array, x: jax.Array) -> jax.Array:
  """Channel-summed squared differences e[b, i, h, w] = Σ_c (z[b,h,w,c] − x[i,h,w,c])².

  Computed from direct differences (never ‖z‖² − 2 z·x + ‖x‖², which cancels at small σ).

  Args:
    z: (B, H, W, C) float32 queries.
    x: (n, H, W, C) float32 data chunk.

  Returns:
    (B, n, H, W) float32.
  """
  channels = z.shape[-1]
  return sum(jnp.square(z[:, None, :, :, c] - x[None, :, :, :, c]) for c in range(channels))


def pixel_sq_dists_major(z: jax.Array, x: jax.Array) -> jax.Array:
  """`pixel_sq_dists` in the pixel-major layout: e[p, b, i] = Σ_c (z[p, c, b] − x[p, c, i])².

  Args:
    z: (P, C, B) float32 queries (pixels major).
    x: (P, C, n) float32 data chunk (pixels major, dataset rows minor).

  Returns:
    (P, B, n) float32, from direct differences.
  """
  channels = z.shape[1]
  return sum(jnp.square(z[:, c, :, None] - x[:, c, None, :]) for c in range(channels))


def _generic_dists_major(masks, z: jax.Array, x: jax.Array) -> jax.Array:
  """Σ over every mask of the channel-summed squared differences: (*mask_shape, B, n) from pixel-major
  z (P, C, B) and x (P, C, n), via `pixel_sq_dists_major` and `masks.sums_major`."""
  e = pixel_sq_dists_major(z, x)
  return masks.sums_major(e.reshape(masks.image_shape + e.shape[1:]))


# Window widths up to which `SquareWindows.dists_major` sums a window's columns inside the
# squared-difference loop instead of storing e and summing it (measured on CPU, 32×32×3, B = 16: 9 %
# faster PSPC-Square calls at s = 3, even at s = 5, slower from s = 7).
_FUSED_COLUMNS = 3

# Cost rule for the window sums of `SquareWindows` in the pixel-major layout (measured on CPU, 32×32
# images, see bin/benchmark). `lax.reduce_window` costs about one add per window element per output; a
# 0/1 matmul costs one multiply-add per *input* position per output but runs several times faster per
# operation. Along the leading axis (rows) the matmul is one large GEMM and wins from s ≈ 0.35·H; along
# the second axis (columns) it is a batch of smaller GEMMs and only wins from s ≈ 0.6·W. The spread
# along columns never won in measurements and always uses reduce_window.
_ROW_MATMUL_FRACTION = 0.35
_COLUMN_MATMUL_FRACTION = 0.6


def _reduce_window_sums(a: jax.Array, size: int, axis: int, padding=None) -> jax.Array:
  """`lax.reduce_window` sums of length `size` along `axis` (valid, or with (lo, hi) zero padding)."""
  window = [1] * a.ndim
  window[axis] = size
  pads = [(0, 0)] * a.ndim
  pads[axis] = padding or (0, 0)
  return lax.reduce_window(a, _ZERO, lax.add, tuple(window), (1,) * a.ndim, pads)


def _window_sums_major(a: jax.Array, size: int, axis: int, method: str) -> jax.Array:
  """Valid window sums of length `size` along leading axis `axis` ∈ {0, 1} of `a`."""
  length = a.shape[axis]
  if method == "window":
    return _reduce_window_sums(a, size, axis)
  matrix = jnp.asarray(window_matrix(length, size).T)  # (K, L)
  return _apply_major(matrix, a, axis)


def _window_spread_major(a: jax.Array, size: int, axis: int, method: str) -> jax.Array:
  """Transpose of `_window_sums_major`: K = L − size + 1 window values → L positions."""
  num = a.shape[axis]
  if method == "window":
    return _reduce_window_sums(a, size, axis, (size - 1, size - 1))
  matrix = jnp.asarray(window_matrix(num + size - 1, size))  # (L, K)
  return _apply_major(matrix, a, axis)


def _apply_major(matrix: jax.Array, a: jax.Array, axis: int) -> jax.Array:
  """out[..., j, ...] = Σ_k matrix[j, k] a[..., k, ...] along leading axis 0 or 1 (no transposes)."""
  if axis == 0:
    flat = a.reshape(a.shape[0], -1)
    out = jnp.dot(matrix, flat, precision=_HIGHEST)
    return out.reshape(matrix.shape[:1] + a.shape[1:])
  flat = a.reshape(a.shape[0], a.shape[1], -1)
  batched = jnp.broadcast_to(matrix, (a.shape[0],) + matrix.shape)
  out = lax.dot_general(batched, flat, (((2,), (1,)), ((0,), (0,))), precision=_HIGHEST)
  return out.reshape((a.shape[0], matrix.shape[0]) + a.shape[2:])


def window_matrix(length: int, size: int) -> np.ndarray:
  """0/1 matrix (length, length − size + 1) whose column k selects positions k … k + size − 1."""
  if not 1 <= size <= length:
    raise ValueError(f"patch size {size} must be between 1 and the image side {length}")
  pos = np.arange(length)[:, None]
  start = np.arange(length - size + 1)[None, :]
  return ((pos >= start) & (pos < start + size)).astype(np.float32)


class SquareWindows:
  """All windows of patch size s fully inside an H×W image, no padding.

  A patch size s applies to a rectangle as windows of s_h × s_w = min(s, H) × min(s, W) pixels: s×s
  squares while s ≤ min(H, W), full-height (or full-width) bands for min(H, W) < s < max(H, W), and the
  whole image (one window) for every s ≥ max(H, W). There are Kh·Kw = (H − s_h + 1)·(W − s_w + 1)
  windows; window (i, j) covers rows i … i+s_h−1 and columns j … j+s_w−1. Per-mask arrays have trailing
  shape (Kh, Kw).

  Attributes:
    window: (s_h, s_w).

  Raises:
    ValueError: s < 1.
  """

  def __init__(self, height: int, width: int, size: int):
    self.image_shape = (height, width)
    self.window = (min(int(size), height), min(int(size), width))
    self.rows = window_matrix(height, self.window[0])  # (H, Kh)
    self.cols = window_matrix(width, self.window[1])   # (W, Kw)
    self.mask_shape = (self.rows.shape[1], self.cols.shape[1])
    self.coverage = np.outer(self.rows.sum(1), self.cols.sum(1)).astype(np.float32)  # (H, W)

  def sums(self, e: jax.Array) -> jax.Array:
    """(..., H, W) → (..., Kh, Kw): Σ of e over every window."""
    along_w = jnp.einsum("...hw,wj->...hj", e, self.cols, precision=_HIGHEST)
    return jnp.einsum("...hj,hi->...ij", along_w, self.rows, precision=_HIGHEST)

  def spread(self, w: jax.Array) -> jax.Array:
    """(..., Kh, Kw) → (..., H, W): every window's value added to each of its s_h×s_w pixels."""
    along_w = jnp.einsum("...ij,wj->...iw", w, self.cols, precision=_HIGHEST)
    return jnp.einsum("...iw,hi->...hw", along_w, self.rows, precision=_HIGHEST)

  def _methods(self):
    """(rows, columns) method of the window sums, by the cost rule above."""
    height, width = self.rows.shape[0], self.cols.shape[0]
    rows = "matmul" if self.window[0] >= _ROW_MATMUL_FRACTION * height else "window"
    cols = "matmul" if self.window[1] >= _COLUMN_MATMUL_FRACTION * width else "window"
    return rows, cols

  def sums_major(self, e: jax.Array) -> jax.Array:
    """(H, W, ...) → (Kh, Kw, ...): Σ of e over every window (pixel-major layout)."""
    rows, cols = self._methods()
    along_w = _window_sums_major(e, self.window[1], 1, cols)
    return _window_sums_major(along_w, self.window[0], 0, rows)

  @property
  def sums_stored(self) -> bool:
    """Whether `dists_major` ends in a non-fusible operation (a `reduce_window`, a matmul), so that
    every consumer reads the same stored distances: all windows but single pixels."""
    return self.window != (1, 1)

  def dists_major(self, z: jax.Array, x: jax.Array) -> jax.Array:
    """Window distances (Kh, Kw, B, n) from pixel-major queries z (P, C, B) and data x (P, C, n).

    Sums of non-negative direct squared differences only. Narrow windows (1 < s_w ≤ `_FUSED_COLUMNS`,
    s_h > 1) add up each window's s_w·C column differences inside the loop that forms them (a pixel's
    difference is formed s_w times, which costs less than storing e and re-reading it for a window sum
    along W), then sum along H (`sums_major`'s row rule); others form e once and use `sums_major`.
    """
    height, width = self.image_shape
    size_h, size_w = self.window
    if not (1 < size_w <= _FUSED_COLUMNS and size_h > 1):
      return _generic_dists_major(self, z, x)
    channels, batch, rows = z.shape[1], z.shape[2], x.shape[2]
    z = z.reshape(height, width, channels, batch)
    x = x.reshape(height, width, channels, rows)
    num = self.mask_shape[1]
    along_w = sum(jnp.square(z[:, v:v + num, c, :, None] - x[:, v:v + num, c, None, :])
                  for v in range(size_w) for c in range(channels))  # (H, Kw, B, n)
    return _window_sums_major(along_w, size_h, 0, self._methods()[0])

  def _spread_methods(self):
    """(rows, columns) method of the spread."""
    return self._methods()[0], "window"

  def spread_major(self, w: jax.Array) -> jax.Array:
    """(Kh, Kw, ...) → (H, W, ...): every window's value added to each of its pixels."""
    rows, cols = self._spread_methods()
    along_h = _window_spread_major(w, self.window[0], 0, rows)
    return _window_spread_major(along_h, self.window[1], 1, cols)


def check_coverage(coverage: np.ndarray) -> None:
  """Raises ValueError if some pixel of the concrete (H, W) coverage n_p is covered by no mask."""
  if not np.all(coverage > 0):
    missing = np.argwhere(coverage == 0)
    raise ValueError(f"{len(missing)} pixel(s) are covered by no mask, e.g. (row, col) = "
                     f"{tuple(int(v) for v in missing[0])}; PSPC is undefined there (Eq. 11)")


@jax.tree_util.register_pytree_node_class
class PixelMasks:
  """Arbitrary cropping masks given as a boolean (M, H, W) array; per-mask arrays end in (M,).

  A pytree: the (M, H·W) 0/1 `matrix` and the (H, W) `coverage` are leaves, the shapes static, so a
  mask set can be held by a denoiser value and passed into `jax.jit` as an argument.
  """

  def __init__(self, masks):
    if masks.ndim != 3:
      raise ValueError(f"masks must have shape (M, H, W), got {masks.shape}")
    self.image_shape = tuple(masks.shape[1:])
    self.matrix = jnp.asarray(masks, jnp.float32).reshape(masks.shape[0], -1)  # (M, H·W)
    self.mask_shape = (masks.shape[0],)
    self.coverage = jnp.sum(self.matrix, axis=0).reshape(self.image_shape)
    if not isinstance(self.coverage, jax.core.Tracer):
      check_coverage(np.asarray(self.coverage))

  def tree_flatten(self):
    return (self.matrix, self.coverage), (self.image_shape, self.mask_shape)

  @classmethod
  def tree_unflatten(cls, static, leaves):
    masks = object.__new__(cls)
    masks.image_shape, masks.mask_shape = static
    masks.matrix, masks.coverage = leaves
    return masks

  def sums(self, e: jax.Array) -> jax.Array:
    """(..., H, W) → (..., M)."""
    flat = e.reshape(e.shape[:-2] + (-1,))
    return jnp.einsum("...p,mp->...m", flat, self.matrix, precision=_HIGHEST)

  def spread(self, w: jax.Array) -> jax.Array:
    """(..., M) → (..., H, W)."""
    flat = jnp.einsum("...m,mp->...p", w, self.matrix, precision=_HIGHEST)
    return flat.reshape(w.shape[:-1] + self.image_shape)

  sums_stored = True  # a GEMM

  def dists_major(self, z: jax.Array, x: jax.Array) -> jax.Array:
    """(M, B, n) mask distances from pixel-major z (P, C, B) and x (P, C, n)."""
    return _generic_dists_major(self, z, x)

  def sums_major(self, e: jax.Array) -> jax.Array:
    """(H, W, ...) → (M, ...): one GEMM with the (M, H·W) mask matrix."""
    flat = e.reshape(self.matrix.shape[1], -1)
    return jnp.dot(self.matrix, flat, precision=_HIGHEST).reshape(self.mask_shape + e.shape[2:])

  def spread_major(self, w: jax.Array) -> jax.Array:
    """(M, ...) → (H, W, ...)."""
    flat = w.reshape(self.matrix.shape[0], -1)
    out = lax.dot_general(self.matrix, flat, (((0,), (0,)), ((), ())), precision=_HIGHEST)
    return out.reshape(self.image_shape + w.shape[1:])


# Cost rule of `IndexMasks` (measured on a shared 2-core CPU, 32×32×3 images, B = 16, 1024 masks):
# gathering and adding K contiguous rows per output beats the dense 0/1 GEMM of `PixelMasks` (one
# multiply-add per pixel per output, but many times faster per operation) while K is below about a
# fifth of the GEMM's inner dimension: whole PSPC-Flex calls took gather/matmul = 0.13 at K = 18,
# 0.47 at K = 70, 0.66 at K = 122, 1.07 at K = 226 and 1.5 at K = 341.
_GATHER_FRACTION = 0.2
# Most rows gathered and added per step of the scan over the padded index lists (unrolled in the step).
_GATHER_BLOCK = 16


def padded_indices(members: np.ndarray, fill: int) -> np.ndarray:
  """Bool (R, L) membership → int32 (R, K): each row's True columns in ascending order, padded with
  `fill` to K = the largest row count (at least 1)."""
  members = np.asarray(members, bool)
  counts = members.sum(axis=1)
  width = max(1, int(counts.max(initial=0)))
  order = np.argsort(~members, axis=1, kind="stable")[:, :width]
  return np.where(np.arange(width)[None, :] < counts[:, None], order, fill).astype(np.int32)


def gather_plan(index: np.ndarray, fill: int) -> np.ndarray:
  """Concrete int (M, K) row indices (`fill` = padding) → the (steps, M, block) int32 blocks that
  `gather_sums_major` reads: K padded with `fill` to a multiple of the block, blocks leading.

  The block is at most `_GATHER_BLOCK` and at most ⌈K/2⌉, so the loop has at least two steps when
  K ≥ 2: a one-step loop is inlined, and XLA then fused the whole gather chain into each of its
  consumers in the PSPC passes (measured 3-6× slower calls at K = 9 and 13 on CPU).
  """
  index = np.asarray(index)
  num, width = index.shape
  block = min(_GATHER_BLOCK, max(1, -(-width // 2)))
  steps = -(-width // block)
  index = np.pad(index, ((0, 0), (0, steps * block - width)), constant_values=fill)
  return index.reshape(num, steps, block).transpose(1, 0, 2).astype(np.int32)


def _plan_rows(plan) -> jax.Array:
  """A `gather_plan` back as (M, K') padded row indices (K' ≥ K)."""
  plan = jnp.asarray(plan)
  return plan.transpose(1, 0, 2).reshape(plan.shape[1], -1)


def gather_sums_major(a: jax.Array, plan) -> jax.Array:
  """out[m, ...] = Σ_k a[index[m, k], ...] along the leading axis of `a`; index L = len(a) reads 0.

  Args:
    a: (L, ...) float32.
    plan: `gather_plan(index, fill=L)` of the int (M, K) row indices in [0, L] (may be traced).

  Returns:
    (M, ...) float32: a sum of non-negative terms when `a` is non-negative (no cancellation).

  Rows are gathered one block at a time in a `lax.scan` over the blocks: every add is a vectorised
  add of one contiguous row, and nothing of size M·K·row is materialised. Row L is a zero row appended
  to `a` (fused into the computation of `a` where that is a loop), so every index is in range and no
  gathered element needs a bounds select (mode "clip" only clamps the M indices).
  """
  num, block = plan.shape[1], plan.shape[2]
  flat = jnp.pad(a.reshape(a.shape[0], -1), ((0, 1), (0, 0)))

  def step(total, idx):
    for j in range(block):
      total = total + jnp.take(flat, idx[:, j], axis=0, mode="clip")
    return total, None

  total, _ = lax.scan(step, jnp.zeros((num, flat.shape[1]), flat.dtype), jnp.asarray(plan))
  return total.reshape((num,) + a.shape[1:])


@jax.tree_util.register_pytree_node_class
class IndexMasks:
  """Arbitrary masks held as padded index lists: the fast form of `PixelMasks` when masks are small.

  Built from a concrete bool (M, H, W) array (not traceable: the padded widths are shapes). `members`
  (M, K) lists each mask's pixels (flat index h·W + w, K = the largest mask) and `owners` (H·W, n_max)
  each pixel's masks (n_max = the largest coverage); both are padded with an out-of-range index that
  reads 0. Then `sums_major` costs M·K row adds and `spread_major` H·W·n_max, instead of M·H·W
  multiply-adds each for the 0/1 matrix. Each map falls back to that matrix product (exact, at
  `Precision.HIGHEST`) when its padded width exceeds `_GATHER_FRACTION` of the matrix's inner dimension,
  unless `method="gather"` forces the gathers. Per-mask arrays end in (M,).

  A pytree: the index lists (as `gather_plan` blocks), the matrix (or None) and the coverage are
  leaves, the shapes and path choices static; a denoiser value holds it and passes it into `jax.jit`.
  """

  def __init__(self, masks, method: str = "auto"):
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
      raise ValueError(f"masks must have shape (M, H, W), got {masks.shape}")
    if method not in ("auto", "gather"):
      raise ValueError(f"unknown IndexMasks method {method!r}; use 'auto' or 'gather'")
    self.image_shape = tuple(masks.shape[1:])
    self.mask_shape = (masks.shape[0],)
    flat = masks.reshape(masks.shape[0], -1)  # (M, P)
    self.coverage = flat.sum(axis=0).reshape(self.image_shape).astype(np.float32)
    check_coverage(self.coverage)
    num_masks, pixels = flat.shape
    members = padded_indices(flat, fill=pixels)      # (M, K)
    owners = padded_indices(flat.T, fill=num_masks)  # (P, n_max)
    force = method == "gather"
    self.max_mask_size = members.shape[1]
    self.gather_sums = force or members.shape[1] <= _GATHER_FRACTION * pixels
    self.gather_spread = force or owners.shape[1] <= _GATHER_FRACTION * num_masks
    self.members = jnp.asarray(gather_plan(members, fill=pixels))
    self.owners = jnp.asarray(gather_plan(owners, fill=num_masks))
    self.coverage = jnp.asarray(self.coverage)
    matrix = None if self.gather_sums and self.gather_spread else flat.astype(np.float32)
    self.matrix = None if matrix is None else jnp.asarray(matrix)

  _STATIC = ("image_shape", "mask_shape", "max_mask_size", "gather_sums", "gather_spread")
  _LEAVES = ("members", "owners", "matrix", "coverage")

  def tree_flatten(self):
    return (tuple(getattr(self, name) for name in self._LEAVES),
            tuple(getattr(self, name) for name in self._STATIC))

  @classmethod
  def tree_unflatten(cls, static, leaves):
    masks = object.__new__(cls)
    for name, value in zip(cls._STATIC + cls._LEAVES, tuple(static) + tuple(leaves)):
      setattr(masks, name, value)
    return masks

  def sums(self, e: jax.Array) -> jax.Array:
    """(..., H, W) → (..., M)."""
    flat = e.reshape(e.shape[:-2] + (-1,))
    picked = jnp.take(flat, _plan_rows(self.members), axis=-1, mode="fill", fill_value=0)
    return jnp.sum(picked, axis=-1)

  def spread(self, w: jax.Array) -> jax.Array:
    """(..., M) → (..., H, W)."""
    picked = jnp.take(w, _plan_rows(self.owners), axis=-1, mode="fill", fill_value=0)
    return jnp.sum(picked, axis=-1).reshape(w.shape[:-1] + self.image_shape)

  @property
  def sums_stored(self) -> bool:
    """Whether `dists_major` ends in a non-fusible operation: a GEMM, or a gather loop of ≥ 2 steps
    (a one-step loop is inlined, e.g. for single-pixel masks)."""
    return not self.gather_sums or self.members.shape[0] > 1

  def dists_major(self, z: jax.Array, x: jax.Array) -> jax.Array:
    """(M, B, n) mask distances from pixel-major z (P, C, B) and x (P, C, n)."""
    return _generic_dists_major(self, z, x)

  def sums_major(self, e: jax.Array) -> jax.Array:
    """(H, W, ...) → (M, ...): padded gather of each mask's pixel rows (or the 0/1 GEMM)."""
    flat = e.reshape((-1,) + e.shape[2:])
    if self.gather_sums:
      return gather_sums_major(flat, self.members)
    out = jnp.dot(jnp.asarray(self.matrix), flat.reshape(flat.shape[0], -1), precision=_HIGHEST)
    return out.reshape(self.mask_shape + e.shape[2:])

  def spread_major(self, w: jax.Array) -> jax.Array:
    """(M, ...) → (H, W, ...): padded gather of each pixel's mask rows (or the 0/1 GEMM)."""
    if self.gather_spread:
      out = gather_sums_major(w, self.owners)
    else:
      flat = w.reshape(w.shape[0], -1)
      out = lax.dot_general(jnp.asarray(self.matrix), flat, (((0,), (0,)), ((), ())),
                            precision=_HIGHEST)
    return out.reshape(self.image_shape + w.shape[1:])
