"""Patch-based denoisers: patch posterior means composed over a set of masks (Eq. 9-11).

For every mask C and training image i the patch posterior weight is
w_i(C) = softmax_i(−‖C z − C x_i‖² / (2σ²)), and the PSPC composite is

    x̂[p] = (1/n_p) Σ_{C ∋ p} Σ_i w_i(C) x_i[p]                                          (Eq. 11)

computed with the fast exact algorithm of DESIGN §3: no loop over masks, two streaming passes over the
dataset. Pass 1 accumulates the log-normaliser of every mask (online logsumexp); pass 2 forms the exact
normalised weights, spreads them back to pixels and accumulates Σ_i W_i ⊙ x_i. A single pass would need
one running numerator per (mask, pixel of the mask), s² times more work; two passes keep the cost a
constant times one read of the data, and peak memory independent of N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pspc_jax import images
from pspc_jax.denoisers.empirical import default_chunk_size, empirical_denoise, logit_scale
from pspc_jax.denoisers.masks import PixelMasks, SquareWindows, pixel_sq_dists
from pspc_jax.reduce import SoftminStats, fold_chunks


def composite_denoise(z: jax.Array, sigma, data: jax.Array, masks, *,
                      chunk_size: int | None = None) -> jax.Array:
  """PSPC composite (Eq. 11) for any mask set with `sums`, `spread`, `coverage`, `mask_shape`.

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels.
    data: (N, H, W, C) uint8 or float training images.
    masks: a `SquareWindows` or `PixelMasks` (or any object with the same four members).
    chunk_size: dataset rows per streamed chunk.

  Returns:
    (B, H, W, C) float32.
  """
  images.check_query_and_data(z, data)
  batch, height, width, _ = z.shape
  z = z.astype(jnp.float32)
  scale = logit_scale(images.sigma_per_sample(sigma, batch))
  scale = scale.reshape((batch,) + (1,) * len(masks.mask_shape))
  chunk_size = chunk_size or default_chunk_size(batch, height, width)

  def dists_and_images(chunk):
    # The same code computes the distances in both passes; pass 2 relies on seeing pass 1's values.
    x = images.to_model_range(chunk)
    return masks.sums(pixel_sq_dists(z, x)), x  # (B, n, *mask_shape)

  def normaliser_step(stats, chunk):
    return stats.add(dists_and_images(chunk)[0], scale, axis=1)[0]

  stats = fold_chunks(normaliser_step, SoftminStats.empty((batch,) + masks.mask_shape), data,
                      chunk_size)
  inv_total = jnp.expand_dims(1.0 / stats.total, 1)

  def mean_step(numerator, chunk):
    dists, x = dists_and_images(chunk)
    weights = SoftminStats.weights(dists, stats.min_dist, scale, axis=1) * inv_total
    pixel_weights = masks.spread(weights)  # (B, n, H, W)
    return numerator + jnp.sum(pixel_weights[..., None] * x[None], axis=1)

  numerator = fold_chunks(mean_step, jnp.zeros_like(z), data, chunk_size)
  return numerator / masks.coverage[..., None]


def pspc_square_denoise(z: jax.Array, sigma, data: jax.Array, patch_size: int, *,
                        chunk_size: int | None = None) -> jax.Array:
  """PSPC-Square: Eq. 11 over all s×s windows fully inside the image (no padding).

  Cost O(B·N·H·W·C) whatever s. With s equal to both image sides the single window is the whole image
  and the call is delegated to the (single-pass) optimal empirical denoiser, which it equals exactly.

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels (EDM σ).
    data: (N, H, W, C) uint8 or float training images.
    patch_size: s, a static int with 1 ≤ s ≤ min(H, W).
    chunk_size: dataset rows per streamed chunk.

  Returns:
    (B, H, W, C) float32 denoised images.
  """
  if z.ndim != 4:
    raise ValueError(f"z must have shape (B, H, W, C), got {z.shape}")
  if patch_size == z.shape[1] == z.shape[2]:
    return empirical_denoise(z, sigma, data, chunk_size=chunk_size)
  windows = SquareWindows(z.shape[1], z.shape[2], patch_size)
  return composite_denoise(z, sigma, data, windows, chunk_size=chunk_size)


def pspc_denoise(z: jax.Array, sigma, data: jax.Array, masks, *,
                 chunk_size: int | None = None) -> jax.Array:
  """PSPC with arbitrary cropping masks (Eq. 11).

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels.
    data: (N, H, W, C) uint8 or float training images.
    masks: bool (M, H, W); every pixel must be covered by at least one mask (checked when `masks` is
      concrete, i.e. not traced under `jit`).
    chunk_size: dataset rows per streamed chunk.

  Returns:
    (B, H, W, C) float32 denoised images.
  """
  pixel_masks = PixelMasks(masks)
  if pixel_masks.image_shape != tuple(z.shape[1:3]):
    raise ValueError(f"masks cover {pixel_masks.image_shape} images, z has {tuple(z.shape[1:3])}")
  return composite_denoise(z, sigma, data, pixel_masks, chunk_size=chunk_size)
