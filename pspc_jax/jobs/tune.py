"""The job behind `bin/tune_schedule`: the patch size s(σ) and PSPC-Flex threshold λ(σ) of least MSE
to a reference denoiser on a σ grid (`pspc_jax.tuning` holds the maths), resumable.

For each σ the square sizes (and thresholds) are scored by `tuning.evaluate_candidates` on num_z
inputs of the z source. Each finished σ is saved at once as `<outdir>/parts/sigma_<σ>.json`
(`part_path`, with the run's configuration); the reverse-process set, computed once for all σ, as
`parts/reverse_z.npz`. A rerun with the same configuration reuses those, and the σ of an existing
`errors.json`, and computes only the rest; a different configuration is refused. When every σ is
done, `outdir` holds:

  patch_schedule.json   the argmin patch sizes (`--patch_schedule=<file>`)
  thresholds.json       the argmin λ, when maps are given (`--thresholds=<file>`)
  errors.json           configuration and the full error surfaces (σ × value: MSE, num_z, choice)
  errors.csv            the same, one row per (kind, σ, value)
  tune_schedule.png     heatmaps of the surfaces (log σ × value) with the argmin marked

and `parts/` is removed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from pspc_jax import schedules, tuning
from pspc_jax.denoisers.values import apply_denoiser, as_argument
from pspc_jax.files import (atomic_write, remove_parts, resume_per_sigma, save_json, save_npz,
                            sigma_part_path)
from pspc_jax.progress import SILENT, Progress, compile_jitted
from pspc_jax.sampling import latents_from_seeds
from pspc_jax.sensitivity import maps_for_sigma

KIND_LABELS = {"square": "PSPC-Square patch size", "flex": "PSPC-Flex threshold λ"}
SCHEDULE_FILES = {"square": "patch_schedule.json", "flex": "thresholds.json"}


def part_path(parts_dir: str, sigma: float) -> str:
  """The JSON file of one finished σ in a run's parts folder."""
  return sigma_part_path(parts_dir, sigma, ".json")


def write_schedule(path: str, schedule: schedules.SigmaSchedule) -> None:
  """Writes `schedule.to_json()` atomically (the file format of `schedules.parse_schedule`)."""
  with atomic_write(path, "w") as f:
    f.write(schedule.to_json() + "\n")


def write_error_table(path: str, surfaces: dict[str, tuning.ErrorSurface]) -> None:
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


def _finite_or_none(values) -> list:
  return [float(v) if np.isfinite(v) else None for v in values]


def _from_json(values) -> np.ndarray:
  return np.asarray([np.inf if v is None else float(v) for v in values], np.float64)


def _different(path: str) -> ValueError:
  return ValueError(f"{path} holds a run of a different configuration; choose another --outdir or "
                    "delete it")


@dataclasses.dataclass(frozen=True)
class _Run:
  """A checked tuning run: its grid, candidates, inputs and folder."""
  data: Any  # (N, H, W, C) jax array
  reference: Callable
  sigmas: list[float]
  sizes: tuple[int, ...]
  lambdas: tuple[float, ...]  # () without maps
  maps: Any  # SensitivityMaps or None
  z_source: str
  num_z: int
  seed: int
  batch_size: int
  flex_method: str  # as resolved by `tuning.flex_method_for`
  solver: str
  chunk_size: int | None
  config: dict
  parts_dir: str

  @property
  def kinds(self) -> tuple[str, ...]:
    return ("square", "flex") if self.maps is not None else ("square",)


def _checked_candidates(data, sigmas, patch_sizes, maps, thresholds
                        ) -> tuple[list[float], tuple[int, ...], tuple[float, ...]]:
  """(grid, square sizes, thresholds) of `tune_run`'s arguments; ValueError for bad ones."""
  sigmas = [float(s) for s in sigmas]
  if not sigmas or any(not np.isfinite(s) or s <= 0 for s in sigmas):
    raise ValueError("tuning needs noise levels > 0")
  if len(set(sigmas)) != len(sigmas):
    raise ValueError("the tuning grid has repeated noise levels")
  height, width = int(data.shape[1]), int(data.shape[2])
  side = min(height, width)
  sizes = (tuning.candidate_patch_sizes(side) if patch_sizes is None
           else tuple(int(s) for s in patch_sizes))
  if not sizes or any(not 1 <= s <= side for s in sizes):
    raise ValueError(f"patch sizes must lie in [1, {side}], got {list(sizes)}")
  lambdas = tuple(float(v) for v in thresholds) if maps is not None else ()
  if maps is not None:
    if not lambdas or any(not 0 < v <= 1 for v in lambdas):
      raise ValueError(f"thresholds must lie in (0, 1], got {list(lambdas)}")
    if tuple(maps.maps.shape[1:]) != (height, width, height, width):
      raise ValueError(f"maps of {tuple(maps.maps.shape[1:3])} images do not fit the "
                       f"{(height, width)} training images")
  return sigmas, sizes, lambdas


def _read_part(path: str, config: dict, kinds: Sequence[str]) -> dict:
  with open(path) as f:
    part = json.load(f)
  if part.get("config") != config:
    raise _different(path)
  return {"num_z": part["num_z"], **{kind: _from_json(part[kind]) for kind in kinds}}


def _resume(outdir: str, run: _Run, progress: Progress) -> dict[int, dict]:
  """{σ index: {"num_z": K, "square": (M,) mse, "flex": (M',) mse}} that earlier runs of this
  configuration computed: the σ of `errors.json`, then the part files."""
  errors_path = os.path.join(outdir, "errors.json")
  finished = None
  if os.path.exists(errors_path):
    with open(errors_path) as f:
      previous = json.load(f)
    if previous.get("config") != run.config:
      raise _different(errors_path)
    finished = (previous["sigmas"],
                lambda i: {"num_z": previous["num_z"][i],
                           **{kind: _from_json(previous[kind]["mse"][i]) for kind in run.kinds}})
  done = resume_per_sigma(run.sigmas, lambda sigma: part_path(run.parts_dir, sigma),
                          lambda path: _read_part(path, run.config, run.kinds), finished)
  if done:
    progress.note(f"resuming: {len(done)}/{len(run.sigmas)} noise levels already computed")
  return done


def cached_reverse_set(path: str, reference: Callable, sigmas: Sequence[float], image_shape,
                       config: dict, *, num_z: int, seed: int, solver: str, batch_size: int,
                       progress: Progress = SILENT) -> tuple[np.ndarray, np.ndarray]:
  """`tuning.reverse_set` from the latents of seeds seed … seed + num_z − 1, saved to (with
  `config`) or reused from `path`; (z, reference outputs), each (S, K, H, W, C).

  Raises:
    ValueError: `path` holds the set of a different configuration.
  """
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      if json.loads(str(f["config"])) != config:
        raise _different(path)
      progress.note(f"resuming: the reverse-process set of {path}")
      return f["z"], f["reference_out"]
  latents = latents_from_seeds(jnp.arange(seed, seed + num_z), image_shape)
  z, out = tuning.reverse_set(reference, latents, sigmas, solver=solver, batch_size=batch_size,
                              progress=progress)
  save_npz(path, z=z, reference_out=out, config=np.array(json.dumps(config)))
  return z, out


class _Steps(NamedTuple):
  """The compiled evaluations of a run: reference (forward z only), square candidates, and the
  compiled flex functions ({function: executable}, shared by every σ with traced masks)."""
  reference: Callable | None
  squares: list
  flex: dict


def _compile_steps(run: _Run, batch, sigma: float, progress: Progress) -> _Steps:
  """Compiles, as visible phases, what every σ runs: the reference (forward z), every square size
  and the traced flex function (gather masks are constants of each σ: compiled as they come)."""
  reference = None
  if run.z_source == "forward":
    value = as_argument(run.reference)
    compiled = compile_jitted(progress, "reference", apply_denoiser, value, batch,
                              jnp.float32(sigma))
    reference = functools.partial(compiled, value)
  squares = tuning.compile_candidates(
      tuning.square_candidates(run.data, run.sizes, chunk_size=run.chunk_size), batch, sigma,
      progress=progress)
  flex = {}
  if run.maps is not None and run.flex_method == "matmul":
    tuning.compile_candidates(_flex_candidates(run, sigma), batch, sigma, progress=progress,
                              compiled=flex)
  return _Steps(reference, squares, flex)


def _flex_candidates(run: _Run, sigma: float) -> list:
  return tuning.flex_candidates(run.data, maps_for_sigma(run.maps, sigma), run.lambdas,
                                method=run.flex_method, chunk_size=run.chunk_size)


def _evaluate_sigma(run: _Run, steps: _Steps, k: int, reverse, batch, progress: Progress) -> dict:
  """{"num_z": K, "square": (M,) mse[, "flex": (M',) mse]} of grid point k."""
  sigma = run.sigmas[k]
  if reverse is None:
    z = tuning.forward_set(run.data, sigma, run.num_z, run.seed)
    reference_out = tuning.batched_outputs(steps.reference, z, sigma, run.batch_size)
  else:
    z, reference_out = reverse[0][k], reverse[1][k]
  row = {"num_z": int(z.shape[0]),
         "square": tuning.evaluate_candidates(z, sigma, reference_out, steps.squares,
                                              batch_size=run.batch_size)}
  if run.maps is not None:
    flexes = _flex_candidates(run, sigma)
    if run.flex_method == "matmul":
      flexes = tuning.compile_candidates(flexes, batch, sigma, progress=progress,
                                         compiled=steps.flex)
    row["flex"] = tuning.evaluate_candidates(z, sigma, reference_out, flexes,
                                             batch_size=run.batch_size)
  return row


def _chosen(run: _Run, sigma: float, row: dict) -> str:
  """One line of what σ's errors choose."""
  chosen = [f"size {run.sizes[int(np.argmin(row['square']))]} (mse {np.min(row['square']):.3g})"]
  if run.maps is not None and np.isfinite(row["flex"]).any():
    chosen.append(f"λ {run.lambdas[int(np.argmin(row['flex']))]:g} (mse {np.min(row['flex']):.3g})")
  return f"σ = {sigma:.4g}: {', '.join(chosen)}"


def _compute_missing(run: _Run, done: dict[int, dict], progress: Progress) -> None:
  """Evaluates the σ not in `done` (adding them), saving each as its part file at once."""
  os.makedirs(run.parts_dir, exist_ok=True)
  reverse = None
  if run.z_source == "reverse":
    reverse = cached_reverse_set(os.path.join(run.parts_dir, "reverse_z.npz"), run.reference,
                                 run.sigmas, run.data.shape[1:], run.config, num_z=run.num_z,
                                 seed=run.seed, solver=run.solver, batch_size=run.batch_size,
                                 progress=progress)
  todo = [k for k in range(len(run.sigmas)) if k not in done]
  batch = jnp.zeros((min(run.batch_size, run.num_z), *run.data.shape[1:]), jnp.float32)
  steps = _compile_steps(run, batch, run.sigmas[todo[0]], progress)
  with progress.bar(total=len(run.sigmas), desc="tuning", unit="σ", initial=len(done)) as bar:
    for k in todo:
      sigma = run.sigmas[k]
      bar.set_postfix_str(f"σ={sigma:.4g}")
      done[k] = _evaluate_sigma(run, steps, k, reverse, batch, progress)
      save_json(part_path(run.parts_dir, sigma),
                {"config": run.config, "sigma": sigma, "num_z": done[k]["num_z"],
                 **{kind: _finite_or_none(done[k][kind]) for kind in run.kinds}})
      progress.note(_chosen(run, sigma, done[k]))
      bar.update()


def _surfaces(run: _Run, done: dict[int, dict]) -> dict[str, tuning.ErrorSurface]:
  rows = [done[k] for k in range(len(run.sigmas))]
  num = np.asarray([row["num_z"] for row in rows], np.int64)
  grid = np.asarray(run.sigmas, np.float64)
  values = {"square": run.sizes, "flex": run.lambdas}
  return {kind: tuning.ErrorSurface(grid, values[kind], np.stack([row[kind] for row in rows]), num)
          for kind in run.kinds}


def _write_outputs(outdir: str, run: _Run, surfaces: dict[str, tuning.ErrorSurface],
                   tuned: dict[str, schedules.SigmaSchedule], metric: str,
                   compare: dict[str, tuple[str, schedules.SigmaSchedule]] | None) -> dict:
  """Writes the schedules, errors.json, errors.csv and the figure; returns their paths."""
  from pspc_jax import plots  # Imported here: the library itself does not need matplotlib.

  paths = {kind: os.path.join(outdir, SCHEDULE_FILES[kind]) for kind in tuned}
  for kind, schedule in tuned.items():
    write_schedule(paths[kind], schedule)
  paths["errors"] = os.path.join(outdir, "errors.json")
  num = surfaces["square"].num_z
  summary = {"config": run.config, "sigmas": run.sigmas, "num_z": num.tolist(), "metric": metric}
  for kind, surface in surfaces.items():
    summary[kind] = {"values": list(surface.values),
                     "mse": [_finite_or_none(r) for r in surface.mse],
                     "best": list(surface.best_values())}
  save_json(paths["errors"], summary)
  paths["csv"] = os.path.join(outdir, "errors.csv")
  write_error_table(paths["csv"], surfaces)
  paths["figure"] = os.path.join(outdir, "tune_schedule.png")
  overlays = {KIND_LABELS[kind]: (name, [schedule(s) for s in run.sigmas])
              for kind, (name, schedule) in (compare or {}).items() if kind in surfaces}
  plots.save_tuning_figure(
      paths["figure"], surfaces["square"].sigmas,
      {KIND_LABELS[kind]: (s.values, s.mse) for kind, s in surfaces.items()}, compare=overlays,
      title=f"MSE to the reference ({run.z_source}-process z, {int(num.min())} per σ)")
  return paths


def tune_run(data, reference: Callable, sigmas: Sequence[float], *, outdir: str, config: dict,
             patch_sizes: Sequence[int] | None = None, maps=None,
             thresholds: Sequence[float] = tuning.DEFAULT_THRESHOLDS, z_source: str = "forward",
             num_z: int = 64, seed: int = 0, batch_size: int = 64, metric: str = "log",
             flex_method: str = "auto", solver: str = "heun", chunk_size: int | None = None,
             compare: dict[str, tuple[str, schedules.SigmaSchedule]] | None = None,
             progress: Progress = SILENT) -> dict:
  """Tunes s(σ) (and λ(σ) when `maps` are given) against `reference`, resuming an interrupted run
  (files: see the module docstring).

  Args:
    data: (N, H, W, C) training images (uint8 or float in [-1, 1]).
    reference: the reference `denoise(z, sigma)` (compiled here, as an argument).
    sigmas: grid noise levels > 0, distinct (the schedules' grid, in this order).
    outdir: output folder.
    config: JSON-able description of the run (reference, checkpoint, dataset, ...), stored and
      compared on resume (together with the grid, candidates, z source, num_z, seed, solver).
    patch_sizes: candidate square sizes (default `tuning.candidate_patch_sizes(min(H, W))`).
    maps: a `SensitivityMaps` (each σ uses the maps of the nearest map σ in log σ), or None to tune
      the square sizes only.
    thresholds: candidate λ.
    z_source: "forward" or "reverse" (see `pspc_jax.tuning`).
    num_z: inputs per σ (forward: sample ids 0 … num_z − 1; reverse: latents of seeds
      seed … seed + num_z − 1).
    seed: seed of the inputs.
    batch_size: z per denoiser call.
    metric: nearest-grid-σ metric of the written schedules.
    flex_method: see `tuning.flex_candidates`.
    solver: sampler of the reverse-process set.
    chunk_size: dataset rows per streamed chunk of the PSPC candidates.
    compare: {kind ("square" / "flex"): (name, schedule)}, schedules drawn over the surfaces for
      comparison (e.g. ("CIFAR-10 rescaled", `schedules.patch_schedule_for(side)`)).
    progress: where resumption, compilations, a bar over the σ and each σ's choice are reported.

  Returns:
    Summary dict: surfaces {kind: ErrorSurface}, schedules {kind: SigmaSchedule}, output paths,
    number of σ computed and reused, seconds.

  Raises:
    ValueError: bad arguments, or files in `outdir` of a different configuration.
  """
  start = time.perf_counter()
  sigmas, sizes, lambdas = _checked_candidates(data, sigmas, patch_sizes, maps, thresholds)
  if z_source not in tuning.Z_SOURCES:
    raise ValueError(f"unknown z source {z_source!r}; use one of {', '.join(tuning.Z_SOURCES)}")
  if num_z < 1 or batch_size < 1:
    raise ValueError("num_z and the batch size must be at least 1")
  config = json.loads(json.dumps({
      **config, "sigmas": sigmas, "z_source": z_source, "num_z": int(num_z), "seed": int(seed),
      "solver": solver, "patch_sizes": list(sizes), "thresholds": list(lambdas)}))
  run = _Run(jnp.asarray(data), reference, sigmas, sizes, lambdas, maps, z_source, int(num_z),
             int(seed), int(batch_size), tuning.flex_method_for(flex_method, *data.shape[1:3]),
             solver, chunk_size, config, os.path.join(outdir, "parts"))
  done = _resume(outdir, run, progress)
  reused = len(done)
  if reused < len(sigmas):
    _compute_missing(run, done, progress)
  surfaces = _surfaces(run, done)
  tuned = {kind: surface.schedule(metric) for kind, surface in surfaces.items()}
  paths = _write_outputs(outdir, run, surfaces, tuned, metric, compare)
  remove_parts(run.parts_dir, [part_path(run.parts_dir, sigma) for sigma in sigmas]
               + [os.path.join(run.parts_dir, "reverse_z.npz")])
  return {"surfaces": surfaces, "schedules": tuned, "paths": paths,
          "computed": len(sigmas) - reused, "reused": reused,
          "seconds": time.perf_counter() - start}
