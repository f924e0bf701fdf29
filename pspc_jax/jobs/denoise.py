"""The job behind `bin/denoise`: several denoisers on forward-process z = x + σ ε of training images
and of held-out images.

The last `holdout` images of the dataset are left out of the training (reference) set every denoiser
uses and are denoised too: on a training image the optimal empirical denoiser returns (nearly) that
image at small σ, so only held-out images show how a denoiser generalises.

It writes into an output folder: config.json, denoised.npz (dataset indices, held_out flags, clean x,
z, one output per denoiser) and denoised.png (one row each; training columns, then held-out ones).
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
from pspc_jax.conventions import to_model_range
from pspc_jax.jobs.sample import config_options
from pspc_jax.progress import SILENT, Progress, compile_jitted
from pspc_jax.sampling import latents_from_seeds

# The error groups of `denoise_run`'s result.
TRAINING, HELD_OUT = "training", "held-out"


def denoise_run(images: np.ndarray, *, denoisers: dict[str, dict], sigma: float, indices: list[int],
                noise_seed: int, outdir: str, holdout: int = 0, dataset_name: str = "",
                progress: Progress = SILENT) -> dict[str, dict[str, float]]:
  """Denoises forward-process z = x + σ ε of chosen training images and of held-out images.

  Args:
    images: (N, H, W, C) uint8 dataset.
    denoisers: {registry name: builder options}.
    sigma: the noise level (EDM σ > 0).
    indices: training images to noise, in [0, N − holdout); ε for dataset image k comes from seed
      `noise_seed + k`.
    noise_seed: offset of those seeds.
    outdir: output folder.
    holdout: the last `holdout` images (0 ≤ holdout < N) are removed from the training set the
      denoisers use and denoised as well.
    dataset_name: recorded in config.json.
    progress: where each denoiser's compilation and run are reported (timed phases).

  Returns:
    {denoiser: {"training": MSE, "held-out": MSE}}: mean squared errors to the clean images (per pixel,
    model units) of the training and of the held-out images ("held-out" absent when holdout = 0).

  Raises:
    ValueError: σ not positive and finite, holdout outside [0, N), indices outside the training set,
      or bad options (before anything is written).
  """
  train, held = _split(images, sigma, indices, holdout)
  config = {"denoisers": {k: config_options(opts) for k, opts in denoisers.items()},
            "sigma": sigma, "indices": indices, "holdout": holdout, "noise_seed": noise_seed,
            "dataset": dataset_name}
  data = jnp.asarray(train)
  built = {name: build_denoiser(name, data, **options) for name, options in denoisers.items()}
  prepare_run_dir(outdir, config, "never-resumed")
  shown = np.asarray(list(indices) + list(held), np.int64)  # dataset indices, training first
  x = to_model_range(jnp.asarray(images[shown]))
  z = x + sigma * latents_from_seeds(jnp.asarray(shown) + noise_seed, images.shape[1:])
  rows = {"clean x": np.asarray(x), f"z (σ={sigma:g})": np.asarray(z)}
  for name, denoise in built.items():
    run = compile_jitted(progress, name, apply_denoiser, denoise, z, sigma)
    with progress.phase(f"denoising with {name}"):
      rows[name] = np.asarray(run(denoise, z, sigma))
  is_held = np.arange(len(shown)) >= len(indices)
  errors = {name: _errors(rows[name], rows["clean x"], is_held) for name in built}
  save_npz(os.path.join(outdir, "denoised.npz"), indices=shown, held_out=is_held,
           **{k.split(" ")[0]: v for k, v in rows.items()})
  _save_figure(os.path.join(outdir, "denoised.png"), rows, shown, is_held, sigma, errors)
  return errors


def _split(images: np.ndarray, sigma: float, indices: list[int], holdout: int
           ) -> tuple[np.ndarray, range]:
  """(training images, dataset indices of the held-out ones) after checking `denoise_run`'s
  arguments."""
  if not math.isfinite(sigma) or sigma <= 0:
    raise ValueError(f"--sigma must be positive and finite, got {sigma}")
  count = images.shape[0]
  if not 0 <= holdout < count:
    raise ValueError(f"--holdout must lie in [0, {count}) (the training set keeps at least one of "
                     f"the {count} images), got {holdout}")
  kept = count - holdout
  if not indices or min(indices) < 0 or max(indices) >= kept:
    raise ValueError(f"image indices must lie in [0, {kept}) (the training images; the last "
                     f"{holdout} of {count} are held out), got {indices[:5]}...")
  return images[:kept], range(kept, count)


def _errors(output: np.ndarray, clean: np.ndarray, is_held: np.ndarray) -> dict[str, float]:
  """{"training": MSE, "held-out": MSE} of (B, H, W, C) outputs; a group without images is absent."""
  squared = np.mean((output - clean) ** 2, axis=(1, 2, 3))
  groups = {TRAINING: ~is_held, HELD_OUT: is_held}
  return {group: float(squared[mask].mean()) for group, mask in groups.items() if mask.any()}


def _save_figure(path: str, rows: dict[str, np.ndarray], shown: np.ndarray, is_held: np.ndarray,
                 sigma: float, errors: dict[str, dict[str, float]]) -> None:
  """denoised.png: one row per entry of `rows`, columns titled by dataset index (held-out ones
  marked), the MSEs by group in the title."""
  titles = [f"held-out #{i}" if held else f"#{i}" for i, held in zip(shown, is_held)]
  groups = " / ".join(errors[next(iter(errors))]) if errors else ""
  scores = ", ".join(f"{name} " + " / ".join(f"{v:.4f}" for v in by_group.values())
                     for name, by_group in errors.items())
  plots.save_rows_figure(path, rows, column_titles=titles,
                         title=f"denoisers at σ = {sigma:g} on training images and on images held "
                               f"out of the training set\nMSE to x ({groups}): {scores}")
