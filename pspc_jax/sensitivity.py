"""Gradient sensitivity maps of a denoiser (paper Eq. 8, Fig. 3).

For a denoiser D(z, σ) on images of shape (H, W, C) the sensitivity of output pixel p to input
pixel q at noise level σ is

    G[σ, p, q] = E_z  Σ_c Σ_c' |∂D(z, σ)_{p,c} / ∂z_{q,c'}|,      z = x + σ·ε,

with x drawn uniformly from a dataset and ε ~ N(0, I): the absolute Jacobian entries are summed over
the output channels c of pixel p **and** over the input channels c' of pixel q (the paper's Eq. 8 sums
absolute values; nothing cancels). A map is an (H, W, H, W) array: G[h, w] is the (H, W) map of
output pixel (h, w) over the input pixels.

Computation: the Jacobian rows are pulled back in batched VJPs (`jax.vmap` over one-hot cotangents of
one `jax.vjp` linearisation), in chunks of `chunk_size` output pixels (C cotangents each) so memory is
bounded, all inside one jitted function per denoiser. The expectation is a plain average over `num_z`
forward-process samples, streamed over batches of `batch_size` z (`batching.padded_batches`: the last
batch is padded, its padding weighted 0) and accumulated in float64 on the host. The z of sample k
depends only on (seed, k) (`forward_process`), not on the batch size and not on σ: every σ uses the
same x and ε (common random numbers), so maps vary smoothly with σ.

The Gaussian denoiser's maps have a closed form (its Jacobian does not depend on z):
`gaussian_sensitivity_maps` (defined in `pspc_jax.denoisers.gaussian_flex`, re-exported here) computes
them exactly, with no expectation.

Pure functions only: the maps files are read and written by `pspc_jax.maps_files`, and the resumable
job behind `bin/sensitivity` is `pspc_jax.jobs.sensitivity`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax.batching import padded_batches
from pspc_jax.denoisers.flex import SensitivityMaps
from pspc_jax.denoisers.gaussian_flex import gaussian_sensitivity_maps  # noqa: F401 (re-export)
from pspc_jax.denoisers.values import as_argument
from pspc_jax.forward_process import forward_samples
from pspc_jax.progress import SILENT, Progress, compile_jitted

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
DEFAULT_FRACTIONS = (0.5, 0.75, 0.95)
# Floats held by one chunk's pulled-back gradients (chunk · C · B · H · W · C) when chunk_size is None.
_AUTO_CHUNK_FLOATS = 1 << 22


# --------------------------------------------------------------------------------------------------
# Jacobians.


def abs_jacobian_sum(denoise: Denoiser, z, sigma, weights=None, *, chunk_size: int | None = None
                     ) -> jnp.ndarray:
  """Σ_b w_b Σ_c Σ_c' |∂D(z, σ)_{b,p,c} / ∂z_{b,q,c'}| for a batch of z, by batched VJPs.

  The denoiser must treat the samples of a batch independently (true of every denoiser here): one
  VJP of the whole batch with the same one-hot cotangent in every sample then yields every sample's
  Jacobian row at once.

  Args:
    denoise: differentiable `denoise(z, sigma) -> x_hat`, (B, H, W, C) float32 in and out.
    z: (B, H, W, C) float32 inputs.
    sigma: noise level, a scalar or (B,); passed to `denoise` unchanged.
    weights: (B,) per-sample weights w_b (e.g. 0 for padding); None weighs every sample 1.
    chunk_size: output pixels per VJP chunk (C·chunk_size cotangents pulled back together); None picks
      it so that the gradients of one chunk hold about 4M floats.

  Returns:
    float32 (H, W, H, W): entry [h, w, i, j] for output pixel (h, w) and input pixel (i, j).
  """
  z = jnp.asarray(z, jnp.float32)
  if z.ndim != 4:
    raise ValueError(f"z must have shape (B, H, W, C), got {z.shape}")
  batch, height, width, channels = z.shape
  num_pixels = height * width
  weights = jnp.ones((batch,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  chunk = _chunk_size(chunk_size, z.shape)
  x_hat, pullback = jax.vjp(lambda zz: denoise(zz, sigma), z)
  if x_hat.shape != z.shape:
    raise ValueError(f"the denoiser returned shape {x_hat.shape} for z of shape {z.shape}")
  eye = jnp.eye(channels, dtype=x_hat.dtype)

  def rows(pixels):
    """(K,) output pixel indices -> (K, H, W) absolute Jacobian sums."""
    count = pixels.shape[0]
    onehot = jax.nn.one_hot(pixels, num_pixels, dtype=x_hat.dtype).reshape(count, 1, height, width, 1)
    cot = onehot * eye[None, :, None, None, :]  # (K, c, H, W, c): one cotangent per (pixel, channel).
    cot = jnp.broadcast_to(cot[:, :, None], (count, channels, batch, height, width, channels))
    (grads,) = jax.vmap(pullback)(cot.reshape(count * channels, batch, height, width, channels))
    summed = jnp.sum(jnp.abs(grads), axis=-1)  # over input channels c': (K·c, B, H, W).
    summed = jnp.sum(summed * weights[None, :, None, None], axis=1)  # over the batch.
    return jnp.sum(summed.reshape(count, channels, height, width), axis=1)  # over output channels c.

  pixels = jnp.arange(num_pixels, dtype=jnp.int32)
  num_full = num_pixels // chunk
  parts = []
  if num_full:
    full = jax.lax.map(rows, pixels[:num_full * chunk].reshape(num_full, chunk))
    parts.append(full.reshape(num_full * chunk, height, width))
  if num_pixels % chunk:
    parts.append(rows(pixels[num_full * chunk:]))
  out = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
  return out.reshape(height, width, height, width)


def _chunk_size(chunk_size: int | None, shape) -> int:
  batch, height, width, channels = shape
  if chunk_size is None:
    chunk_size = _AUTO_CHUNK_FLOATS // (channels * batch * height * width * channels)
  elif chunk_size < 1:
    raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
  return int(max(1, min(chunk_size, height * width)))


# --------------------------------------------------------------------------------------------------
# Forward-process samples and expectations.


def _check_counts(num_z: int, batch_size: int) -> None:
  if num_z < 1:
    raise ValueError(f"num_z must be at least 1, got {num_z}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _check_sigma(sigma: float) -> None:
  if not np.isfinite(sigma) or sigma <= 0:
    raise ValueError(f"sigma must be positive and finite, got {sigma}")


def sensitivity_map_function(denoise: Denoiser, data, *, num_z: int, seed: int = 0,
                             batch_size: int = 8, chunk_size: int | None = None,
                             progress: Progress = SILENT) -> Callable[[float], np.ndarray]:
  """σ ↦ the sensitivity map G[σ] (Eq. 8), with one batch step compiled here for every σ.

  The batch step (the Jacobian sums of `batch_size` forward-process z) is compiled at once, reported
  as the phase "compiling sensitivity step"; the returned function only runs it.

  Args:
    denoise, data, num_z, seed, batch_size, chunk_size: as in :func:`sensitivity_map`.
    progress: where the compilation is reported.

  Returns:
    `map_at(sigma) -> float32 (H, W, H, W)`, the average over sample ids 0 … num_z − 1; it raises
    ValueError for σ that is not positive and finite.

  Raises:
    ValueError: num_z or batch_size below 1, data not (N, H, W, C) with N ≥ 1, chunk_size below 1.
  """
  _check_counts(num_z, batch_size)
  data = jnp.asarray(data)
  if data.ndim != 4 or data.shape[0] == 0:
    raise ValueError(f"data must have shape (N, H, W, C) with N >= 1, got {data.shape}")
  batch_size = min(batch_size, num_z)
  denoise = as_argument(denoise)

  @jax.jit
  def batch_sum(den, dataset, sigma, ids, weights):  # denoiser and dataset are arguments, not constants
    z = forward_samples(dataset, sigma, ids, seed)
    return abs_jacobian_sum(den, z, sigma, weights, chunk_size=chunk_size)

  step = compile_jitted(progress, "sensitivity step", batch_sum, denoise, data, jnp.float32(1.0),
                        jnp.zeros((batch_size,), jnp.int32), jnp.ones((batch_size,), jnp.float32))

  def map_at(sigma):
    _check_sigma(sigma)
    total = 0.0
    for _, size, ids in padded_batches(np.arange(num_z), batch_size):
      weights = (np.arange(batch_size) < size).astype(np.float32)  # the padding weighs nothing.
      part = step(denoise, data, jnp.float32(sigma), jnp.asarray(ids, jnp.int32), jnp.asarray(weights))
      total = total + np.asarray(part, np.float64)
    return (total / num_z).astype(np.float32)

  return map_at


def sensitivity_map(denoise: Denoiser, data, sigma: float, *, num_z: int = 16, seed: int = 0,
                    batch_size: int = 8, chunk_size: int | None = None,
                    progress: Progress = SILENT) -> np.ndarray:
  """The sensitivity map G[σ] (Eq. 8) of `denoise` at one noise level.

  Args:
    denoise: differentiable `denoise(z, sigma)`; samples of a batch must be independent.
    data: (N, H, W, C) dataset the clean x are drawn from (uint8 or float in [-1, 1]).
    sigma: noise level σ > 0.
    num_z: number of forward-process samples averaged (sample ids 0 … num_z − 1).
    seed: seed of the samples (see `forward_process.forward_samples`).
    batch_size: z per VJP batch (memory grows linearly with it).
    chunk_size: output pixels per VJP chunk (see :func:`abs_jacobian_sum`).
    progress: where the compilation is reported.

  Returns:
    float32 (H, W, H, W), non-negative; [h, w] is the map of output pixel (h, w).

  Raises:
    ValueError: σ not positive and finite, or bad counts or data (:func:`sensitivity_map_function`).
  """
  sigma = float(sigma)
  _check_sigma(sigma)  # before compiling
  return sensitivity_map_function(denoise, data, num_z=num_z, seed=seed, batch_size=batch_size,
                                  chunk_size=chunk_size, progress=progress)(sigma)


def sensitivity_maps(denoise: Denoiser, data, sigmas: Sequence[float], *, num_z: int = 16,
                     seed: int = 0, batch_size: int = 8, chunk_size: int | None = None,
                     progress: Progress = SILENT) -> SensitivityMaps:
  """Sensitivity maps (Eq. 8) at several noise levels, compiled once for all of them.

  Args:
    denoise, data, num_z, seed, batch_size, chunk_size: as in :func:`sensitivity_map`.
    sigmas: noise levels σ > 0, in any order (kept).
    progress: where the compilation and a bar over the σ are reported.

  Returns:
    SensitivityMaps with sigmas as float64 (S,) and maps (S, H, W, H, W).

  Raises:
    ValueError: no σ, or as :func:`sensitivity_map`.
  """
  sigmas = np.asarray(sigmas, np.float64).reshape(-1)
  if sigmas.size == 0:
    raise ValueError("no noise levels given")
  for sigma in sigmas:
    _check_sigma(sigma)  # before compiling
  map_at = sensitivity_map_function(denoise, data, num_z=num_z, seed=seed, batch_size=batch_size,
                                    chunk_size=chunk_size, progress=progress)
  maps = []
  with progress.bar(total=len(sigmas), desc="sensitivity maps", unit="σ") as bar:
    for sigma in sigmas:
      maps.append(map_at(float(sigma)))
      bar.update()
  return SensitivityMaps(sigmas=sigmas, maps=np.stack(maps))


# --------------------------------------------------------------------------------------------------
# The Fig. 3 (left) statistic.


def captured_mass(maps, pixel: tuple[int, int] | None = None) -> np.ndarray:
  """Fraction of the normalised map mass inside centred squares of radius r = 0, 1, ….

  Each output pixel's map is normalised to sum 1; the square of radius r around output pixel p is
  {q : max(|q_h − p_h|, |q_w − p_w|) ≤ r} clipped to the image (side 2r + 1 before clipping). With
  `pixel=None` the fraction is averaged over all output pixels with a non-zero map (the same as
  capturing the average of all maps, each shifted so its output pixel is at the centre); otherwise it
  is that pixel's.

  Args:
    maps: (..., H, W, H, W) non-negative maps (e.g. one σ, or all S of a SensitivityMaps).
    pixel: an output pixel (h, w), or None for the average over all output pixels.

  Returns:
    float64 (..., R) non-decreasing fractions for r = 0 … R − 1, R = max(H, W); the last entry is 1
    (NaN where every map considered is zero).
  """
  maps = np.asarray(maps, np.float64)
  if maps.ndim < 4 or maps.shape[-4:-2] != maps.shape[-2:]:
    raise ValueError(f"maps must have shape (..., H, W, H, W), got {maps.shape}")
  height, width = maps.shape[-2:]
  lead = maps.shape[:-4]
  if pixel is not None:
    h, w = pixel
    if not (0 <= h < height and 0 <= w < width):
      raise ValueError(f"pixel {pixel} is outside the {height}x{width} image")
    maps = maps[..., h:h + 1, w:w + 1, :, :]
  if pixel is None:
    out_h, out_w = np.divmod(np.arange(height * width), width)
  else:
    out_h, out_w = np.array([pixel[0]]), np.array([pixel[1]])
  # Chebyshev distance from each considered output pixel to every input pixel: (P', H, W).
  dist = np.maximum(np.abs(np.arange(height)[None, :, None] - out_h[:, None, None]),
                    np.abs(np.arange(width)[None, None, :] - out_w[:, None, None]))
  radii = max(height, width)
  flat = maps.reshape(-1, dist.shape[0], height * width)  # (L, P', H·W)
  totals = flat.sum(-1)  # (L, P')
  ring_index = (np.arange(dist.shape[0])[:, None] * radii + dist.reshape(dist.shape[0], -1))
  rings = np.stack([np.bincount(ring_index.ravel(), weights=m.ravel(), minlength=dist.shape[0] * radii)
                    for m in flat]).reshape(flat.shape[0], dist.shape[0], radii)
  valid = totals > 0
  fractions = np.cumsum(rings, axis=-1) / np.where(valid, totals, 1.0)[..., None]
  count = valid.sum(-1)
  mean = np.where(count[:, None] > 0,
                  (fractions * valid[..., None]).sum(1) / np.maximum(count, 1)[:, None], np.nan)
  return mean.reshape(*lead, radii)


def square_capture_sides(maps, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                         pixel: tuple[int, int] | None = None) -> np.ndarray:
  """Side of the smallest centred square capturing each fraction of the map mass (paper Fig. 3 left).

  The side is 2r + 1 for the smallest radius r whose centred square (see :func:`captured_mass`)
  holds at least the fraction of the normalised mass (up to 1e-9 of round-off). With `pixel=None`
  the captured fraction is first averaged over all output pixels. Sides are odd and can exceed the
  image side for off-centre pixels (a corner pixel needs r = H − 1 to see the whole image).

  Args:
    maps: (..., H, W, H, W) non-negative maps.
    fractions: fractions in (0, 1], e.g. (0.5, 0.75, 0.95).
    pixel: an output pixel (h, w), or None for the average over all output pixels.

  Returns:
    float64 (..., F) sides (NaN where every map considered is zero).
  """
  fractions = np.asarray(fractions, np.float64).reshape(-1)
  if fractions.size == 0 or np.any(fractions <= 0) or np.any(fractions > 1):
    raise ValueError(f"fractions must lie in (0, 1], got {fractions.tolist()}")
  curve = captured_mass(maps, pixel)
  reached = curve[..., None, :] >= fractions[:, None] - 1e-9  # (..., F, R)
  radius = np.argmax(reached, axis=-1)
  return np.where(np.isnan(curve[..., :1]), np.nan, 2.0 * radius + 1.0)


# --------------------------------------------------------------------------------------------------
# Maps at an arbitrary σ.


def nearest_sigma_index(sigmas, sigma):
  """Index of the grid σ nearest to `sigma` in log σ (ties: the lower index).

  σ ≤ 0 maps to the smallest grid σ (the log σ → −∞ limit). Works on concrete values (NumPy result)
  and inside `jax.jit` on traced ones (JAX result).

  Args:
    sigmas: (S,) positive grid.
    sigma: a scalar or an array of any shape.

  Returns:
    int index array of the shape of sigma.
  """
  try:
    sigma_np = np.asarray(sigma, np.float64)
  except jax.errors.TracerArrayConversionError:
    grid = jnp.log(jnp.asarray(sigmas, jnp.float32))
    target = jnp.log(jnp.maximum(jnp.asarray(sigma, jnp.float32), jnp.finfo(jnp.float32).tiny))
    return jnp.argmin(jnp.abs(target[..., None] - grid), axis=-1)
  grid = np.log(np.asarray(sigmas, np.float64))
  target = np.log(np.maximum(sigma_np, np.finfo(np.float64).tiny))
  return np.argmin(np.abs(target[..., None] - grid), axis=-1)


def maps_for_sigma(maps: SensitivityMaps, sigma):
  """The map of the grid σ nearest to `sigma` in log σ (:func:`nearest_sigma_index`).

  Args:
    maps: the grid of maps.
    sigma: a scalar, or (B,) for one map per sample; may be traced under `jax.jit`.

  Returns:
    (H, W, H, W) for a scalar sigma, (B, H, W, H, W) for (B,); NumPy for concrete sigma, JAX when
    traced.
  """
  index = nearest_sigma_index(maps.sigmas, sigma)
  if isinstance(index, np.ndarray):
    return maps.maps[index]
  return jnp.asarray(maps.maps)[index]
