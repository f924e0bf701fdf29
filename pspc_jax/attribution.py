"""Attribution of (generated) images to training images through the PSPC patch posterior weights.

For a PSPC composite over masks C (Eq. 11) the output at pixel p is Σ_i a_i[p] x_i[p] with the
*composite weight* of training image i at pixel p

    a_i[p] = (1/n_p) Σ_{C ∋ p} w_i(C),    w_i(C) = softmax_i(−‖C z − C x_i‖² / (2σ²))   (Eq. 10-11),

n_p = number of masks covering p. For every pixel Σ_i a_i[p] = 1, so a[p] is a distribution over the
training set saying which images the denoiser copies pixel p from. This module computes, exactly and
streamed over the dataset in chunks (memory independent of N apart from the (B, N) totals):

* per pixel, the k training images with the largest a_i[p] and their weights, (B, H, W, k);
* per query, every training image's share of the whole image, t_i = (1/P) Σ_p a_i[p], (B, N)
  (Σ_i t_i = 1), and from it how many images make up 50 % / 90 % of the weight (`contributor_counts`).

Two passes, as in `pspc.composite_denoise` (docs/design.md §3) and with the same building blocks (pixel-major
distances, `sums_major` / `spread_major` of the mask set, `SoftminStats`, `fold_chunks`): pass 1 gets
every mask's softmax normaliser, pass 2 forms the exact a_i[p] of one chunk of rows at a time and
merges them into a running per-pixel top-k (`lax.top_k` of the running k and the chunk's n
candidates; ties go to the lower dataset index) while writing the chunk's columns of the totals. Cost:
about two PSPC-Square denoiser calls per query, plus the top-k merges.

Several queries can be aggregated into one attribution target before the top-k: target b gets
Σ_q M[b, q] a^{(q)}, for a fixed (B, Q) matrix M. `attribute` uses it for a sampling trajectory: the
attribution of a sample is the mean of the per-step composite weights over the steps t with σ_t > 0
(each step's denoiser input z_t at σ_t, with that σ's patch size),

    ā_i[p] = (1/|T|) Σ_{t ∈ T} a_i^{(t)}[p],     T = {t : σ_t > 0} (optionally σ_t within a range),

and its per-pixel top-k is the exact top-k of ā (not a merge of per-step top-k lists). ā still sums to
1 over i at every pixel. Steps at large σ, where the weights are nearly uniform, spread mass over the
whole training set; restrict `sigma_range` to look at the steps that decide the details.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pspc_jax import conventions, schedules
from pspc_jax.denoisers.empirical import logit_scale
from pspc_jax.denoisers.masks import SquareWindows, pixel_sq_dists_major
from pspc_jax.denoisers.pspc import pixel_major_chunk_size
from pspc_jax.softmin import SoftminStats, fold_chunks
from pspc_jax.sampling import Trajectory

_HIGHEST = lax.Precision.HIGHEST


class Attribution(NamedTuple):
  """Composite-weight attribution of B targets (queries or sampling trajectories).

  Attributes:
    indices: (B, H, W, k) int32 training indices of the k largest weights at every pixel, by
      decreasing weight (ties: lower index first).
    weights: (B, H, W, k) float32 the matching composite weights a_i[p] (or their step mean).
    totals: (B, N) float32 per-image share of the whole target, (1/P) Σ_p a_i[p]; rows sum to 1. None
      when not requested.
  """
  indices: jax.Array
  weights: jax.Array
  totals: Any = None


class _Group(NamedTuple):
  """Queries that share one mask set, and their columns of the aggregation matrix."""
  z: jax.Array        # (Q, H, W, C)
  sigma: jax.Array    # (Q,)
  masks: Any          # object with sums_major, spread_major, coverage, mask_shape
  matrix: Any         # (B, Q) aggregation coefficients, or None for the identity (Q = B)


def _square_masks(height: int, width: int, size: int) -> SquareWindows:
  if int(size) < 1:  # a size s covers min(s, H) × min(s, W) pixels (`SquareWindows`)
    raise ValueError(f"patch size {size} must be at least 1 (on {height}×{width} images)")
  return SquareWindows(height, width, int(size))


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _groups(z, sigma, matrix, masks, image_shape) -> list[_Group]:
  """Splits queries by mask set.

  `masks`: a patch size (int), a `SigmaSchedule` of patch sizes (each query uses the size of its own
  σ), or a mask object (`SquareWindows`, `PixelMasks`, `IndexMasks`). With a schedule and concrete σ
  the queries are grouped statically; with traced σ every distinct size runs on all queries and the
  aggregation coefficients select each query's own size (exact, but costs one pass per size).
  """
  height, width = image_shape
  if isinstance(masks, (int, np.integer)):
    return [_Group(z, sigma, _square_masks(height, width, masks), matrix)]
  if not isinstance(masks, schedules.SigmaSchedule):
    if not (hasattr(masks, "sums_major") and hasattr(masks, "spread_major")):
      raise ValueError("masks must be a patch size, a SigmaSchedule or a mask set with "
                       "sums_major/spread_major (SquareWindows, PixelMasks, IndexMasks)")
    return [_Group(z, sigma, masks, matrix)]
  values = masks.distinct_values
  num = z.shape[0]
  full = jnp.eye(num, dtype=jnp.float32) if matrix is None else matrix
  if _is_concrete(sigma):
    sizes = np.asarray(masks.values)[np.asarray(masks.index(sigma))]
    if matrix is None and len(set(sizes.tolist())) == 1:
      return [_Group(z, sigma, _square_masks(height, width, sizes[0]), None)]
    groups = []
    for value in values:
      members = np.flatnonzero(sizes == value)
      if members.size:
        groups.append(_Group(z[members], sigma[members], _square_masks(height, width, value),
                             full[:, members]))
    return groups
  branch_of_entry = jnp.asarray([values.index(v) for v in masks.values])
  which = branch_of_entry[masks.index(sigma)]
  return [_Group(z, sigma, _square_masks(height, width, value),
                 full * (which == j).astype(jnp.float32)[None, :]) for j, value in enumerate(values)]


def _stream(groups: Sequence[_Group], data: jax.Array, num_targets: int, k: int, *, chunk_size,
            with_totals: bool, progress) -> Attribution:
  """The two streaming passes over `data` for all groups at once (see the module docstring)."""
  height, width, channels = data.shape[1:]
  pixels = height * width
  num_rows = data.shape[0]
  if not 1 <= k <= num_rows:
    raise ValueError(f"k must be between 1 and the dataset size {num_rows}, got {k}")
  num_queries = sum(g.z.shape[0] for g in groups)
  chunk_size = max(1, min(int(chunk_size or pixel_major_chunk_size(num_queries, height, width)),
                          num_rows))

  def major(g):
    q = g.z.shape[0]
    z_major = jnp.transpose(g.z.astype(jnp.float32), (1, 2, 3, 0)).reshape(pixels, channels, q)
    return z_major, logit_scale(g.sigma)[None, :], math.prod(g.masks.mask_shape)

  prepared_groups = [major(g) for g in groups]

  def prepare(chunk):
    rows = chunk.shape[0]
    x = conventions.to_model_range(chunk).reshape(rows, pixels, channels)
    return jnp.transpose(x, (1, 2, 0))  # (P, C, n)

  def dists(j, x):
    # The same code computes the distances in both passes; pass 2 relies on seeing pass 1's minima.
    z_major, _, num_masks = prepared_groups[j]
    e = pixel_sq_dists_major(z_major, x)  # (P, Q, n)
    d = groups[j].masks.sums_major(e.reshape((height, width) + e.shape[1:]))
    return d.reshape((num_masks,) + e.shape[1:])  # (masks, Q, n)

  def report(stage, offset, rows):
    if progress is not None:
      jax.debug.callback(lambda s, done: progress(int(s), int(done), num_rows), stage, offset + rows,
                         ordered=True)

  # Pass 1: per-mask running minimum and normaliser, for every group.
  def normaliser_step(stats, x, offset):
    report(1, offset, x.shape[-1])
    return tuple(s.add(dists(j, x), prepared_groups[j][1], axis=2)[0] for j, s in enumerate(stats))

  init = tuple(SoftminStats.empty((p[2], g.z.shape[0])) for g, p in zip(groups, prepared_groups))
  stats = fold_chunks(normaliser_step, init, data, chunk_size, prepare=prepare, with_offset=True)
  inv_totals = [1.0 / s.total for s in stats]

  def pixel_weights(x):
    """a_i[p] of this chunk for every target: (P, B, n)."""
    total = None
    for j, g in enumerate(groups):
      w = SoftminStats.weights(dists(j, x), stats[j].min_dist, prepared_groups[j][1], axis=2)
      w = w * inv_totals[j][..., None]
      spread = g.masks.spread_major(w.reshape(g.masks.mask_shape + w.shape[1:]))  # (H, W, Q, n)
      a = spread / jnp.asarray(g.masks.coverage, jnp.float32)[..., None, None]
      a = a.reshape((pixels,) + w.shape[1:])
      if g.matrix is not None:
        a = jnp.einsum("bq,pqn->pbn", g.matrix, a, precision=_HIGHEST)
      total = a if total is None else total + a
    return total

  # Pass 2: exact weights per chunk, merged into the running per-pixel top-k and the totals.
  def merge_step(carry, x, offset):
    best, best_idx, totals = carry
    rows = x.shape[-1]
    report(2, offset, rows)
    a = pixel_weights(x)
    idx = offset + jnp.arange(rows, dtype=jnp.int32)
    values = jnp.concatenate([best, a], axis=2)
    candidates = jnp.concatenate([best_idx, jnp.broadcast_to(idx, a.shape)], axis=2)
    best, pos = lax.top_k(values, k)
    best_idx = jnp.take_along_axis(candidates, pos, axis=2)
    if totals is not None:
      share = jnp.sum(a, axis=0) / pixels  # (B, n)
      totals = lax.dynamic_update_slice_in_dim(totals, share, offset, axis=1)
    return best, best_idx, totals

  init = (jnp.full((pixels, num_targets, k), -jnp.inf, jnp.float32),
          jnp.full((pixels, num_targets, k), -1, jnp.int32),
          jnp.zeros((num_targets, num_rows), jnp.float32) if with_totals else None)
  best, best_idx, totals = fold_chunks(merge_step, init, data, chunk_size, prepare=prepare,
                                       with_offset=True)

  def to_images(a):
    return jnp.transpose(a, (1, 0, 2)).reshape(num_targets, height, width, k)

  return Attribution(to_images(best_idx), to_images(best), totals)


def pixel_attribution(z: jax.Array, sigma, data: jax.Array, masks, k: int = 5, *,
                      with_totals: bool = True, chunk_size: int | None = None,
                      progress: Callable[[int, int, int], None] | None = None) -> Attribution:
  """Per-pixel top-k composite weights a_i[p] (and per-image totals) of PSPC queries.

  Args:
    z: (B, H, W, C) float32 noisy queries (model units).
    sigma: scalar or (B,) noise levels (EDM σ); a batch may mix levels.
    data: (N, H, W, C) uint8 or float training images, N ≥ k.
    masks: the PSPC mask set: a square patch size s (int; all s×s windows, PSPC-Square), a
      `SigmaSchedule` of patch sizes (each query uses its own σ's size), or a mask object
      (`SquareWindows`, `PixelMasks`, `IndexMasks`).
    k: training images kept per pixel.
    with_totals: also compute the (B, N) per-image totals (the same pass; costs B·N floats).
    chunk_size: dataset rows per streamed chunk; changes speed and memory, not the result beyond
      float32 rounding (ties in the top-k aside).
    progress: optional `progress(pass, rows_done, N)` called after each chunk of each pass (1, 2)
      through `jax.debug.callback`.

  Returns:
    `Attribution` with indices/weights (B, H, W, k) and totals (B, N) (or None).
  """
  conventions.check_query_and_data(z, data)
  sigma = conventions.sigma_per_sample(sigma, z.shape[0])
  groups = _groups(z, sigma, None, masks, data.shape[1:3])
  return _stream(groups, data, z.shape[0], k, chunk_size=chunk_size, with_totals=with_totals,
                 progress=progress)


def pixel_top_k(z: jax.Array, sigma, data: jax.Array, masks, k: int = 5, *,
                chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The k training images with the largest composite weight a_i[p] at every pixel.

  Arguments as `pixel_attribution`. Returns (indices, weights), each (B, H, W, k): int32 training
  indices by decreasing weight and their float32 weights.
  """
  result = pixel_attribution(z, sigma, data, masks, k, with_totals=False, chunk_size=chunk_size)
  return result.indices, result.weights


def image_totals(z: jax.Array, sigma, data: jax.Array, masks, *, chunk_size: int | None = None
                 ) -> jax.Array:
  """Every training image's share of each query, t_i = (1/P) Σ_p a_i[p]: (B, N) float32, rows sum to 1.

  Arguments as `pixel_attribution` (each chunk fills its own columns; the per-pixel top-1 is kept
  alongside, which costs little).
  """
  return pixel_attribution(z, sigma, data, masks, 1, chunk_size=chunk_size).totals


def contributor_counts(totals, shares: Sequence[float] = (0.5, 0.9)) -> np.ndarray:
  """How many training images make up each share of the weight.

  For each row t (one target) and share q: the smallest m such that the m largest entries of t sum to
  at least q · Σ_i t_i (the row sum, 1 up to rounding).

  Args:
    totals: (B, N) non-negative per-image totals (`image_totals`, `Attribution.totals`).
    shares: fractions in (0, 1].

  Returns:
    (B, len(shares)) int64 counts in [1, N].
  """
  totals = np.asarray(totals, np.float64)
  if totals.ndim != 2:
    raise ValueError(f"totals must have shape (B, N), got {totals.shape}")
  if any(not 0 < q <= 1 for q in shares):
    raise ValueError(f"shares must lie in (0, 1], got {list(shares)}")
  ordered = -np.sort(-totals, axis=1)
  cumulative = np.cumsum(ordered, axis=1)
  counts = np.empty((totals.shape[0], len(shares)), np.int64)
  for j, q in enumerate(shares):
    target = q * cumulative[:, -1] * (1 - 1e-12)  # forgive rounding of the cumulative sum at q = 1
    counts[:, j] = np.minimum((cumulative < target[:, None]).sum(axis=1) + 1, totals.shape[1])
  return counts


def _steps_of(path, sigmas) -> tuple[jax.Array, jax.Array, int]:
  """(z (T, B, H, W, C), σ (T,), B) of a Trajectory (with its grid) or a sequence of (z, σ) pairs."""
  if isinstance(path, Trajectory):
    if sigmas is None:
      raise ValueError("attributing a Trajectory needs the sampler's σ grid (sigmas=)")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    steps = path.z.shape[0] - 1
    if sigmas.shape != (steps + 1,):
      raise ValueError(f"a {steps}-step trajectory needs {steps + 1} sigmas, got {sigmas.shape}")
    # Step t's (first) denoiser call sees z_t at σ_t; the final state z_T (σ = 0) is the sample.
    return path.z[:-1], sigmas[:-1], path.z.shape[1]
  pairs = list(path)
  if not pairs:
    raise ValueError("nothing to attribute: the path is empty")
  z = jnp.stack([jnp.asarray(p[0], jnp.float32) for p in pairs])
  batch = z.shape[1]
  sigma = jnp.stack([jnp.asarray(p[1], jnp.float32).reshape(()) for p in pairs])
  return z, sigma, batch


def step_mask(sigmas, sigma_range: tuple[float, float] | None = None):
  """Which steps `attribute` averages: σ_t > 0 and lo ≤ σ_t ≤ hi for sigma_range (lo, hi).

  Args:
    sigmas: noise levels, NumPy or JAX (traced ones too).
    sigma_range: (lo, hi), or None for every σ > 0.

  Returns:
    bool array of the shape (and kind) of `sigmas`.
  """
  lo, hi = sigma_range if sigma_range is not None else (0.0, math.inf)
  return (sigmas > 0) & (sigmas >= lo) & (sigmas <= hi)


def attribute(path, data: jax.Array, masks="auto", *, sigmas=None, k: int = 5,
              sigma_range: tuple[float, float] | None = None, with_totals: bool = True,
              chunk_size: int | None = None,
              progress: Callable[[int, int, int], None] | None = None) -> Attribution:
  """Attributes samples to training images along their sampling trajectories (the main entry point).

  The attribution of sample b is the mean of the per-step composite weights over the selected steps,
  ā_i[p] = (1/|T|) Σ_{t ∈ T} a_i^{(t)}[p] with T = {t : σ_t > 0, lo ≤ σ_t ≤ hi} (see the module
  docstring); indices/weights are the exact per-pixel top-k of ā and totals its per-image shares.

  Args:
    path: a `sampling.Trajectory` (with `sigmas`, the grid it was sampled on; step t's query is
      z_t at σ_t, the input of that step's first denoiser call) or a sequence of (z (B, H, W, C),
      scalar σ) pairs.
    data: (N, H, W, C) uint8 or float training images.
    masks: "auto" (the PSPC-Square schedule for the image side, `schedules.patch_schedule_for`), a
      patch size, a `SigmaSchedule` of patch sizes, or a mask object.
    sigmas: (T + 1,) noise levels of a Trajectory (ignored for pairs).
    k: training images kept per pixel.
    sigma_range: optional (lo, hi): only steps with lo ≤ σ_t ≤ hi count (σ = 0 steps never do). With
      concrete σ the other steps are dropped before any work; with traced σ they get weight 0.
    with_totals: also return the (B, N) per-image shares.
    chunk_size: dataset rows per streamed chunk.
    progress: as in `pixel_attribution`.

  Returns:
    `Attribution` of the B samples.
  """
  z, sigma, batch = _steps_of(path, sigmas)
  conventions.check_query_and_data(z[0], data)
  if isinstance(masks, str):
    if masks != "auto":
      masks = schedules.parse_patch_schedule(masks, data.shape[1:3])
    else:
      masks = schedules.patch_schedule_for(data.shape[1:3])
  lo, hi = sigma_range if sigma_range is not None else (0.0, math.inf)
  if _is_concrete(sigma):
    keep = np.flatnonzero(step_mask(np.asarray(sigma), (lo, hi)))
    if keep.size == 0:
      raise ValueError(f"no step has 0 < σ and {lo} ≤ σ ≤ {hi}")
    z, sigma = z[keep], sigma[keep]
    step_weight = jnp.full((keep.size,), 1.0 / keep.size, jnp.float32)
  else:
    selected = step_mask(sigma, (lo, hi)).astype(jnp.float32)
    step_weight = selected / jnp.maximum(jnp.sum(selected), 1.0)
  steps = z.shape[0]
  # Queries are step-major: query t·B + b is sample b at step t.
  queries = z.reshape((steps * batch,) + z.shape[2:])
  query_sigma = jnp.repeat(sigma, batch)
  matrix = (step_weight[None, :, None] * jnp.eye(batch, dtype=jnp.float32)[:, None, :])
  matrix = matrix.reshape(batch, steps * batch)  # (B, T·B): M[b, t·B + b'] = ω_t δ_bb'
  groups = _groups(queries, query_sigma, matrix, masks, data.shape[1:3])
  return _stream(groups, data, batch, k, chunk_size=chunk_size, with_totals=with_totals,
                 progress=progress)


def dominant_images(indices, weights, count: int) -> np.ndarray:
  """The `count` training images that dominate the most weight of one target's pixels (for figures).

  Image i scores Σ_p [top-1 at p is i] · a_i[p] (its top-1 weight summed over the pixels it
  dominates); images never top-1 come last. Ties go to the lower index.

  Args:
    indices, weights: (H, W, k) per-pixel top-k of one target.
    count: images returned.

  Returns:
    (count,) int training indices by decreasing score (fewer if fewer distinct images are top-k).
  """
  top1 = np.asarray(indices)[..., 0].ravel()
  mass = np.asarray(weights, np.float64)[..., 0].ravel()
  candidates = np.unique(np.asarray(indices))
  score = np.zeros(candidates.size)
  np.add.at(score, np.searchsorted(candidates, top1), mass)
  order = np.lexsort((candidates, -score))
  return candidates[order[:count]]


def figure_images(indices, weights, totals, count: int) -> np.ndarray:
  """The training images a figure shows for one target, in the order of their share of its weight.

  Picks the `count` images dominating the most weight (`dominant_images`: steps at large σ spread
  their totals over the whole training set, so the images that win pixels say more), fills up with
  the largest totals, then orders them by decreasing total share (ties: lower index), the share the
  figure prints: an image holding 0 % never comes before one holding 1 %.

  Args:
    indices, weights: (H, W, k) per-pixel top-k of one target.
    totals: (N,) the target's per-image total shares.
    count: images returned, at most N.

  Returns:
    (count,) int training indices.
  """
  totals = np.asarray(totals, np.float64)
  picked = list(dominant_images(indices, weights, count))
  by_total = [i for i in np.argsort(-totals, kind="stable")[:2 * count] if i not in picked]
  chosen = np.asarray((picked + by_total)[:count], np.int64)
  return chosen[np.lexsort((chosen, -totals[chosen]))]


def dominance_map(indices, weights, chosen) -> tuple[np.ndarray, np.ndarray]:
  """Which of a few chosen training images dominates each pixel (for figures).

  Args:
    indices: (H, W, k) per-pixel top-k training indices of one target.
    weights: (H, W, k) their weights.
    chosen: (M,) training indices (e.g. the target's largest totals).

  Returns:
    (which, strength): (H, W) int, the position in `chosen` of the pixel's top-1 image or −1 when its
    top-1 is not chosen; (H, W) float, that top-1 weight.
  """
  top1 = np.asarray(indices)[..., 0]
  chosen = np.asarray(chosen)
  match = top1[..., None] == chosen
  which = np.where(match.any(-1), np.argmax(match, axis=-1), -1)
  return which, np.asarray(weights)[..., 0]


def summarise(totals, top: int = 5, shares: Sequence[float] = (0.5, 0.9)) -> list[dict]:
  """Per-target summary: images needed for each share of the weight and the `top` largest shares.

  Returns:
    One dict per row of `totals`: {"images_for_50%": m, "images_for_90%": m', "top": [{"index": i,
    "share": t_i}, …]} (keys follow `shares`).
  """
  totals = np.asarray(totals, np.float64)
  counts = contributor_counts(totals, shares)
  order = np.argsort(-totals, axis=1, kind="stable")[:, :top]
  out = []
  for b in range(totals.shape[0]):
    entry = {f"images_for_{100 * q:g}%": int(counts[b, j]) for j, q in enumerate(shares)}
    entry["top"] = [{"index": int(i), "share": float(totals[b, i])} for i in order[b]]
    out.append(entry)
  return out
