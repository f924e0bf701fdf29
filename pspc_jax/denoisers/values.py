"""Denoisers as values: pytrees whose leaves are arrays and whose configuration is static.

Every denoiser here satisfies the one `Denoiser` protocol, `denoiser(z, sigma) -> x_hat` with z
(B, H, W, C) float32 and sigma a scalar or (B,), and is a `flax.struct.dataclass`: its arrays (the
training set, Gaussian statistics, network parameters, mask index lists) are pytree leaves and its
configuration (patch schedules, chunk sizes, mesh axes) is static and hashable. A denoiser is therefore
passed *into* `jax.jit`, `jax.vmap`, `jax.grad` and `jax.shard_map` as an argument:

    run = jax.jit(lambda denoiser, latents: pj.sample(denoiser, latents, pj.edm_sigmas(18)))
    samples = run(pj.make_denoiser("pspc_square", data), latents)

so the training set is an input of the compiled program, never a constant compiled into it (closing over
it costs seconds of compilation per call site at CIFAR-10 scale and breaks multi-host runs).

Shardable denoisers (empirical, pspc_square, pspc, pspc_flex) hold the training set in `data` and the
static fields `axis_name` and `valid_rows`; `pspc_jax.distributed.shard` wraps one from outside.
This module does no file I/O: maps, checkpoints and datasets are read by the command-line layer.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from pspc_jax import conventions, schedules, validation
from pspc_jax.denoisers.cfdm import DEFAULT_NUM_NOISE, DEFAULT_SMOOTHING, cfdm_denoise
from pspc_jax.denoisers.els import els_denoise
from pspc_jax.denoisers.empirical import empirical_denoise
from pspc_jax.denoisers.flex import SensitivityMaps, flex_branches
from pspc_jax.denoisers.gaussian import GaussianStats, gaussian_denoise
from pspc_jax.denoisers.pspc import composite_denoise, pixel_major_data, pspc_square_denoise
from pspc_jax.edm import EDMPrecond, Preconditioning

# Largest pixel-major dataset copy (bytes) `with_pixel_major` adds to a denoiser value by default.
DEFAULT_PIXEL_MAJOR_BYTES = 1 << 30


@runtime_checkable
class Denoiser(Protocol):
  """`denoiser(z, sigma) -> x_hat`: z (B, H, W, C) float32 in [-1, 1] units plus noise, sigma a
  scalar or (B,) EDM noise level (a batch may mix levels), x_hat (B, H, W, C) float32."""

  def __call__(self, z: jax.Array, sigma) -> jax.Array:
    ...


# A denoiser value: a frozen pytree dataclass, hashed by identity (eq=False), so that `jax.jit(denoiser)`
# works too (a field-wise hash would hash the arrays).
denoiser_value = functools.partial(struct.dataclass, eq=False)


def static(default=None):
  """A static (hashable, compiled-in) field of a denoiser value."""
  return struct.field(pytree_node=False, default=default)


def _dispatch_sizes(denoiser, branch, z, sigma):
  """`branch(denoiser, patch_size, z, sigma)` with each sample's size from `denoiser.patch_schedule`
  (`schedules.dispatch`: one branch per distinct size, run when a sample of the batch needs it)."""
  def make_branch(patch_size):
    return functools.partial(branch, denoiser, int(patch_size))
  return schedules.dispatch(denoiser.patch_schedule, make_branch)(z, sigma)


def _shards(denoiser) -> dict:
  return {"axis_name": denoiser.axis_name, "valid_rows": denoiser.valid_rows}


@denoiser_value
class EmpiricalDenoiser:
  """The optimal empirical denoiser (Eq. 6-7; `empirical.empirical_denoise`) over `data`.

  Attributes:
    data: (N, H, W, C) training images, uint8 or float in [-1, 1] (with `axis_name`: a device shard).
    chunk_size, axis_name, valid_rows: as `empirical_denoise` (static).
  """
  data: jax.Array
  chunk_size: int | None = static()
  axis_name: Any = static()
  valid_rows: int | None = static()

  def __call__(self, z, sigma):
    return empirical_denoise(z, sigma, self.data, chunk_size=self.chunk_size, **_shards(self))


@denoiser_value
class PSPCSquareDenoiser:
  """PSPC-Square (Eq. 11 over all s×s windows), s = `patch_schedule(σ)` per sample.

  Attributes:
    data: (N, H, W, C) training images.
    patch_schedule: a `schedules.SigmaSchedule` of patch sizes (static); a fixed s is a one-entry
      schedule.
    chunk_size, axis_name, valid_rows: as `pspc.pspc_square_denoise` (static).
    data_major: None, or `pspc.pixel_major_data(data)` (a leaf; speed only, see `with_pixel_major`).
  """
  data: jax.Array
  patch_schedule: schedules.SigmaSchedule = static()
  chunk_size: int | None = static()
  axis_name: Any = static()
  valid_rows: int | None = static()
  data_major: Any = None

  def __call__(self, z, sigma):
    return _dispatch_sizes(self, _square_branch, z, sigma)


def _square_branch(denoiser: PSPCSquareDenoiser, patch_size: int, z, sigma):
  return pspc_square_denoise(z, sigma, denoiser.data, patch_size, chunk_size=denoiser.chunk_size,
                             data_major=denoiser.data_major, **_shards(denoiser))


@denoiser_value
class PSPCDenoiser:
  """PSPC over one fixed set of cropping masks (Eq. 11; `pspc.pspc_denoise`).

  Attributes:
    data: (N, H, W, C) training images.
    masks: a mask set pytree (`masks.PixelMasks` or `masks.IndexMasks`) covering every pixel.
    chunk_size, axis_name, valid_rows: as `pspc.composite_denoise` (static).
    data_major: None, or `pspc.pixel_major_data(data)` (a leaf; speed only, see `with_pixel_major`).
  """
  data: jax.Array
  masks: Any
  chunk_size: int | None = static()
  axis_name: Any = static()
  valid_rows: int | None = static()
  data_major: Any = None

  def __call__(self, z, sigma):
    return composite_denoise(z, sigma, self.data, self.masks, chunk_size=self.chunk_size,
                             data_major=self.data_major, **_shards(self))


@denoiser_value
class PSPCFlexDenoiser:
  """PSPC-Flex (Eq. 12): per sample, the masks of the nearest maps σ cut at λ(σ) (`flex.flex_branches`).

  Attributes:
    data: (N, H, W, C) training images.
    masks: one mask set pytree per branch (None: the λ ≥ 1 branch, the optimal empirical denoiser).
    table: (S, T) int32 branch of (maps index, threshold index).
    map_schedule, thresholds: σ → maps index and σ → λ (static).
    chunk_size, axis_name, valid_rows: as `pspc.composite_denoise` (static).
    data_major: None, or `pspc.pixel_major_data(data)` (a leaf; speed only, see `with_pixel_major`).
  """
  data: jax.Array
  masks: tuple
  table: jax.Array
  map_schedule: schedules.SigmaSchedule = static()
  thresholds: schedules.SigmaSchedule = static()
  chunk_size: int | None = static()
  axis_name: Any = static()
  valid_rows: int | None = static()
  data_major: Any = None

  def __call__(self, z, sigma):
    def branch_index(sigma):
      return self.table[self.map_schedule.index(sigma), self.thresholds.index(sigma)]
    branches = [functools.partial(_flex_branch, self, k) for k in range(len(self.masks))]
    return schedules.dispatch_indexed(branch_index, branches)(z, sigma)


def _flex_branch(denoiser: PSPCFlexDenoiser, index: int, z, sigma):
  masks = denoiser.masks[index]
  if masks is None:
    return empirical_denoise(z, sigma, denoiser.data, chunk_size=denoiser.chunk_size,
                             **_shards(denoiser))
  return composite_denoise(z, sigma, denoiser.data, masks, chunk_size=denoiser.chunk_size,
                           data_major=denoiser.data_major, **_shards(denoiser))


def with_pixel_major(denoiser, max_bytes: int = DEFAULT_PIXEL_MAJOR_BYTES):
  """`denoiser` (a PSPC-Square, PSPC or PSPC-Flex value) holding a pixel-major copy of its training set.

  The copy (`pspc.pixel_major_data`, the dataset's size in its own dtype) saves every call the
  per-chunk transposes of the pixel-major passes: about a tenth of a PSPC call on CPU, with the same
  results bit for bit (`pspc.composite_denoise`, `data_major`). A denoiser that already has one, whose
  dataset is sharded (`axis_name`) or whose copy would exceed `max_bytes` is returned unchanged;
  `distributed.shard` drops the copy.

  Raises:
    ValueError: a denoiser without a `data_major` field, or max_bytes < 0.
  """
  if not hasattr(denoiser, "data_major"):
    raise ValueError(f"a {type(denoiser).__name__} takes no pixel-major dataset copy")
  max_bytes = validation.positive_int(max_bytes, "max_bytes", minimum=0)
  data = denoiser.data
  size = data.size * data.dtype.itemsize
  if denoiser.data_major is not None or denoiser.axis_name is not None or size > max_bytes:
    return denoiser
  return denoiser.replace(data_major=pixel_major_data(data))


def make_flex_denoiser(data, sigmas, maps, thresholds=None, *, metric: str = "log",
                       chunk_size: int | None = None, method: str = "auto") -> PSPCFlexDenoiser:
  """PSPC-Flex with σ-dependent maps and thresholds, as a denoiser value (masks computed now).

  Args:
    data: (N, H, W, C) uint8 or float training images.
    sigmas: (S,) noise levels of the maps, > 0.
    maps: (S, H, W, H, W) non-negative sensitivity maps; maps[k, h, w] is the map of output pixel
      (h, w) at sigmas[k].
    thresholds, metric, method: as `flex.flex_branches`.
    chunk_size: dataset rows per streamed chunk.

  Returns:
    The denoiser value, holding a pixel-major copy of `data` when it is at most
    `DEFAULT_PIXEL_MAJOR_BYTES` (`with_pixel_major`).

  Raises:
    ValueError: bad maps or thresholds, or a pixel covered by no mask in some branch.
  """
  validation.positive_int(chunk_size, "chunk_size", optional=True)
  branches = flex_branches(SensitivityMaps(sigmas, maps), tuple(data.shape[1:3]), thresholds,
                           metric=metric, method=method)
  return with_pixel_major(PSPCFlexDenoiser(data, branches.masks, jnp.asarray(branches.table),
                                           branches.map_schedule, branches.thresholds, chunk_size))


@denoiser_value
class GaussianDenoiser:
  """The Gaussian denoiser μ + Σ(Σ+σ²I)⁻¹(z−μ) (`gaussian.gaussian_denoise`) of a fit `stats`."""
  stats: GaussianStats

  def __call__(self, z, sigma):
    return gaussian_denoise(z, sigma, self.stats)


@denoiser_value
class ELSDenoiser:
  """ELS / LS machine (Kamb & Ganguli; `els.els_denoise`), patch size k = `patch_schedule(σ)`.

  Attributes:
    data: (N, H, W, C) training images.
    patch_schedule: `SigmaSchedule` of odd patch sizes (static).
    equivariant, boundary, chunk_size: as `els_denoise` (static).
  """
  data: jax.Array
  patch_schedule: schedules.SigmaSchedule = static()
  equivariant: bool = static(True)
  boundary: str = static("zeros")
  chunk_size: int | None = static()

  def __call__(self, z, sigma):
    return _dispatch_sizes(self, _els_branch, z, sigma)


def _els_branch(denoiser: ELSDenoiser, patch_size: int, z, sigma):
  return els_denoise(z, sigma, denoiser.data, patch_size, equivariant=denoiser.equivariant,
                     boundary=denoiser.boundary, chunk_size=denoiser.chunk_size)


@denoiser_value
class CFDMDenoiser:
  """σ-smoothed closed-form diffusion model (Scarvelis et al.; `cfdm.cfdm_denoise`).

  Attributes:
    data: (N, H, W, C) training images.
    smoothing: the paper's smoothing parameter (≥ 0; 0 = the optimal empirical denoiser) (static).
    num_noise, noise_seed, chunk_size: as `cfdm_denoise` (static).
  """
  data: jax.Array
  smoothing: float = static(DEFAULT_SMOOTHING)
  num_noise: int = static(DEFAULT_NUM_NOISE)
  noise_seed: int = static(0)
  chunk_size: int | None = static()

  def __call__(self, z, sigma):
    return cfdm_denoise(z, sigma, self.data, self.smoothing, num_noise=self.num_noise,
                        noise_seed=self.noise_seed, chunk_size=self.chunk_size)


@denoiser_value
class NetworkDenoiser:
  """A network F with its preconditioning, D = c_skip·z + c_out·F(c_in·z, c_noise)
  (`nets.precond.precond_apply`).

  Attributes:
    params: the network's parameters (leaves).
    module: the Flax module (static, hashable).
    precond: the preconditioning (static, hashable): `pspc_jax.edm.EDMPrecond(sigma_data)` (default
      σ_data = 0.5, for [-1, 1] images) or EDM's baselines `VPPrecond` / `VEPrecond`.
  """
  params: Any
  module: Any = static()
  precond: Preconditioning = static(EDMPrecond())

  def __call__(self, z, sigma):
    from pspc_jax.nets.precond import precond_apply  # the networks are imported only when used

    # σ checked (concrete) or made NaN where invalid (traced), as in the other denoisers.
    validation.check_finite(z, "z")
    sigma = conventions.sigma_per_sample(sigma, jnp.shape(z)[0])
    return precond_apply(self.module, self.params, z, sigma, precond=self.precond)


def is_shardable(denoiser) -> bool:
  """Whether `denoiser` holds a training set it can stream as device shards (`distributed.shard`)."""
  return all(hasattr(denoiser, name) for name in ("data", "axis_name", "valid_rows"))


@jax.jit
def apply_denoiser(denoiser, z, sigma):
  """`denoiser(z, sigma)` compiled with the denoiser (and so its training set) as an argument: one
  compilation per denoiser structure and input shape, never a dataset constant in the program."""
  return denoiser(z, sigma)


def as_argument(denoiser):
  """`denoiser` as a value that can be passed into `jax.jit`: denoiser values as they are, and a plain
  function wrapped in a `jax.tree_util.Partial` (no leaves; what it closes over stays a constant)."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(denoiser)):
    return jax.tree_util.Partial(denoiser)
  return denoiser
