"""The job behind `bin/evaluate`: every denoiser on every (σ, evaluation set), MSE tables and figures.

For every σ of a grid and every evaluation set of noisy images z (`pspc_jax.evaluation.forward_set`,
`pspc_jax.evaluation.reverse_set`, or z given from a file: the set "given", a
`pspc_jax.evaluation.GivenSet` evaluated at its own σ), every denoiser's output D(z, σ) and the mean
squared error between every pair of denoisers (paper Fig. 2/6), optionally with the patch-level
analysis of Fig. 4 (`patch_posterior_means` of every s×s window against the same window of a target
denoiser's output).

Outputs in the output folder: config.json, results.json (the resumption state: finished (σ, set) and
all rows), mse.csv / mse.json (tidy rows sigma, set, denoiser_a, denoiser_b, mse, count),
patch_mse.csv / .json, mse.png, patch_mse.png, reverse_set.npz. Rows are saved after every finished
(σ, set); a rerun of the same configuration skips the finished ones, so an interrupted run loses at
most one (σ, set).

Denoisers are built once each by a `make(name) -> denoiser` callable (`registry_maker` over the
registry; a sharded or otherwise customised construction can be swapped in there) and called through
`BatchedDenoiser`: compiled once for one batch shape, the last batch padded, σ passed per sample so one
compilation serves every σ. Progress: each build and each compilation is a phase, the reverse set has a
bar over its trajectories, then one bar counts the (σ, set, denoiser or patch size) outputs, so its
ETA excludes compilation.

In a multi-host run (`--multihost`) every process computes every output (the sharded denoisers'
collectives need them all); only process 0 reads and writes the folder and reports progress, and it
tells the others which (σ, set) an earlier run finished and hands them a saved reverse set.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import multihost, validation
from pspc_jax.batching import map_batched
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.values import apply_denoiser, as_argument
from pspc_jax.evaluation import (AGREEMENT_MSE, GIVEN, SETS, Denoiser, GivenSet, PatchMeans,
                                 default_sigmas, forward_set, mse, mse_lookup, pairwise_mse,
                                 patch_target, reverse_set, window_grid)
from pspc_jax.files import prepare_run_dir, save_json, save_npz
from pspc_jax.jobs.tables import write_table
from pspc_jax.progress import SILENT, Progress, compile_jitted

MSE_COLUMNS = ("sigma", "set", "denoiser_a", "denoiser_b", "mse", "count")
# windows: the windows per z the patch MSE averages over (every window, or `patch_positions`²).
PATCH_COLUMNS = ("sigma", "set", "patch_size", "target", "mse", "count", "windows")
# Every evaluation set, in table order: the drawn ones, then z given from a file.
ALL_SETS = SETS + (GIVEN,)
_STATE_FILE = "results.json"
_REVERSE_FILE = "reverse_set.npz"


class BatchedDenoiser:
  """`denoise` compiled once for a fixed batch size; calls on any number of z pad the last batch.

  σ is passed per sample ((batch_size,) float32), so one compilation serves every σ (and batches that
  mix levels). The object is built once per denoiser and reused for every σ and set; it compiles on
  construction (a "compiling <label>" phase of `progress`).
  """

  def __init__(self, denoise: Denoiser, batch_size: int, image_shape, progress: Progress = SILENT,
               label: str = "denoiser"):
    """denoise: a denoiser value or function; batch_size ≥ 1; image_shape: (H, W, C) of the z.

    Raises:
      ValueError: batch_size < 1.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    self.batch_size = int(batch_size)
    self.calls = 0  # compiled-batch calls, for tests
    self.denoise = as_argument(denoise)
    z = jax.ShapeDtypeStruct((self.batch_size,) + tuple(image_shape), jnp.float32)
    sigma = jax.ShapeDtypeStruct((self.batch_size,), jnp.float32)
    self._step = compile_jitted(progress, label, apply_denoiser, self.denoise, z, sigma)

  def __call__(self, z: np.ndarray, sigma) -> np.ndarray:
    """(B, H, W, C) z, σ scalar or (B,) → (B, H, W, C) float32 NumPy outputs (on every process)."""
    z = np.asarray(z, np.float32)
    sigma = np.broadcast_to(np.asarray(sigma, np.float32), (len(z),))

    def call(z_batch, sigma_batch):
      self.calls += 1
      # A sharded denoiser's output is replicated: every process reads its own copy.
      return multihost.local_copy(self._step(self.denoise, z_batch, sigma_batch))
    return map_batched(call, [z, sigma], self.batch_size)


def registry_maker(data, options: Mapping[str, Mapping] | None = None, mesh=None
                   ) -> Callable[[str], Denoiser]:
  """`make(name)` over the registry: `build_denoiser(name, data, **options.get(name, {}))`.

  The one place where the jobs build denoisers; pass another `make` to `evaluate_run` /
  `compare_run` to change how they are built. With a device `mesh` (`pspc_jax.distributed.make_mesh`),
  the denoisers that hold a training set are sharded over it (`distributed.shard`; pass `data` as a
  host array so that each device receives only its shard), the others stay on one device.
  """
  options = dict(options or {})

  def make(name):
    return build_denoiser(name, data, mesh=mesh, shard_if_possible=True, **options.get(name, {}))
  return make


class _Plan(NamedTuple):
  """The checked settings of an evaluation (see `evaluate_run`)."""
  denoisers: list[str]
  sigmas: list[float]
  sets: list[str]
  patch_sizes: list[int]
  patch_positions: int | None
  count: int
  seed: int
  batch_size: int
  reference: str
  steps: int
  solver: str
  given: GivenSet | None


def _given_set(images: np.ndarray, sets, given: GivenSet | None, sigmas, count: int
               ) -> GivenSet | None:
  """The given set restricted to what the evaluation uses (`GivenSet.select`), or None.

  Raises:
    ValueError: "given" in `sets` without z, z without "given" in `sets`, or z of another image shape.
  """
  if (GIVEN in sets) != (given is not None):
    raise ValueError("the set 'given' needs z from a file (--z=FILE), and --z needs 'given' in --sets"
                     if given is None else
                     f"z are given ({given.source}) but the set '{GIVEN}' is not in --sets")
  if given is None:
    return None
  if given.z.shape[2:] != images.shape[1:]:
    raise ValueError(f"the z of {given.source} are images of shape {given.z.shape[2:]}, the training "
                     f"set's are {images.shape[1:]}")
  return given.select(sigmas, count)


def _plan(images: np.ndarray, denoisers, sigmas, sets, patch_sizes, patch_positions: int | None,
          count: int, seed: int, batch_size: int, reference: str, steps: int, solver: str,
          given: GivenSet | None, progress: Progress) -> _Plan:
  """Checks and normalises `evaluate_run`'s arguments; adds the patch targets to the denoisers."""
  unknown = [s for s in sets if s not in ALL_SETS]
  if unknown or not sets:
    raise ValueError(f"unknown evaluation set {unknown[0] if unknown else '(none)'}; use "
                     f"{', '.join(ALL_SETS)}")
  denoisers = list(dict.fromkeys(denoisers))
  if not denoisers:
    raise ValueError("give at least one denoiser")
  patch_sizes = sorted({int(s) for s in patch_sizes})
  side = min(images.shape[1], images.shape[2])
  if patch_sizes and not 1 <= patch_sizes[0] <= patch_sizes[-1] <= side:
    raise ValueError(f"patch sizes must lie in [1, {side}], got {patch_sizes}")
  patch_positions = validation.positive_int(patch_positions, "patch_positions", minimum=0,
                                           optional=True)
  for name in sets if patch_sizes else ():
    target = patch_target(name, reference)
    if target not in denoisers:
      progress.note(f"patch analysis on the {name} set compares with {target}: evaluating it too")
      denoisers.append(target)
  given_sigmas = sigmas
  sigmas = [float(s) for s in (default_sigmas(steps) if sigmas is None else
                               np.sort(np.asarray(sigmas, np.float32))[::-1])]
  if not sigmas or not all(np.isfinite(s) and s > 0 for s in sigmas):
    raise ValueError(f"need at least one σ, all positive and finite, got {sigmas}")
  if count < 1 or batch_size < 1:
    raise ValueError("--count and --batch must be at least 1")
  given = _given_set(images, sets, given, given_sigmas, count)
  if len(denoisers) < 2 and not patch_sizes:
    raise ValueError(f"nothing to compare: give at least two denoisers or --patch_sizes, got "
                     f"{denoisers}")
  # No compiled batch larger than a whole set.
  return _Plan(denoisers, sigmas, list(sets), patch_sizes, patch_positions or None, count, seed,
               min(batch_size, count), reference, steps, solver, given)


def _units(plan: _Plan) -> list[tuple[float, str]]:
  """The (σ, set) of an evaluation, σ descending: the drawn sets at the plan's σ (at each σ in the
  order of `plan.sets`), the given set at its own σ (after the drawn sets at an equal σ)."""
  units = [(s, name) for s in plan.sigmas for name in plan.sets if name != GIVEN]
  if plan.given is not None:
    units += [(float(s), GIVEN) for s in plan.given.sigmas]
  return sorted(units, key=lambda unit: -unit[0])


def _config(images: np.ndarray, plan: _Plan, options: dict, dataset_name: str) -> dict:
  """config.json of a run: what its results depend on (not the mesh: only float32 rounding); the
  given set by its σ and the SHA-256 of its z."""
  config = {"denoisers": plan.denoisers,
            "options": {n: {k: str(v) for k, v in o.items()} for n, o in options.items()
                        if n in plan.denoisers or n == plan.reference},
            "sigmas": plan.sigmas, "sets": plan.sets, "count": plan.count, "seed": plan.seed,
            "reference": plan.reference if "reverse" in plan.sets else None, "steps": plan.steps,
            "solver": plan.solver, "patch_sizes": plan.patch_sizes,
            "patch_positions": plan.patch_positions, "dataset": dataset_name,
            "num_train_images": int(images.shape[0]), "image_shape": list(images.shape[1:])}
  if plan.given is not None:
    config["given"] = {"source": plan.given.source, "sigmas": [float(s) for s in plan.given.sigmas],
                       "sha256": plan.given.fingerprint()}
  return config


def evaluate_run(images: np.ndarray, *, denoisers: Sequence[str], outdir: str,
                 make: Callable[[str], Denoiser] | None = None,
                 options: Mapping[str, Mapping] | None = None,
                 sigmas: Sequence[float] | None = None, sets: Sequence[str] = SETS, count: int = 64,
                 seed: int = 0, batch_size: int = 16, reference: str = "network", steps: int = 18,
                 solver: str = "heun", patch_sizes: Sequence[int] = (),
                 patch_positions: int | None = None, given: GivenSet | None = None,
                 dataset_name: str = "", mesh=None, plot: bool = True,
                 progress: Progress = SILENT) -> dict | None:
  """Evaluates `denoisers` on every (σ, set) and writes the MSE tables and figures (module doc).

  Args:
    images: (N, H, W, C) uint8 training set (the denoisers' data and the forward set's x).
    denoisers: registry names, at least one (pairs need two).
    outdir: output folder; a run of the same configuration there is resumed.
    make: `make(name) -> denoiser`; default `registry_maker(images, options, mesh)`. Called at most
      once per name, and only when something is left to compute.
    options: builder options per name (recorded in config.json; used by the default `make`).
    sigmas: noise levels (default `default_sigmas(steps)`), evaluated in descending order. The given
      set is evaluated at those of its own σ that are among `sigmas` (all of them by default).
    sets: subset of ("forward", "reverse", "given"); "given" if and only if `given` is set.
    count: z per σ and set (the reverse set: `count` trajectories, seeds seed … seed+count−1).
    seed: base seed of both sets.
    batch_size: z per compiled denoiser call.
    reference: the denoiser whose trajectories make the reverse set.
    steps, solver: the reverse set's sampler (see `reverse_grid`).
    patch_sizes: when non-empty, also the patch analysis (Fig. 4) against `patch_target(set,
      reference)` (empirical on the forward set, the reference on the reverse and given sets), which
      is then evaluated even if not in `denoisers` (it is added to the list).
    patch_positions: None or 0: the patch MSE averages over every window; k ≥ 1: over the windows of
      an even k×k grid of corners only (`evaluation.window_grid`), each window's posterior mean still
      exact (`window_posterior_means`): the affordable choice on large images (CIFAR-10: 16 windows
      instead of up to 900 per z and patch size). The row's "windows" says which.
    given: z from a file (`pspc_jax.release_files.load_z_set`), the set "given": its first `count` z
      at each selected σ. Recorded in config.json by its σ and the SHA-256 of its z.
    dataset_name: recorded in config.json.
    mesh: optional device mesh for the default `make` (sharded datasets; results equal up to float32
      rounding, so it is not part of the configuration). `batch_size` should then be a multiple of the
      mesh's batch axis.
    plot: write mse.png (and patch_mse.png).
    progress: where builds, compilations, the reverse set and the outputs are reported (process 0
      only).

  Returns:
    On process 0: {"mse": rows, "patch_mse": rows, "computed": [(σ, set) computed now], "seconds":
    float, "outdir": outdir}. On the other processes of a multi-host run, which write nothing: None.

  Raises:
    ValueError: bad arguments, or `outdir` holds a run of another configuration.
  """
  start = time.perf_counter()
  main = multihost.is_main_process()
  progress = progress if main else SILENT
  plan = _plan(images, denoisers, sigmas, sets, patch_sizes, patch_positions, count, seed,
               batch_size, reference, steps, solver, given, progress)
  options = {name: dict(options.get(name, {})) for name in options} if options else {}
  units = _units(plan)
  state, reverse_saved = _resume(outdir, _config(images, plan, options, dataset_name), units,
                                 progress)
  finished = {(float(s), name) for s, name in state["finished"]}
  todo = [unit for unit in units if unit not in finished]
  if todo:
    make = make or registry_maker(images if mesh is not None else jnp.asarray(images), options, mesh)
    _compute(images, plan, make, todo, len(units), state, outdir, reverse_saved, progress)
  else:
    progress.note(f"nothing left to compute in {outdir}")
  if not main:
    return None
  state = _save_state(outdir, state)
  if plot:
    _plot(outdir, state, dataset_name)
  return {"mse": state["mse"], "patch_mse": state["patch_mse"], "computed": todo,
          "seconds": time.perf_counter() - start, "outdir": outdir}


def _empty_state() -> dict:
  return {"finished": [], "mse": [], "patch_mse": []}


def _read_folder(outdir: str, config: dict, num_units: int, progress: Progress) -> tuple[dict, bool]:
  """(state, whether a reverse set is saved) of `outdir` after `prepare_run_dir`.

  A fresh run deletes a reverse set left by another configuration and writes its (empty) state at
  once, so whatever follows (the reverse set first) belongs to this configuration.
  """
  state_path = os.path.join(outdir, _STATE_FILE)
  reverse_path = os.path.join(outdir, _REVERSE_FILE)
  if prepare_run_dir(outdir, config, _STATE_FILE):
    with open(state_path) as f:
      state = json.load(f)
    progress.note(f"resuming: {len(state['finished'])}/{num_units} (σ, set) already in {state_path}")
    return state, os.path.exists(reverse_path)
  if os.path.exists(reverse_path):
    os.unlink(reverse_path)
  state = _empty_state()
  _save_state(outdir, state)
  return state, False


def _resume(outdir: str, config: dict, units: list[tuple[float, str]], progress: Progress
            ) -> tuple[dict, bool]:
  """(state, whether a reverse set is saved): what an earlier run of `config` left in `outdir`.

  Only process 0 looks at the folder. In a multi-host run it tells the others which (σ, set) are
  finished (their state lists only those, without rows) and whether the reverse set is saved, or that
  it refused the folder, so that every process computes the same outputs, or all of them stop.

  Raises:
    ValueError: `outdir` holds a run of another configuration (on the other processes: process 0
      refused the folder).
  """
  state, saved, refusal = _empty_state(), False, None
  if multihost.is_main_process():
    try:
      state, saved = _read_folder(outdir, config, len(units), progress)
    except (ValueError, OSError) as err:
      refusal = err
  finished = {(float(s), name) for s, name in state["finished"]}
  # [folder accepted, reverse set saved, unit 0 finished, unit 1 finished, …] as process 0 knows them.
  known = np.asarray([refusal is None, saved] + [unit in finished for unit in units], np.int32)
  shared = multihost.broadcast_from_main(known)
  if refusal is not None:
    raise refusal
  if not shared[0]:
    raise ValueError(f"process 0 refused --outdir={outdir} (see its error)")
  if not multihost.is_main_process():
    state["finished"] = [list(unit) for unit, done in zip(units, shared[2:]) if done]
  return state, bool(shared[1])


def _compute(images: np.ndarray, plan: _Plan, make: Callable[[str], Denoiser],
             todo: list[tuple[float, str]], num_units: int, state: dict, outdir: str,
             reverse_saved: bool, progress: Progress) -> None:
  """Computes the (σ, set) of `todo`, adding their rows to `state` (saved after each on process 0).

  Everything is built and compiled first (a bad option fails before any work); then the evaluation
  sets are drawn, then one bar counts the outputs of all `num_units` (σ, set), the finished included.
  """
  sets_todo = {name for _, name in todo}
  calls, reference = _build_steps(make, plan, images.shape[1:], "reverse" in sets_todo, progress)
  data = jnp.asarray(images)
  height, width = images.shape[1:3]
  patch_fns = {s: PatchMeans(data, s, plan.batch_size, progress,
                             window_grid(height, width, s, plan.patch_positions))
               for s in plan.patch_sizes}
  forward = forward_set(images, plan.count, plan.seed) if "forward" in sets_todo else None
  reverse = (_reverse_states(images, plan, reference, outdir, reverse_saved, progress)
             if "reverse" in sets_todo else None)
  per_unit = len(calls) + len(patch_fns)
  with progress.bar(total=num_units * per_unit, initial=(num_units - len(todo)) * per_unit,
                    desc="evaluating", unit="output") as bar:
    for sigma, set_name in todo:
      z = (forward.z(sigma) if set_name == "forward" else
           reverse[sigma] if set_name == "reverse" else plan.given.at(sigma))
      rows, patch_rows = _evaluate_unit(z, sigma, set_name, plan.reference, calls, patch_fns, bar)
      state["mse"].extend(rows)
      state["patch_mse"].extend(patch_rows)
      state["finished"].append([sigma, set_name])
      if multihost.is_main_process():
        _save_state(outdir, state)


def _build_steps(make: Callable[[str], Denoiser], plan: _Plan, image_shape, with_reference: bool,
                 progress: Progress) -> tuple[dict[str, BatchedDenoiser], Denoiser | None]:
  """({name: compiled batched denoiser}, the reverse set's reference or None).

  Every denoiser is built (each a phase) before any is compiled, so a bad option fails at once.
  """
  built: dict[str, Denoiser] = {}

  def build(name):
    if name not in built:
      with progress.phase(f"building {name}"):
        built[name] = make(name)
    return built[name]

  reference = build(plan.reference) if with_reference else None
  for name in plan.denoisers:
    build(name)
  calls = {name: BatchedDenoiser(built[name], plan.batch_size, image_shape, progress,
                                 label=f"denoiser {name}") for name in plan.denoisers}
  return calls, reference


def _reverse_states(images: np.ndarray, plan: _Plan, reference: Denoiser, outdir: str, saved: bool,
                    progress: Progress) -> dict[float, np.ndarray]:
  """{σ: (count, H, W, C) states} of the reverse set: process 0's saved reverse_set.npz (handed to
  every process), else the reference's trajectories (every process samples them; process 0 saves)."""
  path = os.path.join(outdir, _REVERSE_FILE)
  if saved:
    states = np.zeros((len(plan.sigmas), plan.count) + tuple(images.shape[1:]), np.float32)
    if multihost.is_main_process():
      with np.load(path) as stored:
        states = stored["states"]
      progress.note(f"reverse set loaded from {path}")
    states = multihost.broadcast_from_main(states)
  else:
    seeds = list(range(plan.seed, plan.seed + plan.count))
    states = reverse_set(reference, images.shape[1:], plan.sigmas, seeds, steps=plan.steps,
                         solver=plan.solver, batch_size=plan.batch_size, progress=progress)
    if multihost.is_main_process():
      save_npz(path, sigmas=np.asarray(plan.sigmas, np.float32), seeds=np.asarray(seeds),
               states=states)
  return dict(zip(plan.sigmas, states))


def _evaluate_unit(z: np.ndarray, sigma: float, set_name: str, reference: str,
                   calls: Mapping[str, BatchedDenoiser], patch_fns: Mapping[int, PatchMeans], bar
                   ) -> tuple[list[dict], list[dict]]:
  """(MSE rows, patch rows) of one (σ, set): every denoiser on `z`, then the patch means; each output
  advances `bar`, whose postfix names it while it is computed."""
  outputs = {}
  for name, call in calls.items():
    bar.set_postfix_str(f"σ={sigma:.4g} {set_name} {name}")
    outputs[name] = call(z, sigma)
    bar.update()
  rows = [{"sigma": sigma, "set": set_name, "denoiser_a": a, "denoiser_b": b, "mse": value,
           "count": len(z)} for a, b, value in pairwise_mse(outputs)]
  target = patch_target(set_name, reference)
  patch_rows = []
  for size, means_fn in patch_fns.items():
    bar.set_postfix_str(f"σ={sigma:.4g} {set_name} patch means s={size}")
    means = means_fn(z, sigma)
    patch_rows.append({"sigma": sigma, "set": set_name, "patch_size": size, "target": target,
                       "mse": mse(means, means_fn.patches(outputs[target])), "count": len(z),
                       "windows": means_fn.windows})
    bar.update()
  return rows, patch_rows


def _save_state(outdir: str, state: dict) -> dict:
  """results.json first (the resumption state), then the table views; rows sorted by σ descending
  (then set, then computation order). Returns the sorted state."""
  key = {name: k for k, name in enumerate(ALL_SETS)}
  order = lambda row: (-row["sigma"], key[row["set"]])  # noqa: E731
  state = {"finished": state["finished"], "mse": sorted(state["mse"], key=order),
           "patch_mse": sorted(state["patch_mse"], key=order)}
  save_json(os.path.join(outdir, _STATE_FILE), state)
  write_table(os.path.join(outdir, "mse"), state["mse"], MSE_COLUMNS)
  if state["patch_mse"]:
    write_table(os.path.join(outdir, "patch_mse"), state["patch_mse"], PATCH_COLUMNS)
  return state


def _plot(outdir: str, state: dict, dataset_name: str) -> None:
  """mse.png, and patch_mse.png when there are patch rows."""
  from pspc_jax import plots  # matplotlib only when plotting

  plots.save_mse_plot(os.path.join(outdir, "mse.png"), state["mse"],
                      title=f"{dataset_name}: denoiser MSE by σ" if dataset_name else "")
  if state["patch_mse"]:
    plots.save_patch_mse_plot(os.path.join(outdir, "patch_mse.png"), state["patch_mse"],
                              tolerance=AGREEMENT_MSE)


def format_pivot(rows: Sequence[Mapping], set_name: str,
                 pairs: Sequence[tuple[str, str]] | None = None) -> str:
  """A Markdown table of one set's MSE: one row per σ (descending), one column per denoiser pair.

  Args:
    rows: MSE table rows (`evaluate_run`).
    set_name: "forward", "reverse" or "given".
    pairs: the (a, b) columns (default: every pair present, in table order).
  """
  rows = [row for row in rows if row["set"] == set_name]
  if pairs is None:
    pairs = list(dict.fromkeys((row["denoiser_a"], row["denoiser_b"]) for row in rows))
  sigmas = sorted({row["sigma"] for row in rows}, reverse=True)
  lines = ["| σ | " + " | ".join(f"{a} vs {b}" for a, b in pairs) + " |",
           "|---|" + "---|" * len(pairs)]
  for sigma in sigmas:
    cells = []
    for a, b in pairs:
      value = mse_lookup(rows, set_name, a, b).get(sigma)
      cells.append("" if value is None else f"{value:.4g}")
    lines.append(f"| {sigma:.4g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
