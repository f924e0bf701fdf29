"""Gradient sensitivity maps of a denoiser (paper Eq. 8, Fig. 3) and their file format.

For a denoiser D(z, σ) on images of shape (H, W, C) the sensitivity of output pixel p to input
pixel q at noise level σ is

    G[σ, p, q] = E_z  Σ_c Σ_c' |∂D(z, σ)_{p,c} / ∂z_{q,c'}|,      z = x + σ·ε,

with x drawn uniformly from a dataset and ε ~ N(0, I): the absolute Jacobian entries are summed over
the output channels c of pixel p **and** over the input channels c' of pixel q (the paper's Eq. 8 sums
absolute values; nothing cancels). A map is an (H, W, H, W) array: G[h, w] is the (H, W) map of
output pixel (h, w) over the input pixels.

Computation: the Jacobian rows are pulled back in batched VJPs (`jax.vmap` over one-hot cotangents of
one `jax.vjp` linearisation), in chunks of `chunk_size` output pixels (C cotangents each) so memory is
bounded, all inside one jitted function per denoiser. The expectation is a plain average over `num_z`
forward-process samples, streamed over batches of `batch_size` z and accumulated in float64 on the
host. The z of sample k depends only on (seed, k) (image index and ε from `fold_in(key(seed), k)`), not
on the batch size and not on σ: every σ uses the same x and ε (common random numbers), so maps vary
smoothly with σ.

File format (`save_maps` / `load_maps`): an `.npz` with `sigmas` (S,) float64 > 0, `maps`
(S, H, W, H, W) float32 ≥ 0 and `meta`, a JSON string (denoiser, checkpoint, num_z, seed, dataset, ...).
`load_maps` also reads the official release's maps: a .npy array (L, H, W, H, W), map k at σ_k of the
L-step EDM grid (80 … 0.002).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
import zlib
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax.denoisers.flex import SensitivityMaps
from pspc_jax.denoisers.values import as_argument
from pspc_jax.edm import edm_sigmas
from pspc_jax.files import (resume_per_sigma, save_json, save_npz,
                            sigma_part_path)
from pspc_jax.forward_process import forward_samples

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
DEFAULT_FRACTIONS = (0.5, 0.75, 0.95)
# Floats held by one chunk's pulled-back gradients (chunk · C · B · H · W · C) when chunk_size is None.
_AUTO_CHUNK_FLOATS = 1 << 22


# --------------------------------------------------------------------------------------------------
# Jacobians.


def abs_jacobian_sum(denoise: Denoiser, z, sigma, weights=None, *, chunk_size: int | None = None
                     ) -> jnp.ndarray:
  """Σ_b w_b Σ_c Σ_c' |∂D(z, σ)_{b,p,c} / ∂z_{b,q,c'}| for a batch of z, by batched VJPs.

  The denoiser must treat the samples of a batch independently (true of every denoiser here): one
  VJP of the whole batch with the same one-hot cotangent in every sample then yields every sample's
  Jacobian row at once.

  Args:
    denoise: differentiable `denoise(z, sigma) -> x_hat`, (B, H, W, C) float32 in and out.
    z: (B, H, W, C) float32 inputs.
    sigma: noise level, a scalar or (B,); passed to `denoise` unchanged.
    weights: (B,) per-sample weights w_b (e.g. 0 for padding); None weighs every sample 1.
    chunk_size: output pixels per VJP chunk (C·chunk_size cotangents pulled back together); None picks
      it so that the gradients of one chunk hold about 4M floats.

  Returns:
    float32 (H, W, H, W): entry [h, w, i, j] for output pixel (h, w) and input pixel (i, j).
  """
  z = jnp.asarray(z, jnp.float32)
  if z.ndim != 4:
    raise ValueError(f"z must have shape (B, H, W, C), got {z.shape}")
  batch, height, width, channels = z.shape
  num_pixels = height * width
  weights = jnp.ones((batch,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  chunk = _chunk_size(chunk_size, z.shape)
  x_hat, pullback = jax.vjp(lambda zz: denoise(zz, sigma), z)
  if x_hat.shape != z.shape:
    raise ValueError(f"the denoiser returned shape {x_hat.shape} for z of shape {z.shape}")
  eye = jnp.eye(channels, dtype=x_hat.dtype)

  def rows(pixels):
    """(K,) output pixel indices -> (K, H, W) absolute Jacobian sums."""
    count = pixels.shape[0]
    onehot = jax.nn.one_hot(pixels, num_pixels, dtype=x_hat.dtype).reshape(count, 1, height, width, 1)
    cot = onehot * eye[None, :, None, None, :]  # (K, c, H, W, c): one cotangent per (pixel, channel).
    cot = jnp.broadcast_to(cot[:, :, None], (count, channels, batch, height, width, channels))
    (grads,) = jax.vmap(pullback)(cot.reshape(count * channels, batch, height, width, channels))
    summed = jnp.sum(jnp.abs(grads), axis=-1)  # over input channels c': (K·c, B, H, W).
    summed = jnp.sum(summed * weights[None, :, None, None], axis=1)  # over the batch.
    return jnp.sum(summed.reshape(count, channels, height, width), axis=1)  # over output channels c.

  pixels = jnp.arange(num_pixels, dtype=jnp.int32)
  num_full = num_pixels // chunk
  parts = []
  if num_full:
    full = jax.lax.map(rows, pixels[:num_full * chunk].reshape(num_full, chunk))
    parts.append(full.reshape(num_full * chunk, height, width))
  if num_pixels % chunk:
    parts.append(rows(pixels[num_full * chunk:]))
  out = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
  return out.reshape(height, width, height, width)


def _chunk_size(chunk_size: int | None, shape) -> int:
  batch, height, width, channels = shape
  if chunk_size is None:
    chunk_size = _AUTO_CHUNK_FLOATS // (channels * batch * height * width * channels)
  elif chunk_size < 1:
    raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
  return int(max(1, min(chunk_size, height * width)))


# --------------------------------------------------------------------------------------------------
# Forward-process samples and expectations.


def _check_counts(num_z: int, batch_size: int) -> None:
  if num_z < 1:
    raise ValueError(f"num_z must be at least 1, got {num_z}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _map_function(denoise: Denoiser, data, *, num_z: int, seed: int, batch_size: int,
                  chunk_size: int | None) -> Callable[[float], np.ndarray]:
  """sigma -> (H, W, H, W) float32 map averaged over num_z samples, with one compiled batch step."""
  _check_counts(num_z, batch_size)
  data = jnp.asarray(data)
  if data.ndim != 4 or data.shape[0] == 0:
    raise ValueError(f"data must have shape (N, H, W, C) with N >= 1, got {data.shape}")
  batch_size = min(batch_size, num_z)
  denoise = as_argument(denoise)

  @jax.jit
  def batch_sum(den, dataset, sigma, ids, weights):  # denoiser and dataset are arguments, not constants
    z = forward_samples(dataset, sigma, ids, seed)
    return abs_jacobian_sum(den, z, sigma, weights, chunk_size=chunk_size)

  def map_at(sigma):
    if not np.isfinite(sigma) or sigma <= 0:
      raise ValueError(f"sigma must be positive and finite, got {sigma}")
    total = None
    for start in range(0, num_z, batch_size):
      ids = np.arange(start, start + batch_size)
      weights = (ids < num_z).astype(np.float32)  # the last batch is padded with zero weights.
      part = np.asarray(batch_sum(denoise, data, jnp.float32(sigma), jnp.asarray(np.minimum(ids, num_z - 1)),
                                  jnp.asarray(weights)), np.float64)
      total = part if total is None else total + part
    return (total / num_z).astype(np.float32)

  return map_at


def sensitivity_map(denoise: Denoiser, data, sigma: float, *, num_z: int = 16, seed: int = 0,
                    batch_size: int = 8, chunk_size: int | None = None) -> np.ndarray:
  """The sensitivity map G[σ] (Eq. 8) of `denoise` at one noise level.

  Args:
    denoise: differentiable `denoise(z, sigma)`; samples of a batch must be independent.
    data: (N, H, W, C) dataset the clean x are drawn from (uint8 or float in [-1, 1]).
    sigma: noise level σ > 0.
    num_z: number of forward-process samples averaged (sample ids 0 … num_z − 1).
    seed: seed of the samples (see :func:`forward_samples`).
    batch_size: z per VJP batch (memory grows linearly with it).
    chunk_size: output pixels per VJP chunk (see :func:`abs_jacobian_sum`).

  Returns:
    float32 (H, W, H, W), non-negative; [h, w] is the map of output pixel (h, w).
  """
  return _map_function(denoise, data, num_z=num_z, seed=seed, batch_size=batch_size,
                       chunk_size=chunk_size)(float(sigma))


def sensitivity_maps(denoise: Denoiser, data, sigmas: Sequence[float], *, num_z: int = 16,
                     seed: int = 0, batch_size: int = 8, chunk_size: int | None = None,
                     progress: Callable[[int, int, float, np.ndarray], None] | None = None
                     ) -> SensitivityMaps:
  """Sensitivity maps (Eq. 8) at several noise levels, compiled once for all of them.

  Args:
    denoise, data, num_z, seed, batch_size, chunk_size: as in :func:`sensitivity_map`.
    sigmas: noise levels σ > 0, in any order (kept).
    progress: called after every σ as `progress(done, total, sigma, map)`, map (H, W, H, W).

  Returns:
    SensitivityMaps with sigmas as float64 (S,) and maps (S, H, W, H, W).
  """
  sigmas = np.asarray(sigmas, np.float64).reshape(-1)
  if sigmas.size == 0:
    raise ValueError("no noise levels given")
  map_at = _map_function(denoise, data, num_z=num_z, seed=seed, batch_size=batch_size,
                         chunk_size=chunk_size)
  maps = []
  for k, sigma in enumerate(sigmas):
    maps.append(map_at(float(sigma)))
    if progress is not None:
      progress(k + 1, len(sigmas), float(sigma), maps[-1])
  return SensitivityMaps(sigmas=sigmas, maps=np.stack(maps))


# --------------------------------------------------------------------------------------------------
# The Fig. 3 (left) statistic.


def captured_mass(maps, pixel: tuple[int, int] | None = None) -> np.ndarray:
  """Fraction of the normalised map mass inside centred squares of radius r = 0, 1, ….

  Each output pixel's map is normalised to sum 1; the square of radius r around output pixel p is
  {q : max(|q_h − p_h|, |q_w − p_w|) ≤ r} clipped to the image (side 2r + 1 before clipping). With
  `pixel=None` the fraction is averaged over all output pixels with a non-zero map (the same as
  capturing the average of all maps, each shifted so its output pixel is at the centre); otherwise it
  is that pixel's.

  Args:
    maps: (..., H, W, H, W) non-negative maps (e.g. one σ, or all S of a SensitivityMaps).
    pixel: an output pixel (h, w), or None for the average over all output pixels.

  Returns:
    float64 (..., R) non-decreasing fractions for r = 0 … R − 1, R = max(H, W); the last entry is 1
    (NaN where every map considered is zero).
  """
  maps = np.asarray(maps, np.float64)
  if maps.ndim < 4 or maps.shape[-4:-2] != maps.shape[-2:]:
    raise ValueError(f"maps must have shape (..., H, W, H, W), got {maps.shape}")
  height, width = maps.shape[-2:]
  lead = maps.shape[:-4]
  if pixel is not None:
    h, w = pixel
    if not (0 <= h < height and 0 <= w < width):
      raise ValueError(f"pixel {pixel} is outside the {height}x{width} image")
    maps = maps[..., h:h + 1, w:w + 1, :, :]
  if pixel is None:
    out_h, out_w = np.divmod(np.arange(height * width), width)
  else:
    out_h, out_w = np.array([pixel[0]]), np.array([pixel[1]])
  # Chebyshev distance from each considered output pixel to every input pixel: (P', H, W).
  dist = np.maximum(np.abs(np.arange(height)[None, :, None] - out_h[:, None, None]),
                    np.abs(np.arange(width)[None, None, :] - out_w[:, None, None]))
  radii = max(height, width)
  flat = maps.reshape(-1, dist.shape[0], height * width)  # (L, P', H·W)
  totals = flat.sum(-1)  # (L, P')
  ring_index = (np.arange(dist.shape[0])[:, None] * radii + dist.reshape(dist.shape[0], -1))
  rings = np.stack([np.bincount(ring_index.ravel(), weights=m.ravel(), minlength=dist.shape[0] * radii)
                    for m in flat]).reshape(flat.shape[0], dist.shape[0], radii)
  valid = totals > 0
  fractions = np.cumsum(rings, axis=-1) / np.where(valid, totals, 1.0)[..., None]
  count = valid.sum(-1)
  mean = np.where(count[:, None] > 0,
                  (fractions * valid[..., None]).sum(1) / np.maximum(count, 1)[:, None], np.nan)
  return mean.reshape(*lead, radii)


def square_capture_sides(maps, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                         pixel: tuple[int, int] | None = None) -> np.ndarray:
  """Side of the smallest centred square capturing each fraction of the map mass (paper Fig. 3 left).

  The side is 2r + 1 for the smallest radius r whose centred square (see :func:`captured_mass`)
  holds at least the fraction of the normalised mass (up to 1e-9 of round-off). With `pixel=None`
  the captured fraction is first averaged over all output pixels. Sides are odd and can exceed the
  image side for off-centre pixels (a corner pixel needs r = H − 1 to see the whole image).

  Args:
    maps: (..., H, W, H, W) non-negative maps.
    fractions: fractions in (0, 1], e.g. (0.5, 0.75, 0.95).
    pixel: an output pixel (h, w), or None for the average over all output pixels.

  Returns:
    float64 (..., F) sides (NaN where every map considered is zero).
  """
  fractions = np.asarray(fractions, np.float64).reshape(-1)
  if fractions.size == 0 or np.any(fractions <= 0) or np.any(fractions > 1):
    raise ValueError(f"fractions must lie in (0, 1], got {fractions.tolist()}")
  curve = captured_mass(maps, pixel)
  reached = curve[..., None, :] >= fractions[:, None] - 1e-9  # (..., F, R)
  radius = np.argmax(reached, axis=-1)
  return np.where(np.isnan(curve[..., :1]), np.nan, 2.0 * radius + 1.0)


# --------------------------------------------------------------------------------------------------
# Files.


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


_EXPECTED_FILES = ("an .npz written by bin/sensitivity (sigmas, maps), or a .npy array (L, H, W, H, W) "
                   "of the official release, map k at σ_k of the L-step EDM grid")


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
  """The metadata dict stored by :func:`save_maps` ({} when there is none, as in official files)."""
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


def nearest_sigma_index(sigmas, sigma):
  """Index of the grid σ nearest to `sigma` in log σ (ties: the lower index).

  σ ≤ 0 maps to the smallest grid σ (the log σ → −∞ limit). Works on concrete values (NumPy result)
  and inside `jax.jit` on traced ones (JAX result).

  Args:
    sigmas: (S,) positive grid.
    sigma: a scalar or an array of any shape.

  Returns:
    int index array of the shape of sigma.
  """
  try:
    sigma_np = np.asarray(sigma, np.float64)
  except jax.errors.TracerArrayConversionError:
    grid = jnp.log(jnp.asarray(sigmas, jnp.float32))
    target = jnp.log(jnp.maximum(jnp.asarray(sigma, jnp.float32), jnp.finfo(jnp.float32).tiny))
    return jnp.argmin(jnp.abs(target[..., None] - grid), axis=-1)
  grid = np.log(np.asarray(sigmas, np.float64))
  target = np.log(np.maximum(sigma_np, np.finfo(np.float64).tiny))
  return np.argmin(np.abs(target[..., None] - grid), axis=-1)


def maps_for_sigma(maps: SensitivityMaps, sigma):
  """The map of the grid σ nearest to `sigma` in log σ (:func:`nearest_sigma_index`).

  Args:
    maps: the grid of maps.
    sigma: a scalar, or (B,) for one map per sample; may be traced under `jax.jit`.

  Returns:
    (H, W, H, W) for a scalar sigma, (B, H, W, H, W) for (B,); NumPy for concrete sigma, JAX when
    traced.
  """
  index = nearest_sigma_index(maps.sigmas, sigma)
  if isinstance(index, np.ndarray):
    return maps.maps[index]
  return jnp.asarray(maps.maps)[index]


# --------------------------------------------------------------------------------------------------
# The job behind bin/sensitivity.


def _part_path(parts_dir: str, sigma: float) -> str:
  return sigma_part_path(parts_dir, sigma, ".npz")


def _same_config(meta: dict, config: dict) -> bool:
  return all(meta.get(k) == v for k, v in json.loads(json.dumps(config)).items())


def sensitivity_run(denoise: Denoiser, data, sigmas: Sequence[float], *, out: str, config: dict,
                    num_z: int, seed: int, batch_size: int = 8, chunk_size: int | None = None,
                    pixels: Sequence[tuple[int, int]] = (), capture_pixel=None,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict:
  """Computes, saves and plots sensitivity maps, resuming an interrupted run.

  Each finished σ is saved at once as its own maps file in `<out stem>_parts/` (with `config`, num_z
  and seed in its meta); a rerun with the same configuration loads those, and the σ of an existing
  `out` file of the same configuration, and computes only the rest. When all σ are done, `out` holds
  them in the order of `sigmas` and the part files are removed. Next to `out` go
  `<stem>_heatmaps.png` (maps of `pixels` × σ, Fig. 3 right) and `<stem>_capture.png` (sides of the
  centred squares capturing `fractions` of the mass vs σ, Fig. 3 left) with `<stem>_capture.json`.

  Args:
    denoise, data, num_z, seed, batch_size, chunk_size: as in :func:`sensitivity_maps`.
    sigmas: noise levels σ > 0.
    out: path of the maps file.
    config: JSON-able description of the run (denoiser, checkpoint, dataset, ...), stored in meta and
      compared on resume.
    pixels: output pixels (h, w) shown in the heatmap figure.
    capture_pixel: output pixel of the capture statistic, or None for the average over all pixels.
    fractions: mass fractions of the capture statistic.

  Returns:
    Summary dict: out, figure paths, number of σ computed and reused, seconds, capture sides.

  Raises:
    ValueError: an existing part or out file holds a run of a different configuration.
  """
  from pspc_jax import plots  # Imported here: the library itself does not need matplotlib.

  start = time.perf_counter()
  sigmas = [float(s) for s in sigmas]
  config = {**config, "num_z": int(num_z), "seed": int(seed)}
  stem = os.path.splitext(out)[0]
  parts_dir = stem + "_parts"

  def read_same_config(path) -> SensitivityMaps:
    if not _same_config(load_maps_meta(path), config):
      raise ValueError(f"{path} holds maps of a different configuration; choose another --out or "
                       "delete it")
    return load_maps(path)

  finished = None
  if os.path.exists(out):
    previous = read_same_config(out)
    finished = (previous.sigmas, lambda j: previous.maps[j])
  done = resume_per_sigma(sigmas, lambda sigma: _part_path(parts_dir, sigma),
                          lambda path: read_same_config(path).maps[0], finished)
  reused = len(done)

  todo = [k for k in range(len(sigmas)) if k not in done]
  if todo:
    os.makedirs(parts_dir, exist_ok=True)
    clock = {"last": time.perf_counter()}

    def report(count, total, sigma, map_):
      k = todo[count - 1]
      save_maps(_part_path(parts_dir, sigma),
                SensitivityMaps(np.array([sigma]), map_[None]), config)
      done[k] = map_
      now = time.perf_counter()
      print(f"sigma {count}/{total} = {sigma:.4g}: {now - clock['last']:.1f}s "
            f"(elapsed {now - start:.1f}s)", flush=True)
      clock["last"] = now

    sensitivity_maps(denoise, data, [sigmas[k] for k in todo], num_z=num_z, seed=seed,
                     batch_size=batch_size, chunk_size=chunk_size, progress=report)

  result = SensitivityMaps(np.asarray(sigmas, np.float64),
                           np.stack([done[k] for k in range(len(sigmas))]))
  save_maps(out, result, {**config, "seconds": time.perf_counter() - start})
  for sigma in sigmas:
    path = _part_path(parts_dir, sigma)
    if os.path.exists(path):
      os.remove(path)
  if os.path.isdir(parts_dir) and not os.listdir(parts_dir):
    os.rmdir(parts_dir)

  sides = square_capture_sides(result.maps, fractions, capture_pixel)
  heatmap_path, capture_path = stem + "_heatmaps.png", stem + "_capture.png"
  if pixels:
    plots.save_sensitivity_heatmaps(heatmap_path, result.sigmas, result.maps, pixels)
  where = "all output pixels" if capture_pixel is None else f"output pixel {tuple(capture_pixel)}"
  plots.save_capture_plot(capture_path, result.sigmas, sides, fractions,
                          image_side=max(result.maps.shape[1:3]),
                          title=f"centred square capturing the sensitivity mass ({where})")
  capture = {"sigmas": result.sigmas.tolist(), "fractions": list(map(float, fractions)),
             "capture_pixel": None if capture_pixel is None else list(capture_pixel),
             "sides": sides.tolist()}
  save_json(stem + "_capture.json", capture)
  return {"out": out, "heatmaps": heatmap_path if pixels else None, "capture": capture_path,
          "computed": len(todo), "reused": reused, "seconds": time.perf_counter() - start,
          "sides": sides}
