"""The jobs behind `bin/sample`, `bin/denoise` and `bin/attribute`: batching, progress, resumable
outputs, figures.

Each job writes into an output folder:
  sample:    config.json, samples.npz (seeds, samples in [-1, 1], uint8 images, nearest-neighbour
             indices and distances), samples.png (grid), nearest.png (each sample above its nearest
             training image, with the distance).
  denoise:   config.json, denoised.npz (indices, clean x, z, one output per denoiser), denoised.png.
  attribute: attribution.npz (seeds, samples, per-pixel top-k indices/weights, per-image totals,
             counts), attribution.json (per sample: images for 50 %/90 % of the weight, top-5 images
             and shares), attribution.png (sample, dominant-image map, the top training images).
`samples.npz` is rewritten after every finished batch, so an interrupted run loses at most one batch;
rerunning the same command resumes with the seeds that are missing.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import attribution, plots, schedules
from pspc_jax.batching import padded_batches
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.values import apply_denoiser
from pspc_jax.edm import edm_sigmas
from pspc_jax.files import prepare_run_dir, save_json, save_npz
from pspc_jax.images import to_model_range, to_uint8
from pspc_jax.neighbours import nearest_neighbours
from pspc_jax.sampling import SOLVERS, latents_from_seeds, sample


def _load_samples(npz_path: str) -> dict[int, np.ndarray]:
  """{seed: sample} of a samples.npz written by `sample_run`."""
  with np.load(npz_path) as saved:
    return dict(zip(saved["seeds"].tolist(), saved["samples"]))


class _BatchClock:
  """The batch in progress and the time since the start, for 'batch b/n … elapsed Ts' lines."""

  def __init__(self):
    self.start = time.perf_counter()
    self.batch, self.num_batches = 0, 0

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def report(self, text: str) -> None:
    print(f"batch {self.batch}/{self.num_batches} {text} elapsed {self.elapsed():.1f}s", flush=True)

  def sampler_progress(self, label: str):
    """A `progress(step, num_steps, sigma)` for `sampling.sample`: 'batch b/n <label> s/S sigma=…'."""
    def progress(step, num_steps, sigma):
      self.report(f"{label} {step + 1}/{num_steps} sigma={sigma:.4g}")
    return progress


def _seed_batches(seeds: list[int], batch_size: int, image_shape, clock: _BatchClock):
  """Yields (batch, latents) for `seeds` in batches of `batch_size`, keeping `clock` on the batch.

  Latents are `latents_from_seeds` of the batch padded with its last seed to `batch_size` rows, so that
  every batch has one compiled shape; callers keep the first len(batch) rows of the outputs.
  """
  clock.num_batches = -(-len(seeds) // batch_size)
  for number, (start, size, padded) in enumerate(padded_batches(np.asarray(seeds), batch_size), 1):
    clock.batch = number
    yield seeds[start:start + size], latents_from_seeds(jnp.asarray(padded), image_shape)


def sample_run(images: np.ndarray, *, denoiser: str, options: dict, seeds: list[int], steps: int,
               solver: str, outdir: str, batch_size: int, dataset_name: str = "",
               mesh=None) -> dict:
  """Samples one image per seed with the PF-ODE and `denoiser`, saving as it goes.

  Args:
    images: (N, H, W, C) uint8 training set.
    denoiser: registry name; `options` are passed to its builder.
    seeds: one image per seed; image k depends only on its seed.
    steps: EDM grid steps (σ 80 → 0.002, then 0).
    solver: "heun" or "euler".
    outdir: output folder (created; resumed when it holds the same configuration).
    batch_size: images per compiled batch.
    dataset_name: recorded in config.json.
    mesh: a device mesh (`pspc_jax.distributed.make_mesh`) to shard the dataset over, for the
      denoisers that support it (empirical, pspc_square, pspc_flex); None: one device. The samples
      do not depend on it beyond float32 rounding, so it is not part of the resumable configuration.

  Returns:
    Summary dict: number of samples, mean/min nearest-neighbour distance, seconds, output paths.
  """
  if batch_size < 1 or steps < 1:
    raise ValueError("--batch and --steps must be at least 1")
  if images.shape[0] < 2:
    raise ValueError(f"sampling needs at least 2 training images (the memorisation summary compares "
                     f"each sample's nearest and second-nearest), got {images.shape[0]}")
  if solver not in SOLVERS:
    raise ValueError(f"unknown --solver={solver!r}; choose one of {', '.join(SOLVERS)}")
  config = {"denoiser": denoiser, "options": config_options(options),
            "seeds": seeds, "steps": steps, "solver": solver, "dataset": dataset_name,
            "num_train_images": int(images.shape[0]), "image_shape": list(images.shape[1:])}
  data = jnp.asarray(images)
  # Built before anything is written, so that bad options (schedules, maps, checkpoint) leave no
  # output folder behind. With a mesh, the host array is handed over so that each device receives
  # only its shard.
  denoise = build_denoiser(denoiser, images if mesh is not None else data, mesh=mesh, **options)
  npz_path = os.path.join(outdir, "samples.npz")
  done = {}
  if prepare_run_dir(outdir, config, "samples.npz"):
    done = _load_samples(npz_path)
    print(f"resuming: {len(done)}/{len(seeds)} samples already in {npz_path}", flush=True)

  sigmas = edm_sigmas(steps)
  clock = _BatchClock()
  # Per-step progress uses an ordered host callback, which XLA allows on one device only; with a mesh
  # progress is reported per batch.
  step_progress = clock.sampler_progress("step") if mesh is None else None
  # The denoiser (and so the training set) is an argument of the compiled sampler, not a constant.
  run_batch = jax.jit(lambda den, lat: sample(den, lat, sigmas, solver=solver, progress=step_progress))
  todo = [s for s in seeds if s not in done]
  for batch, latents in _seed_batches(todo, batch_size, images.shape[1:], clock):
    out = np.asarray(run_batch(denoise, latents))[:len(batch)]
    done.update(zip(batch, out))
    ordered = [s for s in seeds if s in done]
    save_npz(npz_path, seeds=np.asarray(ordered), samples=np.stack([done[s] for s in ordered]))
    if step_progress is None:
      clock.report(f"{steps} steps done")

  samples = np.stack([done[s] for s in seeds]).astype(np.float32)
  dists, idx = nearest_neighbours(jnp.asarray(samples), data, k=2)
  dists, idx = np.asarray(dists), np.asarray(idx)
  save_npz(npz_path, seeds=np.asarray(seeds), samples=samples, images=to_uint8(samples),
            nn_indices=idx, nn_distances=dists)
  plots.save_grid(os.path.join(outdir, "samples.png"), samples,
                  upscale=max(1, 128 // images.shape[1]))
  neighbours = np.asarray(to_model_range(jnp.asarray(images[idx[:, 0]])))
  plots.save_nearest_neighbour_figure(os.path.join(outdir, "nearest.png"), samples[:64],
                                      neighbours[:64], dists[:64, 0],
                                      [f"seed {s}" for s in seeds[:64]])
  return {"num_samples": len(seeds), "mean_nn_distance": float(dists[:, 0].mean()),
          "min_nn_distance": float(dists[:, 0].min()),
          "mean_nn_ratio": float(np.mean(dists[:, 0] / np.maximum(dists[:, 1], 1e-12))),
          "seconds": clock.elapsed(), "outdir": outdir}


def denoise_run(images: np.ndarray, *, denoisers: dict[str, dict], sigma: float, indices: list[int],
                noise_seed: int, outdir: str, dataset_name: str = "") -> dict:
  """Denoises forward-process z = x + σ ε of chosen training images with several denoisers.

  Args:
    images: (N, H, W, C) uint8 training set.
    denoisers: {registry name: builder options}.
    sigma: the noise level (EDM σ > 0).
    indices: training images to noise; ε for image k comes from seed `noise_seed + k`.
    outdir: output folder.
    dataset_name: recorded in config.json.

  Returns:
    {denoiser: mean squared error to the clean images} (per pixel, model units).
  """
  if not math.isfinite(sigma) or sigma <= 0:
    raise ValueError(f"--sigma must be positive and finite, got {sigma}")
  if not indices or max(indices) >= images.shape[0]:
    raise ValueError(f"image indices must lie in [0, {images.shape[0]}), got {indices[:5]}...")
  config = {"denoisers": {k: config_options(opts) for k, opts in denoisers.items()},
            "sigma": sigma, "indices": indices, "noise_seed": noise_seed, "dataset": dataset_name}
  data = jnp.asarray(images)
  built = {name: build_denoiser(name, data, **options) for name, options in denoisers.items()}
  prepare_run_dir(outdir, config, "never-resumed")
  x = to_model_range(data[jnp.asarray(indices)])
  z = x + sigma * latents_from_seeds(jnp.asarray(indices) + noise_seed, images.shape[1:])
  rows = {"clean x": np.asarray(x), f"z (σ={sigma:g})": np.asarray(z)}
  errors = {}
  for name, denoise in built.items():
    t = time.perf_counter()
    out = np.asarray(apply_denoiser(denoise, z, sigma))
    print(f"{name}: {time.perf_counter() - t:.2f}s", flush=True)
    rows[name] = out
    errors[name] = float(np.mean((out - np.asarray(x)) ** 2))
  save_npz(os.path.join(outdir, "denoised.npz"), indices=np.asarray(indices),
            **{k.split(" ")[0]: v for k, v in rows.items()})
  plots.save_rows_figure(os.path.join(outdir, "denoised.png"), rows,
                         title=f"denoisers at σ = {sigma:g}; MSE to x: " +
                         ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
  return errors


def read_sample_run(folder: str, images: np.ndarray) -> tuple[dict, tuple[str, dict[int, np.ndarray]]]:
  """The sampler settings and the samples of a `sample_run` output folder.

  Args:
    folder: a `sample_run` (bin/sample) output folder.
    images: the training set the caller will use; it must be the one the run sampled on.

  Returns:
    (sampler, previous): sampler = {"denoiser", "options", "seeds", "steps", "solver"} as keyword
    arguments of `sample_run` / `attribute_run`; previous = (path of samples.npz, {seed: sample} of
    the samples saved there).

  Raises:
    ValueError: the run was sampled on a training set of another size or image shape.
    OSError: the folder lacks config.json or samples.npz.
  """
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  if [config["num_train_images"]] + config["image_shape"] != list(images.shape):
    raise ValueError(f"{folder} was sampled on {config['num_train_images']} images of "
                     f"{config['image_shape']}; pass the same --dataset/--max_images/--flip")
  npz_path = os.path.join(folder, "samples.npz")
  stored = _load_samples(npz_path)
  sampler = {"denoiser": config["denoiser"], "options": options_from_config(config.get("options", {})),
             "seeds": config["seeds"], "steps": config["steps"], "solver": config["solver"]}
  return sampler, (npz_path, stored)


def config_options(options: dict) -> dict[str, str]:
  """Denoiser options as config.json stores them (strings); `options_from_config` reads them back."""
  return {k: str(v) for k, v in options.items()}


def options_from_config(stored: dict[str, str]) -> dict:
  """The denoiser options of `config_options` strings: "None" → None, rank → int, others as text
  (the builders parse their text options)."""
  return {k: (None if v == "None" else int(v) if k == "rank" else v) for k, v in stored.items()}


def attribute_run(images: np.ndarray, *, denoiser: str, options: dict, seeds: list[int], steps: int,
                  solver: str, outdir: str, batch_size: int, patch_schedule: str = "auto", k: int = 5,
                  show: int = 4, sigma_range: tuple[float, float] = (0.0, math.inf),
                  chunk_size: int | None = None, dataset_name: str = "",
                  previous: tuple[str, dict[int, np.ndarray]] | None = None) -> dict:
  """Samples one image per seed, recording its trajectory, and attributes it to training images.

  A sample's attribution is the mean over the steps with σ_t > 0 in `sigma_range` of the PSPC-Square
  composite weights a_i[p] (`attribution.attribute`). Writes attribution.npz, attribution.json and
  attribution.png into `outdir` (see the module docstring).

  Args:
    images: (N, H, W, C) uint8 training set.
    denoiser, options, seeds, steps, solver: the sampler, as in `sample_run`.
    outdir: output folder (created).
    batch_size: samples per compiled batch.
    patch_schedule: PSPC-Square patch sizes of the attribution (a `parse_patch_schedule` spec).
    k: training images kept per pixel.
    show: training images shown per sample in the figure (1-10).
    sigma_range: (lo, hi): only steps with lo ≤ σ ≤ hi count.
    chunk_size: dataset rows per streamed chunk of the attribution.
    dataset_name: recorded in attribution.json and the figure title.
    previous: optional (path, {seed: sample}) of samples drawn before with the same sampler (see
      `read_sample_run`); the largest difference to the re-created ones is printed.

  Returns:
    Summary dict: number of samples, median images holding 50 % / 90 % of the weight, seconds, outdir.
  """
  if k < 1:
    raise ValueError(f"--k must be at least 1, got {k}")
  if not 1 <= show <= 10 or batch_size < 1:
    raise ValueError("--show must be between 1 and 10 and --batch at least 1")
  schedule = schedules.parse_patch_schedule(patch_schedule, images.shape[1:3])
  if k > images.shape[0]:
    raise ValueError(f"--k={k} exceeds the {images.shape[0]} training images")
  data = jnp.asarray(images)
  denoise = build_denoiser(denoiser, data, **options)
  os.makedirs(outdir, exist_ok=True)
  sigmas = np.asarray(edm_sigmas(steps))
  clock = _BatchClock()
  reported = {}  # batch → the tenth of the dataset last reported

  def attribution_progress(stage, done, total):
    tenth = (10 * done) // total
    if reported.get(clock.batch) != tenth or done == total:
      reported[clock.batch] = tenth
      clock.report(f"attribution pass {stage}/2 {done}/{total} images")

  run_sampler = jax.jit(lambda den, lat: sample(den, lat, sigmas, solver=solver,
                                                return_trajectory=True,
                                                progress=clock.sampler_progress("sampling step")))
  run_attribution = jax.jit(lambda path, data: attribution.attribute(
      path, data, schedule, sigmas=sigmas, k=k, sigma_range=sigma_range, chunk_size=chunk_size,
      progress=attribution_progress))
  parts = []
  for batch, latents in _seed_batches(seeds, batch_size, images.shape[1:], clock):
    samples, path = run_sampler(denoise, latents)
    result = run_attribution(path, data)
    parts.append([np.asarray(a)[:len(batch)] for a in (samples,) + tuple(result)])
  samples, indices, weights, totals = (np.concatenate(p) for p in zip(*parts))
  if previous is not None:
    path, stored = previous
    gaps = [float(np.abs(samples[i] - stored[s]).max()) for i, s in enumerate(seeds) if s in stored]
    if gaps:
      print(f"re-created samples differ from {path} by at most {max(gaps):.2e}", flush=True)

  counts = attribution.contributor_counts(totals, (0.5, 0.9))
  used = sigmas[:-1][attribution.step_mask(sigmas[:-1], sigma_range)]
  save_npz(os.path.join(outdir, "attribution.npz"), seeds=np.asarray(seeds), samples=samples,
           images=to_uint8(samples), indices=indices, weights=weights, totals=totals,
           counts=counts, count_shares=np.asarray([0.5, 0.9]), sigmas=used)
  summary = attribution.summarise(totals, top=5)
  save_json(os.path.join(outdir, "attribution.json"),
            {"dataset": dataset_name, "num_train_images": int(images.shape[0]),
             "denoiser": denoiser, "patch_schedule": patch_schedule,
             "rule": "mean over the steps with sigma in range of the PSPC-Square composite weights",
             "sigmas": used.tolist(),
             "samples": [dict(seed=s, **entry) for s, entry in zip(seeds, summary)]})
  _save_attribution_figure(
      os.path.join(outdir, "attribution.png"), images, seeds, samples, indices, weights, totals,
      counts, show=min(show, images.shape[0]),
      title=f"{dataset_name}: {denoiser} samples, PSPC-Square attribution (σ in "
            f"[{used.min():.3g}, {used.max():.3g}])\nn/m img: images holding 50%/90% of the weight; "
            "#i p%: training image i, p% of the weight; grey: other images")
  return {"num_samples": len(seeds), "median_images_for_50%": float(np.median(counts[:, 0])),
          "median_images_for_90%": float(np.median(counts[:, 1])), "seconds": clock.elapsed(),
          "outdir": outdir}


def _save_attribution_figure(path: str, images: np.ndarray, seeds: list[int], samples: np.ndarray,
                             indices: np.ndarray, weights: np.ndarray, totals: np.ndarray,
                             counts: np.ndarray, *, show: int, title: str) -> None:
  """`plots.save_attribution_figure` of the first 16 samples, each with `show` training images."""
  rows = min(len(seeds), 16)

  # The images shown are those dominating the most pixels (by top-1 weight), not the largest totals:
  # steps at large σ spread their weight over the whole training set.
  def shown_images(b):
    picked = list(attribution.dominant_images(indices[b], weights[b], show))
    by_total = [i for i in np.argsort(-totals[b], kind="stable")[:2 * show] if i not in picked]
    return (picked + by_total)[:show]

  chosen = np.asarray([shown_images(b) for b in range(rows)])  # (rows, M)
  maps = [attribution.dominance_map(indices[b], weights[b], chosen[b]) for b in range(rows)]
  sources = np.asarray(to_model_range(jnp.asarray(images[chosen.reshape(-1)])))
  plots.save_attribution_figure(
      path, samples[:rows], np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps]),
      sources.reshape(chosen.shape + images.shape[1:]),
      [[f"#{i} {100 * totals[b, i]:.0f}%" for i in chosen[b]] for b in range(rows)],
      [f"seed {s}: {counts[b, 0]}/{counts[b, 1]} img" for b, s in enumerate(seeds[:rows])],
      title=title, others=indices[:rows, ..., 0])
