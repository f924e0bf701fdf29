"""PSPC-Flex with masks cut from the Gaussian denoiser's closed-form sensitivity maps (ours).

The paper's PSPC-Flex (Eq. 12) cuts its masks from the sensitivity maps (Eq. 8) of a trained network.
This variant needs no network: the Gaussian denoiser (docs/design.md §2)

    D(z, σ) = μ + U diag(λ / (λ + σ²)) Uᵀ (z − μ)

is linear in z, so its Jacobian J(σ) = U diag(λ / (λ + σ²)) Uᵀ (D × D, D = H·W·C, rows and columns in
the flattened (H, W, C) order of `GaussianStats.eigvecs`) does not depend on z, and the expectation of
Eq. 8 is the map itself:

    G[σ, p, q] = Σ_c Σ_c' |J(σ)[(p, c), (q, c')]|.

`gaussian_sensitivity_maps` computes it exactly in float64; `pspc_jax.sensitivity.sensitivity_maps`
estimates the same array for any denoiser by VJPs (equal here up to float32 rounding). The maps feed
the ordinary PSPC-Flex (`values.make_flex_denoiser`); the registry name is `pspc_flex_gaussian`.

Coverage. The Gaussian gives no sensitivity to a pixel that is constant over the training set (it is a
null direction of Σ: its row and column of J are 0) and very little to one that barely varies (the
blank borders of the digits), so PSPC-Flex may leave such a pixel in no mask, where Eq. 11 is
undefined. `cover_every_pixel` repairs exactly those pixels and nothing else (module function doc).
"""

from __future__ import annotations

import numpy as np

from pspc_jax import schedules
from pspc_jax.denoisers.flex import SensitivityMaps, flex_masks
from pspc_jax.denoisers.gaussian import GaussianStats


def _check_sigmas(sigmas) -> np.ndarray:
  values = np.asarray(sigmas, np.float64) if np.asarray(sigmas).dtype.kind in "iuf" else None
  if values is None or values.ndim != 1 or values.size == 0:
    raise ValueError(f"sigmas must be a non-empty 1-D array of noise levels, got {sigmas!r}")
  if not np.all(np.isfinite(values) & (values > 0)):
    raise ValueError(f"sigmas must be positive and finite, got {values.tolist()}")
  return values


def _check_image_shape(stats: GaussianStats, image_shape) -> tuple[int, int, int]:
  """(H, W, C) of the statistics, after checking `image_shape` ((H, W) or (H, W, C)) against them."""
  mean_shape = tuple(int(v) for v in np.shape(stats.mean))
  try:
    shape = tuple(int(v) for v in image_shape)
  except (TypeError, ValueError):
    raise ValueError(f"image_shape must be (H, W) or (H, W, C), got {image_shape!r}") from None
  if len(mean_shape) != 3 or shape not in (mean_shape, mean_shape[:2]):
    raise ValueError(f"image_shape {shape} does not match the statistics' images {mean_shape}")
  dim, rank = np.shape(stats.eigvecs) if np.ndim(stats.eigvecs) == 2 else (None, None)
  if dim != int(np.prod(mean_shape)) or np.shape(stats.eigvals) != (rank,):
    raise ValueError(f"stats must hold eigvecs (D, r) with D = {int(np.prod(mean_shape))} and "
                     f"eigvals (r,), got {np.shape(stats.eigvecs)} and {np.shape(stats.eigvals)}")
  return mean_shape


def gaussian_sensitivity_maps(stats: GaussianStats, sigmas, image_shape) -> SensitivityMaps:
  """The exact sensitivity maps (Eq. 8) of the Gaussian denoiser of `stats`, at every σ (module doc).

  For each σ, J = U diag(λ / (λ + σ²)) Uᵀ is formed in float64 from the float32 eigenpairs (a zero
  eigenvalue contributes nothing; with rank r < D only the kept r directions, as `gaussian_denoise`),
  and G[p, q] = Σ_c Σ_c' |J[(p, c), (q, c')]|. Cost per σ: one (D, r) × (r, D) float64 product and a
  (D, D) float64 array (75 MB for CIFAR-10, about 1 s on 2 CPU cores).

  Args:
    stats: a Gaussian fit (`gaussian.gaussian_stats`), mean (H, W, C), eigvals (r,), eigvecs (D, r).
    sigmas: (S,) noise levels, positive and finite, in any order (kept).
    image_shape: (H, W) or (H, W, C) of the images; must match `stats.mean`.

  Returns:
    SensitivityMaps with sigmas float64 (S,) and maps float32 (S, H, W, H, W); maps[k, h, w] is the
    map of output pixel (h, w) over the input pixels at sigmas[k].

  Raises:
    ValueError: `sigmas` not a non-empty 1-D array of positive finite numbers, or `image_shape` (or
      the statistics' shapes) not matching the statistics.
  """
  height, width, channels = _check_image_shape(stats, image_shape)
  sigmas = _check_sigmas(sigmas)
  eigvals = np.asarray(stats.eigvals, np.float64)
  eigvecs = np.asarray(stats.eigvecs, np.float64)
  maps = np.empty((len(sigmas), height, width, height, width), np.float32)
  for k, sigma in enumerate(sigmas):
    keep = eigvals / (eigvals + sigma * sigma)
    jacobian = np.abs((eigvecs * keep) @ eigvecs.T)  # (D, D): [(p, c), (q, c')]
    blocks = jacobian.reshape(height, width, channels, height, width, channels)
    maps[k] = blocks.sum(axis=(2, 5))
  return SensitivityMaps(sigmas=sigmas, maps=maps)


def cover_every_pixel(maps: SensitivityMaps, thresholds=None) -> tuple[SensitivityMaps, int]:
  """`maps` changed so that PSPC-Flex with `thresholds` leaves no pixel in no mask.

  For every (maps σ, λ < 1) pair that some σ reaches (as `flex.flex_branches` pairs them: nearest grid
  σ in log σ), a pixel q that no mask covers gets its own entry G[q, q] raised just above the largest
  entry of its own map (to 1 if that map's largest entry is 0 or subnormal), so that its own mask,
  which always keeps its top pixel, holds it. Raising q's entry changes q's masks only, so this is
  repeated until every reachable pair covers every pixel. Maps with full coverage come back unchanged
  (no copy is made).

  Args:
    maps: (S,) σ and (S, H, W, H, W) non-negative maps.
    thresholds: as `flex.flex_branches` (a SigmaSchedule, a number, a spec, or None for CIFAR-10's).

  Returns:
    (maps, number of diagonal entries raised).
  """
  lam = schedules.threshold_schedule(thresholds)
  grid = schedules.SigmaSchedule(tuple(float(s) for s in maps.sigmas), tuple(range(len(maps.sigmas))))
  pairs = [(k, float(lam.values[j])) for k, j in schedules.reachable_pairs(grid, lam)
           if float(lam.values[j]) < 1]
  out, raised, changed = np.asarray(maps.maps, np.float32), 0, True
  while changed:
    changed = False
    for k, threshold in pairs:
      uncovered = ~np.asarray(flex_masks(out[k], threshold)).any(axis=0)
      for h, w in np.argwhere(uncovered):
        out = out.copy() if not raised else out
        top = float(out[k, h, w].max())
        out[k, h, w, h, w] = top * (1 + 2.0 ** -20) if top >= np.finfo(np.float32).tiny else 1.0
        raised, changed = raised + 1, True
  return SensitivityMaps(maps.sigmas, out) if raised else maps, raised
