"""Files in the layouts of the official PSPC release (Niedoba et al.'s PyTorch code), read and written.

The release stores images channels-first (NCHW), float32, in model units ([-1, 1] images plus noise);
pspc_jax holds them channels-last (NHWC). Nothing here unpickles.

* z files, the inputs of the release's `denoise.py --z` (its published CIFAR-10 forward- and
  reverse-process z): a .npy (steps, N, C, H, W) whose entry [i] holds N noisy images at σ_i of the
  `steps`-step EDM grid σ_i = (80^(1/7) + i/(steps−1) (0.002^(1/7) − 80^(1/7)))^7, i = 0 … steps−1
  (its `edm_t_schedule`, which has no final 0: `pspc_jax.edm_sigmas(steps)` without its last entry;
  the release computes the grid in float32, pspc_jax in float64 rounded once, which differ by at most
  a float32 rounding). `load_z_set` reads them, and the NHWC counterpart of pspc_jax: an .npz with
  `sigmas` (S,) > 0 and `states` (S, K, H, W, C), the layout of bin/evaluate's own reverse_set.npz.
* initial latents, the input of the release's `sample.py --z_init`: a .npy (N, C, H, W) of prior draws
  z_T = σ_max ε, ε ~ N(0, I), already multiplied by σ_max (its `--t_max`, 80). `load_release_latents`.
* samples, the output of the release's `sample.py` (`<denoiser>_samples.npy`): a .npy (N, C, H, W)
  float32 in [-1, 1] units, not clipped. `save_release_samples`.
"""

from __future__ import annotations

import os
import zipfile
import zlib

import jax
import numpy as np

from pspc_jax.edm import edm_sigmas
from pspc_jax.evaluation import GivenSet
from pspc_jax.files import atomic_write

_Z_FILES = ("the official release's .npy (steps, N, C, H, W) on the steps-step EDM grid, or an .npz "
            "with sigmas (S,) and states (S, K, H, W, C)")


def _open(path, what: str, expected: str):
  """np.load(path) memory-mapped, without pickles: an array (.npy) or an NpzFile.

  Raises:
    ValueError: no such file, or not a NumPy file.
  """
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such {what} file")
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile):
    raise ValueError(f"{path}: not a {what} file (expected {expected})") from None


def _float_array(array, path, name: str, ndim: int, layout: str, rows=slice(None)) -> np.ndarray:
  """`array[:, rows]` (all of a 1-D array) checked to be a finite float array of `ndim` dimensions,
  as float32; only those rows of a memory-mapped array are read."""
  if array.ndim != ndim or not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"{path}: {name} must be a float array {layout}, got {array.dtype}"
                     f"{list(array.shape)}")
  array = np.asarray(array[:, rows] if ndim > 1 else array, np.float32)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{path}: {name} contains NaN or infinite values")
  return array


def _release_grid(steps: int) -> np.ndarray:
  """σ_0 … σ_{steps−1} of the release's z files: `edm_sigmas(steps)` without its final 0, float32."""
  with jax.ensure_compile_time_eval():
    return np.asarray(edm_sigmas(steps))[:-1]


def _npz_member(f, name: str, path) -> np.ndarray:
  if name not in f.files:
    raise ValueError(f"{path}: no {name!r} array (expected {_Z_FILES})")
  try:
    return f[name]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
    raise ValueError(f"{path}: cannot read its {name!r} array ({err})") from None


def load_z_set(path, count: int | None = None) -> GivenSet:
  """Reads evaluation z from a file (see the module docstring for both layouts).

  The official layout (steps, N, C, H, W) gets the σ of the `steps`-step EDM grid, entry i at σ_i
  (σ_0 = 80 … σ_{steps−1} = 0.002), and is transposed to NHWC. Only the first `count` z of each σ are
  read (the file is memory-mapped), so a large release file costs only what is used.

  Args:
    path: a .npy in the release's layout or an .npz with `sigmas` and `states`.
    count: read the first `count` z per σ (None: all).

  Returns:
    GivenSet(sigmas (S,) float32, z (S, K, H, W, C) float32, source = the file's name), K = count
    (or the file's number when smaller: `GivenSet.select` then refuses it).

  Raises:
    ValueError: no such file, not a NumPy file, wrong shapes or dtypes, NaN or infinite values,
      σ not positive, finite and distinct.
  """
  loaded = _open(path, "z", _Z_FILES)
  rows = slice(None) if count is None else slice(0, int(count))
  if isinstance(loaded, np.ndarray):
    z = _float_array(loaded, path, "the official z array", 5, "(steps, N, C, H, W)", rows)
    sigmas, z = _release_grid(z.shape[0]), z.transpose(0, 1, 3, 4, 2)
  else:
    with loaded as f:
      sigmas = _float_array(_npz_member(f, "sigmas", path), path, "sigmas", 1, "(S,)")
      z = _float_array(_npz_member(f, "states", path), path, "states", 5, "(S, K, H, W, C)", rows)
  if len(sigmas) != z.shape[0] or len(sigmas) == 0:
    raise ValueError(f"{path}: {len(sigmas)} sigmas for {z.shape[0]} sets of z")
  if np.any(sigmas <= 0) or len(np.unique(sigmas)) != len(sigmas):
    raise ValueError(f"{path}: sigmas must be positive and distinct, got {sigmas.tolist()}")
  return GivenSet(sigmas, np.ascontiguousarray(z), os.path.basename(os.fspath(path)))


def load_release_latents(path, sigma_max: float = 80.0) -> np.ndarray:
  """The release's initial latents as pspc_jax latents.

  The release's `sample.py --z_init` file holds z_T = σ_max ε (N, C, H, W). pspc_jax's latents are
  the ε: `latents_from_seeds` draws them N(0, I) and `pspc_jax.sample` multiplies them by
  sigmas[0] = σ_max itself. So the latents of the file are z_T / σ_max (divided in float64, rounded
  once to float32), NHWC; row k of the file gives sample k, and the sampler's first state
  σ_max · latents equals the release's z_T to within a float32 rounding.

  Args:
    path: the .npy file.
    sigma_max: the σ_max the file was multiplied by (the release's --t_max, 80 by default; the first
      σ of the sampler grid).

  Returns:
    (N, H, W, C) float32 latents.

  Raises:
    ValueError: no such file, not a .npy array of shape (N, C, H, W) with N ≥ 1, not finite, or
      sigma_max not positive.
  """
  if not sigma_max > 0:
    raise ValueError(f"sigma_max must be positive, got {sigma_max}")
  loaded = _open(path, "latents", "the official release's z_init .npy (N, C, H, W)")
  if not isinstance(loaded, np.ndarray):
    loaded.close()
    raise ValueError(f"{path}: latents must be the official release's z_init .npy (N, C, H, W), "
                     "not an .npz")
  z_init = _float_array(loaded, path, "the latents", 4, "(N, C, H, W)")
  if z_init.shape[0] == 0:
    raise ValueError(f"{path}: holds no latents")
  return (np.asarray(z_init, np.float64) / float(sigma_max)).astype(np.float32).transpose(0, 2, 3, 1)


def check_samples_path(path) -> str:
  """`path` as a string, checked to name a .npy file (where `save_release_samples` writes).

  Raises:
    ValueError: it does not end in .npy.
  """
  path = os.fspath(path)
  if not path.endswith(".npy"):
    raise ValueError(f"{path}: samples in the official layout are written to a .npy file")
  return path


def save_release_samples(path, samples) -> None:
  """Writes samples as the release's `sample.py` does: a float32 .npy (N, C, H, W), atomically.

  Args:
    path: the file to write; must end in .npy.
    samples: (N, H, W, C) samples in [-1, 1] units (pspc_jax's layout).

  Raises:
    ValueError: `path` does not end in .npy, or samples are not (N, H, W, C).
  """
  path = check_samples_path(path)
  samples = np.asarray(samples, np.float32)
  if samples.ndim != 4:
    raise ValueError(f"samples must have shape (N, H, W, C), got {samples.shape}")
  with atomic_write(path) as f:
    np.save(f, np.ascontiguousarray(samples.transpose(0, 3, 1, 2)))
