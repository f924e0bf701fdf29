"""The job behind `bin/sensitivity`: sensitivity maps (Eq. 8) of every σ, resumable, and their Fig. 3
figures.

Each finished σ is saved at once as its own maps file in `<out stem>_parts/` (`part_path`, with the
run's configuration, num_z and seed in its meta); a rerun with the same configuration loads those, and
the σ of an existing `out` file of the same configuration, and computes only the rest. When all σ are
done, `out` holds them in the order of the grid and the part files are removed. Next to `out` go
`<stem>_heatmaps.png` (maps of chosen output pixels × σ, Fig. 3 right), `<stem>_capture.png` (sides
of the centred squares capturing mass fractions vs σ, Fig. 3 left) and `<stem>_capture.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

import numpy as np

from pspc_jax.denoisers.flex import SensitivityMaps
from pspc_jax.files import remove_parts, resume_per_sigma, save_json, sigma_part_path
from pspc_jax.maps_files import load_maps, load_maps_meta, save_maps
from pspc_jax.progress import SILENT, Progress
from pspc_jax.sensitivity import (DEFAULT_FRACTIONS, sensitivity_map_function,
                                  square_capture_sides)


def part_path(parts_dir: str, sigma: float) -> str:
  """The maps file of one finished σ in a run's parts folder."""
  return sigma_part_path(parts_dir, sigma, ".npz")


def _same_config(meta: dict, config: dict) -> bool:
  return all(meta.get(k) == v for k, v in json.loads(json.dumps(config)).items())


def _read_same_config(path: str, config: dict) -> SensitivityMaps:
  """The maps of `path`, which must have been written by a run of `config` (its meta).

  Raises:
    ValueError: the file holds maps of a different configuration, or is not a maps file.
  """
  if not _same_config(load_maps_meta(path), config):
    raise ValueError(f"{path} holds maps of a different configuration; choose another --out or "
                     "delete it")
  return load_maps(path)


def _resume(out: str, parts_dir: str, sigmas: list[float], config: dict,
            progress: Progress) -> dict[int, np.ndarray]:
  """{index into sigmas: (H, W, H, W) map} of what an earlier run of `config` already computed."""
  finished = None
  if os.path.exists(out):
    previous = _read_same_config(out, config)
    finished = (previous.sigmas, lambda j: previous.maps[j])
  done = resume_per_sigma(sigmas, lambda sigma: part_path(parts_dir, sigma),
                          lambda path: _read_same_config(path, config).maps[0], finished)
  if done:
    progress.note(f"resuming: {len(done)}/{len(sigmas)} noise levels already computed")
  return done


def _compute_missing(map_at: Callable[[float], np.ndarray], sigmas: list[float],
                     done: dict[int, np.ndarray], parts_dir: str, config: dict,
                     progress: Progress) -> None:
  """Computes the σ not in `done` (adding them), saving each as its part file at once."""
  os.makedirs(parts_dir, exist_ok=True)
  with progress.bar(total=len(sigmas), desc="sensitivity maps", unit="σ", initial=len(done)) as bar:
    for k, sigma in enumerate(sigmas):
      if k in done:
        continue
      bar.set_postfix_str(f"σ={sigma:.4g}")
      done[k] = map_at(sigma)
      save_maps(part_path(parts_dir, sigma), SensitivityMaps(np.array([sigma]), done[k][None]),
                config)
      bar.update()


def _write_figures(stem: str, maps: SensitivityMaps, pixels: Sequence[tuple[int, int]],
                   capture_pixel, fractions: Sequence[float]) -> np.ndarray:
  """Writes the heatmaps (when `pixels`), capture plot and capture JSON; returns the capture sides
  (S, F)."""
  from pspc_jax import plots  # Imported here: the library itself does not need matplotlib.

  sides = square_capture_sides(maps.maps, fractions, capture_pixel)
  if pixels:
    plots.save_sensitivity_heatmaps(stem + "_heatmaps.png", maps.sigmas, maps.maps, pixels)
  where = "all output pixels" if capture_pixel is None else f"output pixel {tuple(capture_pixel)}"
  plots.save_capture_plot(stem + "_capture.png", maps.sigmas, sides, fractions,
                          image_side=max(maps.maps.shape[1:3]),
                          title=f"centred square capturing the sensitivity mass ({where})")
  save_json(stem + "_capture.json",
            {"sigmas": maps.sigmas.tolist(), "fractions": list(map(float, fractions)),
             "capture_pixel": None if capture_pixel is None else list(capture_pixel),
             "sides": sides.tolist()})
  return sides


def sensitivity_run(denoise, data, sigmas: Sequence[float], *, out: str, config: dict,
                    num_z: int, seed: int, batch_size: int = 8, chunk_size: int | None = None,
                    pixels: Sequence[tuple[int, int]] = (), capture_pixel=None,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    progress: Progress = SILENT) -> dict:
  """Computes, saves and plots sensitivity maps, resuming an interrupted run (see the module doc).

  Args:
    denoise, data, num_z, seed, batch_size, chunk_size: as in `sensitivity.sensitivity_maps`.
    sigmas: noise levels σ > 0.
    out: path of the maps file (`maps_files.save_maps`).
    config: JSON-able description of the run (denoiser, checkpoint, dataset, ...), stored in meta and
      compared on resume.
    pixels: output pixels (h, w) shown in the heatmap figure.
    capture_pixel: output pixel of the capture statistic, or None for the average over all pixels.
    fractions: mass fractions of the capture statistic.
    progress: where resumption, compilation and a bar over the σ are reported.

  Returns:
    Summary dict: out, figure paths (heatmaps None without `pixels`), number of σ computed and
    reused, seconds, capture sides (S, F).

  Raises:
    ValueError: an existing part or out file holds a run of a different configuration.
  """
  start = time.perf_counter()
  sigmas = [float(s) for s in sigmas]
  config = {**config, "num_z": int(num_z), "seed": int(seed)}
  stem = os.path.splitext(out)[0]
  parts_dir = stem + "_parts"
  done = _resume(out, parts_dir, sigmas, config, progress)
  reused = len(done)
  if reused < len(sigmas):
    map_at = sensitivity_map_function(denoise, data, num_z=num_z, seed=seed, batch_size=batch_size,
                                      chunk_size=chunk_size, progress=progress)
    _compute_missing(map_at, sigmas, done, parts_dir, config, progress)
  result = SensitivityMaps(np.asarray(sigmas, np.float64),
                           np.stack([done[k] for k in range(len(sigmas))]))
  save_maps(out, result, {**config, "seconds": time.perf_counter() - start})
  remove_parts(parts_dir, [part_path(parts_dir, sigma) for sigma in sigmas])
  sides = _write_figures(stem, result, pixels, capture_pixel, fractions)
  return {"out": out, "heatmaps": stem + "_heatmaps.png" if pixels else None,
          "capture": stem + "_capture.png", "computed": len(sigmas) - reused, "reused": reused,
          "seconds": time.perf_counter() - start, "sides": sides}
