"""Denoisers from option dicts that name files: the bridge from the command line to denoiser values.

The denoisers take values (`registry.make_denoiser`); the tools' options name files
(`maps`: a sensitivity-maps file, `checkpoint`: a network checkpoint). `build_denoiser` reads the
files and builds the value, so a job's JSON-serialisable configuration keeps the file names while the
compiled programs receive arrays.
"""

from __future__ import annotations

import os
from typing import Any

from pspc_jax import distributed
from pspc_jax.denoisers import values
from pspc_jax.denoisers.registry import make_denoiser

def _read_file_options(options: dict, image_shape) -> dict:
  """`options` with a `maps` path read into `SensitivityMaps` and `checkpoint` → `module`, `params`,
  `precond` (the preconditioning its sidecar records)."""
  options = dict(options)
  if isinstance(options.get("maps"), (str, os.PathLike)):
    from pspc_jax.maps_files import load_maps

    options["maps"] = load_maps(options["maps"])
  checkpoint = options.pop("checkpoint", None)
  if checkpoint:
    from pspc_jax.checkpoints import load_network, preconditioning  # orbax only for networks

    module, params, meta = load_network(checkpoint, image_shape=image_shape)
    options.update(module=module, params=params, precond=preconditioning(meta, checkpoint))
  return options


def build_denoiser(name: str, data, *, mesh=None, shard_if_possible: bool = False,
                   **options: Any) -> values.Denoiser:
  """The registry denoiser `name` over `data`, with file options read (`maps`, `checkpoint`).

  Args:
    name: a registry name (`registry.available_denoisers`).
    data: (N, H, W, C) training images (NumPy or jax; uint8 or float in [-1, 1]).
    mesh: shard the dataset over this device mesh (`distributed.shard`); None: one device.
    shard_if_possible: with a mesh, leave denoisers that hold no dataset (gaussian, network, ...) on
      one device instead of raising.
    **options: builder options (`registry.make_denoiser`); `maps` given as a path (a
      sensitivity-maps file, `maps_files.load_maps`) and `checkpoint` (a network checkpoint, `checkpoints.load_network`) are
      read here; None entries are dropped.

  Raises:
    ValueError: unknown name, unreadable files, bad options, or (unless `shard_if_possible`) a mesh
      for a denoiser that cannot shard its dataset.
  """
  options = {k: v for k, v in options.items() if v is not None}
  denoiser = make_denoiser(name, data, **_read_file_options(options, tuple(data.shape[1:])))
  if mesh is None or (shard_if_possible and not values.is_shardable(denoiser)):
    return denoiser
  return distributed.shard(denoiser, mesh)
