"""The job behind `bin/attribute`: samples with their trajectories, attributed to training images.

It writes into an output folder: attribution.npz (seeds, samples, per-pixel top-k indices/weights,
per-image totals, counts), attribution.json (per sample: images for 50 %/90 % of the weight, top-5
images and shares) and attribution.png (sample, dominant-image map, the top training images).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import attribution, plots, schedules
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.edm import edm_sigmas
from pspc_jax.files import save_json, save_npz
from pspc_jax.conventions import to_model_range, to_uint8
from pspc_jax.jobs.sample import StepPostfix, seed_batches
from pspc_jax.progress import SILENT, Progress, compile_jitted
from pspc_jax.sampling import sample

_SHARES = (0.5, 0.9)  # the shares of the weight whose image counts are reported


def _check_attribution(images: np.ndarray, patch_schedule: str, k: int, show: int,
                       batch_size: int) -> schedules.SigmaSchedule:
  """The parsed `patch_schedule`, after checking the other arguments of `attribute_run`."""
  if k < 1:
    raise ValueError(f"--k must be at least 1, got {k}")
  if not 1 <= show <= 10 or batch_size < 1:
    raise ValueError("--show must be between 1 and 10 and --batch at least 1")
  schedule = schedules.parse_patch_schedule(patch_schedule, images.shape[1:3])
  if k > images.shape[0]:
    raise ValueError(f"--k={k} exceeds the {images.shape[0]} training images")
  return schedule


def attribute_run(images: np.ndarray, *, denoiser: str, options: dict, seeds: list[int], steps: int,
                  solver: str, outdir: str, batch_size: int, patch_schedule: str = "auto", k: int = 5,
                  show: int = 4, sigma_range: tuple[float, float] = (0.0, math.inf),
                  chunk_size: int | None = None, dataset_name: str = "",
                  previous: tuple[str, dict[int, np.ndarray]] | None = None,
                  progress: Progress = SILENT) -> dict:
  """Samples one image per seed, recording its trajectory, and attributes it to training images.

  A sample's attribution is the mean over the steps with σ_t > 0 in `sigma_range` of the PSPC-Square
  composite weights a_i[p] (`attribution.attribute`). Writes attribution.npz, attribution.json and
  attribution.png into `outdir` (see the module docstring).

  Args:
    images: (N, H, W, C) uint8 training set.
    denoiser, options, seeds, steps, solver: the sampler, as in `sample.sample_run`.
    outdir: output folder (created).
    batch_size: samples per compiled batch.
    patch_schedule: PSPC-Square patch sizes of the attribution (a `parse_patch_schedule` spec).
    k: training images kept per pixel, 1 ≤ k ≤ N.
    show: training images shown per sample in the figure (1-10).
    sigma_range: (lo, hi): only steps with lo ≤ σ ≤ hi count.
    chunk_size: dataset rows per streamed chunk of the attribution.
    dataset_name: recorded in attribution.json and the figure title.
    previous: optional (path, {seed: sample}) of samples drawn before with the same sampler (see
      `sample.read_sample_run`); the summary gives the largest difference to the re-created ones.
    progress: where the compilations and the batches (with the current sampling step or attribution
      pass) are reported.

  Returns:
    Summary dict: number of samples, median images holding 50 % / 90 % of the weight, the largest
    difference to `previous` ("previous_gap", None without previous samples of these seeds), seconds,
    outdir.

  Raises:
    ValueError: bad arguments or options (before anything is written).
  """
  start = time.perf_counter()
  schedule = _check_attribution(images, patch_schedule, k, show, batch_size)
  data = jnp.asarray(images)
  denoise = build_denoiser(denoiser, data, **options)
  os.makedirs(outdir, exist_ok=True)
  sigmas = np.asarray(edm_sigmas(steps))
  attribute = functools.partial(attribution.attribute, masks=schedule, sigmas=sigmas, k=k,
                                sigma_range=sigma_range, chunk_size=chunk_size)
  samples, indices, weights, totals = _sample_and_attribute(
      denoise, data, seeds, sigmas, solver, attribute, batch_size, progress)
  counts = attribution.contributor_counts(totals, _SHARES)
  used = sigmas[:-1][attribution.step_mask(sigmas[:-1], sigma_range)]
  save_npz(os.path.join(outdir, "attribution.npz"), seeds=np.asarray(seeds), samples=samples,
           images=to_uint8(samples), indices=indices, weights=weights, totals=totals,
           counts=counts, count_shares=np.asarray(_SHARES), sigmas=used)
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
          "median_images_for_90%": float(np.median(counts[:, 1])),
          "previous_gap": _largest_gap(previous, seeds, samples),
          "seconds": time.perf_counter() - start, "outdir": outdir}


def _sample_and_attribute(denoise, data: jax.Array, seeds: list[int], sigmas: np.ndarray,
                          solver: str, attribute: Callable, batch_size: int,
                          progress: Progress) -> tuple[np.ndarray, ...]:
  """(samples, indices, weights, totals) of all `seeds`, batch by batch: each batch is sampled on
  `sigmas` with its trajectory, which `attribute(path, data, progress=…)` attributes.

  The sampler and the attribution (the denoiser and the training set arguments, not constants) are
  compiled first, each as its own phase; then a bar counts the batches, its postfix showing the
  current sampling step or attribution pass.
  """
  batches = seed_batches(seeds, batch_size, data.shape[1:])
  first = next(batches)
  postfix = StepPostfix()

  def attribution_pass(stage, done, total):
    postfix.show(f"attribution pass {stage}/2 {done}/{total} images")

  sampler = jax.jit(lambda den, lat: sample(den, lat, sigmas, solver=solver, return_trajectory=True,
                                             progress=postfix.sampler_step))
  run_sampler = compile_jitted(progress, "sampler", sampler, denoise, first[1])
  path = jax.eval_shape(sampler, denoise, first[1])[1]  # shapes only: nothing is sampled
  run_attribution = compile_jitted(progress, "attribution", jax.jit(
      lambda path, data: attribute(path, data, progress=attribution_pass)), path, data)
  parts = []
  with progress.bar(total=-(-len(seeds) // batch_size), desc="attributing", unit="batch") as bar:
    postfix.bar = bar
    for batch, latents in itertools.chain([first], batches):
      samples, path = run_sampler(denoise, latents)
      result = run_attribution(path, data)
      parts.append([np.asarray(a)[:len(batch)] for a in (samples,) + tuple(result)])
      bar.update()
  return tuple(np.concatenate(p) for p in zip(*parts))


def _largest_gap(previous: tuple[str, dict[int, np.ndarray]] | None, seeds: list[int],
                 samples: np.ndarray) -> float | None:
  """max |sample − previous sample| over the seeds that `previous` (path, {seed: sample}) holds;
  None when it holds none of them."""
  if previous is None:
    return None
  stored = previous[1]
  gaps = [float(np.abs(samples[i] - stored[s]).max()) for i, s in enumerate(seeds) if s in stored]
  return max(gaps) if gaps else None


def _save_attribution_figure(path: str, images: np.ndarray, seeds: list[int], samples: np.ndarray,
                             indices: np.ndarray, weights: np.ndarray, totals: np.ndarray,
                             counts: np.ndarray, *, show: int, title: str) -> None:
  """`plots.save_attribution_figure` of the first 16 samples, each with `show` training images."""
  rows = min(len(seeds), 16)
  chosen = np.asarray([attribution.figure_images(indices[b], weights[b], totals[b], show)
                       for b in range(rows)])  # (rows, M), by decreasing share
  maps = [attribution.dominance_map(indices[b], weights[b], chosen[b]) for b in range(rows)]
  sources = np.asarray(to_model_range(jnp.asarray(images[chosen.reshape(-1)])))
  plots.save_attribution_figure(
      path, samples[:rows], np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps]),
      sources.reshape(chosen.shape + images.shape[1:]),
      [[f"#{i} {100 * totals[b, i]:.0f}%" for i in chosen[b]] for b in range(rows)],
      [f"seed {s}: {counts[b, 0]}/{counts[b, 1]} img" for b, s in enumerate(seeds[:rows])],
      title=title, others=indices[:rows, ..., 0])
