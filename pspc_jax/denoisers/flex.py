"""PSPC-Flex: one adaptive mask per output pixel, cut from its sensitivity map (docs/design.md §2).

For output pixel p at noise level σ, let G_p (H, W) ≥ 0 be its sensitivity map (Eq. 8), normalised to
sum 1. The mask C_p is the smallest set of the highest-sensitivity pixels whose mass is ≥ λ(σ):

    C_p = {q_1, …, q_k},  G_p[q_1] ≥ G_p[q_2] ≥ …,  k = min{k : Σ_{j ≤ k} G_p[q_j] ≥ λ},

with ties in G_p broken stably (equal values keep row-major order, q = h·W + w). λ ≥ 1 keeps every
pixel: each mask is the whole image and the composite is the optimal empirical denoiser. A mask always
keeps at least its top pixel (so λ → 0 and an all-zero map give one pixel, not an empty mask). C_p need
not contain p itself; n_q counts the masks containing q, and a pixel in no mask is an error (Eq. 11 is
undefined there). The denoiser is the PSPC composite (Eq. 11) over the H·W masks {C_p}:

    x̂[q] = (1/n_q) Σ_{p : q ∈ C_p} Σ_i w_i(C_p) x_i[q],   w_i(C) = softmax_i(−‖C z − C x_i‖² / (2σ²)).

It is computed by the exact two-pass streaming algorithm of `pspc.composite_denoise` (docs/design.md §3) with
one of two mask forms:

* "gather" (`masks.IndexMasks`, the default when the maps and λ are concrete): padded lists of each
  mask's pixels and each pixel's masks; the window sums and the spread cost ∝ the mask sizes.
* "matmul" (`masks.PixelMasks`): the dense (H·W, H·W) 0/1 matrix at `Precision.HIGHEST`; cost ∝ (H·W)²
  per query and data row whatever λ. The only form when the maps or λ are traced (mask sizes are then
  unknown at compile time), and the comparison path of the tests and benchmarks.

Sensitivity maps are arrays here, (H, W, H, W) per σ with maps[h, w] the map of output pixel (h, w), or
(S, H, W, H, W) on a grid of S noise levels for the scheduled denoiser (`make_flex_denoiser`); reading
them from a file is left to `pspc_jax.maps_files`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import schedules, validation
from pspc_jax.denoisers.empirical import empirical_denoise
from pspc_jax.denoisers.masks import IndexMasks, PixelMasks
from pspc_jax.denoisers.pspc import composite_denoise

METHODS = ("auto", "gather", "matmul")


def flex_masks(maps_for_sigma: jax.Array, threshold) -> jax.Array:
  """The PSPC-Flex masks of one noise level (see the module docstring).

  Pure and `jit`-compatible (the maps and λ may be traced).

  Args:
    maps_for_sigma: (H, W, H, W) non-negative sensitivity maps; [h, w] is the map of output pixel
      (h, w). Need not be normalised. Non-positive and NaN entries count as 0.
    threshold: λ, the sensitivity mass to keep (scalar); ≥ 1 keeps every pixel.

  Returns:
    bool (H·W, H, W): mask p = h·W + w is C_p, the mask of output pixel (h, w).
  """
  maps = jnp.asarray(maps_for_sigma, jnp.float32)
  if maps.ndim != 4 or maps.shape[:2] != maps.shape[2:]:
    raise ValueError(f"maps must have shape (H, W, H, W), got {maps.shape}")
  height, width = maps.shape[:2]
  pixels = height * width
  # Every non-positive entry becomes +0.0, so that all zeros get the same sort key (−0.0) and tie.
  g = maps.reshape(pixels, pixels)
  g = jnp.where(g > 0, g, 0.0)
  order = jnp.argsort(-g, axis=1, stable=True)  # descending; equal values keep row-major order
  ranked = jnp.take_along_axis(g, order, axis=1)
  # Mass strictly before each ranked pixel (no subtraction: a shifted inclusive cumulative sum).
  before = jnp.concatenate([jnp.zeros((pixels, 1), jnp.float32),
                            jnp.cumsum(ranked, axis=1)[:, :-1]], axis=1)
  total = jnp.sum(ranked, axis=1, keepdims=True)
  threshold = jnp.asarray(threshold, jnp.float32)
  # Pixel j is needed iff the mass before it is still short of λ·total (mass fractions without a
  # division); the top pixel always stays, and λ ≥ 1 keeps everything (whatever the rounding of the sum).
  keep = (before < threshold * total) | (jnp.arange(pixels) == 0)[None, :] | (threshold >= 1)
  rows = jnp.arange(pixels)[:, None]
  masks = jnp.zeros((pixels, pixels), bool).at[rows, order].set(keep)
  return masks.reshape(pixels, height, width)


def _is_concrete(*values) -> bool:
  return not any(isinstance(v, jax.core.Tracer) for v in values)


def flex_mask_set(maps_for_sigma, threshold, method: str = "auto"):
  """The mask object `composite_denoise` takes for one noise level, or None when λ ≥ 1 (whole image).

  Args:
    maps_for_sigma: (H, W, H, W) sensitivity maps.
    threshold: λ.
    method: "auto"/"gather" (an `IndexMasks` when maps and λ are concrete; "gather" forces the
      gathers, "auto" lets each map fall back to the 0/1 matrix for large masks) or "matmul" (a
      `PixelMasks`). Traced maps or λ always give a `PixelMasks`, and never None.

  Raises:
    ValueError: unknown method, bad map shape, or (concrete masks) a pixel covered by no mask.
  """
  if method not in METHODS:
    raise ValueError(f"unknown PSPC-Flex method {method!r}; use one of {', '.join(METHODS)}")
  if not _is_concrete(maps_for_sigma, threshold):
    return PixelMasks(flex_masks(maps_for_sigma, threshold))
  if method != "matmul" and float(threshold) >= 1:
    return None
  # Concrete inputs: compute the masks now, even inside a `jit` trace, so that their sizes are known.
  with jax.ensure_compile_time_eval():
    masks = np.asarray(flex_masks(maps_for_sigma, threshold))
    if method == "matmul":
      return PixelMasks(masks)  # concrete, so its coverage check runs
  return IndexMasks(masks, method="gather" if method == "gather" else "auto")


def pspc_flex_denoise(z: jax.Array, sigma, data: jax.Array, maps: jax.Array, threshold, *,
                      chunk_size: int | None = None, method: str = "auto", axis_name=None,
                      valid_rows: int | None = None, data_major=None) -> jax.Array:
  """PSPC-Flex at one set of sensitivity maps and one threshold (Eq. 11 over the Flex masks).

  The maps belong to one noise level; `sigma` may still be per sample (the posterior weights use each
  sample's σ), but all samples share the masks. `make_flex_denoiser` picks maps and λ per sample.

  Args:
    z: (B, H, W, C) float32 noisy images.
    sigma: scalar or (B,) noise levels (EDM σ).
    data: (N, H, W, C) uint8 or float training images.
    maps: (H, W, H, W) non-negative sensitivity maps, maps[h, w] of output pixel (h, w).
    threshold: λ ∈ (0, 1], the sensitivity mass each mask keeps (ValueError outside, or NaN, when
      concrete). With concrete maps and λ = 1 the call is the (single-pass) optimal empirical
      denoiser, which it equals exactly.
    chunk_size: dataset rows per streamed chunk (default: `pspc.pixel_major_chunk_size`).
    method: "auto" (padded gathers when the maps and λ are concrete, see `flex_mask_set`), "gather" or
      "matmul" (the dense 0/1 mask matrix, also used whenever the maps or λ are traced). The methods
      differ in speed only (float32 rounding aside).
    axis_name, valid_rows: dataset sharded over a mesh axis inside `jax.shard_map`, and padding rows
      (see `pspc.composite_denoise`); None: one device, no padding.
    data_major: `pspc.pixel_major_data(data)` or None (speed only; see `pspc.composite_denoise`).

  Returns:
    (B, H, W, C) float32 denoised images.

  Raises:
    ValueError: shapes that do not match, a concrete threshold outside (0, 1], bad z, sigma or data
      (`conventions.check_query_and_data`), or a pixel covered by no mask (checked when the masks are
      concrete; traced masks that leave a pixel uncovered give NaN there).
  """
  validation.check_threshold(threshold)
  if z.ndim != 4:
    raise ValueError(f"z must have shape (B, H, W, C), got {z.shape}")
  image = tuple(z.shape[1:3])
  if tuple(np.shape(maps)) != image + image:
    raise ValueError(f"maps must have shape {image + image} (H, W, H, W) for {image} images, got "
                     f"{tuple(np.shape(maps))}")
  masks = flex_mask_set(maps, threshold, method)
  shards = dict(axis_name=axis_name, valid_rows=valid_rows)
  if masks is None:
    return empirical_denoise(z, sigma, data, chunk_size=chunk_size, **shards)
  return composite_denoise(z, sigma, data, masks, chunk_size=chunk_size, data_major=data_major,
                           **shards)


def check_maps(sigmas, maps, image_shape) -> tuple[np.ndarray, np.ndarray]:
  """Validated (S,) float64 σ grid and (S, H, W, H, W) float32 maps for images of `image_shape` (H, W).

  Raises:
    ValueError: wrong shapes, σ ≤ 0, or negative / non-finite map entries.
  """
  sigmas = np.asarray(sigmas, np.float64).reshape(-1)
  maps = np.asarray(maps, np.float32)
  image = tuple(int(v) for v in image_shape)
  if maps.ndim != 5 or maps.shape[1:] != image + image or maps.shape[0] != sigmas.shape[0]:
    raise ValueError(f"sensitivity maps must have shape (S, H, W, H, W) = ({sigmas.shape[0]}, "
                     f"{', '.join(map(str, image + image))}) for {image} images and {sigmas.shape[0]} "
                     f"σ, got {maps.shape}")
  if sigmas.size == 0 or not np.all(sigmas > 0):
    raise ValueError("sensitivity maps need at least one σ, all positive")
  if not np.all(np.isfinite(maps)) or np.any(maps < 0):
    raise ValueError("sensitivity maps must be finite and non-negative")
  return sigmas, maps


class SensitivityMaps(NamedTuple):
  """Sensitivity maps (Eq. 8) on a grid of noise levels.

  Attributes:
    sigmas: (S,) float noise levels (EDM σ > 0), in any order.
    maps: (S, H, W, H, W) float32, non-negative; maps[k, h, w] is the (H, W) map of output pixel (h, w)
      over the input pixels at sigmas[k].
  """
  sigmas: np.ndarray
  maps: np.ndarray


class FlexBranches(NamedTuple):
  """The branches of a scheduled PSPC-Flex (`flex_branches`).

  Attributes:
    masks: one mask set per branch (`IndexMasks` / `PixelMasks` pytrees), None for the λ ≥ 1 branch
      (the optimal empirical denoiser).
    table: (S, T) int32: the branch of (maps index k, threshold index j).
    map_schedule: σ → maps index (static).
    thresholds: σ → λ (static).
  """
  masks: tuple
  table: np.ndarray
  map_schedule: schedules.SigmaSchedule
  thresholds: schedules.SigmaSchedule


def flex_branches(maps: SensitivityMaps, image_shape, thresholds=None, *, metric: str = "log",
                  method: str = "auto") -> FlexBranches:
  """The mask sets of every (maps, λ) pair that some σ reaches, computed now (concretely).

  Each sample at σ uses the maps of the nearest σ of the maps grid (in log σ by default, `metric`) and
  the threshold λ(σ) of `thresholds` (its own grid and metric). The reachable pairs are found once
  (`schedules.reachable_pairs`); each is one branch, and every pair with λ ≥ 1 shares one branch, the
  optimal empirical denoiser.

  Args:
    maps: the sensitivity maps, (S,) σ and (S, H, W, H, W) maps.
    image_shape: (H, W) of the training images.
    thresholds: a `SigmaSchedule` of λ, one number, a `schedules.parse_threshold_schedule` spec, or
      None (`schedules.CIFAR10_FLEX_THRESHOLDS` on the 18-step EDM grid, nearest in log σ).
    metric: "log" or "linear": how the nearest σ of the maps grid is chosen.
    method: mask form of every branch (see `pspc_flex_denoise`).

  Raises:
    ValueError: bad maps or thresholds, or a pixel covered by no mask in some branch.
  """
  sigmas, maps = check_maps(maps.sigmas, maps.maps, image_shape)
  thresholds = schedules.threshold_schedule(thresholds)
  map_schedule = schedules.SigmaSchedule(tuple(float(s) for s in sigmas), tuple(range(len(sigmas))),
                                         metric)
  pairs = schedules.reachable_pairs(map_schedule, thresholds)

  def key(pair):
    k, j = pair
    lam = float(thresholds.values[j])
    return ("full",) if lam >= 1 and method != "matmul" else (k, lam)

  keys = sorted(set(key(pair) for pair in pairs), key=str)
  table = np.zeros((len(sigmas), len(thresholds.values)), np.int32)
  log_grid = np.log(np.asarray(thresholds.sigmas, np.float64))
  for k in range(len(sigmas)):
    reachable = [j for kk, j in pairs if kk == k]
    if not reachable:  # a repeated grid σ: its maps are never selected
      continue
    for j in range(len(thresholds.values)):
      # Pairs no σ selects (all but measure-zero ties) fall back to the nearest reachable λ grid entry.
      nearest = min(reachable, key=lambda r: abs(log_grid[r] - log_grid[j]))
      table[k, j] = keys.index(key((k, j if j in reachable else nearest)))
  masks = tuple(None if k == ("full",) else flex_mask_set(maps[k[0]], k[1], method) for k in keys)
  return FlexBranches(masks, table, map_schedule, thresholds)
