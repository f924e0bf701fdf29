"""The exact denoisers on many devices and hosts: dataset sharded, queries batched (docs/design.md §3).

A 2-D device mesh with axes ("batch", "data") (`make_mesh`): the training set is split into equal
consecutive shards along "data" (`shard_dataset`; each device holds N_padded / data_devices rows,
replicated along "batch"), and query batches are split along "batch". Every device streams its own
shard with the single-device kernels, which take the mesh axis as `axis_name` and merge exactly:

* pass 1 of the PSPC composite (`pspc.composite_denoise`): the per-mask (min distance, total) states
  are merged with `SoftminStats.merge_across` — the global minimum (pmin), then the psum of every
  device's total rescaled by exp((own min − global min)·scale), the flash-attention rule — so every
  device normalises pass 2 with the global normaliser; pass 2's per-device numerators are summed (psum);
* the single-pass optimal empirical denoiser merges (min, total, numerator) with the same rescale
  (`SoftminStats.merge_values_across`).

Padding. N need not divide by the number of data shards: `shard_dataset` pads the dataset at the end
with zero rows up to a multiple and returns `valid_rows` = N; the kernels (`valid_rows=`) set the
distances of rows at global index ≥ N to +inf after the window sums, so they get weight exactly 0 at
any finite σ (σ = 80 included), never take part in a minimum, and a shard of padding only keeps the
empty state (min +inf, total 0, numerator 0: `SoftminStats.add`), which the merge
scales by exp(−inf) = 0. The global total is ≥ 1 (the nearest real row has weight 1), so nothing is
ever divided by zero. Without padding the kernels trace exactly their unpadded code.

Scheduled denoisers (PSPC-Square with a per-σ patch schedule, PSPC-Flex) pick a branch per distinct
schedule value with `lax.cond` on "does a sample of my batch need it" (`schedules.dispatch`). Inside
`shard_map` each device decides on its local batch, so devices of different batch shards may take
different branches. That is safe because every collective inside a branch runs over the "data" axis
only, and the devices of one "data" group hold the same batch shard (z and σ are replicated along
"data"), so they all take the same branch and meet in the same collectives; no collective ever spans
two batch shards. (`tests/test_distributed.py` checks mixed-σ batches whose batch shards need
different branches.)

The same functions run on one device (a 1×1 mesh gives the same bits as the unsharded kernel jitted
with the dataset as an argument; a dataset closed over as a constant lets XLA fold its conversion at
compile time, which can change last bits whether sharded or not), on the devices of one host, and on
several hosts. Multi-host launch: start the same command on every host,
with the coordinator's address, the number of processes and each host's index, e.g. for 2 hosts

    # host 0 (the coordinator, reachable at host0:1234):
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python bin/sample ...
    # host 1:
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python bin/sample ...

where the program calls `initialize()` (which calls `jax.distributed.initialize`) before any other JAX
call; under SLURM or Open MPI the three variables can be left out (JAX detects them). Every process
must load the same dataset and pass the same queries (the samplers derive them from seeds), and should
let only `jax.process_index() == 0` write files. `jax.devices()` then lists the devices of all hosts and
`make_mesh()` spreads the dataset over all of them; the denoiser's output is replicated on every
device, so every host can read it. Inputs of a jitted computation that spans hosts must be global
arrays: the sharded denoiser converts its own host inputs, and `replicate(latents, mesh)` does it for
e.g. the latents of a jitted sampler. (The multi-host path follows JAX's multi-controller model; the
tests exercise 1 and 8 devices of one host.)
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pspc_jax import conventions, validation
from pspc_jax.denoisers.values import denoiser_value, is_shardable

DATA_AXIS = "data"
BATCH_AXIS = "batch"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins a multi-host run: `jax.distributed.initialize` with arguments from the environment.

  Call it first, before any other JAX call. Arguments not given are read from JAX_COORDINATOR_ADDRESS
  ("host:port" of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; when neither gives the number of
  processes, JAX detects the cluster itself (SLURM, Open MPI, Cloud TPU, ...).
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def make_mesh(data_devices: int | None = None, batch_devices: int | None = None, *,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A (batch_devices, data_devices) mesh with axes ("batch", "data").

  Args:
    data_devices: devices the dataset is sharded over (memory per device ∝ N / data_devices).
    batch_devices: devices query batches are split over (no communication between them).
      With neither given, every device holds a dataset shard (batch_devices = 1); with one given, the
      other is the device count divided by it. The mesh uses the first data·batch devices.
    devices: the devices (default `jax.devices()`: every device of every host). "data" is the minor
      axis, so with batch_devices = hosts each data group stays within a host.

  Raises:
    ValueError: sizes < 1, or more devices asked for than there are.
  """
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  data_devices = validation.positive_int(data_devices, "data_devices", optional=True)
  batch_devices = validation.positive_int(batch_devices, "batch_devices", optional=True)
  if data_devices is None and batch_devices is None:
    data_devices, batch_devices = count, 1
  elif data_devices is None:
    data_devices = count // int(batch_devices)
  elif batch_devices is None:
    batch_devices = count // int(data_devices)
  data_devices, batch_devices = int(data_devices), int(batch_devices)
  if data_devices < 1 or batch_devices < 1 or data_devices * batch_devices > count:
    raise ValueError(f"cannot make a mesh of {data_devices} data × {batch_devices} batch devices "
                     f"from {count} device(s)")
  grid = np.empty(batch_devices * data_devices, dtype=object)
  grid[:] = devices[:batch_devices * data_devices]
  return Mesh(grid.reshape(batch_devices, data_devices), (BATCH_AXIS, DATA_AXIS))


def mesh_from_spec(spec: str | int | None, devices: Sequence[Any] | None = None) -> Mesh | None:
  """The mesh of a `--devices` flag: None or "" → None (single device, unsharded kernels); "all" →
  every device on the data axis; "8" → 8 data devices; "4x2" → 4 data × 2 batch devices.

  Raises:
    ValueError: a malformed spec, or more devices than there are.
  """
  if spec is None or str(spec).strip() == "":
    return None
  text = str(spec).strip().lower()
  if text == "all":
    return make_mesh(devices=devices)
  try:
    parts = [int(p) for p in text.split("x")]
  except ValueError:
    parts = []
  if len(parts) not in (1, 2):
    raise ValueError(f"cannot parse --devices={spec!r}; use 'all', a device count (the dataset is "
                     "sharded over them) or DATAxBATCH, e.g. '4x2'")
  return make_mesh(parts[0], parts[1] if len(parts) == 2 else 1, devices=devices)


def _axis_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[name] for name in names)


class ShardedDataset(NamedTuple):
  """A dataset split along a mesh axis: `images` (N_padded, H, W, C), a global `jax.Array` whose rows
  ≥ `valid_rows` are zero padding; `axis` is the mesh axis of the shards."""
  images: jax.Array
  valid_rows: int
  axis: Any = DATA_AXIS

  @property
  def shard_rows(self) -> int:
    return self.images.addressable_shards[0].data.shape[0]


def shard_dataset(data, mesh: Mesh, axis=DATA_AXIS) -> ShardedDataset:
  """Pads `data` with zero rows to a multiple of the size of mesh axis `axis` and places shard k
  (rows k·n … (k+1)·n − 1, n = N_padded / shards) on the devices at index k of that axis.

  Each device gets only its own rows (`jax.make_array_from_callback`), so device memory is
  ∝ N / shards; on several hosts, every process passes the same host array (e.g. a NumPy memmap) and
  materialises only its devices' shards.

  Args:
    data: (N, H, W, C) uint8 or float images, N ≥ 1: a NumPy array or a fully addressable jax.Array.
    mesh: the device mesh.
    axis: the mesh axis (or tuple of axes) of the dataset shards.

  Returns:
    A `ShardedDataset` (images, valid_rows = N, axis).
  """
  if isinstance(data, jax.Array):
    data = np.asarray(jax.device_get(data))
  if data.ndim != 4 or data.shape[0] == 0:
    raise ValueError(f"data must have shape (N, H, W, C) with N ≥ 1, got {data.shape}")
  num = data.shape[0]
  shards = _axis_size(mesh, axis)
  padded = -(-num // shards) * shards
  shape = (padded,) + tuple(data.shape[1:])

  def rows(index):
    start, stop, _ = index[0].indices(padded)
    part = np.asarray(data[min(start, num):min(stop, num)])
    if stop - start > part.shape[0]:
      filler = np.zeros((stop - start - part.shape[0],) + part.shape[1:], part.dtype)
      part = np.concatenate([part, filler])
    return part[(slice(None),) + tuple(index[1:])]

  array = jax.make_array_from_callback(shape, NamedSharding(mesh, P(axis)), rows)
  return ShardedDataset(array, num, axis)


def replicate(x, mesh: Mesh):
  """A host value (NumPy, scalar, or fully addressable jax.Array) as a global array replicated on
  every device of `mesh`, for the inputs of jitted multi-host computations (every process must pass
  the same value). Tracers and arrays already on the mesh are returned as they are."""
  if isinstance(x, jax.core.Tracer):
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x
  host = np.asarray(jax.device_get(x))
  return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda index: host[index])


@denoiser_value
class ShardedDenoiser:
  """A denoiser value whose training set is sharded over a device mesh (`shard`).

  Attributes:
    inner: the single-device denoiser value, holding the padded global dataset (rows ≥ its
      `valid_rows` are zero padding) and streaming its own shard inside `jax.shard_map`.
    mesh: the device mesh (static).
    data_axis: the mesh axis (or axes) of the dataset shards (static).
    batch_axis: the mesh axis of the query batch, or None (queries replicated) (static).
  """
  inner: Any
  mesh: Mesh = struct.field(pytree_node=False)
  data_axis: Any = struct.field(pytree_node=False, default=DATA_AXIS)
  batch_axis: Any = struct.field(pytree_node=False, default=BATCH_AXIS)

  def __call__(self, z, sigma):
    """x̂ (B, H, W, C), replicated on every device; any B (padded to the batch shards)."""
    if jax.process_count() > 1:  # host arrays → global replicated arrays (same values on every host)
      z, sigma = replicate(z, self.mesh), replicate(sigma, self.mesh)
    return _sharded_call(self, z, sigma)


@jax.jit
def _sharded_call(denoiser: ShardedDenoiser, z, sigma):
  """`ShardedDenoiser.__call__`, compiled once per denoiser structure and input shape."""
  z = jnp.asarray(z, jnp.float32)
  if z.ndim != 4:
    raise ValueError(f"z must have shape (B, H, W, C), got {z.shape}")
  batch = z.shape[0]
  sigma = conventions.sigma_per_sample(sigma, batch)
  pad = -batch % _axis_size(denoiser.mesh, denoiser.batch_axis)
  if pad:  # copies of the last sample: same σ, so no extra schedule branch
    z = jnp.concatenate([z, jnp.repeat(z[-1:], pad, axis=0)])
    sigma = jnp.concatenate([sigma, jnp.repeat(sigma[-1:], pad)])
  batch_spec = P(denoiser.batch_axis)
  inner_specs = jax.tree.map(lambda _: P(), denoiser.inner).replace(data=P(denoiser.data_axis))
  # check_vma=False: the schedules' `lax.cond` dispatch returns a batch-varying value from one branch
  # and its invariant operand from the other, which the varying-axes type check rejects. The output
  # is replicated along the data axis all the same (every device of a data group ends with the same
  # psum results).
  mapped = jax.shard_map(lambda zz, ss, inner: inner(zz, ss), mesh=denoiser.mesh,
                         in_specs=(batch_spec, batch_spec, inner_specs), out_specs=batch_spec,
                         check_vma=False)
  out = mapped(z, sigma, denoiser.inner)[:batch]
  return jax.lax.with_sharding_constraint(out, NamedSharding(denoiser.mesh, P()))


def shard(denoiser, mesh: Mesh, *, data_axis=DATA_AXIS, batch_axis=BATCH_AXIS) -> ShardedDenoiser:
  """`denoiser` with its training set sharded over `mesh`: a denoiser value of the same results.

  The dataset is padded and split along `data_axis` (`shard_dataset`: each device receives only its
  rows); query batches are split along `batch_axis`. A pixel-major copy of the dataset
  (`values.with_pixel_major`) is dropped: it holds the unsharded rows. Inside `jax.shard_map` every
  device streams its shard with the single-device kernel and the softmin states are merged exactly
  across the data axis (module docstring), so the output equals the unsharded denoiser's up to
  float32 rounding.

  Args:
    denoiser: a shardable denoiser value (`values.is_shardable`: empirical, pspc_square, pspc,
      pspc_flex), not already sharded.
    mesh: the device mesh (`make_mesh`), on one or many hosts.
    data_axis, batch_axis: mesh axes of the dataset shards and of the query batch (a batch axis the
      mesh lacks replicates the queries).

  Returns:
    A `ShardedDenoiser`; pass it into `jax.jit` as an argument like any denoiser.

  Raises:
    ValueError: a denoiser that holds no shardable dataset, or one already sharded.
  """
  if isinstance(denoiser, ShardedDenoiser) or getattr(denoiser, "axis_name", None) is not None:
    raise ValueError("this denoiser is already sharded")
  if not is_shardable(denoiser):
    raise ValueError(f"a {type(denoiser).__name__} cannot shard a training set over devices; run it "
                     "on one device, or use empirical, pspc_square, pspc or pspc_flex")
  if batch_axis is not None and batch_axis not in mesh.axis_names:
    batch_axis = None
  dataset = shard_dataset(denoiser.data, mesh, data_axis)
  inner = denoiser.replace(data=dataset.images, axis_name=data_axis, valid_rows=dataset.valid_rows)
  if getattr(inner, "data_major", None) is not None:  # a copy of the unsharded dataset: drop it
    inner = inner.replace(data_major=None)
  return ShardedDenoiser(inner, mesh, data_axis, batch_axis)
