"""Equivariant local score (ELS) and local score (LS) denoisers of Kamb & Ganguli.

Kamb & Ganguli, "An analytic theory of creativity in convolutional diffusion models" (arXiv 2412.20292,
ICML 2025) solve score matching under two constraints of convolutional networks: locality (the score at
pixel p sees only the k×k patch Ω_p around p) and translation equivariance. The optimal constrained
denoiser at pixel p is a posterior mean over training *patches*, and only their centre pixel is used:

    x̂[p] = Σ_{i, q ∈ Q(p)} w_{i,q}(p) x_i[q],
    w_{i,q}(p) = softmax_{i,q}( −‖Ω_p z − Ω_q x_i‖² / (2σ²) )                 (LS / ELS machines)

with ‖Ω_p z − Ω_q x_i‖² = Σ_{δ ∈ [−r, r]²} Σ_c (z̃[p+δ, c] − x̃_i[q+δ, c])², r = (k−1)/2, where z̃, x̃
are the padded images. The machines differ in the candidate set Q(p):

* **LS** (`equivariant=False`, their "local score machine"): Q(p) = {p}, the same location in every
  training image (location-specific). Both z and x_i are zero-padded, so near the border the patch is
  the part of the k×k window inside the image.
* **ELS, zero-padding boundaries** (`boundary="zeros"`, the default; their boundary-aware ELS of a
  zero-padded CNN, "bbELS" in their code). A zero-padded CNN can see the border inside its receptive
  field, so equivariance holds only among patches with the same padding pattern. Per axis separately:
  if p is interior along that axis (r ≤ p_h ≤ H−1−r) the candidate coordinate is any interior
  coordinate; if p is within r of the border the candidate coordinate is p itself. So interior pixels
  compare their patch with every fully-inside patch of every training image (translation-equivariant),
  edge pixels with patches sliding along their edge at the same distance from it, and corner pixels
  with the same corner of every image (LS there). When k > H along an axis no pixel is interior and
  that axis is location-specific; k ≥ 2·max(H, W) − 1 makes every patch the whole image, which is the
  optimal empirical denoiser (Eq. 6-7 of Niedoba et al.).
* **ELS, circular boundaries** (`boundary="circular"`, their ELS for a circularly padded CNN): z is
  padded periodically and Q(p) is every fully-inside (valid) patch location of every training image, for
  every p. This machine is exactly equivariant to circular shifts of z. Needs k ≤ min(H, W).
  With `equivariant=False` both z and x_i are padded periodically at the same location.

Conventions and choices (the paper states its machines for the VP process φ_t = √ᾱ φ_0 + √(1−ᾱ) η;
with EDM's z = x + σε the same posterior reads as above, σ² = (1−ᾱ)/ᾱ):

* Channels: a patch holds all C channels; distances sum over them, and the output copies all channels
  of the winning centre pixels (the paper treats a pixel as a C-vector).
* Patch sizes are odd (centred patches), 1 ≤ k ≤ 2·max(H, W) − 1. The paper calibrates k per time step
  against a trained network; see `els_patch_schedule_for` for our default schedule.
* Softmax over (training image, candidate location) jointly, i.e. the training set of the machine is
  the multiset of all candidate patches (their normalisation; a plain mean over all of them at σ → ∞).
* No class conditioning (their code optionally restricts the training set to one label).

Algorithm (exact, streamed; no ‖z‖² − 2z·x + ‖x‖² expansion). For a shift Δ = q − p and a dataset
chunk, e_Δ[u] = Σ_c (z̃[u, c] − x̃_i[u+Δ, c])² is formed from direct differences on the padded grid and
its valid k×k window sums give ‖Ω_p z − Ω_{p+Δ} x_i‖² for every output pixel p at once (sums of
non-negative terms: `SquareWindows.sums_major`). Pairs (p, p+Δ) outside Q(p) are masked to +inf. Every
(chunk, shift) is one step of a single online softmax per (pixel, query) (`SoftminStats`), whose
numerator accumulates Σ w x_i[p+Δ] (C values per pixel), so one pass over the data suffices.

Cost: S · B · N · (H+2r)(W+2r) · (C + 2k + exp) operations with S shifts: S = (2(H−2r)−1)(2(W−2r)−1)
for zero boundaries (about 4·(H−2r)(W−2r) shifts; the pairs outside Q(p) are computed and masked, so
about 4× the work of the valid pairs alone), S = (2H−2r−1)(2W−2r−1) for circular boundaries, S = 1 for
LS. That is ~4·H·W times the optimal empirical denoiser: 0.38 s for B = 16 on 8×8 digits (N = 1797,
k = 3, 2 CPU cores; the optimal denoiser: < 1 ms); at the same throughput about 3 minutes per query
image and call on CIFAR-10 (32×32, N = 50,000, k = 3, S = 3481 shifts). Peak memory: a few
(H+2r)·(W+2r)·B·n float32 intermediates per chunk of n rows (`els_chunk_size`: about 4 MB each) plus
the padded chunk; independent of N.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pspc_jax import conventions, schedules, validation
from pspc_jax.denoisers.empirical import logit_scale
from pspc_jax.denoisers.masks import SquareWindows, pixel_sq_dists_major
from pspc_jax.softmin import SoftminStats, fold_chunks

BOUNDARIES = ("zeros", "circular")

# Elements of one (H+2r, W+2r, B, n) float32 intermediate per dataset chunk.
_CHUNK_ELEMENTS = 1 << 20

_HIGHEST = lax.Precision.HIGHEST


def els_chunk_size(batch_size: int, padded_height: int, padded_width: int) -> int:
  """Dataset rows n per chunk so that one (H+2r, W+2r, B, n) float32 intermediate is about 4 MB
  (a power of two in [8, 4096])."""
  rows = _CHUNK_ELEMENTS / (batch_size * padded_height * padded_width)
  return int(min(4096, max(8, 2 ** int(np.floor(np.log2(max(rows, 1.0)))))))


def _axis_plan(length: int, radius: int, equivariant: bool, boundary: str):
  """Shifts Δ = q − p along one axis and the (num_shifts, length) bool table of valid (p, p+Δ) pairs.

  The shift 0 comes first.
  """
  interior = np.zeros(length, bool)
  interior[radius:length - radius] = True
  positions = np.arange(length)
  if not equivariant:
    return np.zeros(1, np.int64), np.ones((1, length), bool)
  num_interior = int(interior.sum())
  if boundary == "zeros":
    if num_interior == 0:
      return np.zeros(1, np.int64), np.ones((1, length), bool)
    reach = num_interior - 1
    shifts = np.arange(-reach, reach + 1)
  else:  # circular: any p, q any interior location
    shifts = np.arange(radius - (length - 1), length - radius)
  shifts = shifts[np.argsort(np.abs(shifts), kind="stable")]  # 0 first
  targets = positions[None, :] + shifts[:, None]
  inside = (targets >= 0) & (targets < length)
  target_interior = inside & interior[np.clip(targets, 0, length - 1)]
  if boundary == "zeros":
    valid = (shifts[:, None] == 0) | (interior[None, :] & target_interior)
  else:
    valid = target_interior
  return shifts, valid


def _check(patch_size: int, height: int, width: int, boundary: str, equivariant: bool) -> int:
  if boundary not in BOUNDARIES:
    raise ValueError(f"unknown ELS boundary {boundary!r}; use one of {BOUNDARIES}")
  size = validation.positive_int(patch_size, "patch_size")
  largest = 2 * max(height, width) - 1
  if size % 2 != 1 or not 1 <= size <= largest:
    raise ValueError(f"ELS patch size {patch_size} must be odd (centred patches) and between 1 and "
                     f"{largest} for {height}×{width} images")
  if boundary == "circular" and equivariant and size > min(height, width):
    raise ValueError(f"circular ELS compares with fully-inside training patches: patch size {size} "
                     f"must be at most {min(height, width)}")
  return size


def els_denoise(z: jax.Array, sigma, data: jax.Array, patch_size: int, *, equivariant: bool = True,
                boundary: str = "zeros", chunk_size: int | None = None) -> jax.Array:
  """ELS (or LS) machine of Kamb & Ganguli as a denoiser: see the module docstring for the equations.

  x̂[p] = Σ_{i, q ∈ Q(p)} softmax_{i,q}(−‖Ω_p z − Ω_q x_i‖²/(2σ²)) x_i[q], exact in float32 and streamed
  over the dataset.

  Args:
    z: (B, H, W, C) float32 noisy images (EDM units: z = x + σε).
    sigma: scalar or (B,) noise levels; a batch may mix levels. σ = 0 picks the nearest patch.
    data: (N, H, W, C) training images, uint8 in [0, 255] or float in [-1, 1].
    patch_size: k, odd, 1 ≤ k ≤ 2·max(H, W) − 1 (static).
    equivariant: True for ELS (patches from other locations), False for LS (same location only).
    boundary: "zeros" (zero-padded CNN: equivariance among patches with the same padding pattern) or
      "circular" (periodically padded z, every valid training patch; needs k ≤ min(H, W) for ELS).
    chunk_size: dataset rows per streamed chunk (default `els_chunk_size`); changes speed and memory,
      not the result beyond float32 rounding.

  Returns:
    (B, H, W, C) float32 denoised images; B = 0 gives an empty (0, H, W, C) array.

  Raises:
    ValueError: bad shapes, dtypes or concrete values of z, sigma or data
      (`conventions.check_query_and_data`; a traced σ that is negative or not finite gives NaN), a patch
      size that is not an odd integer in range, an unknown boundary, or a bad chunk_size.
  """
  conventions.check_query_and_data(z, data)
  sigma = conventions.sigma_per_sample(sigma, z.shape[0])
  chunk_size = validation.positive_int(chunk_size, "chunk_size", optional=True)
  batch, height, width, channels = z.shape
  size = _check(patch_size, height, width, boundary, equivariant)
  if batch == 0:
    return jnp.zeros(z.shape, jnp.float32)
  radius = size // 2
  padded_h, padded_w = height + 2 * radius, width + 2 * radius
  shifts_h, valid_h = _axis_plan(height, radius, equivariant, boundary)
  shifts_w, valid_w = _axis_plan(width, radius, equivariant, boundary)
  pairs = list(itertools.product(range(len(shifts_h)), range(len(shifts_w))))
  shifts = np.asarray([(shifts_h[a], shifts_w[b]) for a, b in pairs], np.int32)  # (S, 2), (0, 0) first
  valid = np.stack([valid_h[a][:, None] & valid_w[b][None, :] for a, b in pairs])  # (S, H, W)
  reach_h, reach_w = int(np.abs(shifts_h).max()), int(np.abs(shifts_w).max())

  # Padding of z and of the training images (both on the (H+2r, W+2r) grid).
  z_mode = "wrap" if boundary == "circular" else "constant"
  x_mode = "wrap" if boundary == "circular" and not equivariant else "constant"
  z_major = jnp.transpose(z.astype(jnp.float32), (1, 2, 3, 0))  # (H, W, C, B)
  z_pad = jnp.pad(z_major, ((radius, radius), (radius, radius), (0, 0), (0, 0)), mode=z_mode)
  scale = logit_scale(sigma).reshape(1, 1, batch)
  windows = SquareWindows(padded_h, padded_w, size)
  chunk_size = max(1, min(int(chunk_size or els_chunk_size(batch, padded_h, padded_w)),
                          data.shape[0]))

  def step(carry, chunk):
    rows = chunk.shape[0]
    x = jnp.transpose(conventions.to_model_range(chunk), (1, 2, 3, 0))  # (H, W, C, n)
    x = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0), (0, 0)), mode=x_mode)
    # Zero margin of the largest shift: the slice at offset (reach + Δ) is x̃ shifted by Δ.
    x = jnp.pad(x, ((reach_h, reach_h), (reach_w, reach_w), (0, 0), (0, 0)))

    def shift_step(carry, inputs):
      stats, numerator = carry
      shift, mask = inputs
      moved = lax.dynamic_slice(x, (reach_h + shift[0], reach_w + shift[1], 0, 0),
                                (padded_h, padded_w, channels, rows))  # x̃[u + Δ]
      e = pixel_sq_dists_major(z_pad.reshape(padded_h * padded_w, channels, batch),
                               moved.reshape(padded_h * padded_w, channels, rows))
      dists = windows.sums_major(e.reshape(padded_h, padded_w, batch, rows))  # (H, W, B, n)
      # Pairs outside Q(p) are left out (+inf: weight exactly 0, also while a state is still empty).
      dists = jnp.where(mask[:, :, None, None], dists, jnp.inf)
      stats, weights, rescale = stats.add(dists, scale, axis=3)
      centres = moved[radius:radius + height, radius:radius + width]  # x_i[p + Δ]: (H, W, C, n)
      update = lax.dot_general(weights.reshape(height * width, batch, rows),
                               centres.reshape(height * width, channels, rows),
                               (((2,), (2,)), ((0,), (0,))), precision=_HIGHEST)  # (P, B, C)
      numerator = numerator * rescale.reshape(height * width, batch, 1) + update
      return (stats, numerator), None

    carry, _ = lax.scan(shift_step, carry, (jnp.asarray(shifts), jnp.asarray(valid)))
    return carry

  init = (SoftminStats.empty((height, width, batch)),
          jnp.zeros((height * width, batch, channels), jnp.float32))
  stats, numerator = fold_chunks(step, init, data, chunk_size)
  out = numerator / stats.total.reshape(height * width, batch, 1)
  return jnp.transpose(out.reshape(height, width, batch, channels), (2, 0, 1, 3))


def ls_denoise(z: jax.Array, sigma, data: jax.Array, patch_size: int, *, boundary: str = "zeros",
               chunk_size: int | None = None) -> jax.Array:
  """The LS machine (location-specific local score): `els_denoise(..., equivariant=False)`."""
  return els_denoise(z, sigma, data, patch_size, equivariant=False, boundary=boundary,
                     chunk_size=chunk_size)


def _to_els_size(size: int, side: int) -> int:
  """PSPC square size → ELS size: the full image becomes 2·side − 1 (every centred patch covers the
  whole image: the optimal denoiser), an even size s becomes s + 1 (centred patches are odd)."""
  size = int(size)
  if size >= side:
    return 2 * side - 1
  return size if size % 2 else size + 1


def els_patch_schedule_for(side: int, metric: str = "log") -> schedules.SigmaSchedule:
  """Default ELS patch sizes for images of side `side` (our heuristic, not the paper's values).

  Kamb & Ganguli calibrate k(t) per time step to a trained network (odd k, e.g. 3 … 17 on 32×32), which
  needs that network. Without one we reuse the PSPC patch schedule rescaled to the image side
  (`schedules.patch_schedule_for`; Niedoba et al. fitted it to trained networks too) and make it
  centred with `_to_els_size`: full-image entries become 2·side − 1 (then ELS = the optimal empirical
  denoiser at large σ, as PSPC-Square), even entries the next odd size.
  """
  base = schedules.patch_schedule_for(side, metric)
  return dataclasses.replace(base, values=tuple(_to_els_size(s, side) for s in base.values))


def parse_els_patch_schedule(spec: str, side: int) -> schedules.SigmaSchedule:
  """An ELS patch-size schedule from a command-line string (grammar of `schedules.parse_schedule`).

  Named forms: "auto" (`els_patch_schedule_for(side)`) and "cifar10" (the PSPC CIFAR-10 sizes made
  centred by `_to_els_size`); otherwise odd integers ("5", a list on the EDM grid, "σ:k" pairs) or a
  JSON file.

  Raises:
    ValueError: malformed specs, even sizes, sizes outside [1, 2·side − 1].
  """
  def cifar10(metric):
    base = schedules.cifar10_patch_schedule(metric)
    return dataclasses.replace(base, values=tuple(_to_els_size(s, 32) for s in base.values))

  schedule = schedules.parse_schedule(spec, value_type=int, what="ELS patch schedule",
                                      named={"auto": lambda m: els_patch_schedule_for(side, m),
                                             "cifar10": cifar10})
  largest = 2 * side - 1
  bad = [s for s in schedule.values if not (1 <= int(s) <= largest and int(s) % 2 == 1)]
  if bad:
    raise ValueError(f"ELS patch size {bad[0]} is not an odd size between 1 and {largest} "
                     f"(centred patches on {side}×{side} images)")
  return schedule
