"""Sensitivity-maps files: reading and writing the maps of `bin/sensitivity` and the official release.

File format (`save_maps` / `load_maps`): an `.npz` with `sigmas` (S,) float64 > 0, `maps`
(S, H, W, H, W) float32 ≥ 0 and `meta`, a JSON string (denoiser, checkpoint, num_z, seed, dataset, ...).
`load_maps` also reads the official release's maps: a .npy array (L, H, W, H, W), map k at σ_k of the
L-step EDM grid (80 … 0.002). Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib

import jax
import numpy as np

from pspc_jax.denoisers.flex import SensitivityMaps
from pspc_jax.edm import edm_sigmas
from pspc_jax.files import save_npz

_EXPECTED_FILES = ("an .npz written by bin/sensitivity (sigmas, maps), or a .npy array (L, H, W, H, W) "
                   "of the official release, map k at σ_k of the L-step EDM grid")


def _validate(sigmas, maps, source: str) -> SensitivityMaps:
  sigmas = np.asarray(sigmas)
  maps = np.asarray(maps)
  if sigmas.ndim != 1 or sigmas.size == 0 or not np.issubdtype(sigmas.dtype, np.floating):
    raise ValueError(f"{source}: sigmas must be a non-empty 1-D float array, got "
                     f"{sigmas.dtype}{list(sigmas.shape)}")
  if not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
    raise ValueError(f"{source}: sigmas must be finite and positive, got {sigmas.tolist()}")
  if maps.ndim != 5 or maps.shape[0] != sigmas.size or maps.shape[1:3] != maps.shape[3:5]:
    raise ValueError(f"{source}: maps must have shape (S, H, W, H, W) with S = {sigmas.size}, got "
                     f"{list(maps.shape)}")
  if not np.issubdtype(maps.dtype, np.floating):
    raise ValueError(f"{source}: maps must be floating point, got {maps.dtype}")
  if not np.all(np.isfinite(maps)):
    raise ValueError(f"{source}: maps contain NaN or infinite values")
  if np.any(maps < 0):
    raise ValueError(f"{source}: maps contain negative values (min {maps.min():g})")
  return SensitivityMaps(sigmas=sigmas.astype(np.float64), maps=maps.astype(np.float32))


def save_maps(path, maps: SensitivityMaps, meta: dict | None = None) -> None:
  """Writes maps to an `.npz` (arrays `sigmas`, `maps`, and `meta` as a JSON string), atomically.

  Raises:
    ValueError: invalid maps (see :func:`load_maps`) or meta that JSON cannot encode.
  """
  checked = _validate(maps.sigmas, maps.maps, str(path))
  try:
    meta_json = json.dumps(meta or {})
  except TypeError as err:
    raise ValueError(f"meta must be JSON-serialisable: {err}") from None
  save_npz(path, sigmas=checked.sigmas, maps=checked.maps, meta=np.array(meta_json))


def _load(path) -> np.lib.npyio.NpzFile | np.ndarray:
  """np.load of a maps file without pickles: an NpzFile (ours) or an array (the official layout)."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such sensitivity-maps file")
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile):
    raise ValueError(f"{path}: not a sensitivity-maps file (expected {_EXPECTED_FILES})") from None


def _npz_array(f: np.lib.npyio.NpzFile, name: str, path) -> np.ndarray:
  try:
    return f[name]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
    raise ValueError(f"{path}: cannot read its {name!r} array ({err})") from None


def _official_maps(maps: np.ndarray, source: str) -> SensitivityMaps:
  """Maps in the official release's layout: (L, H, W, H, W), map k at σ_k of the L-step EDM grid
  (`edm_sigmas(L)` without its final 0: σ_0 = 80 … σ_{L-1} = 0.002)."""
  if maps.ndim != 5:
    raise ValueError(f"{source}: a .npy of sensitivity maps must have the official layout (L, H, W, "
                     f"H, W), got shape {list(maps.shape)}")
  with jax.ensure_compile_time_eval():
    grid = np.asarray(edm_sigmas(maps.shape[0]), np.float64)[:-1]
  return _validate(grid, maps, source)


def load_maps(path) -> SensitivityMaps:
  """Reads sensitivity maps: a file written by :func:`save_maps`, or the official release's layout,
  a float .npy array (L, H, W, H, W) whose map k belongs to σ_k of the L-step EDM grid from σ = 80
  down to 0.002 (`pspc_jax.edm_sigmas(L)` without its final 0).

  Returns:
    SensitivityMaps with sigmas float64 (S,) and maps float32 (S, H, W, H, W).

  Raises:
    ValueError: no such file, not a maps file (e.g. text or a pickle, which is never loaded), missing
      arrays, wrong shapes, non-positive or non-finite sigmas, negative or non-finite maps.
  """
  loaded = _load(path)
  if isinstance(loaded, np.ndarray):
    return _official_maps(loaded, str(path))
  with loaded as f:
    missing = [k for k in ("sigmas", "maps") if k not in f.files]
    if missing:
      raise ValueError(f"{path}: not a sensitivity-maps file (missing {', '.join(missing)}; expected "
                       f"{_EXPECTED_FILES})")
    return _validate(_npz_array(f, "sigmas", path), _npz_array(f, "maps", path), str(path))


def load_maps_meta(path) -> dict:
  """The metadata dict stored by :func:`save_maps` ({} when there is none, as in official files).

  Raises:
    ValueError: as :func:`load_maps` for unreadable files; meta that is not a JSON object.
  """
  loaded = _load(path)
  if isinstance(loaded, np.ndarray):
    return {}
  with loaded as f:
    if "meta" not in f.files:
      return {}
    try:
      meta = json.loads(str(_npz_array(f, "meta", path)))
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}: meta is not valid JSON: {err}") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{path}: meta must be a JSON object")
  return meta
