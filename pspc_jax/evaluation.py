"""Batch evaluation of denoisers against each other (paper §4-5, Fig. 2, 4, 6, 8; DESIGN §7).

Three jobs, each a pure-maths core plus a resumable run that writes an output folder:

* `evaluate_run` (bin/evaluate): for every σ of a grid and every *evaluation set* of noisy images z,
  every denoiser's output D(z, σ) and the mean squared error between every pair of denoisers
  (Fig. 2/6), optionally with the patch-level analysis of Fig. 4 (`patch_posterior_means` of every
  s×s window against the same window of a target denoiser's output).
    - forward set (`forward_set`): z = x + σ ε with x drawn from the training set; the same x and ε at
      every σ (common random numbers: curves over σ are not blurred by redrawing);
    - reverse set (`reverse_set`): the states z(σ) of a reference denoiser's own sampler trajectories
      (Heun on the EDM grid, from seeded latents), i.e. the inputs that denoiser sees while sampling.
  Outputs: results.json (the resumption state: finished (σ, set) and all rows), mse.csv / mse.json
  (tidy rows sigma, set, denoiser_a, denoiser_b, mse, count), patch_mse.csv / .json, mse.png,
  patch_mse.png, reverse_set.npz. Rows are saved after every finished (σ, set); a rerun of the same
  configuration skips the finished ones, so an interrupted run loses at most one (σ, set).
* `compare_run` (bin/compare_samples): samples of several denoisers from shared initial latents, a
  trajectory figure (Fig. 8: z and D(z) along the sampler, one pair of rows per denoiser), similarity
  matrices between the denoisers' samples under pluggable descriptors (`register_descriptor`), and
  memorisation statistics (`memorisation_stats`).

MSE is per pixel and channel, in model units ([-1, 1] images), averaged over the z of a set:
mse(a, b) = mean over z, pixels, channels of (D_a(z) − D_b(z))², computed in float64.

Denoisers are built once each by a `make(name) -> denoise` callable (`registry_maker` over the
registry; a sharded or otherwise customised construction can be swapped in there) and called through
`BatchedDenoiser`: one compiled batch shape, the last batch padded, σ passed per sample so one
compilation serves every σ.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax.batching import map_batched
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.pspc import patch_posterior_means
from pspc_jax.denoisers.values import apply_denoiser, as_argument
from pspc_jax.edm import edm_sigmas
from pspc_jax.files import atomic_write, prepare_run_dir, save_npz
from pspc_jax.images import to_model_range
from pspc_jax.neighbours import nearest_neighbours
from pspc_jax.sampling import latents_from_seeds, sample

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

SETS = ("forward", "reverse")
# The denoiser whose output the patch posterior means are compared with on the forward set (Fig. 4):
# the optimal empirical denoiser. On the reverse set it is the reference that made the trajectories
# (the network in the paper).
FORWARD_PATCH_TARGET = "empirical"


def patch_target(set_name: str, reference: str) -> str:
  """The denoiser the patch analysis compares with on `set_name`."""
  return FORWARD_PATCH_TARGET if set_name == "forward" else reference
# Tags folded into the base key so the forward set's draws never coincide with sampler latents.
_TAG_FORWARD_INDEX, _TAG_FORWARD_NOISE = 1, 2
# Memorisation threshold on the nearest / second-nearest training distance ratio (see
# `memorisation_stats`).
MEMORISATION_RATIO = 1.0 / 3.0


# ----------------------------------------------------------------------------------------------------
# Noise levels and evaluation sets (pure).

def default_sigmas(steps: int = 18) -> np.ndarray:
  """The `steps`-step EDM grid without its final 0 (σ = 80 … 0.002, descending), float32."""
  return np.asarray(edm_sigmas(steps))[:-1]


def parse_sigmas(spec: str, steps: int = 18) -> np.ndarray:
  """'edm' → `default_sigmas(steps)`; 'edm:K' → the K-step EDM grid; '1,0.1' → those σ (descending).

  A σ spec may also select grid points by index: 'edm[0,5,10]' → those entries of the grid of `steps`.

  Raises:
    ValueError: malformed spec or a σ ≤ 0.
  """
  spec = spec.strip()
  try:
    if spec == "edm":
      sigmas = default_sigmas(steps)
    elif spec.startswith("edm:"):
      sigmas = default_sigmas(int(spec[4:]))
    elif spec.startswith("edm[") and spec.endswith("]"):
      grid = default_sigmas(steps)
      sigmas = grid[[int(i) for i in spec[4:-1].split(",")]]
    else:
      sigmas = np.asarray([float(s) for s in spec.split(",")], np.float32)
  except (ValueError, IndexError) as err:
    raise ValueError(f"cannot parse --sigmas={spec!r} ({err}); use 'edm', 'edm:K', 'edm[i,j,...]' "
                     "(indices into the --steps grid) or a comma list of positive σ") from None
  if sigmas.size == 0 or np.any(sigmas <= 0):
    raise ValueError(f"--sigmas={spec!r}: need at least one σ, all positive")
  return np.sort(np.unique(sigmas.astype(np.float32)))[::-1]


def _image_keys(seed: int, tag: int, count: int) -> jax.Array:
  """One key per image k: fold_in(fold_in(key(seed), tag), k); image k does not depend on `count`."""
  base = jax.random.fold_in(jax.random.key(seed), tag)
  return jax.vmap(lambda k: jax.random.fold_in(base, k))(jnp.arange(count))


class ForwardSet(NamedTuple):
  """Forward-process evaluation set: z(σ) = x + σ ε, the same x and ε at every σ.

  Attributes:
    indices: (B,) int training image of each z (drawn uniformly with replacement).
    x: (B, H, W, C) float32 clean images in [-1, 1].
    noise: (B, H, W, C) float32 standard normal ε.
  """
  indices: np.ndarray
  x: np.ndarray
  noise: np.ndarray

  def z(self, sigma: float) -> np.ndarray:
    """(B, H, W, C) float32 x + σ ε."""
    return self.x + np.float32(sigma) * self.noise


def forward_set(images: np.ndarray, count: int, seed: int = 0) -> ForwardSet:
  """Draws the forward set: entry k's image index and noise come from keys of (seed, k) only.

  Args:
    images: (N, H, W, C) uint8 or float training set.
    count: number of z per σ.
    seed: base seed.
  """
  if count < 1:
    raise ValueError(f"need at least one z per σ, got {count}")
  index_keys = _image_keys(seed, _TAG_FORWARD_INDEX, count)
  indices = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (), 0, images.shape[0]))(index_keys))
  shape = tuple(images.shape[1:])
  noise_keys = _image_keys(seed, _TAG_FORWARD_NOISE, count)
  noise = np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(noise_keys))
  x = np.asarray(to_model_range(jnp.asarray(images[indices])))
  return ForwardSet(indices, x, noise)


def reverse_grid(sigmas: Sequence[float], steps: int = 18) -> np.ndarray:
  """The sampler grid of the reverse set: the EDM grid of `steps` united with `sigmas`, descending,
  then 0 (float32). With `sigmas` on the EDM grid (the default) it is exactly the EDM grid, so the
  trajectories are the reference's ordinary samples and the states at the grid σ are Heun's states."""
  grid = np.concatenate([default_sigmas(steps), np.asarray(sigmas, np.float32)]).astype(np.float32)
  return np.append(np.unique(grid)[::-1], np.float32(0.0))


def reverse_set(denoise: Denoiser, image_shape, sigmas: Sequence[float], seeds: Sequence[int], *,
                steps: int = 18, solver: str = "heun", batch_size: int = 16,
                log: Callable[[str], None] | None = None) -> np.ndarray:
  """States z(σ) of `denoise`'s own PF-ODE trajectories, one per seed (the paper's reverse set).

  Sample k starts from `latents_from_seeds([seeds[k]])` (so its final state is what bin/sample draws
  for that seed) and is integrated on `reverse_grid(sigmas, steps)`; the state at each requested σ is
  kept (Trajectory.z at that grid index).

  Args:
    denoise: the reference denoiser (e.g. the network).
    image_shape: (H, W, C).
    sigmas: (S,) noise levels, each kept from the trajectory.
    seeds: (B,) latent seeds.
    steps, solver: the sampler (`pspc_jax.sample`).
    batch_size: trajectories per compiled batch (the last batch is padded).
    log: optional progress printer.

  Returns:
    (S, B, H, W, C) float32: [j, k] is seed k's state at sigmas[j].
  """
  grid = reverse_grid(sigmas, steps)
  where = np.asarray([int(np.flatnonzero(grid == np.float32(s))[0]) for s in sigmas])
  run = jax.jit(lambda den, seeds: jnp.swapaxes(sample(
      den, latents_from_seeds(seeds, tuple(image_shape)), jnp.asarray(grid), solver=solver,
      return_trajectory=True)[1].z[where], 0, 1))
  seeds = np.asarray([int(s) for s in seeds])
  start = time.perf_counter()
  done = [0]

  def report(count):
    done[0] += count
    if log:
      log(f"reverse set: {done[0]}/{len(seeds)} trajectories ({len(grid) - 1} {solver} "
          f"steps) elapsed {time.perf_counter() - start:.1f}s")

  denoise = as_argument(denoise)
  states = map_batched(lambda batch: run(denoise, batch), [seeds], batch_size, on_batch=report)
  return np.swapaxes(states, 0, 1)


# ----------------------------------------------------------------------------------------------------
# Denoiser calls and metrics.

class BatchedDenoiser:
  """`denoise` compiled once for a fixed batch size; calls on any number of z pad the last batch.

  σ is passed per sample ((batch_size,) float32), so one compilation serves every σ (and batches that
  mix levels). The object is built once per denoiser and reused for every σ and set.
  """

  def __init__(self, denoise: Denoiser, batch_size: int):
    if batch_size < 1:
      raise ValueError(f"batch size must be at least 1, got {batch_size}")
    self.batch_size = int(batch_size)
    self.calls = 0  # compiled-batch calls, for tests and progress
    self.denoise = as_argument(denoise)

  def __call__(self, z: np.ndarray, sigma) -> np.ndarray:
    """(B, H, W, C) z, σ scalar or (B,) → (B, H, W, C) float32 NumPy outputs."""
    z = np.asarray(z, np.float32)
    sigma = np.broadcast_to(np.asarray(sigma, np.float32), (len(z),))

    def call(z_batch, sigma_batch):
      self.calls += 1
      return apply_denoiser(self.denoise, z_batch, sigma_batch)
    return map_batched(call, [z, sigma], self.batch_size)


def registry_maker(data, options: Mapping[str, Mapping] | None = None, mesh=None
                   ) -> Callable[[str], Denoiser]:
  """`make(name)` over the registry: `build_denoiser(name, data, **options.get(name, {}))`.

  This is the one place where the evaluation builds denoisers; pass another `make` to `evaluate_run` /
  `compare_run` to change how they are built. With a device `mesh` (`pspc_jax.distributed.make_mesh`),
  the denoisers that hold a training set are sharded over it (`distributed.shard`), the others stay on
  one device.
  """
  options = dict(options or {})

  def make(name):
    return build_denoiser(name, data, mesh=mesh, shard_if_possible=True, **options.get(name, {}))
  return make


def mse(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over every z, pixel and channel of (a − b)², in float64."""
  return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def pairwise_mse(outputs: Mapping[str, np.ndarray]) -> list[tuple[str, str, float]]:
  """(a, b, mse(outputs[a], outputs[b])) for every unordered pair, in the order of `outputs`."""
  names = list(outputs)
  return [(a, b, mse(outputs[a], outputs[b])) for i, a in enumerate(names) for b in names[i + 1:]]


def extract_patches(images: np.ndarray, patch_size: int) -> np.ndarray:
  """Every s×s window of (B, H, W, C) images → (B, H−s+1, W−s+1, s, s, C) (the layout of
  `patch_posterior_means`)."""
  images = np.asarray(images)
  _, height, width, _ = images.shape
  rows = np.arange(height - patch_size + 1)[:, None] + np.arange(patch_size)[None, :]
  cols = np.arange(width - patch_size + 1)[:, None] + np.arange(patch_size)[None, :]
  return images[:, rows[:, None, :, None], cols[None, :, None, :], :]


class PatchMeans:
  """`patch_posterior_means` of one patch size, compiled once for a fixed batch (last batch padded)."""

  def __init__(self, data, patch_size: int, batch_size: int):
    self.data, self.batch_size = data, int(batch_size)
    self._fn = jax.jit(lambda z, sigma, data: patch_posterior_means(z, sigma, data, int(patch_size)))

  def __call__(self, z: np.ndarray, sigma: float) -> np.ndarray:
    z = np.asarray(z, np.float32)
    sigmas = np.full((len(z),), sigma, np.float32)
    return map_batched(lambda zb, sb: self._fn(zb, sb, self.data), [z, sigmas], self.batch_size)


# ----------------------------------------------------------------------------------------------------
# The resumable evaluation run.

def _write_table(stem: str, rows: list[dict], columns: Sequence[str]) -> None:
  """Writes rows as `stem.csv` and `stem.json` (a list of row objects), atomically."""
  with atomic_write(stem + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
  with atomic_write(stem + ".csv", "w") as f:
    f.write(text.getvalue())


MSE_COLUMNS = ("sigma", "set", "denoiser_a", "denoiser_b", "mse", "count")
PATCH_COLUMNS = ("sigma", "set", "patch_size", "target", "mse", "count")


class _Clock:
  """Progress over a known number of work units: elapsed and ETA from the units done so far."""

  def __init__(self, total: int, log: Callable[[str], None]):
    self.total, self.log, self.done = max(1, total), log, 0
    self.start = time.perf_counter()

  def tick(self, what: str, seconds: float) -> None:
    self.done += 1
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * (self.total - self.done)
    self.log(f"[{self.done}/{self.total}] {what} {seconds:.1f}s; elapsed {elapsed:.1f}s, "
             f"eta {eta:.1f}s")


def evaluate_run(images: np.ndarray, *, denoisers: Sequence[str], outdir: str,
                 make: Callable[[str], Denoiser] | None = None,
                 options: Mapping[str, Mapping] | None = None,
                 sigmas: Sequence[float] | None = None, sets: Sequence[str] = SETS, count: int = 64,
                 seed: int = 0, batch_size: int = 16, reference: str = "network", steps: int = 18,
                 solver: str = "heun", patch_sizes: Sequence[int] = (), dataset_name: str = "",
                 mesh=None, plot: bool = True, log: Callable[[str], None] = print) -> dict:
  """Evaluates `denoisers` on every (σ, set) and writes the MSE tables and figures (see module doc).

  Args:
    images: (N, H, W, C) uint8 training set (the denoisers' data and the forward set's x).
    denoisers: registry names, at least one (pairs need two).
    outdir: output folder; a run of the same configuration there is resumed.
    make: `make(name) -> denoise`; default `registry_maker(images, options, mesh)`. Called at most
      once per name, and only when something is left to compute.
    options: builder options per name (recorded in config.json; used by the default `make`).
    sigmas: noise levels (default `default_sigmas(steps)`), evaluated in descending order.
    sets: subset of ("forward", "reverse").
    count: z per σ and set (the reverse set: `count` trajectories, seeds seed … seed+count−1).
    seed: base seed of both sets.
    batch_size: z per compiled denoiser call.
    reference: the denoiser whose trajectories make the reverse set.
    steps, solver: the reverse set's sampler (see `reverse_grid`).
    patch_sizes: when non-empty, also the patch analysis (Fig. 4) against `patch_target(set,
      reference)` (empirical on the forward set, the reference on the reverse set), which is then
      evaluated even if not in `denoisers` (it is added to the list).
    dataset_name: recorded in config.json.
    mesh: optional device mesh for the default `make` (sharded datasets; results equal up to float32
      rounding, so it is not part of the configuration). `batch_size` should then be a multiple of the
      mesh's batch axis.
    plot: write mse.png (and patch_mse.png).
    log: progress printer.

  Returns:
    {"mse": rows, "patch_mse": rows, "computed": [(σ, set) computed now], "seconds": float,
     "outdir": outdir}.
  """
  unknown = [s for s in sets if s not in SETS]
  if unknown or not sets:
    raise ValueError(f"unknown evaluation set {unknown[0] if unknown else '(none)'}; use "
                     f"{' and/or '.join(SETS)}")
  denoisers = list(dict.fromkeys(denoisers))
  if not denoisers:
    raise ValueError("give at least one denoiser")
  patch_sizes = sorted({int(s) for s in patch_sizes})
  side = min(images.shape[1], images.shape[2])
  if patch_sizes and not 1 <= patch_sizes[0] <= patch_sizes[-1] <= side:
    raise ValueError(f"patch sizes must lie in [1, {side}], got {patch_sizes}")
  for name in sets if patch_sizes else ():
    target = patch_target(name, reference)
    if target not in denoisers:
      log(f"patch analysis on the {name} set compares with {target}: evaluating it too")
      denoisers.append(target)
  sigmas = [float(s) for s in (default_sigmas(steps) if sigmas is None else
                               np.sort(np.asarray(sigmas, np.float32))[::-1])]
  if not sigmas or min(sigmas) <= 0:
    raise ValueError("need at least one σ, all positive")
  if count < 1 or batch_size < 1:
    raise ValueError("--count and --batch must be at least 1")
  batch_size = min(batch_size, count)  # no compiled batch larger than a whole set
  options = {name: dict(options.get(name, {})) for name in options} if options else {}
  config = {"denoisers": denoisers,
            "options": {n: {k: str(v) for k, v in o.items()} for n, o in options.items()
                        if n in denoisers or n == reference},
            "sigmas": sigmas, "sets": list(sets), "count": count, "seed": seed,
            "reference": reference if "reverse" in sets else None, "steps": steps, "solver": solver,
            "patch_sizes": patch_sizes, "dataset": dataset_name,
            "num_train_images": int(images.shape[0]), "image_shape": list(images.shape[1:])}
  state_path = os.path.join(outdir, "results.json")
  state = {"finished": [], "mse": [], "patch_mse": []}
  if prepare_run_dir(outdir, config, "results.json"):
    with open(state_path) as f:
      state = json.load(f)
    log(f"resuming: {len(state['finished'])}/{len(sigmas) * len(sets)} (σ, set) already in "
        f"{state_path}")
  else:
    # A fresh run: no reverse set of another configuration may be picked up, and the (empty) state is
    # written at once, so whatever follows (the reverse set first) belongs to this configuration.
    if os.path.exists(os.path.join(outdir, "reverse_set.npz")):
      os.unlink(os.path.join(outdir, "reverse_set.npz"))
    _save_state(outdir, state)
  finished = {(float(s), name) for s, name in state["finished"]}
  todo = [(s, name) for s in sigmas for name in sets if (s, name) not in finished]
  start = time.perf_counter()

  if todo:
    data = jnp.asarray(images)
    make = make or registry_maker(data, options, mesh)
    built: dict[str, Denoiser] = {}

    def build(name):
      if name not in built:
        t = time.perf_counter()
        built[name] = make(name)
        log(f"built {name} in {time.perf_counter() - t:.1f}s")
      return built[name]

    # Every denoiser is built before any work, so a bad option fails at once.
    sets_todo = {name for _, name in todo}
    if "reverse" in sets_todo:
      build(reference)
    calls = {name: BatchedDenoiser(build(name), batch_size) for name in denoisers}
    forward = forward_set(images, count, seed) if "forward" in sets_todo else None
    reverse = None
    if "reverse" in sets_todo:
      reverse_path = os.path.join(outdir, "reverse_set.npz")
      if os.path.exists(reverse_path):
        with np.load(reverse_path) as saved:
          reverse = dict(zip(saved["sigmas"].tolist(), saved["states"]))
        log(f"reverse set loaded from {reverse_path}")
      else:
        log(f"reverse set: {count} {reference} trajectories on {len(reverse_grid(sigmas, steps)) - 1}"
            f" {solver} steps")
        seeds = list(range(seed, seed + count))
        states = reverse_set(build(reference), images.shape[1:], sigmas, seeds, steps=steps,
                             solver=solver, batch_size=batch_size, log=log)
        save_npz(reverse_path, sigmas=np.asarray(sigmas, np.float32), seeds=np.asarray(seeds),
                 states=states)
        reverse = dict(zip(np.asarray(sigmas, np.float32).tolist(), states))

    patch_fns = {s: PatchMeans(data, s, batch_size) for s in patch_sizes}
    clock = _Clock(len(todo) * (len(denoisers) + len(patch_sizes)), log)
    for sigma, set_name in todo:
      z = forward.z(sigma) if set_name == "forward" else reverse[float(np.float32(sigma))]
      log(f"σ={sigma:.4g} set={set_name}: {len(z)} z, {len(denoisers)} denoisers")
      outputs = {}
      for name in denoisers:
        t = time.perf_counter()
        outputs[name] = calls[name](z, sigma)
        clock.tick(f"σ={sigma:.4g} set={set_name} denoiser={name}", time.perf_counter() - t)
      rows = [{"sigma": sigma, "set": set_name, "denoiser_a": a, "denoiser_b": b, "mse": value,
               "count": len(z)} for a, b, value in pairwise_mse(outputs)]
      patch_rows = []
      target = patch_target(set_name, reference)
      for size in patch_sizes:
        t = time.perf_counter()
        means = patch_fns[size](z, sigma)
        patch_rows.append({"sigma": sigma, "set": set_name, "patch_size": size, "target": target,
                           "mse": mse(means, extract_patches(outputs[target], size)),
                           "count": len(z)})
        clock.tick(f"σ={sigma:.4g} set={set_name} patch means s={size}", time.perf_counter() - t)
      state["mse"].extend(rows)
      state["patch_mse"].extend(patch_rows)
      state["finished"].append([sigma, set_name])
      _save_state(outdir, state)
  else:
    log(f"nothing left to compute in {outdir}")

  state = _save_state(outdir, state)
  if plot:
    from pspc_jax import plots

    plots.save_mse_plot(os.path.join(outdir, "mse.png"), state["mse"],
                        title=f"{dataset_name}: denoiser MSE by σ" if dataset_name else "")
    if state["patch_mse"]:
      plots.save_patch_mse_plot(os.path.join(outdir, "patch_mse.png"), state["patch_mse"])
  return {"mse": state["mse"], "patch_mse": state["patch_mse"], "computed": todo,
          "seconds": time.perf_counter() - start, "outdir": outdir}


def _save_state(outdir: str, state: dict) -> dict:
  """results.json first (the resumption state), then the table views; rows sorted by σ descending
  (then set, then computation order). Returns the sorted state."""
  key = {name: k for k, name in enumerate(SETS)}
  order = lambda row: (-row["sigma"], key[row["set"]])  # noqa: E731
  state = {"finished": state["finished"], "mse": sorted(state["mse"], key=order),
           "patch_mse": sorted(state["patch_mse"], key=order)}
  with atomic_write(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(state, f, indent=1)
  _write_table(os.path.join(outdir, "mse"), state["mse"], MSE_COLUMNS)
  if state["patch_mse"]:
    _write_table(os.path.join(outdir, "patch_mse"), state["patch_mse"], PATCH_COLUMNS)
  return state


def mse_lookup(rows: Sequence[Mapping], set_name: str, a: str, b: str) -> dict[float, float]:
  """{σ: mse} of the pair (a, b) (either order) on `set_name`, from table rows."""
  return {row["sigma"]: row["mse"] for row in rows if row["set"] == set_name
          and {row["denoiser_a"], row["denoiser_b"]} == {a, b}}


# ----------------------------------------------------------------------------------------------------
# Sample comparisons from shared latents: descriptors, similarity, memorisation.

class Descriptor(NamedTuple):
  """An image descriptor: `embed(samples, data) -> (B, D)` and how two embeddings compare.

  Attributes:
    embed: maps (B, H, W, C) float32 samples in [-1, 1] and the (N, H, W, C) training set (uint8 or
      float) to (B, D) array-likes.
    similarity: "cosine" (cosine similarity of the two embeddings, in [-1, 1]) or "equal" (1 when the
      embeddings are identical, else 0).
  """
  embed: Callable[[np.ndarray, np.ndarray], np.ndarray]
  similarity: str = "cosine"


_DESCRIPTORS: dict[str, Descriptor] = {}


def register_descriptor(name: str, embed: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        similarity: str = "cosine") -> None:
  """Adds (or replaces) a descriptor for `similarity_matrix` / bin/compare_samples --descriptors.

  The hook for learned copy-detection embeddings such as SSCD (Pizzi et al. 2022; the paper's choice,
  whose weights are not shipped here):

    def sscd(samples, data):          # samples (B, H, W, C) float32 in [-1, 1]
      x = preprocess(samples)         # e.g. resize to 288, ImageNet normalisation, NCHW
      return np.asarray(model(x))     # (B, 512) embeddings
    register_descriptor("sscd", sscd) # cosine similarity, as in the paper

  Args:
    name: descriptor name.
    embed: `embed(samples, data) -> (B, D)`; `data` is the training set, for descriptors that need it.
    similarity: "cosine" or "equal" (see `Descriptor`).
  """
  if similarity not in ("cosine", "equal"):
    raise ValueError(f"unknown similarity {similarity!r}; use 'cosine' or 'equal'")
  _DESCRIPTORS[name] = Descriptor(embed, similarity)


def available_descriptors() -> tuple[str, ...]:
  return tuple(sorted(_DESCRIPTORS))


def _pixel_embedding(samples, data):
  del data
  return np.asarray(samples, np.float64).reshape(len(samples), -1)


def _nearest_training_embedding(samples, data):
  _, idx = nearest_neighbours(jnp.asarray(samples, jnp.float32), jnp.asarray(data), k=1)
  return np.asarray(idx)


register_descriptor("pixel", _pixel_embedding, "cosine")
register_descriptor("nearest_training", _nearest_training_embedding, "equal")


def pairwise_similarity(first: np.ndarray, second: np.ndarray, similarity: str) -> np.ndarray:
  """Per-row similarity of two (B, D) embeddings: cosine, or 1.0/0.0 for equal/unequal rows."""
  first = np.asarray(first, np.float64).reshape(len(first), -1)
  second = np.asarray(second, np.float64).reshape(len(second), -1)
  if similarity == "equal":
    return np.all(first == second, axis=1).astype(np.float64)
  norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
  return np.sum(first * second, axis=1) / np.maximum(norms, 1e-30)


def similarity_matrix(samples: Mapping[str, np.ndarray], data, descriptor: str | Descriptor
                      ) -> tuple[list[str], np.ndarray]:
  """Mean similarity between denoisers' samples drawn from the same latents.

  Entry (a, b) averages, over the seeds, the similarity of a's and b's samples of the same seed under
  the descriptor (each denoiser's samples are embedded once). The diagonal is 1 for the built-ins.

  Args:
    samples: {denoiser: (B, H, W, C) samples}, all of the same seeds in the same order.
    data: (N, H, W, C) training set (for descriptors that use it).
    descriptor: a registered name or a `Descriptor`.

  Returns:
    (names, (K, K) float64 symmetric matrix).
  """
  if isinstance(descriptor, str):
    if descriptor not in _DESCRIPTORS:
      raise ValueError(f"unknown descriptor {descriptor!r}; choose one of "
                       f"{', '.join(available_descriptors())}")
    descriptor = _DESCRIPTORS[descriptor]
  names = list(samples)
  embeddings = {name: np.asarray(descriptor.embed(np.asarray(samples[name], np.float32), data))
                for name in names}
  matrix = np.ones((len(names), len(names)))
  for i, a in enumerate(names):
    for j, b in enumerate(names):
      matrix[i, j] = float(np.mean(pairwise_similarity(embeddings[a], embeddings[b],
                                                       descriptor.similarity)))
  return names, matrix


def memorisation_stats(samples: np.ndarray, data, threshold: float = MEMORISATION_RATIO) -> dict:
  """Distances of samples to their nearest training images (the memorisation view of a sampler).

  For each sample, d1 and d2 are the Euclidean distances (model units) to its nearest and second
  nearest training images and ratio = d1 / d2 (0 when d1 = 0, even if d2 = 0 too). A sample counts as
  memorised when ratio < `threshold`, by default 1/3: the criterion of Yoon et al. (2023, "Diffusion
  probabilistic models generalize when they fail to memorize") and Gu et al. (2023, "On memorization in
  diffusion models"): the sample is much closer to one training image than to any other. With
  horizontal flips in the training set, a near-symmetric image and its mirror are two close training
  images, which lowers the ratio's power to detect copies of them.

  Args:
    samples: (B, H, W, C) float32 in [-1, 1].
    data: (N, H, W, C) training set, N ≥ 2.
    threshold: the memorisation ratio threshold.

  Returns:
    dict of per-sample arrays "nn_distance", "nn_ratio", "nn_index" and summary floats
    "mean_nn_distance", "median_nn_distance", "min_nn_distance", "median_nn_ratio",
    "fraction_memorised", "count".
  """
  dists, idx = nearest_neighbours(jnp.asarray(samples, jnp.float32), jnp.asarray(data), k=2)
  dists = np.asarray(dists, np.float64)
  d1, d2 = dists[:, 0], dists[:, 1]
  ratio = np.where(d1 == 0, 0.0, d1 / np.maximum(d2, 1e-30))
  return {"nn_distance": d1, "nn_ratio": ratio, "nn_index": np.asarray(idx)[:, 0],
          "mean_nn_distance": float(d1.mean()), "median_nn_distance": float(np.median(d1)),
          "min_nn_distance": float(d1.min()), "median_nn_ratio": float(np.median(ratio)),
          "fraction_memorised": float(np.mean(ratio < threshold)), "count": int(len(d1))}


def sample_with_trajectory(denoise: Denoiser, seeds: Sequence[int], image_shape, sigmas, *,
                           solver: str = "heun", batch_size: int = 16
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Samples one image per seed and records its trajectory (batched, last batch padded).

  Returns:
    (samples (B, H, W, C), z (N+1, B, H, W, C), denoised (N, B, H, W, C)) NumPy float32, as
    `pspc_jax.sample(..., return_trajectory=True)`.
  """
  grid = jnp.asarray(sigmas, jnp.float32)

  def run(den, seeds):
    out, path = sample(den, latents_from_seeds(seeds, tuple(image_shape)), grid, solver=solver,
                       return_trajectory=True)
    return out, jnp.swapaxes(path.z, 0, 1), jnp.swapaxes(path.denoised, 0, 1)

  run = jax.jit(run)
  seeds = np.asarray([int(s) for s in seeds])
  denoise = as_argument(denoise)
  samples, z, denoised = map_batched(lambda batch: run(denoise, batch), [seeds], batch_size)
  return samples, np.swapaxes(z, 0, 1), np.swapaxes(denoised, 0, 1)


def compare_run(images: np.ndarray, *, denoisers: Sequence[str], seeds: Sequence[int], outdir: str,
                make: Callable[[str], Denoiser] | None = None,
                options: Mapping[str, Mapping] | None = None, steps: int = 18,
                solver: str = "heun", batch_size: int = 16,
                descriptors: Sequence[str] = ("pixel", "nearest_training"), figure_seeds: int = 2,
                columns: int = 6, dataset_name: str = "", mesh=None,
                log: Callable[[str], None] = print) -> dict:
  """Samples every denoiser from the same latents and compares the samples (paper Fig. 8 and §5).

  Writes to `outdir`: samples_<denoiser>.npz (seeds, samples, trajectory z and denoised; a finished
  denoiser is skipped on a rerun of the same configuration), samples.png (one row per denoiser, one
  column per seed), trajectory_<seed>.png for the first `figure_seeds` seeds (z and D(z) at `columns`
  steps and the final sample, two rows per denoiser), similarity.json / similarity.csv and
  similarity_<descriptor>.png (one matrix per descriptor), memorisation.json / memorisation.csv.
  `make`, `options` and `mesh` as in `evaluate_run`.

  Returns:
    {"similarity": {descriptor: {"names": [...], "matrix": [[...]]}}, "memorisation": {denoiser:
     summary}, "seconds": float}.
  """
  from pspc_jax import plots

  denoisers = list(dict.fromkeys(denoisers))
  seeds = [int(s) for s in seeds]
  if not denoisers or not seeds:
    raise ValueError("need at least one denoiser and one seed")
  for name in descriptors:
    if name not in _DESCRIPTORS:
      raise ValueError(f"unknown descriptor {name!r}; choose one of {', '.join(available_descriptors())}")
  options = dict(options or {})
  config = {"denoisers": denoisers,
            "options": {n: {k: str(v) for k, v in o.items()} for n, o in options.items()
                        if n in denoisers},
            "seeds": seeds, "steps": steps, "solver": solver, "dataset": dataset_name,
            "num_train_images": int(images.shape[0]), "image_shape": list(images.shape[1:])}
  prepare_run_dir(outdir, config, "config.json")
  start = time.perf_counter()
  data = jnp.asarray(images)
  make = make or registry_maker(data, options, mesh)
  grid = np.asarray(edm_sigmas(steps))
  results = {}
  for k, name in enumerate(denoisers, 1):
    path = os.path.join(outdir, f"samples_{name}.npz")
    if os.path.exists(path):
      with np.load(path) as saved:
        results[name] = (saved["samples"], saved["trajectory_z"], saved["trajectory_denoised"])
      log(f"[{k}/{len(denoisers)}] {name}: loaded {path}")
      continue
    t = time.perf_counter()
    results[name] = sample_with_trajectory(make(name), seeds, images.shape[1:], grid, solver=solver,
                                           batch_size=min(batch_size, len(seeds)))
    save_npz(path, seeds=np.asarray(seeds), samples=results[name][0], trajectory_z=results[name][1],
             trajectory_denoised=results[name][2], sigmas=grid)
    elapsed = time.perf_counter() - start
    log(f"[{k}/{len(denoisers)}] sampled {name}: {len(seeds)} seeds in {time.perf_counter() - t:.1f}s;"
        f" elapsed {elapsed:.1f}s, eta {elapsed / k * (len(denoisers) - k):.1f}s")

  samples = {name: results[name][0] for name in denoisers}
  plots.save_rows_figure(os.path.join(outdir, "samples.png"),
                         {name: s[:16] for name, s in samples.items()},
                         title=f"samples from shared latents (seeds {seeds[0]}…)")
  # Trajectory figures (Fig. 8): `columns` steps evenly spaced over the N steps, then the sample.
  num_steps = len(grid) - 1
  picked = np.unique(np.round(np.linspace(0, num_steps - 1, min(columns, num_steps))).astype(int))
  titles = [f"σ={grid[i]:.3g}" for i in picked] + ["sample"]
  for b in range(min(figure_seeds, len(seeds))):
    rows = {}
    for name in denoisers:
      _, path_z, path_d = results[name]
      rows[f"{name}: z"] = np.concatenate([path_z[picked, b], path_z[-1:, b]])
      rows[f"{name}: D(z)"] = np.concatenate([path_d[picked, b], path_z[-1:, b]])
    plots.save_trajectory_figure(os.path.join(outdir, f"trajectory_{seeds[b]}.png"), rows, titles,
                                 title=f"seed {seeds[b]}: z and D(z) along the {solver} sampler")

  similarity = {}
  for name in descriptors:
    names, matrix = similarity_matrix(samples, data, name)
    similarity[name] = {"names": names, "matrix": matrix.tolist()}
    plots.save_similarity_matrix(os.path.join(outdir, f"similarity_{name}.png"), names, matrix,
                                 title=f"{name} similarity of samples from shared latents")
  with atomic_write(os.path.join(outdir, "similarity.json"), "w") as f:
    json.dump(similarity, f, indent=1)
  _write_table(os.path.join(outdir, "similarity"),
               [{"descriptor": d, "denoiser_a": a, "denoiser_b": b,
                 "similarity": similarity[d]["matrix"][i][j], "count": len(seeds)}
                for d in similarity for i, a in enumerate(similarity[d]["names"])
                for j, b in enumerate(similarity[d]["names"]) if j > i],
               ("descriptor", "denoiser_a", "denoiser_b", "similarity", "count"))

  memorisation = {}
  for name in denoisers:
    stats = memorisation_stats(samples[name], data)
    memorisation[name] = {k: v for k, v in stats.items() if not isinstance(v, np.ndarray)}
  _write_table(os.path.join(outdir, "memorisation"),
               [{"denoiser": name, **summary} for name, summary in memorisation.items()],
               ("denoiser", "mean_nn_distance", "median_nn_distance", "min_nn_distance",
                "median_nn_ratio", "fraction_memorised", "count"))
  return {"similarity": similarity, "memorisation": memorisation,
          "seconds": time.perf_counter() - start}


def format_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  """A Markdown table of `rows` (floats to 4 significant digits), for logs and READMEs."""
  def cell(value):
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
  lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def format_pivot(rows: Sequence[Mapping], set_name: str,
                 pairs: Sequence[tuple[str, str]] | None = None) -> str:
  """A Markdown table of one set's MSE: one row per σ (descending), one column per denoiser pair.

  Args:
    rows: MSE table rows (`evaluate_run`).
    set_name: "forward" or "reverse".
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
