"""The job behind `bin/sample`: one PF-ODE sample per seed, resumable, with the nearest training images.

It writes into an output folder: config.json, samples.npz (seeds, samples in [-1, 1], uint8 images,
nearest-neighbour indices and distances), samples.png (grid), nearest.png (each sample above its
nearest training image, with the distance), and on request the samples in the official release's
layout (`pspc_jax.release_files.save_release_samples`). `samples.npz` is rewritten after every
finished batch, so an interrupted run loses at most one batch; rerunning the same command resumes with
the seeds that are missing.

Latents are drawn from the seeds (`latents_from_seeds`), or given (e.g. the release's z_init,
`pspc_jax.release_files.load_release_latents`): then the "seeds" are row indices into them.

In a multi-host run (`--multihost`) every process samples every batch (the sharded denoiser's
collectives need them all); only process 0 reads and writes the folder, reports progress and searches
the nearest neighbours, and it tells the others which seeds an earlier run already sampled.

Also here, shared with `pspc_jax.jobs.attribute`: the seed batches, the sampler's per-step postfix on a
progress bar, reading a sample run back (`read_sample_run`) and the denoiser options of config.json.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import multihost, plots
from pspc_jax.batching import padded_batches
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.edm import edm_sigmas
from pspc_jax.files import prepare_run_dir, save_npz
from pspc_jax.conventions import to_model_range, to_uint8
from pspc_jax.neighbours import nearest_neighbours
from pspc_jax.progress import SILENT, Progress, compile_jitted
from pspc_jax.release_files import check_samples_path, save_release_samples
from pspc_jax.sampling import SOLVERS, latents_from_seeds, sample

_SAMPLES_FILE = "samples.npz"


def config_options(options: dict) -> dict[str, str]:
  """Denoiser options as config.json stores them (strings); `options_from_config` reads them back."""
  return {k: str(v) for k, v in options.items()}


def options_from_config(stored: dict[str, str]) -> dict:
  """The denoiser options of `config_options` strings: "None" → None, rank → int, others as text
  (the builders parse their text options)."""
  return {k: (None if v == "None" else int(v) if k == "rank" else v) for k, v in stored.items()}


def _load_samples(npz_path: str) -> dict[int, np.ndarray]:
  """{seed: (H, W, C) sample} of a samples.npz written by `sample_run`."""
  with np.load(npz_path) as saved:
    return dict(zip(saved["seeds"].tolist(), saved["samples"]))


def seed_batches(seeds: list[int], batch_size: int, image_shape,
                 latents: np.ndarray | None = None) -> Iterator[tuple[list[int], jax.Array]]:
  """Yields (batch, latents) for `seeds` in batches of `batch_size`.

  Latents (batch_size, H, W, C) are `latents_from_seeds` of the batch padded with its last seed to
  `batch_size` rows, so that every batch has one compiled shape; callers keep the first len(batch)
  rows of the outputs. With given `latents` (N, H, W, C), the seeds are row indices into them and the
  batch's latents are those rows.
  """
  for start, size, padded in padded_batches(np.asarray(seeds), batch_size):
    batch = (latents_from_seeds(jnp.asarray(padded), image_shape) if latents is None
             else jnp.asarray(latents[padded], jnp.float32))
    yield seeds[start:start + size], batch


class StepPostfix:
  """Host callbacks of a compiled loop that show its latest step on a tqdm bar's postfix.

  Compile the loop with these methods as its `progress` callbacks, then set `bar` once the bar is
  open (steps before that are not shown). The postfix is redrawn at most every `interval` seconds,
  and the bar's final line shows the last step.
  """

  def __init__(self, interval: float = 0.5):
    self.bar = None
    self.interval = interval
    self._drawn = -math.inf

  def show(self, text: str) -> None:
    if self.bar is None:
      return
    self.bar.set_postfix_str(text, refresh=False)
    now = time.monotonic()
    if now - self._drawn >= self.interval:
      self._drawn = now
      self.bar.refresh()

  def sampler_step(self, step: int, num_steps: int, sigma: float) -> None:
    """`sampling.sample`'s progress(step index, number of steps, σ of the step)."""
    self.show(f"step {step + 1}/{num_steps} σ={sigma:.4g}")


def _check_sampling(images: np.ndarray, steps: int, solver: str, batch_size: int) -> None:
  if batch_size < 1 or steps < 1:
    raise ValueError("--batch and --steps must be at least 1")
  if images.shape[0] < 2:
    raise ValueError(f"sampling needs at least 2 training images (the memorisation summary compares "
                     f"each sample's nearest and second-nearest), got {images.shape[0]}")
  if solver not in SOLVERS:
    raise ValueError(f"unknown --solver={solver!r}; choose one of {', '.join(SOLVERS)}")


def _latents_record(latents: np.ndarray, seeds: list[int], image_shape) -> dict:
  """config.json's record of given latents: how many the file holds and the SHA-256 of the rows used
  (float32, in seed order).

  Raises:
    ValueError: latents of another image shape, or a seed that is not a row of them.
  """
  if latents.ndim != 4 or latents.shape[1:] != tuple(image_shape):
    raise ValueError(f"--latents holds images of shape {latents.shape[1:]}, the training set's are "
                     f"{tuple(image_shape)}")
  if max(seeds) >= len(latents):
    raise ValueError(f"with --latents, --seeds/--num_samples pick rows of the {len(latents)} latents; "
                     f"row {max(seeds)} does not exist")
  used = np.ascontiguousarray(latents[np.asarray(seeds)], np.float32)
  return {"rows": len(latents), "sha256": hashlib.sha256(used.tobytes()).hexdigest()}


def sample_run(images: np.ndarray, *, denoiser: str, options: dict, seeds: list[int], steps: int,
               solver: str, outdir: str, batch_size: int, dataset_name: str = "",
               latents: np.ndarray | None = None, export_release: str | None = None,
               mesh=None, progress: Progress = SILENT) -> dict | None:
  """Samples one image per seed with the PF-ODE and `denoiser`, saving as it goes.

  Args:
    images: (N, H, W, C) uint8 training set, N ≥ 2.
    denoiser: registry name; `options` are passed to its builder.
    seeds: one image per seed; image k depends only on its seed (with `latents`: on row seeds[k]).
    steps: EDM grid steps (σ 80 → 0.002, then 0).
    solver: "heun" or "euler".
    outdir: output folder (created; resumed when it holds the same configuration).
    batch_size: images per compiled batch.
    dataset_name: recorded in config.json.
    latents: given (N, H, W, C) float32 latents in N(0, I) units instead of `latents_from_seeds`
      (the sampler multiplies them by σ_max = 80); the seeds are then row indices into them. The
      official release's z_init (already × σ_max): `release_files.load_release_latents`. Recorded in
      config.json by the SHA-256 of the rows used.
    export_release: also write the samples (in seed order) to this .npy in the official release's
      layout (N, C, H, W) (`release_files.save_release_samples`; process 0 only).
    mesh: a device mesh (`pspc_jax.distributed.make_mesh`) to shard the dataset over, for the
      denoisers that support it (empirical, pspc_square, pspc_flex); None: one device. The samples
      do not depend on it beyond float32 rounding, so it is not part of the resumable configuration.
    progress: where the compilation, the batches (with the sampler's step on one device) and a
      resumption are reported.

  Returns:
    On process 0: a summary dict (number of samples, mean/min nearest-neighbour distance, mean
    nearest/second-nearest ratio, seconds, outdir, export_release). On the other processes of a
    multi-host run, which write nothing: None.

  Raises:
    ValueError: bad arguments or options (before anything is written), or `outdir` holds a run of
      another configuration.
  """
  start = time.perf_counter()
  _check_sampling(images, steps, solver, batch_size)
  if export_release is not None:
    export_release = check_samples_path(export_release)
  config = {"denoiser": denoiser, "options": config_options(options),
            "seeds": seeds, "steps": steps, "solver": solver, "dataset": dataset_name,
            "num_train_images": int(images.shape[0]), "image_shape": list(images.shape[1:])}
  if latents is not None:
    config["latents"] = _latents_record(np.asarray(latents), seeds, images.shape[1:])
  data = jnp.asarray(images)
  # Built before anything is written, so that bad options (schedules, maps, checkpoint) leave no
  # output folder behind. With a mesh, the host array is handed over so that each device receives
  # only its shard.
  denoise = build_denoiser(denoiser, images if mesh is not None else data, mesh=mesh, **options)
  done = _resume(outdir, config, seeds, progress)
  npz_path = os.path.join(outdir, _SAMPLES_FILE)

  def save_so_far(batch, samples):
    done.update(zip(batch, samples))
    ordered = [s for s in seeds if s in done]
    save_npz(npz_path, seeds=np.asarray(ordered), samples=np.stack([done[s] for s in ordered]))

  main = multihost.is_main_process()
  _sample_batches(denoise, edm_sigmas(steps), solver, [s for s in seeds if s not in done],
                  batch_size, images.shape[1:], save_so_far if main else None, progress,
                  per_step=mesh is None, latents=latents)
  if not main:
    return None
  samples = np.stack([done[s] for s in seeds]).astype(np.float32)
  summary = _save_samples_and_neighbours(outdir, images, data, seeds, samples)
  if export_release is not None:
    save_release_samples(export_release, samples)
  return dict(summary, seconds=time.perf_counter() - start, outdir=outdir,
              export_release=export_release)


def _resume(outdir: str, config: dict, seeds: list[int], progress: Progress) -> dict:
  """{seed: sample} of what an earlier run of `config` left in `outdir`, after `prepare_run_dir`.

  Only process 0 looks at the folder. In a multi-host run it tells the others which seeds are done
  (there they map to None) or that it refused the folder, so that every process samples the same
  batches, or all of them stop.

  Raises:
    ValueError: `outdir` holds a run of another configuration (on the other processes: process 0
      refused the folder).
  """
  done, refusal = {}, None
  if multihost.is_main_process():
    try:
      if prepare_run_dir(outdir, config, _SAMPLES_FILE):
        done = _load_samples(os.path.join(outdir, _SAMPLES_FILE))
        progress.note(f"resuming: {len(done)}/{len(seeds)} samples already in "
                      f"{os.path.join(outdir, _SAMPLES_FILE)}")
    except (ValueError, OSError) as err:
      refusal = err
  # [folder accepted, seed 0 done, seed 1 done, …] as process 0 knows them.
  known = np.asarray([refusal is None] + [s in done for s in seeds], np.int32)
  shared = multihost.broadcast_from_main(known)
  if refusal is not None:
    raise refusal
  if not shared[0]:
    raise ValueError(f"process 0 refused --outdir={outdir} (see its error)")
  return done if multihost.is_main_process() else {
      s: None for s, was_done in zip(seeds, shared[1:]) if was_done}


def _sample_batches(denoise, sigmas: jax.Array, solver: str, seeds: list[int], batch_size: int,
                    image_shape, on_batch: Callable[[list[int], np.ndarray], None] | None,
                    progress: Progress, *, per_step: bool, latents: np.ndarray | None = None) -> None:
  """Samples `seeds` on the σ grid `sigmas` batch by batch, calling `on_batch(batch seeds,
  (len(batch), H, W, C) samples)` after each; with given `latents`, seeds are rows of them
  (`seed_batches`).

  The batch sampler (the denoiser an argument, not a constant) is compiled once as its own phase, then
  a bar counts the batches. With `per_step` the sampler reports each step on the bar's postfix (an
  ordered host callback, which XLA allows on one device only).
  """
  batches = seed_batches(seeds, batch_size, image_shape, latents)
  first = next(batches, None)
  if first is None:
    return
  postfix = StepPostfix()
  step_progress = postfix.sampler_step if per_step else None
  sampler = jax.jit(lambda den, lat: sample(den, lat, sigmas, solver=solver, progress=step_progress))
  run = compile_jitted(progress, "sampler", sampler, denoise, first[1])
  with progress.bar(total=-(-len(seeds) // batch_size), desc="sampling", unit="batch") as bar:
    postfix.bar = bar
    for batch, latents in itertools.chain([first], batches):
      # Every process waits for the batch: the denoiser's output is replicated on every device.
      samples = np.asarray(multihost.local_copy(run(denoise, latents)))[:len(batch)]
      if on_batch is not None:
        on_batch(batch, samples)
      bar.update()


def _save_samples_and_neighbours(outdir: str, images: np.ndarray, data: jax.Array, seeds: list[int],
                                 samples: np.ndarray) -> dict:
  """Writes samples.npz with the two nearest training images of every sample, samples.png and
  nearest.png; returns the nearest-neighbour summary.

  `data` is `images` on this process's default device: the search involves no other process, so
  process 0 may run it alone.
  """
  dists, idx = nearest_neighbours(jnp.asarray(samples), data, k=2)
  dists, idx = np.asarray(dists), np.asarray(idx)
  save_npz(os.path.join(outdir, _SAMPLES_FILE), seeds=np.asarray(seeds), samples=samples,
           images=to_uint8(samples), nn_indices=idx, nn_distances=dists)
  plots.save_grid(os.path.join(outdir, "samples.png"), samples,
                  upscale=max(1, 128 // images.shape[1]))
  neighbours = np.asarray(to_model_range(jnp.asarray(images[idx[:, 0]])))
  plots.save_nearest_neighbour_figure(os.path.join(outdir, "nearest.png"), samples[:64],
                                      neighbours[:64], dists[:64, 0],
                                      [f"seed {s}" for s in seeds[:64]])
  return {"num_samples": len(seeds), "mean_nn_distance": float(dists[:, 0].mean()),
          "min_nn_distance": float(dists[:, 0].min()),
          "mean_nn_ratio": float(np.mean(dists[:, 0] / np.maximum(dists[:, 1], 1e-12)))}


def read_sample_run(folder: str, images: np.ndarray) -> tuple[dict, tuple[str, dict[int, np.ndarray]]]:
  """The sampler settings and the samples of a `sample_run` output folder.

  Args:
    folder: a `sample_run` (bin/sample) output folder.
    images: the training set the caller will use; it must be the one the run sampled on.

  Returns:
    (sampler, previous): sampler = {"denoiser", "options", "seeds", "steps", "solver"} as keyword
    arguments of `sample_run` / `attribute.attribute_run`; previous = (path of samples.npz,
    {seed: sample} of the samples saved there).

  Raises:
    ValueError: the run was sampled on a training set of another size or image shape, or from given
      latents (which the seeds alone do not re-create).
    OSError: the folder lacks config.json or samples.npz.
  """
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  if "latents" in config:
    raise ValueError(f"{folder} was sampled from given latents (bin/sample --latents); its seeds do not "
                     "re-create them")
  if [config["num_train_images"]] + config["image_shape"] != list(images.shape):
    raise ValueError(f"{folder} was sampled on {config['num_train_images']} images of "
                     f"{config['image_shape']}; pass the same --dataset/--max_images/--flip")
  npz_path = os.path.join(folder, _SAMPLES_FILE)
  stored = _load_samples(npz_path)
  sampler = {"denoiser": config["denoiser"], "options": options_from_config(config.get("options", {})),
             "seeds": config["seeds"], "steps": config["steps"], "solver": config["solver"]}
  return sampler, (npz_path, stored)
