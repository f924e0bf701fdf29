"""The job behind `bin/compare_samples`: several denoisers sampled from shared latents, compared
(paper Fig. 8 and §5).

Writes to the output folder: config.json, samples_<denoiser>.npz (seeds, samples, trajectory z and
denoised; a finished denoiser is reloaded on a rerun of the same configuration), samples.png (one row
per denoiser, one column per seed), trajectory_<seed>.png (z, min–max scaled per image, and D(z) at
several steps and the final sample, two rows per denoiser), similarity_<descriptor>.png (one matrix
per descriptor, `evaluation.similarity_matrix`), similarity.json / similarity.csv (one row per pair of
denoisers and descriptor), memorisation.json / memorisation.csv (`evaluation.memorisation_stats`),
nearest.json / nearest.csv (every sample's nearest training image: index, distance, ratio to the second
nearest) and sheet_<denoiser>.png (every sample beside its nearest training image, with the distance).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from pspc_jax.conventions import to_model_range
from pspc_jax.edm import edm_sigmas
from pspc_jax.evaluation import (MEMORISATION_RATIO, Denoiser, available_descriptors,
                                 memorisation_stats, sample_with_trajectory, similarity_matrix)
from pspc_jax.files import prepare_run_dir, save_npz
from pspc_jax.jobs.evaluate import registry_maker
from pspc_jax.jobs.tables import write_table
from pspc_jax.progress import SILENT, Progress

SIMILARITY_COLUMNS = ("descriptor", "denoiser_a", "denoiser_b", "similarity", "count")
MEMORISATION_COLUMNS = ("denoiser", "mean_nn_distance", "median_nn_distance", "min_nn_distance",
                        "median_nn_ratio", "fraction_memorised", "count")
NEAREST_COLUMNS = ("denoiser", "seed", "nn_index", "nn_distance", "nn_ratio")

# (samples (B, H, W, C), trajectory z (N+1, B, H, W, C), trajectory denoised (N, B, H, W, C)).
Trajectories = tuple[np.ndarray, np.ndarray, np.ndarray]


def compare_run(images: np.ndarray, *, denoisers: Sequence[str], seeds: Sequence[int], outdir: str,
                make: Callable[[str], Denoiser] | None = None,
                options: Mapping[str, Mapping] | None = None, steps: int = 18,
                solver: str = "heun", batch_size: int = 16,
                descriptors: Sequence[str] = ("pixel", "nearest_training"), figure_seeds: int = 2,
                columns: int = 6, dataset_name: str = "", mesh=None,
                progress: Progress = SILENT) -> dict:
  """Samples every denoiser from the same latents and compares the samples (module doc).

  Args:
    images: (N, H, W, C) uint8 training set, N ≥ 2.
    denoisers: registry names, at least one.
    seeds: latent seeds, at least one; every denoiser starts from the same latents.
    outdir: output folder; a run of the same configuration there reuses its finished denoisers.
    make, options, mesh: as in `pspc_jax.jobs.evaluate.evaluate_run`.
    steps, solver: the sampler (EDM grid of `steps`, then 0).
    batch_size: trajectories per compiled batch.
    descriptors: registered descriptor names (`evaluation.available_descriptors`).
    figure_seeds: trajectory figures for the first this many seeds.
    columns: trajectory steps shown (evenly spaced) before the final sample.
    dataset_name: recorded in config.json.
    progress: each denoiser's build and compilation as phases, its sampling as a bar.

  Returns:
    {"similarity": {descriptor: {"names": [...], "matrix": [[...]]}}, "memorisation": {denoiser:
     summary}, "seconds": float}.

  Raises:
    ValueError: no denoiser or seed, an unknown descriptor, or `outdir` holds a run of another
      configuration.
  """
  start = time.perf_counter()
  denoisers = list(dict.fromkeys(denoisers))
  seeds = [int(s) for s in seeds]
  if not denoisers or not seeds:
    raise ValueError("need at least one denoiser and one seed")
  unknown = [name for name in descriptors if name not in available_descriptors()]
  if unknown:
    raise ValueError(f"unknown descriptor {unknown[0]!r}; choose one of "
                     f"{', '.join(available_descriptors())}")
  options = dict(options or {})
  config = {"denoisers": denoisers,
            "options": {n: {k: str(v) for k, v in o.items()} for n, o in options.items()
                        if n in denoisers},
            "seeds": seeds, "steps": steps, "solver": solver, "dataset": dataset_name,
            "num_train_images": int(images.shape[0]), "image_shape": list(images.shape[1:])}
  prepare_run_dir(outdir, config, "config.json")
  data = jnp.asarray(images)
  make = make or registry_maker(images if mesh is not None else data, options, mesh)
  grid = np.asarray(edm_sigmas(steps))
  results = {name: _sample_denoiser(name, make, seeds, images.shape[1:], grid, solver,
                                    min(batch_size, len(seeds)), outdir, progress)
             for name in denoisers}
  samples = {name: results[name][0] for name in denoisers}
  _save_figures(outdir, results, seeds, grid, solver, figure_seeds, columns)
  similarity = _save_similarities(outdir, samples, data, descriptors, len(seeds))
  memorisation = _save_memorisation(outdir, samples, images, data, seeds)
  return {"similarity": similarity, "memorisation": memorisation,
          "seconds": time.perf_counter() - start}


def _sample_denoiser(name: str, make: Callable[[str], Denoiser], seeds: list[int], image_shape,
                     grid: np.ndarray, solver: str, batch_size: int, outdir: str,
                     progress: Progress) -> Trajectories:
  """`name`'s samples and trajectories: reloaded from samples_<name>.npz, else sampled and saved."""
  path = os.path.join(outdir, f"samples_{name}.npz")
  if os.path.exists(path):
    with np.load(path) as saved:
      progress.note(f"{name}: loaded {path}")
      return saved["samples"], saved["trajectory_z"], saved["trajectory_denoised"]
  with progress.phase(f"building {name}"):
    denoise = make(name)
  result = sample_with_trajectory(denoise, seeds, image_shape, grid, solver=solver,
                                  batch_size=batch_size, progress=progress, label=f"{name} sampler")
  save_npz(path, seeds=np.asarray(seeds), samples=result[0], trajectory_z=result[1],
           trajectory_denoised=result[2], sigmas=grid)
  return result


def _save_figures(outdir: str, results: Mapping[str, Trajectories], seeds: list[int],
                  grid: np.ndarray, solver: str, figure_seeds: int, columns: int) -> None:
  """samples.png (one row per denoiser) and the trajectory figures (Fig. 8): z and D(z) at `columns`
  steps evenly spaced over the N steps, then the sample, for the first `figure_seeds` seeds."""
  from pspc_jax import plots  # matplotlib only when plotting

  plots.save_rows_figure(os.path.join(outdir, "samples.png"),
                         {name: result[0][:16] for name, result in results.items()},
                         title=f"samples from shared latents (seeds {seeds[0]}…)")
  num_steps = len(grid) - 1
  picked = np.unique(np.round(np.linspace(0, num_steps - 1, min(columns, num_steps))).astype(int))
  titles = [f"σ={grid[i]:.3g}" for i in picked] + ["sample"]
  for b in range(min(figure_seeds, len(seeds))):
    rows = {}
    for name, (_, path_z, path_d) in results.items():
      rows[f"{name}: z, min–max"] = np.concatenate([plots.min_max_scaled(path_z[picked, b]),
                                                    path_z[-1:, b]])
      rows[f"{name}: D(z)"] = np.concatenate([path_d[picked, b], path_z[-1:, b]])
    plots.save_trajectory_figure(
        os.path.join(outdir, f"trajectory_{seeds[b]}.png"), rows, titles,
        title=f"seed {seeds[b]}: z and D(z) along the {solver} sampler\nz rows: each image min–max "
              "scaled to black–white (z spans about ±3σ); D(z) rows and samples: [-1, 1]")


def _save_similarities(outdir: str, samples: Mapping[str, np.ndarray], data,
                       descriptors: Sequence[str], count: int) -> dict:
  """{descriptor: {"names", "matrix"}}; writes similarity.json / similarity.csv (one row per pair of
  denoisers and descriptor) and similarity_<descriptor>.png."""
  from pspc_jax import plots  # matplotlib only when plotting

  similarity = {}
  for name in descriptors:
    names, matrix = similarity_matrix(samples, data, name)
    similarity[name] = {"names": names, "matrix": matrix.tolist()}
    plots.save_similarity_matrix(os.path.join(outdir, f"similarity_{name}.png"), names, matrix,
                                 title=f"{name} similarity of samples from shared latents")
  write_table(os.path.join(outdir, "similarity"),
              [{"descriptor": d, "denoiser_a": a, "denoiser_b": b,
                "similarity": similarity[d]["matrix"][i][j], "count": count}
               for d in similarity for i, a in enumerate(similarity[d]["names"])
               for j, b in enumerate(similarity[d]["names"]) if j > i],
              SIMILARITY_COLUMNS)
  return similarity


def _save_memorisation(outdir: str, samples: Mapping[str, np.ndarray], images: np.ndarray, data,
                       seeds: list[int]) -> dict:
  """{denoiser: memorisation summary} (`memorisation_stats` without the per-sample arrays), written
  as memorisation.json / memorisation.csv; the per-sample nearest training images (one search per
  denoiser, shared by both) as nearest.json / nearest.csv and the sheets (`_save_sheets`)."""
  stats = {name: memorisation_stats(batch, data) for name, batch in samples.items()}
  memorisation = {name: {k: v for k, v in s.items() if not isinstance(v, np.ndarray)}
                  for name, s in stats.items()}
  write_table(os.path.join(outdir, "memorisation"),
              [{"denoiser": name, **summary} for name, summary in memorisation.items()],
              MEMORISATION_COLUMNS)
  write_table(os.path.join(outdir, "nearest"),
              [{"denoiser": name, "seed": seed, "nn_index": int(s["nn_index"][k]),
                "nn_distance": float(s["nn_distance"][k]), "nn_ratio": float(s["nn_ratio"][k])}
               for name, s in stats.items() for k, seed in enumerate(seeds)],
              NEAREST_COLUMNS)
  _save_sheets(outdir, samples, stats, images, seeds)
  return memorisation


def _save_sheets(outdir: str, samples: Mapping[str, np.ndarray], stats: Mapping[str, dict],
                 images: np.ndarray, seeds: list[int]) -> None:
  """sheet_<denoiser>.png: each sample beside its nearest training image (8 pairs per row), the seed
  above and the L2 distance d (and the nearest / second-nearest ratio r) below, memorised samples
  (r < `MEMORISATION_RATIO`) in red; the title gives the denoiser's memorisation summary."""
  from pspc_jax import plots  # matplotlib only when plotting

  for name, batch in samples.items():
    s = stats[name]
    neighbours = np.asarray(to_model_range(np.asarray(images)[s["nn_index"]]))
    captions = [(f"seed {seed} · #{s['nn_index'][k]}",
                 f"d {s['nn_distance'][k]:.2f} · r {s['nn_ratio'][k]:.2f}")
                for k, seed in enumerate(seeds)]
    plots.save_pair_sheet(
        os.path.join(outdir, f"sheet_{name}.png"), batch, neighbours, captions,
        highlight=s["nn_ratio"] < MEMORISATION_RATIO,
        title=f"{name}: mean NN distance {s['mean_nn_distance']:.3f}, "
              f"{s['fraction_memorised']:.0%} memorised (r < {MEMORISATION_RATIO:.2g}), "
              f"{s['count']} samples\neach pair: sample (left), nearest training image #index "
              "(right); d = L2 distance in [-1, 1] units, r = d / second-nearest distance")
