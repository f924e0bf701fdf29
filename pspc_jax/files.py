"""Atomic file writes: an interrupted run never leaves a torn output file behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
  """Opens a temporary file next to `path` and renames it over `path` when the block succeeds.

  The folder is created if needed. On an exception the temporary file is deleted and `path` keeps its
  old content (or stays absent). The new file gets the usual permissions (0666 less the umask), not the
  private ones `tempfile.mkstemp` creates.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def save_npz(path: str | os.PathLike, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  with atomic_write(path) as f:
    np.savez(f, **arrays)


def save_json(path: str | os.PathLike, value) -> None:
  """`json.dump(value, f, indent=1)` into `path`, atomically."""
  with atomic_write(path, "w") as f:
    json.dump(value, f, indent=1)


def prepare_run_dir(outdir: str | os.PathLike, config: dict, resume_file: str) -> bool:
  """Creates `outdir` for a run described by the JSON-serialisable `config`.

  Returns True when `outdir` already holds `config.json` equal to `config` and `resume_file`: the
  caller then resumes from `resume_file`. Otherwise writes `config.json` and returns False.

  Raises:
    ValueError: `outdir` holds a resumable run of a different configuration.
  """
  outdir = os.fspath(outdir)
  os.makedirs(outdir, exist_ok=True)
  config_path = os.path.join(outdir, "config.json")
  if os.path.exists(config_path) and os.path.exists(os.path.join(outdir, resume_file)):
    with open(config_path) as f:
      if json.load(f) != config:
        raise ValueError(f"{outdir} holds a run with a different configuration; choose another "
                         "--outdir or delete it")
    return True
  save_json(config_path, config)
  return False


def sigma_part_path(parts_dir: str, sigma: float, suffix: str) -> str:
  """The file of one noise level's results in a resumable run's parts folder."""
  return os.path.join(parts_dir, f"sigma_{sigma:.9e}{suffix}")


def resume_per_sigma(sigmas: Sequence[float], part_path: Callable[[float], str],
                     read_part: Callable[[str], Any],
                     finished: tuple[Sequence[float], Callable[[int], Any]] | None = None
                     ) -> dict[int, Any]:
  """What earlier runs of a per-σ job already computed, by index into `sigmas`.

  Args:
    sigmas: the noise levels of this run.
    part_path: the part file of one σ (written as soon as that σ is done).
    read_part: reads an existing part file; raises ValueError if it belongs to another configuration.
    finished: (grid, value_at) of a completed run's output, already checked to be of this
      configuration: a σ equal to grid[j] (relative 1e-6) reuses value_at(j) before any part file.

  Returns:
    {index in sigmas: value} (the caller reports the resumption).
  """
  grid = np.asarray(finished[0] if finished else [], np.float64)
  done = {}
  for k, sigma in enumerate(sigmas):
    match = np.flatnonzero(np.isclose(grid, sigma, rtol=1e-6, atol=0))
    if match.size:
      done[k] = finished[1](int(match[0]))
    elif os.path.exists(part_path(sigma)):
      done[k] = read_part(part_path(sigma))
  return done


def remove_parts(parts_dir: str, paths: Sequence[str]) -> None:
  """Deletes a finished run's part files `paths` (those that exist), then `parts_dir` if it is empty."""
  for path in paths:
    if os.path.exists(path):
      os.remove(path)
  if os.path.isdir(parts_dir) and not os.listdir(parts_dir):
    os.rmdir(parts_dir)
