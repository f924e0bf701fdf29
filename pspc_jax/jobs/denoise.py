"""The job behind `bin/denoise`: several denoisers on forward-process z = x + σ ε of training images.

It writes into an output folder: config.json, denoised.npz (indices, clean x, z, one output per
denoiser) and denoised.png (one row each).
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np

from pspc_jax import plots
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.values import apply_denoiser
from pspc_jax.files import prepare_run_dir, save_npz
from pspc_jax.images import to_model_range
from pspc_jax.jobs.sample import config_options
from pspc_jax.progress import SILENT, Progress, compile_jitted
from pspc_jax.sampling import latents_from_seeds


def denoise_run(images: np.ndarray, *, denoisers: dict[str, dict], sigma: float, indices: list[int],
                noise_seed: int, outdir: str, dataset_name: str = "",
                progress: Progress = SILENT) -> dict[str, float]:
  """Denoises forward-process z = x + σ ε of chosen training images with several denoisers.

  Args:
    images: (N, H, W, C) uint8 training set.
    denoisers: {registry name: builder options}.
    sigma: the noise level (EDM σ > 0).
    indices: training images to noise; ε for image k comes from seed `noise_seed + k`.
    outdir: output folder.
    dataset_name: recorded in config.json.
    progress: where each denoiser's compilation and run are reported (timed phases).

  Returns:
    {denoiser: mean squared error to the clean images} (per pixel, model units).

  Raises:
    ValueError: σ not positive and finite, indices outside the training set, or bad options (before
      anything is written).
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
    run = compile_jitted(progress, name, apply_denoiser, denoise, z, sigma)
    with progress.phase(f"denoising with {name}"):
      rows[name] = np.asarray(run(denoise, z, sigma))
    errors[name] = float(np.mean((rows[name] - np.asarray(x)) ** 2))
  save_npz(os.path.join(outdir, "denoised.npz"), indices=np.asarray(indices),
           **{k.split(" ")[0]: v for k, v in rows.items()})
  plots.save_rows_figure(os.path.join(outdir, "denoised.png"), rows,
                         title=f"denoisers at σ = {sigma:g}; MSE to x: " +
                         ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
  return errors
