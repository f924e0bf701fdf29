"""Cropping masks as linear maps between pixels and masks (DESIGN §3, steps 2 and 4).

A set of M cropping masks is a 0/1 matrix between the H·W pixel positions and the masks. Two operations
are all the PSPC denoisers need:

* `sums(e)`: for per-pixel squared distances e (..., H, W), the distance restricted to every mask,
  ‖C z − C x‖² = Σ_{p ∈ C} e[p] (Eq. 9).
* `spread(w)`: for per-mask weights w (..., masks), the per-pixel total Σ_{C ∋ p} w[C] (the inner sum of
  Eq. 11).

Both are products with a 0/1 matrix at `Precision.HIGHEST`: sums of non-negative terms with no
subtraction, so they keep full float32 relative precision even when a patch distance is 1e-6 and the
logit divides it by 2σ² = 8e-6. `coverage` is n_p, the number of masks covering each pixel.

`SquareWindows` exploits the separable structure of all s×s windows (a banded matrix along W, then along
H), so its cost does not depend on s; `PixelMasks` holds arbitrary masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


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


def window_matrix(length: int, size: int) -> np.ndarray:
  """0/1 matrix (length, length − size + 1) whose column k selects positions k … k + size − 1."""
  if not 1 <= size <= length:
    raise ValueError(f"patch size {size} must be between 1 and the image side {length}")
  pos = np.arange(length)[:, None]
  start = np.arange(length - size + 1)[None, :]
  return ((pos >= start) & (pos < start + size)).astype(np.float32)


class SquareWindows:
  """All s×s windows fully inside an H×W image: (H − s + 1)·(W − s + 1) masks, no padding.

  Window (i, j) covers rows i … i+s−1 and columns j … j+s−1. Per-mask arrays have trailing shape
  (H − s + 1, W − s + 1).
  """

  def __init__(self, height: int, width: int, size: int):
    self.size = int(size)
    self.rows = window_matrix(height, self.size)  # (H, Kh)
    self.cols = window_matrix(width, self.size)   # (W, Kw)
    self.mask_shape = (self.rows.shape[1], self.cols.shape[1])
    self.coverage = np.outer(self.rows.sum(1), self.cols.sum(1)).astype(np.float32)  # (H, W)

  def sums(self, e: jax.Array) -> jax.Array:
    """(..., H, W) → (..., Kh, Kw): Σ of e over every window."""
    along_w = jnp.einsum("...hw,wj->...hj", e, self.cols, precision=_HIGHEST)
    return jnp.einsum("...hj,hi->...ij", along_w, self.rows, precision=_HIGHEST)

  def spread(self, w: jax.Array) -> jax.Array:
    """(..., Kh, Kw) → (..., H, W): every window's value added to each of its s×s pixels."""
    along_w = jnp.einsum("...ij,wj->...iw", w, self.cols, precision=_HIGHEST)
    return jnp.einsum("...iw,hi->...hw", along_w, self.rows, precision=_HIGHEST)


class PixelMasks:
  """Arbitrary cropping masks given as a boolean (M, H, W) array; per-mask arrays end in (M,)."""

  def __init__(self, masks):
    if masks.ndim != 3:
      raise ValueError(f"masks must have shape (M, H, W), got {masks.shape}")
    self.image_shape = tuple(masks.shape[1:])
    self.matrix = jnp.asarray(masks, jnp.float32).reshape(masks.shape[0], -1)  # (M, H·W)
    self.mask_shape = (masks.shape[0],)
    self.coverage = jnp.sum(self.matrix, axis=0).reshape(self.image_shape)
    if not isinstance(self.coverage, jax.core.Tracer) and not bool(jnp.all(self.coverage > 0)):
      missing = np.argwhere(np.asarray(self.coverage) == 0)
      raise ValueError(f"{len(missing)} pixel(s) are covered by no mask, e.g. (row, col) = "
                       f"{tuple(int(v) for v in missing[0])}; PSPC is undefined there (Eq. 11)")

  def sums(self, e: jax.Array) -> jax.Array:
    """(..., H, W) → (..., M)."""
    flat = e.reshape(e.shape[:-2] + (-1,))
    return jnp.einsum("...p,mp->...m", flat, self.matrix, precision=_HIGHEST)

  def spread(self, w: jax.Array) -> jax.Array:
    """(..., M) → (..., H, W)."""
    flat = jnp.einsum("...m,mp->...p", w, self.matrix, precision=_HIGHEST)
    return flat.reshape(w.shape[:-1] + self.image_shape)
