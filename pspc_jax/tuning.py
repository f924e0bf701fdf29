"""Schedule tuning: the patch size s(σ) and PSPC-Flex threshold λ(σ) that best match a reference.

The paper chose its schedules by minimising patch error against the network (DESIGN §4, §7); this
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

Pure part: `evaluate_candidates`, `argmin_schedule`, `ErrorSurface`; evaluation sets `forward_set`,
`reverse_set`; candidate denoisers `square_candidates`, `flex_candidates`; the resumable job behind
`bin/tune_schedule`: `tune_run`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import schedules
from pspc_jax.batching import map_batched
from pspc_jax.denoisers.flex import flex_masks, pspc_flex_denoise
from pspc_jax.denoisers.pspc import pspc_square_denoise
from pspc_jax.denoisers.values import apply_denoiser, as_argument
from pspc_jax.files import (atomic_write, resume_per_sigma, save_json, save_npz,
                            sigma_part_path)
from pspc_jax.forward_process import forward_samples
from pspc_jax.sampling import latents_from_seeds, sample

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


def reverse_set(reference: Denoiser, latents, sigmas, *, solver: str = "heun", batch_size: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
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

  Returns:
    (z, reference_out), each float32 (S, K, H, W, C) in the order of `sigmas`.
  """
  sigmas = np.asarray(sigmas, np.float64).reshape(-1)
  if sigmas.size == 0 or np.any(sigmas <= 0) or len(np.unique(sigmas)) != sigmas.size:
    raise ValueError("the reverse-process grid needs distinct noise levels > 0")
  latents = np.asarray(latents, np.float32)
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
  # Trajectories batch-major for `map_batched`, then back to (S, K, ...).
  z, out = map_batched(lambda part: jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1),
                                                 trajectories(reference, part)), [latents], batch_size)
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


@functools.partial(jax.jit, static_argnames=("patch_size", "chunk_size"))
def _square(z, sigma, data, *, patch_size, chunk_size):
  return pspc_square_denoise(z, sigma, data, patch_size, chunk_size=chunk_size)


def square_candidates(data, sizes: Sequence[int], *, chunk_size: int | None = None
                      ) -> list[Denoiser]:
  """One jitted PSPC-Square `denoise(z, sigma)` per patch size (σ traced: compiled once per size and
  batch shape, whatever the grid); the training set is an argument, not a compiled constant."""
  data = jnp.asarray(data)
  return [functools.partial(lambda z, sigma, s: _square(z, sigma, data, patch_size=s,
                                                        chunk_size=chunk_size), s=int(s))
          for s in sizes]


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _flex_traced(z, sigma, data, maps, threshold, *, chunk_size):
  return pspc_flex_denoise(z, sigma, data, maps, threshold, chunk_size=chunk_size, method="matmul")


def masks_cover_image(maps_for_sigma, threshold) -> bool:
  """Whether every pixel lies in some PSPC-Flex mask of these (H, W, H, W) maps at λ (Eq. 11 is
  undefined at an uncovered pixel)."""
  with jax.ensure_compile_time_eval():
    return bool(np.asarray(flex_masks(maps_for_sigma, threshold)).any(axis=0).all())


def flex_candidates(data, maps_for_sigma, thresholds: Sequence[float], *, method: str = "auto",
                    chunk_size: int | None = None) -> list[Denoiser | None]:
  """One PSPC-Flex `denoise(z, sigma)` per threshold λ with the maps of one noise level.

  Args:
    data: (N, H, W, C) training images.
    maps_for_sigma: (H, W, H, W) sensitivity maps (concrete).
    thresholds: candidate λ in (0, 1].
    method: "matmul" (maps and λ traced: one compiled function for every σ and λ, dense 0/1 mask
      matrix), "gather" (concrete masks compiled per λ, `flex.pspc_flex_denoise`'s fast path), or
      "auto" ("matmul" up to 256 pixels, else "gather").
    chunk_size: dataset rows per streamed chunk.

  Returns:
    A list with a `denoise` per λ, None where the masks leave a pixel uncovered.
  """
  if method not in FLEX_METHODS:
    raise ValueError(f"unknown flex method {method!r}; use one of {', '.join(FLEX_METHODS)}")
  data = jnp.asarray(data)
  maps = np.asarray(maps_for_sigma, np.float32)
  if method == "auto":
    method = "matmul" if maps.shape[0] * maps.shape[1] <= _TRACED_FLEX_MAX_PIXELS else "gather"
  traced_maps = jnp.asarray(maps)
  out = []
  for lam in thresholds:
    lam = float(lam)
    if not 0 < lam <= 1:
      raise ValueError(f"threshold {lam} is outside (0, 1]")
    if not masks_cover_image(maps, lam):
      out.append(None)
    elif method == "matmul":
      out.append(functools.partial(
          lambda z, sigma, lam: _flex_traced(z, sigma, data, traced_maps, lam,
                                             chunk_size=chunk_size), lam=jnp.float32(lam)))
    else:
      fn = jax.jit(functools.partial(pspc_flex_denoise, maps=maps, threshold=lam,
                                     chunk_size=chunk_size, method="gather"))
      out.append(functools.partial(lambda z, sigma, fn: fn(z, sigma, data), fn=fn))
  return out


# --------------------------------------------------------------------------------------------------
# The job behind bin/tune_schedule.


def _part_path(parts_dir: str, sigma: float) -> str:
  return sigma_part_path(parts_dir, sigma, ".json")


def _normalised(config: dict) -> dict:
  return json.loads(json.dumps(config))


def _finite_or_none(values) -> list:
  return [float(v) if np.isfinite(v) else None for v in values]


def _from_json(values) -> np.ndarray:
  return np.asarray([np.inf if v is None else float(v) for v in values], np.float64)


def write_schedule(path: str, schedule: schedules.SigmaSchedule) -> None:
  """Writes `schedule.to_json()` atomically (the file format of `schedules.parse_schedule`)."""
  with atomic_write(path, "w") as f:
    f.write(schedule.to_json() + "\n")


def write_error_table(path: str, surfaces: dict[str, ErrorSurface]) -> None:
  """CSV with one row per (kind, σ, value): kind,sigma,value,mse,num_z,chosen (mse 'inf' when
  unavailable; chosen 1 for the argmin of its σ)."""
  with atomic_write(path, "w") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["kind", "sigma", "value", "mse", "num_z", "chosen"])
    for kind, surface in surfaces.items():
      best = surface.best_index()
      for i, sigma in enumerate(surface.sigmas):
        for j, value in enumerate(surface.values):
          writer.writerow([kind, repr(float(sigma)), value, repr(float(surface.mse[i, j])),
                           int(surface.num_z[i]), int(best[i] == j)])


def tune_run(data, reference: Denoiser, sigmas: Sequence[float], *, outdir: str, config: dict,
             patch_sizes: Sequence[int] | None = None, maps=None,
             thresholds: Sequence[float] = DEFAULT_THRESHOLDS, z_source: str = "forward",
             num_z: int = 64, seed: int = 0, batch_size: int = 64, metric: str = "log",
             flex_method: str = "auto", solver: str = "heun", chunk_size: int | None = None,
             compare: dict[str, tuple[str, schedules.SigmaSchedule]] | None = None) -> dict:
  """Tunes s(σ) (and λ(σ) when `maps` are given) against `reference`, resuming an interrupted run.

  For each σ the square sizes (and thresholds) are scored by `evaluate_candidates` on num_z inputs
  from `z_source`. Each finished σ is saved at once as `<outdir>/parts/sigma_<σ>.json` (with the
  run's configuration); the reverse-process set, computed once for all σ, as `parts/reverse_z.npz`.
  A rerun with the same configuration reuses those, and the σ of an existing `errors.json`, and
  computes only the rest; a different configuration is refused. When every σ is done, `outdir`
  holds:

    patch_schedule.json   the argmin patch sizes (`--patch_schedule=<file>`)
    thresholds.json       the argmin λ, when maps are given (`--thresholds=<file>`)
    errors.json           configuration and the full error surfaces (σ × value: MSE, num_z, choice)
    errors.csv            the same, one row per (kind, σ, value)
    tune_schedule.png     heatmaps of the surfaces (log σ × value) with the argmin marked

  and `parts/` is removed.

  Args:
    data: (N, H, W, C) training images (uint8 or float in [-1, 1]).
    reference: the reference `denoise(z, sigma)` (jitted here).
    sigmas: grid noise levels > 0, distinct (the schedules' grid, in this order).
    outdir: output folder.
    config: JSON-able description of the run (reference, checkpoint, dataset, ...), stored and
      compared on resume (together with the grid, candidates, z source, num_z, seed, solver).
    patch_sizes: candidate square sizes (default `candidate_patch_sizes(min(H, W))`).
    maps: a `sensitivity.SensitivityMaps` (each σ uses the maps of the nearest map σ in log σ), or
      None to tune the square sizes only.
    thresholds: candidate λ.
    z_source: "forward" or "reverse" (see the module docstring).
    num_z: inputs per σ (forward: sample ids 0 … num_z − 1; reverse: latents of seeds
      seed … seed + num_z − 1).
    seed: seed of the inputs.
    batch_size: z per denoiser call.
    metric: nearest-grid-σ metric of the written schedules.
    flex_method: see `flex_candidates`.
    solver: sampler of the reverse-process set.
    chunk_size: dataset rows per streamed chunk of the PSPC candidates.
    compare: {kind ("square" / "flex"): (name, schedule)}, schedules drawn over the surfaces for
      comparison (e.g. ("CIFAR-10 rescaled", `schedules.patch_schedule_for(side)`)).

  Returns:
    Summary dict: surfaces {kind: ErrorSurface}, schedules {kind: SigmaSchedule}, output paths,
    number of σ computed and reused, seconds.

  Raises:
    ValueError: bad arguments, or files in `outdir` of a different configuration.
  """
  from pspc_jax import plots  # Imported here: the library itself does not need matplotlib.
  from pspc_jax.sensitivity import maps_for_sigma

  start = time.perf_counter()
  sigmas = [float(s) for s in sigmas]
  if not sigmas or any(not np.isfinite(s) or s <= 0 for s in sigmas):
    raise ValueError("tuning needs noise levels > 0")
  if len(set(sigmas)) != len(sigmas):
    raise ValueError("the tuning grid has repeated noise levels")
  if z_source not in Z_SOURCES:
    raise ValueError(f"unknown z source {z_source!r}; use one of {', '.join(Z_SOURCES)}")
  if num_z < 1 or batch_size < 1:
    raise ValueError("num_z and the batch size must be at least 1")
  if flex_method not in FLEX_METHODS:
    raise ValueError(f"unknown flex method {flex_method!r}; use one of {', '.join(FLEX_METHODS)}")
  height, width = int(data.shape[1]), int(data.shape[2])
  side = min(height, width)
  sizes = candidate_patch_sizes(side) if patch_sizes is None else tuple(int(s) for s in patch_sizes)
  bad = [s for s in sizes if not 1 <= s <= side]
  if not sizes or bad:
    raise ValueError(f"patch sizes must lie in [1, {side}], got {list(sizes)}")
  lambdas = tuple(float(v) for v in thresholds) if maps is not None else ()
  if maps is not None:
    if not lambdas or any(not 0 < v <= 1 for v in lambdas):
      raise ValueError(f"thresholds must lie in (0, 1], got {list(lambdas)}")
    if tuple(maps.maps.shape[1:]) != (height, width, height, width):
      raise ValueError(f"maps of {tuple(maps.maps.shape[1:3])} images do not fit the "
                       f"{(height, width)} training images")
  config = _normalised({**config, "sigmas": sigmas, "z_source": z_source, "num_z": int(num_z),
                        "seed": int(seed), "solver": solver, "patch_sizes": list(sizes),
                        "thresholds": list(lambdas)})
  kinds = ("square", "flex") if maps is not None else ("square",)

  parts_dir = os.path.join(outdir, "parts")
  errors_path = os.path.join(outdir, "errors.json")
  finished = None
  if os.path.exists(errors_path):
    with open(errors_path) as f:
      previous = json.load(f)
    if previous.get("config") != config:
      raise ValueError(f"{errors_path} holds a run of a different configuration; choose another "
                       "--outdir or delete it")
    finished = (previous["sigmas"],
                lambda i: {"num_z": previous["num_z"][i],
                           **{kind: _from_json(previous[kind]["mse"][i]) for kind in kinds}})

  def read_part(path):
    with open(path) as f:
      part = json.load(f)
    if part.get("config") != config:
      raise ValueError(f"{path} holds a run of a different configuration; choose another "
                       "--outdir or delete it")
    return {"num_z": part["num_z"], **{kind: _from_json(part[kind]) for kind in kinds}}

  # σ index → {"num_z": K, "square": (M,) mse, "flex": (M',) mse}
  done = resume_per_sigma(sigmas, lambda sigma: _part_path(parts_dir, sigma), read_part, finished)
  reused = len(done)

  todo = [k for k in range(len(sigmas)) if k not in done]
  if todo:
    os.makedirs(parts_dir, exist_ok=True)
    data = jnp.asarray(data)
    reference_jit = functools.partial(apply_denoiser, as_argument(reference))
    reverse = None
    if z_source == "reverse":
      reverse = _reverse_set_cached(os.path.join(parts_dir, "reverse_z.npz"), reference, sigmas,
                                    data.shape[1:], config, num_z=num_z, seed=seed, solver=solver,
                                    batch_size=batch_size)
    squares = square_candidates(data, sizes, chunk_size=chunk_size)
    for count, k in enumerate(todo, 1):
      tick = time.perf_counter()
      sigma = sigmas[k]
      if reverse is None:
        z = forward_set(data, sigma, num_z, seed)
        reference_out = batched_outputs(reference_jit, z, sigma, batch_size)
      else:
        z, reference_out = reverse[0][k], reverse[1][k]
      row = {"num_z": int(z.shape[0])}
      row["square"] = evaluate_sigma(z, sigma, reference_out, squares, batch_size=batch_size)
      if maps is not None:
        flexes = flex_candidates(data, maps_for_sigma(maps, sigma), lambdas, method=flex_method,
                                 chunk_size=chunk_size)
        row["flex"] = evaluate_sigma(z, sigma, reference_out, flexes, batch_size=batch_size)
      save_json(_part_path(parts_dir, sigma),
                {"config": config, "sigma": sigma, "num_z": row["num_z"],
                 **{kind: _finite_or_none(row[kind]) for kind in kinds}})
      done[k] = row
      now = time.perf_counter()
      chosen = [f"size {sizes[int(np.argmin(row['square']))]} (mse {np.min(row['square']):.3g})"]
      if maps is not None and np.isfinite(row["flex"]).any():
        chosen.append(f"λ {lambdas[int(np.argmin(row['flex']))]:g} (mse {np.min(row['flex']):.3g})")
      print(f"sigma {count}/{len(todo)} = {sigma:.4g}: {', '.join(chosen)}; {now - tick:.1f}s "
            f"(elapsed {now - start:.1f}s)", flush=True)

  num = np.asarray([done[k]["num_z"] for k in range(len(sigmas))], np.int64)
  grid = np.asarray(sigmas, np.float64)
  surfaces = {"square": ErrorSurface(grid, sizes, np.stack([done[k]["square"] for k in
                                                            range(len(sigmas))]), num)}
  if maps is not None:
    surfaces["flex"] = ErrorSurface(grid, lambdas, np.stack([done[k]["flex"] for k in
                                                             range(len(sigmas))]), num)
  tuned = {kind: surface.schedule(metric) for kind, surface in surfaces.items()}

  paths = {"square": os.path.join(outdir, "patch_schedule.json"),
           "flex": os.path.join(outdir, "thresholds.json")}
  for kind, schedule in tuned.items():
    write_schedule(paths[kind], schedule)
  summary_json = {"config": config, "sigmas": sigmas, "num_z": num.tolist(), "metric": metric}
  for kind, surface in surfaces.items():
    summary_json[kind] = {"values": list(surface.values),
                          "mse": [_finite_or_none(r) for r in surface.mse],
                          "best": list(surface.best_values())}
  save_json(errors_path, summary_json)
  csv_path = os.path.join(outdir, "errors.csv")
  write_error_table(csv_path, surfaces)
  figure_path = os.path.join(outdir, "tune_schedule.png")
  labels = {"square": "PSPC-Square patch size", "flex": "PSPC-Flex threshold λ"}
  overlays = {labels[kind]: (name, [schedule(s) for s in sigmas])
              for kind, (name, schedule) in (compare or {}).items() if kind in surfaces}
  plots.save_tuning_figure(
      figure_path, grid, {labels[kind]: (s.values, s.mse) for kind, s in surfaces.items()},
      compare=overlays, title=f"MSE to the reference ({z_source}-process z, {int(num.min())} per σ)")

  for sigma in sigmas:
    path = _part_path(parts_dir, sigma)
    if os.path.exists(path):
      os.remove(path)
  reverse_path = os.path.join(parts_dir, "reverse_z.npz")
  if os.path.exists(reverse_path):
    os.remove(reverse_path)
  if os.path.isdir(parts_dir) and not os.listdir(parts_dir):
    os.rmdir(parts_dir)
  return {"surfaces": surfaces, "schedules": tuned,
          "paths": {**{kind: paths[kind] for kind in tuned}, "errors": errors_path, "csv": csv_path,
                    "figure": figure_path},
          "computed": len(todo), "reused": reused, "seconds": time.perf_counter() - start}


def evaluate_sigma(z, sigma, reference_out, candidates, *, batch_size):
  """One σ's candidate errors (`evaluate_candidates`); the unit of work `tune_run` saves and
  resumes."""
  return evaluate_candidates(z, sigma, reference_out, candidates, batch_size=batch_size)


def _reverse_set_cached(path: str, reference: Denoiser, sigmas, image_shape, config: dict, *,
                        num_z: int, seed: int, solver: str, batch_size: int):
  """`reverse_set` from seeds seed … seed + num_z − 1, saved to / reused from `path`."""
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      if json.loads(str(f["config"])) != config:
        raise ValueError(f"{path} holds a run of a different configuration; choose another "
                         "--outdir or delete it")
      return f["z"], f["reference_out"]
  tick = time.perf_counter()
  latents = latents_from_seeds(jnp.arange(seed, seed + num_z), image_shape)
  z, out = reverse_set(reference, latents, sigmas, solver=solver, batch_size=batch_size)
  save_npz(path, z=z, reference_out=out, config=np.array(json.dumps(config)))
  print(f"reverse-process set: {num_z} {solver} trajectories over {len(sigmas)} noise levels in "
        f"{time.perf_counter() - tick:.1f}s", flush=True)
  return z, out
