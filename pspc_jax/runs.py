"""The jobs behind `bin/sample` and `bin/denoise`: batching, progress, resumable outputs, figures.

Each job writes into an output folder:
  sample:  config.json, samples.npz (seeds, samples in [-1, 1], uint8 images, nearest-neighbour
           indices and distances), samples.png (grid), nearest.png (each sample above its nearest
           training image, with the distance).
  denoise: config.json, denoised.npz (indices, clean x, z, one output per denoiser), denoised.png.
`samples.npz` is rewritten after every finished batch, so an interrupted run loses at most one batch;
rerunning the same command resumes with the seeds that are missing.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import plots
from pspc_jax.denoisers.registry import make_denoiser
from pspc_jax.edm import edm_sigmas
from pspc_jax.files import save_npz
from pspc_jax.images import to_model_range, to_uint8
from pspc_jax.neighbours import nearest_neighbours
from pspc_jax.sampling import latents_from_seeds, sample


def _prepare_outdir(outdir: str, config: dict, resume_file: str) -> bool:
  """Creates `outdir`; returns True when it holds a resumable run of exactly this `config`."""
  os.makedirs(outdir, exist_ok=True)
  config_path = os.path.join(outdir, "config.json")
  if os.path.exists(config_path) and os.path.exists(os.path.join(outdir, resume_file)):
    with open(config_path) as f:
      if json.load(f) != config:
        raise ValueError(f"{outdir} holds a run with a different configuration; choose another "
                         "--outdir or delete it")
    return True
  with open(config_path, "w") as f:
    json.dump(config, f, indent=1)
  return False


def sample_run(images: np.ndarray, *, denoiser: str, options: dict, seeds: list[int], steps: int,
               solver: str, outdir: str, batch_size: int, dataset_name: str = "") -> dict:
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

  Returns:
    Summary dict: number of samples, mean/min nearest-neighbour distance, seconds, output paths.
  """
  if batch_size < 1 or steps < 1:
    raise ValueError("--batch and --steps must be at least 1")
  config = {"denoiser": denoiser, "options": {k: str(v) for k, v in options.items()},
            "seeds": seeds, "steps": steps, "solver": solver, "dataset": dataset_name,
            "num_train_images": int(images.shape[0]), "image_shape": list(images.shape[1:])}
  npz_path = os.path.join(outdir, "samples.npz")
  done = {}
  if _prepare_outdir(outdir, config, "samples.npz"):
    with np.load(npz_path) as saved:
      done = dict(zip(saved["seeds"].tolist(), saved["samples"]))
    print(f"resuming: {len(done)}/{len(seeds)} samples already in {npz_path}", flush=True)

  data = jnp.asarray(images)
  denoise = make_denoiser(denoiser, data, **options)
  sigmas = edm_sigmas(steps)
  todo = [s for s in seeds if s not in done]
  batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  start = time.perf_counter()
  current = {"batch": 0}

  def report(step, num_steps, sigma):
    print(f"batch {current['batch']}/{len(batches)} step {step + 1}/{num_steps} sigma={sigma:.4g} "
          f"elapsed {time.perf_counter() - start:.1f}s", flush=True)

  run_batch = jax.jit(lambda lat: sample(denoise, lat, sigmas, solver=solver, progress=report))
  for number, batch in enumerate(batches, 1):
    current["batch"] = number
    padded = batch + [batch[-1]] * (batch_size - len(batch))  # one compiled shape for every batch
    out = np.asarray(run_batch(latents_from_seeds(jnp.asarray(padded), images.shape[1:])))
    out = out[:len(batch)]
    done.update(zip(batch, out))
    ordered = [s for s in seeds if s in done]
    save_npz(npz_path, seeds=np.asarray(ordered), samples=np.stack([done[s] for s in ordered]))

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
          "seconds": time.perf_counter() - start, "outdir": outdir}


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
  if sigma <= 0:
    raise ValueError(f"--sigma must be positive, got {sigma}")
  if not indices or max(indices) >= images.shape[0]:
    raise ValueError(f"image indices must lie in [0, {images.shape[0]}), got {indices[:5]}...")
  config = {"denoisers": {k: {o: str(v) for o, v in opts.items()} for k, opts in denoisers.items()},
            "sigma": sigma, "indices": indices, "noise_seed": noise_seed, "dataset": dataset_name}
  _prepare_outdir(outdir, config, "never-resumed")
  data = jnp.asarray(images)
  x = to_model_range(data[jnp.asarray(indices)])
  z = x + sigma * latents_from_seeds(jnp.asarray(indices) + noise_seed, images.shape[1:])
  rows = {"clean x": np.asarray(x), f"z (σ={sigma:g})": np.asarray(z)}
  errors = {}
  for name, options in denoisers.items():
    t = time.perf_counter()
    out = np.asarray(jax.jit(make_denoiser(name, data, **options))(z, sigma))
    print(f"{name}: {time.perf_counter() - t:.2f}s", flush=True)
    rows[name] = out
    errors[name] = float(np.mean((out - np.asarray(x)) ** 2))
  save_npz(os.path.join(outdir, "denoised.npz"), indices=np.asarray(indices),
            **{k.split(" ")[0]: v for k, v in rows.items()})
  plots.save_rows_figure(os.path.join(outdir, "denoised.png"), rows,
                         title=f"denoisers at σ = {sigma:g}; MSE to x: " +
                         ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
  return errors
