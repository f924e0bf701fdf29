"""Denoisers by name: `make_denoiser("pspc_square", data, **options)` returns a denoiser value.

Every builder takes the training set (N, H, W, C) (uint8 or float in [-1, 1]) and keyword options and
returns a `values.Denoiser`: a pytree with `__call__(z, sigma)` (z (B, H, W, C) float32, sigma scalar or
(B,), mixed levels allowed) to pass into `jax.jit`, `jax.grad`, `pspc_jax.sample` and
`pspc_jax.distributed.shard` as an argument. Options are values, never file names: the command-line
layer reads sensitivity maps and checkpoints (`pspc_jax.cli.denoiser_options`). Later modules add
names with `@register("name")`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from pspc_jax import schedules, validation
from pspc_jax.denoisers import values
from pspc_jax.denoisers.flex import SensitivityMaps
from pspc_jax.denoisers.gaussian import gaussian_stats
from pspc_jax.denoisers.gaussian_flex import cover_every_pixel, gaussian_sensitivity_maps
from pspc_jax.edm import EDMPrecond, Preconditioning, edm_sigmas

Denoiser = values.Denoiser
_BUILDERS: dict[str, Callable[..., Denoiser]] = {}


def register(name: str):
  """Decorator adding a builder `builder(data, **options) -> Denoiser` under `name`."""
  def add(builder):
    _BUILDERS[name] = builder
    return builder
  return add


def available_denoisers() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def make_denoiser(name: str, data, **options) -> Denoiser:
  """Builds the denoiser registered as `name` over the training set `data`, as a value.

  The training set is checked here once (`validation.check_data`: uint8, or float within [-1, 1];
  the value range is scanned when the data is concrete), before any denoiser is built. To shard the
  dataset over devices, wrap the result: `pspc_jax.distributed.shard(make_denoiser(...), mesh)`.

  Raises:
    ValueError: unknown name (the message lists the known ones), data that is not (N, H, W, C) with
      N ≥ 1 training images of a valid dtype and range, an option the denoiser does not take (the
      message lists those it takes), or a bad option value.
  """
  build = builder(name)
  taken = [p for p in inspect.signature(build).parameters if p != "data"]
  unknown = sorted(set(options) - set(taken))
  if unknown:
    raise ValueError(f"the {name} denoiser takes no option {', '.join(map(repr, unknown))}; its "
                     f"options are {', '.join(taken) or 'none'}")
  if np.ndim(data) != 4 or np.shape(data)[0] == 0:
    raise ValueError(f"data must have shape (N, H, W, C) with N >= 1 training images, got "
                     f"{np.shape(data)}")
  validation.check_data(data)
  return build(data, **options)


def builder(name: str) -> Callable[..., Denoiser]:
  """The builder registered as `name` (ValueError when unknown)."""
  if name not in _BUILDERS:
    raise ValueError(f"unknown denoiser {name!r}; choose one of {', '.join(available_denoisers())}")
  return _BUILDERS[name]


def _size_schedule(spec, parse: Callable[[str, Any], schedules.SigmaSchedule],
                   shape) -> schedules.SigmaSchedule:
  """A patch-size schedule from a SigmaSchedule, one integer size (int or NumPy integer; not a float
  or bool), or a spec string for `parse(spec, shape)` (`shape`: the image side or (H, W), as `parse`
  takes it). ValueError naming `patch_schedule` otherwise."""
  if isinstance(spec, str):
    return parse(spec, shape)
  if not isinstance(spec, schedules.SigmaSchedule):
    return parse(str(validation.positive_int(spec, "patch_schedule")), shape)
  for size in spec.values:
    validation.positive_int(size, "patch_schedule")
  return spec


@register("empirical")
def _empirical(data, *, chunk_size: int | None = None) -> Denoiser:
  validation.positive_int(chunk_size, "chunk_size", optional=True)
  return values.EmpiricalDenoiser(data, chunk_size)


@register("pspc_square")
def _pspc_square(data, *, patch_schedule: schedules.SigmaSchedule | int | str = "auto",
                 chunk_size: int | None = None) -> Denoiser:
  """`patch_schedule`: a SigmaSchedule, a fixed patch size, or a spec for `parse_patch_schedule`."""
  shape = (data.shape[1], data.shape[2])  # sizes apply as min(s, H) × min(s, W): max(H, W) is full
  patch_schedule = _size_schedule(patch_schedule, schedules.parse_patch_schedule, shape)
  validation.positive_int(chunk_size, "chunk_size", optional=True)
  return values.PSPCSquareDenoiser(data, patch_schedule, chunk_size)


@register("pspc_flex")
def _pspc_flex(data, *, maps: SensitivityMaps | None = None,
               thresholds: schedules.SigmaSchedule | float | str = "cifar10",
               chunk_size: int | None = None, method: str = "auto") -> Denoiser:
  """`maps`: the `SensitivityMaps` (read a file with `pspc_jax.maps_files.load_maps`); each sample
  uses the maps of the nearest σ in log σ. `thresholds`: a λ SigmaSchedule, one number, or a spec for
  `schedules.parse_threshold_schedule` (default: the paper's CIFAR-10 values)."""
  if not isinstance(maps, SensitivityMaps):
    raise ValueError("the pspc_flex denoiser needs sensitivity maps: maps=SensitivityMaps "
                     "(pspc_jax.load_maps(path) reads a file; --maps=FILE at the command line), "
                     f"got {type(maps).__name__}")
  return values.make_flex_denoiser(data, maps.sigmas, maps.maps, thresholds, chunk_size=chunk_size,
                                   method=method)


@register("gaussian")
def _gaussian(data, *, rank: int | None = None) -> Denoiser:
  return values.GaussianDenoiser(gaussian_stats(data, rank=rank))


@register("pspc_flex_gaussian")
def _pspc_flex_gaussian(data, *, rank: int | None = None, sigmas=None,
                        thresholds: schedules.SigmaSchedule | float | str = "cifar10",
                        chunk_size: int | None = None, method: str = "auto") -> Denoiser:
  """Ours, not in the paper: PSPC-Flex whose masks come from the Gaussian denoiser's exact
  sensitivity maps (`gaussian_flex.gaussian_sensitivity_maps`) instead of a network's, so it needs no
  trained network and no maps file. The Gaussian fit is `gaussian_stats(data, rank=rank)`; the maps are
  computed at `sigmas` (default: the 18-step EDM grid without its final 0); `thresholds`, `chunk_size`
  and `method` are those of `pspc_flex` (default λ: the paper's CIFAR-10 values, which were tuned for
  network maps, not for these). Where those masks would leave a pixel in no mask (pixels of little or
  no variance, e.g. the digits' blank borders, which the Gaussian ignores), its own map is raised at
  itself so that its own mask holds it (`gaussian_flex.cover_every_pixel`); otherwise this is exactly
  `pspc_flex` with these maps."""
  stats = gaussian_stats(data, rank=rank)
  sigmas = np.asarray(edm_sigmas(18))[:-1] if sigmas is None else sigmas
  maps = gaussian_sensitivity_maps(stats, sigmas, tuple(data.shape[1:]))

  def build(maps):
    return values.make_flex_denoiser(data, maps.sigmas, maps.maps, thresholds,
                                     chunk_size=chunk_size, method=method)
  try:
    return build(maps)
  except ValueError as err:
    if "covered by no mask" not in str(err):
      raise
  return build(cover_every_pixel(maps, thresholds)[0])


@register("network")
def _network(data, *, module: Any = None, params: Any = None,
             precond: Preconditioning = EDMPrecond()) -> Denoiser:
  """A network from its Flax `module`, `params` and preconditioning `precond` (`pspc_jax.edm`:
  EDMPrecond(σ_data), EDM's VPPrecond or VEPrecond); a checkpoint gives all three
  (`pspc_jax.checkpoints.load_network` and `checkpoints.preconditioning`; --checkpoint=DIR at the
  command line)."""
  if module is None or params is None:
    raise ValueError("the network denoiser needs a checkpoint: module= and params= (pspc_jax.checkpoints."
                     "load_network(path) reads them; --checkpoint=DIR at the command line)")
  del data  # the network does not read the training set
  return values.NetworkDenoiser(params, module, precond)


@register("els")
def _els(data, *, patch_schedule: schedules.SigmaSchedule | int | str = "auto",
         equivariant: bool = True, boundary: str = "zeros", chunk_size: int | None = None) -> Denoiser:
  """Equivariant local score machine (Kamb & Ganguli; `els.els_denoise`). `patch_schedule`: a
  SigmaSchedule, one odd patch size, or a spec for `els.parse_els_patch_schedule` ("auto": the PSPC
  schedule rescaled to the image side and made odd, full image → 2·side − 1). `equivariant=False` gives
  their LS machine; `boundary`: "zeros" (default) or "circular"."""
  from pspc_jax.denoisers.els import parse_els_patch_schedule

  patch_schedule = _size_schedule(patch_schedule, parse_els_patch_schedule,
                                  max(data.shape[1], data.shape[2]))
  validation.positive_int(chunk_size, "chunk_size", optional=True)
  return values.ELSDenoiser(data, patch_schedule, bool(equivariant), boundary, chunk_size)


@register("cfdm")
def _cfdm(data, *, smoothing: float | None = None, num_noise: int | None = None, noise_seed: int = 0,
          chunk_size: int | None = None) -> Denoiser:
  """Smoothed closed-form diffusion model (Scarvelis et al.; `cfdm.cfdm_denoise`). `smoothing`: the
  paper's smoothing parameter σ (default `cfdm.DEFAULT_SMOOTHING` = 0.3; 0 = the optimal empirical
  denoiser); `num_noise`: fixed Monte-Carlo draws of the smoothing noise (default 8)."""
  from pspc_jax.denoisers import cfdm

  smoothing = cfdm.DEFAULT_SMOOTHING if smoothing is None else smoothing
  validation.check_non_negative(smoothing, "smoothing")
  num_noise = validation.positive_int(num_noise, "num_noise", optional=True) or cfdm.DEFAULT_NUM_NOISE
  noise_seed = validation.positive_int(noise_seed, "noise_seed", minimum=0)
  validation.positive_int(chunk_size, "chunk_size", optional=True)
  return values.CFDMDenoiser(data, float(smoothing), num_noise, noise_seed, chunk_size)
