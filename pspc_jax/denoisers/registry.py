"""Denoisers by name: `make_denoiser("pspc_square", data) -> denoise(z, sigma)`.

Every builder takes the training set (N, H, W, C) (uint8 or float in [-1, 1]) and keyword options and
returns a pure `denoise(z, sigma)` closure (z (B, H, W, C) float32, sigma scalar or (B,), mixed levels
allowed) that can be passed to `jax.jit` and to `pspc_jax.sample`. Later modules add names with
`@register("name")`.

Builders that accept the keyword options `axis_name` and `valid_rows` (empirical, pspc_square,
pspc_flex) can run with the dataset sharded over devices: `make_denoiser(name, data, mesh=mesh)`
(`pspc_jax.distributed`) calls them inside `jax.shard_map` with this device's shard as `data`.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from pspc_jax import images, schedules, validation
from pspc_jax.denoisers.empirical import empirical_denoise
from pspc_jax.denoisers.flex import make_flex_denoiser
from pspc_jax.denoisers.gaussian import gaussian_denoise, gaussian_stats
from pspc_jax.denoisers.pspc import pspc_square_denoise

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
_BUILDERS: dict[str, Callable[..., Denoiser]] = {}


def register(name: str):
  """Decorator adding a builder `builder(data, **options) -> Denoiser` under `name`."""
  def add(builder):
    _BUILDERS[name] = builder
    return builder
  return add


def available_denoisers() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def make_denoiser(name: str, data, *, mesh=None, **options) -> Denoiser:
  """Builds the denoiser registered as `name` over the training set `data`.

  With a device `mesh` (`pspc_jax.distributed.make_mesh`), the dataset is sharded over the mesh's
  "data" axis and query batches over its "batch" axis (`distributed.sharded_denoiser`); the results
  equal the single-device ones up to float32 rounding.

  The training set is checked here once (`validation.check_data`: uint8, or float within [-1, 1];
  the value range is scanned when the data is concrete), before any denoiser is built.

  Raises:
    ValueError: unknown name (the message lists the known ones), bad data, bad options, or a mesh for
      a denoiser that cannot shard its dataset.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown denoiser {name!r}; choose one of {', '.join(available_denoisers())}")
  if mesh is not None:
    # Imported here: it imports this module.
    from pspc_jax.distributed import ShardedDataset, sharded_denoiser

    validation.check_data(data.images if isinstance(data, ShardedDataset) else data)
    return sharded_denoiser(name, data, mesh, **options)
  validation.check_data(data)
  return _BUILDERS[name](data, **options)


def builder(name: str) -> Callable[..., Denoiser]:
  """The builder registered as `name` (ValueError when unknown)."""
  if name not in _BUILDERS:
    raise ValueError(f"unknown denoiser {name!r}; choose one of {', '.join(available_denoisers())}")
  return _BUILDERS[name]


def _size_schedule(spec, parse: Callable[[str, int], schedules.SigmaSchedule],
                   side: int) -> schedules.SigmaSchedule:
  """A patch-size schedule from a SigmaSchedule, one integer size (int or NumPy integer; not a float
  or bool), or a spec string for `parse(spec, side)`. ValueError naming `patch_schedule` otherwise."""
  if isinstance(spec, str):
    return parse(spec, side)
  if not isinstance(spec, schedules.SigmaSchedule):
    return parse(str(validation.positive_int(spec, "patch_schedule")), side)
  for size in spec.values:
    validation.positive_int(size, "patch_schedule")
  return spec


@register("empirical")
def _empirical(data, *, chunk_size: int | None = None, axis_name=None,
               valid_rows: int | None = None) -> Denoiser:
  validation.positive_int(chunk_size, "chunk_size", optional=True)

  def denoise(z, sigma):
    return empirical_denoise(z, sigma, data, chunk_size=chunk_size, axis_name=axis_name,
                             valid_rows=valid_rows)
  return denoise


@register("pspc_square")
def _pspc_square(data, *, patch_schedule: schedules.SigmaSchedule | int | str = "auto",
                 chunk_size: int | None = None, axis_name=None,
                 valid_rows: int | None = None) -> Denoiser:
  """`patch_schedule`: a SigmaSchedule, a fixed patch size, or a spec for `parse_patch_schedule`."""
  shape = (data.shape[1], data.shape[2])  # sizes apply as min(s, H) × min(s, W): max(H, W) is full
  patch_schedule = _size_schedule(patch_schedule, schedules.parse_patch_schedule, shape)
  validation.positive_int(chunk_size, "chunk_size", optional=True)

  def make_branch(patch_size):
    def denoise(z, sigma):
      return pspc_square_denoise(z, sigma, data, patch_size, chunk_size=chunk_size,
                                 axis_name=axis_name, valid_rows=valid_rows)
    return denoise

  return schedules.dispatch(patch_schedule, make_branch)


@register("pspc_flex")
def _pspc_flex(data, *, heatmaps: str | None = None,
               thresholds: schedules.SigmaSchedule | float | str = "cifar10",
               chunk_size: int | None = None, method: str = "auto", axis_name=None,
               valid_rows: int | None = None) -> Denoiser:
  """`heatmaps`: a sensitivity-map .npz (`pspc_jax.sensitivity.save_maps`, e.g. from bin/sensitivity);
  each sample uses the maps of the nearest σ of that file in log σ. `thresholds`: a λ SigmaSchedule, one
  number, or a spec for `schedules.parse_threshold_schedule` (default: the paper's CIFAR-10 values)."""
  if not heatmaps:
    raise ValueError("the pspc_flex denoiser needs sensitivity maps (--heatmaps=FILE.npz, written by "
                     "bin/sensitivity)")
  validation.positive_int(chunk_size, "chunk_size", optional=True)
  # Imported here so that the other denoisers do not depend on the sensitivity module.
  from pspc_jax.sensitivity import load_maps

  maps = load_maps(heatmaps)
  image = tuple(data.shape[1:3])
  if tuple(maps.maps.shape[1:]) != image + image:
    raise ValueError(f"{heatmaps}: maps of {tuple(maps.maps.shape[1:3])} images do not fit the "
                     f"{image} training images")
  return make_flex_denoiser(data, maps.sigmas, maps.maps, thresholds, chunk_size=chunk_size,
                            method=method, axis_name=axis_name, valid_rows=valid_rows)


@register("gaussian")
def _gaussian(data, *, rank: int | None = None) -> Denoiser:
  stats = gaussian_stats(data, rank=rank)

  def denoise(z, sigma):
    return gaussian_denoise(z, sigma, stats)
  return denoise


@register("network")
def _network(data, *, checkpoint: str | None = None) -> Denoiser:
  """A trained (`bin/train`) or converted network with EDM preconditioning, from `checkpoint`: a
  training workdir, its checkpoints/ folder or one step folder (newest step unless a step folder)."""
  if not checkpoint:
    raise ValueError("the network denoiser needs a checkpoint (--checkpoint=DIR)")
  # Imported here so that the other denoisers do not pay for importing orbax.
  from pspc_jax.checkpoints import load_network
  from pspc_jax.nets.precond import edm_denoiser

  module, params, meta = load_network(checkpoint, image_shape=data.shape[1:])
  apply = jax.jit(lambda p, z, sigma: edm_denoiser(module, p, sigma_data=meta["sigma_data"])(z, sigma))

  def denoise(z, sigma):
    # σ checked (concrete) or made NaN where invalid (traced), as in the other denoisers.
    validation.check_finite(z, "z")
    sigma = images.sigma_per_sample(sigma, np.shape(z)[0])
    return apply(params, z, sigma)  # params stay an argument, not constants compiled into the graph
  return denoise


@register("els")
def _els(data, *, patch_schedule: schedules.SigmaSchedule | int | str = "auto",
         equivariant: bool = True, boundary: str = "zeros", chunk_size: int | None = None) -> Denoiser:
  """Equivariant local score machine (Kamb & Ganguli; `els.els_denoise`). `patch_schedule`: a
  SigmaSchedule, one odd patch size, or a spec for `els.parse_els_patch_schedule` ("auto": the PSPC
  schedule rescaled to the image side and made odd, full image → 2·side − 1). `equivariant=False` gives
  their LS machine; `boundary`: "zeros" (default) or "circular"."""
  from pspc_jax.denoisers.els import els_denoise, parse_els_patch_schedule

  patch_schedule = _size_schedule(patch_schedule, parse_els_patch_schedule,
                                  max(data.shape[1], data.shape[2]))
  validation.positive_int(chunk_size, "chunk_size", optional=True)

  def make_branch(patch_size):
    def denoise(z, sigma):
      return els_denoise(z, sigma, data, patch_size, equivariant=equivariant, boundary=boundary,
                         chunk_size=chunk_size)
    return denoise

  return schedules.dispatch(patch_schedule, make_branch)


@register("cfdm")
def _cfdm(data, *, smoothing: float | None = None, num_noise: int | None = None, noise_seed: int = 0,
          chunk_size: int | None = None) -> Denoiser:
  """Smoothed closed-form diffusion model (Scarvelis et al.; `cfdm.cfdm_denoise`). `smoothing`: the
  paper's smoothing parameter σ (default `cfdm.DEFAULT_SMOOTHING` = 0.3; 0 = the optimal empirical
  denoiser); `num_noise`: fixed Monte-Carlo draws of the smoothing noise (default 8)."""
  from pspc_jax.denoisers import cfdm

  smoothing = cfdm.DEFAULT_SMOOTHING if smoothing is None else smoothing
  validation.check_non_negative(smoothing, "smoothing")
  smoothing = float(smoothing)
  num_noise = validation.positive_int(num_noise, "num_noise", optional=True) or cfdm.DEFAULT_NUM_NOISE
  validation.positive_int(noise_seed, "noise_seed", minimum=0)
  validation.positive_int(chunk_size, "chunk_size", optional=True)

  def denoise(z, sigma):
    return cfdm.cfdm_denoise(z, sigma, data, smoothing, num_noise=num_noise, noise_seed=noise_seed,
                             chunk_size=chunk_size)
  return denoise
