"""Schedule tuning: the patch size s(σ) and PSPC-Flex threshold λ(σ) that best match a reference.

The paper chose its schedules by minimising patch error against the network (docs/design.md §4, §7); this
module reproduces that procedure for any reference denoiser D_ref. For each σ of a grid and each
candidate value v (a PSPC-Square patch size, or a PSPC-Flex mass threshold λ) the error is

    MSE(σ, v) = 1/(K·H·W·C) Σ_k ‖D_v(z_k, σ) − D_ref(z_k, σ)‖²          (per pixel, model units)

over K evaluation inputs z_k at σ, either

* forward-process z: z_k = x_{i_k} + σ·ε_k with x from the training set (`forward_set`: the same
  x and ε at every σ, `forward_process.forward_samples`), or
* reverse-process z: the states at σ of the reference denoiser's own Heun PF-ODE trajectories from
  seeded latents (`reverse_set`). The sampler runs on the tuning grid itself (largest σ first, no
  final step to 0), so every state lies exactly at a grid σ; with the default grid, the 18-step EDM
  grid without its final 0, these are the states of the usual 18-step sampler.

The tuned schedule takes, at each grid σ, the candidate of least MSE (ties: the first in the given
order); it is a `schedules.SigmaSchedule` on that grid, written as the JSON that `--patch_schedule` /
`--thresholds` (`schedules.parse_patch_schedule` / `parse_threshold_schedule`) read. A candidate that
cannot be built at some σ (a Flex mask set leaving a pixel uncovered) or gives non-finite output has
MSE = inf there and is never chosen.

Pure functions only: `evaluate_candidates`, `argmin_schedule`, `ErrorSurface`; evaluation sets
`forward_set`, `reverse_set`; candidate denoisers (`Candidate`) `square_candidates`, `flex_candidates`,
compiled ahead by `compile_candidates`. The resumable job behind `bin/tune_schedule` is
`pspc_jax.jobs.tune`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import schedules
from pspc_jax.batching import map_batched
from pspc_jax.denoisers.flex import flex_masks, pspc_flex_denoise
from pspc_jax.denoisers.pspc import pspc_square_denoise
from pspc_jax.denoisers.values import as_argument
from pspc_jax.forward_process import forward_samples
from pspc_jax.progress import SILENT, Progress, compile_jitted
from pspc_jax.sampling import sample

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

# Candidate PSPC-Flex thresholds λ (fractions of the sensitivity mass).
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
Z_SOURCES = ("forward", "reverse")
FLEX_METHODS = ("auto", "gather", "matmul")
# flex_method="auto" traces the masks (one compiled function for every σ and λ, cost ∝ (H·W)² per
# query and data row) up to this many pixels, and builds concrete gather masks per (σ, λ) above.
_TRACED_FLEX_MAX_PIXELS = 256


class ErrorSurface(NamedTuple):
  """MSE of every candidate value at every σ of a grid.

  Attributes:
    sigmas: (S,) float64 grid noise levels (EDM σ > 0), in grid order.
    values: (M,) candidate values (patch sizes or thresholds), in candidate order.
    mse: (S, M) float64 mean squared error per pixel against the reference; inf where the candidate
      is unavailable or non-finite.
    num_z: (S,) int number of z the MSE of each σ averages over.
  """
  sigmas: np.ndarray
  values: tuple
  mse: np.ndarray
  num_z: np.ndarray

  def best_index(self) -> np.ndarray:
    """(S,) index of the least-MSE candidate at each σ (ties: the first)."""
    return best_indices(self.mse)

  def best_values(self) -> tuple:
    return tuple(self.values[j] for j in self.best_index())

  def schedule(self, metric: str = "log") -> schedules.SigmaSchedule:
    """The argmin schedule on this grid (see `argmin_schedule`)."""
    return argmin_schedule(self.sigmas, self.values, self.mse, metric)


def best_indices(mse) -> np.ndarray:
  """(S, M) errors → (S,) index of the least finite error per row (ties: the first).

  Raises:
    ValueError: a row without any finite error.
  """
  mse = np.asarray(mse, np.float64)
  finite = np.isfinite(mse)
  if not np.all(finite.any(axis=1)):
    row = int(np.flatnonzero(~finite.any(axis=1))[0])
    raise ValueError(f"no candidate has a finite error at grid point {row}")
  return np.argmin(np.where(finite, mse, np.inf), axis=1)


def argmin_schedule(sigmas, values: Sequence, mse, metric: str = "log") -> schedules.SigmaSchedule:
  """The schedule taking, at each grid σ, the candidate value of least MSE.

  Args:
    sigmas: (S,) grid noise levels > 0.
    values: (M,) candidate values (ints for patch sizes, floats for thresholds).
    mse: (S, M) errors; non-finite entries are never chosen.
    metric: how σ off the grid find their grid point ("log" or "linear", `schedules.SigmaSchedule`).

  Returns:
    SigmaSchedule with the grid as given (Python floats) and one chosen value per σ.
  """
  mse = np.asarray(mse, np.float64)
  sigmas = [float(s) for s in np.asarray(sigmas, np.float64).reshape(-1)]
  if mse.shape != (len(sigmas), len(values)):
    raise ValueError(f"mse must have shape (S, M) = ({len(sigmas)}, {len(values)}), got {mse.shape}")
  chosen = tuple(values[j] for j in best_indices(mse))
  return schedules.SigmaSchedule(tuple(sigmas), chosen, metric)


# --------------------------------------------------------------------------------------------------
# Evaluation.


def batched_outputs(denoise: Denoiser, z, sigma: float, batch_size: int) -> np.ndarray:
  """`denoise(z, σ)` over (K, H, W, C) inputs in batches of one fixed shape (the last is padded with
  copies of its final row, so one compiled shape serves every batch); float32 NumPy (K, H, W, C)."""
  z = np.asarray(z, np.float32)
  batch_size = max(1, min(int(batch_size), z.shape[0]))
  out = map_batched(lambda part: denoise(jnp.asarray(part), jnp.float32(sigma)), [z], batch_size)
  return np.asarray(out, np.float32)


def evaluate_candidates(z, sigma: float, reference_out, candidates: Sequence[Denoiser | None], *,
                        batch_size: int = 64) -> np.ndarray:
  """MSE of each candidate denoiser against the reference outputs at one noise level.

  Args:
    z: (K, H, W, C) inputs at σ.
    sigma: the noise level σ > 0 passed to every candidate.
    reference_out: (K, H, W, C) reference denoiser outputs D_ref(z, σ).
    candidates: `denoise(z, sigma)` per candidate value, or None for an unavailable one.
    batch_size: z per candidate call.

  Returns:
    (M,) float64 per-pixel MSE, inf for None candidates and non-finite outputs.
  """
  reference_out = np.asarray(reference_out, np.float64)
  if np.shape(z) != reference_out.shape:
    raise ValueError(f"z {np.shape(z)} and reference outputs {reference_out.shape} differ in shape")
  errors = np.full(len(candidates), np.inf)
  for j, candidate in enumerate(candidates):
    if candidate is None:
      continue
    out = batched_outputs(candidate, z, sigma, batch_size).astype(np.float64)
    mse = float(np.mean(np.square(out - reference_out)))
    errors[j] = mse if np.isfinite(mse) else np.inf
  return errors


def forward_set(data, sigma: float, num_z: int, seed: int = 0) -> np.ndarray:
  """Forward-process z_k = x_{i_k} + σ·ε_k, k = 0 … num_z − 1 (`forward_process.forward_samples`: the
  same training image and ε for a given k at every σ); float32 NumPy (K, H, W, C)."""
  if num_z < 1:
    raise ValueError(f"num_z must be at least 1, got {num_z}")
  return np.asarray(forward_samples(jnp.asarray(data), float(sigma), jnp.arange(num_z), seed))


def reverse_set(reference: Denoiser, latents, sigmas, *, solver: str = "heun", batch_size: int = 64,
                progress: Progress = SILENT) -> tuple[np.ndarray, np.ndarray]:
  """Reverse-process z: the reference's own PF-ODE trajectory states at each grid σ, and D_ref there.

  The sampler (`sampling.sample`, deterministic) runs on the grid sorted from the largest σ down,
  without a final step to 0: state i is exactly at grid σ_i, starting from z_0 = σ_0 · latents. The
  reference outputs at the states come from the trajectory (`Trajectory.denoised`, the first denoiser
  call of each step, which is D_ref(z_i, σ_i)) plus one call at the last state.

  Args:
    reference: `denoise(z, sigma)`.
    latents: (K, H, W, C) standard normal latents (`sampling.latents_from_seeds`).
    sigmas: (S,) distinct grid noise levels > 0, any order.
    solver: "heun" (the paper's sampler) or "euler".
    batch_size: trajectories per compiled sampler call.
    progress: where the sampler's compilation and a bar over the trajectories are reported.

  Returns:
    (z, reference_out), each float32 (S, K, H, W, C) in the order of `sigmas`.

  Raises:
    ValueError: an empty grid, repeated or non-positive σ, or latents not (K, H, W, C) with K ≥ 1.
  """
  sigmas = np.asarray(sigmas, np.float64).reshape(-1)
  if sigmas.size == 0 or np.any(sigmas <= 0) or len(np.unique(sigmas)) != sigmas.size:
    raise ValueError("the reverse-process grid needs distinct noise levels > 0")
  latents = np.asarray(latents, np.float32)
  if latents.ndim != 4 or latents.shape[0] == 0:
    raise ValueError(f"latents must have shape (K, H, W, C) with K >= 1, got {latents.shape}")
  order = np.argsort(-sigmas)
  grid = jnp.asarray(sigmas[order], jnp.float32)

  @jax.jit
  def trajectories(den, lat):  # the reference denoiser is an argument, not a compiled constant
    if grid.shape[0] == 1:
      z = (lat * grid[0])[None]
      return z, den(z[0], grid[0])[None]
    _, path = sample(den, lat, grid, solver=solver, return_trajectory=True)
    final = den(path.z[-1], grid[-1])
    return path.z, jnp.concatenate([path.denoised, final[None]])

  batch_size = max(1, min(int(batch_size), latents.shape[0]))
  reference = as_argument(reference)
  step = compile_jitted(progress, "reference trajectories", trajectories, reference,
                        latents[:batch_size])
  # Trajectories batch-major for `map_batched`, then back to (S, K, ...).
  with progress.bar(total=latents.shape[0], desc="reverse trajectories", unit="z") as bar:
    z, out = map_batched(lambda part: jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1),
                                                   step(reference, part)),
                         [latents], batch_size, on_batch=bar.update)
  inverse = np.argsort(order)
  return np.swapaxes(z, 0, 1)[inverse], np.swapaxes(out, 0, 1)[inverse]


# --------------------------------------------------------------------------------------------------
# Candidates.


def candidate_patch_sizes(side: int, sizes: Sequence[int] = schedules.PAPER_PATCH_SIZES
                          ) -> tuple[int, ...]:
  """The sizes of `sizes` that fit (≤ side), plus the full image `side`, ascending and distinct."""
  if side < 1:
    raise ValueError(f"image side must be at least 1, got {side}")
  bad = [s for s in sizes if int(s) < 1]
  if bad:
    raise ValueError(f"patch sizes must be at least 1, got {bad[0]}")
  return tuple(sorted({int(s) for s in sizes if int(s) <= side} | {int(side)}))


class Candidate(NamedTuple):
  """A candidate denoiser `denoise(z, sigma) = fn(z, sigma, *args)`.

  Attributes:
    fn: a `jax.jit` function of (z, sigma, *args), or its compiled executable (`compile_candidates`).
    args: the arrays it takes after z and σ (training set, maps, λ): arguments, never compiled
      constants, so that one compilation serves every σ (and λ).
    label: what the candidate is, e.g. "PSPC-Square s=5"; names its compilation.
  """
  fn: Callable
  args: tuple
  label: str

  def __call__(self, z, sigma):
    return self.fn(z, sigma, *self.args)


def compile_candidates(candidates: Sequence[Candidate | None], z, sigma, *,
                       progress: Progress = SILENT, compiled: dict | None = None
                       ) -> list[Candidate | None]:
  """The candidates with their functions compiled ahead for batches shaped like `z`.

  Each distinct function is compiled once, as a "compiling <label>" phase of `progress`, so that
  later calls only run (and a progress bar's ETA excludes compilation).

  Args:
    candidates: Candidate values, or None for unavailable ones (kept as None).
    z: (B, H, W, C) float32, a batch of the shape every later call passes (values unused).
    sigma: a noise level (value unused: σ is traced).
    progress: where the compilations are reported.
    compiled: {function: compiled executable}, reused and extended (e.g. across σ, for the flex
      function shared by every σ and λ); None starts an empty one.

  Returns:
    The candidates in the same order, each calling its compiled executable.
  """
  compiled = {} if compiled is None else compiled
  z, sigma = jnp.asarray(z, jnp.float32), jnp.float32(sigma)
  out = []
  for candidate in candidates:
    if candidate is None:
      out.append(None)
      continue
    if candidate.fn not in compiled:
      compiled[candidate.fn] = compile_jitted(progress, candidate.label, candidate.fn, z, sigma,
                                              *candidate.args)
    out.append(candidate._replace(fn=compiled[candidate.fn]))
  return out


@functools.lru_cache(maxsize=None)
def _square_function(patch_size: int, chunk_size: int | None) -> Callable:
  """The jitted PSPC-Square `fn(z, sigma, data)` of one patch size (σ and the training set traced)."""
  return jax.jit(functools.partial(pspc_square_denoise, patch_size=patch_size,
                                   chunk_size=chunk_size))


def square_candidates(data, sizes: Sequence[int], *, chunk_size: int | None = None
                      ) -> list[Candidate]:
  """One PSPC-Square candidate per patch size, jitted with σ traced (compiled once per size and
  batch shape, whatever the grid); the training set is an argument, not a compiled constant."""
  data = jnp.asarray(data)
  return [Candidate(_square_function(int(s), chunk_size), (data,), f"PSPC-Square s={int(s)}")
          for s in sizes]


@functools.lru_cache(maxsize=None)
def _flex_traced_function(chunk_size: int | None) -> Callable:
  """The jitted PSPC-Flex `fn(z, sigma, data, maps, threshold)` with traced masks ("matmul")."""
  return jax.jit(functools.partial(pspc_flex_denoise, chunk_size=chunk_size, method="matmul"))


def flex_method_for(method: str, height: int, width: int) -> str:
  """The mask form `flex_candidates` uses for (H, W) images: `method`, or for "auto" "matmul" up to
  256 pixels and "gather" above.

  Raises:
    ValueError: a method not in FLEX_METHODS.
  """
  if method not in FLEX_METHODS:
    raise ValueError(f"unknown flex method {method!r}; use one of {', '.join(FLEX_METHODS)}")
  if method == "auto":
    return "matmul" if height * width <= _TRACED_FLEX_MAX_PIXELS else "gather"
  return method


def masks_cover_image(maps_for_sigma, threshold) -> bool:
  """Whether every pixel lies in some PSPC-Flex mask of these (H, W, H, W) maps at λ (Eq. 11 is
  undefined at an uncovered pixel)."""
  with jax.ensure_compile_time_eval():
    return bool(np.asarray(flex_masks(maps_for_sigma, threshold)).any(axis=0).all())


def flex_candidates(data, maps_for_sigma, thresholds: Sequence[float], *, method: str = "auto",
                    chunk_size: int | None = None) -> list[Candidate | None]:
  """One PSPC-Flex candidate per threshold λ with the maps of one noise level.

  Args:
    data: (N, H, W, C) training images.
    maps_for_sigma: (H, W, H, W) sensitivity maps (concrete).
    thresholds: candidate λ in (0, 1].
    method: "matmul" (maps and λ traced: one function for every σ and λ, dense 0/1 mask matrix),
      "gather" (concrete masks compiled per λ, `flex.pspc_flex_denoise`'s fast path), or "auto"
      (`flex_method_for`).
    chunk_size: dataset rows per streamed chunk.

  Returns:
    A list with a Candidate per λ, None where the masks leave a pixel uncovered.

  Raises:
    ValueError: an unknown method, or a threshold outside (0, 1].
  """
  data = jnp.asarray(data)
  maps = np.asarray(maps_for_sigma, np.float32)
  method = flex_method_for(method, maps.shape[0], maps.shape[1])
  traced_maps = jnp.asarray(maps)
  out = []
  for lam in thresholds:
    lam = float(lam)
    if not 0 < lam <= 1:
      raise ValueError(f"threshold {lam} is outside (0, 1]")
    if not masks_cover_image(maps, lam):
      out.append(None)
    elif method == "matmul":
      out.append(Candidate(_flex_traced_function(chunk_size), (data, traced_maps, jnp.float32(lam)),
                           "PSPC-Flex (traced masks)"))
    else:
      fn = jax.jit(functools.partial(pspc_flex_denoise, maps=maps, threshold=lam,
                                     chunk_size=chunk_size, method="gather"))
      out.append(Candidate(fn, (data,), f"PSPC-Flex λ={lam:g} (gather masks)"))
  return out
