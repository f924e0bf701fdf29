"""Converts public network weights into pspc_jax checkpoints (`bin/convert`).

Two sources are understood:

* EDM network pickles (`edm-cifar10-32x32-uncond-vp.pkl` and its siblings, EDM's VP/VE baselines
  `baseline-cifar10-32x32-uncond-vp.pkl` / `-ve.pkl`, or EDM training snapshots), read by
  `pspc_jax.nets.edm_pickle` without EDM's code, without torch and without running the source embedded
  in the pickle; the SongUNet config and the preconditioning (EDMPrecond with its σ_data, VPPrecond or
  VEPrecond with their settings) come from the pickle itself.
* PyTorch DiT state dicts (`.pt`/`.pth` through torch, `.safetensors` with NumPy alone), for a DiT config
  the caller names (a state dict does not record its architecture).

A third "source" is a `bin/train` workdir (or one of its step folders): `export_training_run` keeps only
its EMA weights and sidecar, the small inference checkpoint that is worth committing or sharing.

Either way the result is a step folder that `pspc_jax.checkpoints.load_network` and
`bin/sample --denoiser=network --checkpoint=DIR` read, with the provenance (file name, size, SHA-256)
in its sidecar.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import jax
import numpy as np

from pspc_jax import checkpoints, nets
from pspc_jax.edm import EDMPrecond
from pspc_jax.nets import dit_convert, edm_pickle

EDM_SUFFIXES = (".pkl", ".pickle")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors")


def file_provenance(path: str | os.PathLike) -> dict:
  """{"source": file name, "bytes": size, "sha256": hex digest} of a file (read in 1 MiB blocks)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return {"source": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def num_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def convert_edm_pickle(source: str | os.PathLike, destination: str | os.PathLike,
                       key: str = "ema") -> dict:
  """Converts an EDM network pickle (EDMPrecond, VPPrecond or VEPrecond around a SongUNet) into a
  checkpoint folder whose sidecar records the preconditioning (`checkpoints.save_params`).

  Args:
    source: the `.pkl` file.
    destination: the step folder to create (must not exist).
    key: the entry of a snapshot dict that holds the network ("ema" in EDM's files).

  Returns:
    The checkpoint's sidecar (as `checkpoints.read_meta` returns it).

  Raises:
    ValueError: not an EDMPrecond/VPPrecond/VEPrecond pickle around a SongUNet, its weights do not
      match its config, or it is empty, truncated or references code outside the reader's table of
      allowed globals (`pickle.UnpicklingError`, re-raised).
  """
  try:
    network = edm_pickle.load_edm_pickle(source, key=key)
  except pickle.UnpicklingError as err:
    raise ValueError(f"{source}: cannot read it as an EDM pickle: {err}") from err
  info = network.info
  image_shape = (info["img_resolution"], info["img_resolution"], info["img_channels"])
  extra = {**file_provenance(source), "converter": "edm_pickle", "precond": info,
           "num_params": num_params(network.params)}
  checkpoints.save_params(str(destination), network.params, network.config, extra,
                          image_shape=image_shape, precond=network.precond)
  return checkpoints.read_meta(str(destination))


def convert_dit_state_dict(source: str | os.PathLike, destination: str | os.PathLike, network: dict, *,
                           entry: str | None = None, drop_learned_sigma: bool = False,
                           fold_null_class: bool = False, sigma_data: float = 0.5) -> dict:
  """Converts a PyTorch DiT state dict into a checkpoint folder.

  Args:
    source: `.pt`/`.pth` (needs torch: `pip install 'pspc-jax[convert]'`) or `.safetensors`.
    destination: the step folder to create (must not exist).
    network: the DiT config the weights belong to (e.g. `nets.presets()["dit_b4_cifar10"]`).
    entry: the top-level entry of a training checkpoint to read (default: "ema" when present).
    drop_learned_sigma: the model outputs 2C channels (learn_sigma=True); keep the mean's C.
    fold_null_class: an unconditional DiT saved by the original code with label dropout holds a 1-row
      class table (its classifier-free-guidance null class, added to every conditioning vector): fold
      it into t_embedder's output bias (`dit_convert.dit_state_to_flax`).
    sigma_data: σ_data of the EDM preconditioning the network was trained with.

  Returns:
    The checkpoint's sidecar.
  """
  if network.get("arch") != "dit":
    raise ValueError(f"state dicts are converted into DiT networks; --network has arch "
                     f"{network.get('arch')!r}")
  params = dit_convert.load_dit_params(source, network, drop_learned_sigma=drop_learned_sigma,
                                       entry=entry, fold_null_class=fold_null_class)
  image_shape = (network["img_resolution"], network["img_resolution"], network["in_channels"])
  extra = {**file_provenance(source), "converter": "dit_state_dict", "entry": entry,
           "drop_learned_sigma": drop_learned_sigma, "fold_null_class": fold_null_class,
           "num_params": num_params(params)}
  checkpoints.save_params(str(destination), params, network, extra, image_shape=image_shape,
                          precond=EDMPrecond(sigma_data))
  return checkpoints.read_meta(str(destination))


def export_training_run(source: str | os.PathLike, destination: str | os.PathLike) -> dict:
  """Writes the inference part of a training checkpoint (EMA weights and sidecar) as its own folder.

  Args:
    source: a `bin/train` workdir, its checkpoints/ folder or a step folder (newest step otherwise).
    destination: the step folder to create (must not exist).

  Returns:
    The new sidecar; its "extra" keeps the run's "train" config, "dataset" fingerprint and "step".
  """
  step_dir = checkpoints.find_checkpoint(str(source))
  module, params, meta = checkpoints.load_network(step_dir)
  del module
  extra = {"converter": "training_run", "step": meta["step"], "train": meta.get("train"),
           "dataset": meta.get("dataset"), "source": os.path.relpath(step_dir),
           "num_params": num_params(params)}
  checkpoints.save_params(str(destination), params, meta["network"], extra,
                          image_shape=meta["image_shape"],
                          precond=checkpoints.preconditioning(meta, step_dir))
  return checkpoints.read_meta(str(destination))


def convert(source: str | os.PathLike, destination: str | os.PathLike, *, network: dict | None = None,
            **options) -> dict:
  """Dispatches on the source: a folder to `export_training_run`, EDM pickles to `convert_edm_pickle`,
  state dicts (which need `network`) to `convert_dit_state_dict`; `options` go to the chosen converter."""
  suffix = Path(source).suffix.lower()
  if os.path.isdir(source):
    if network is not None or options:
      raise ValueError("a training run records its own network and settings; drop the other flags")
    return export_training_run(source, destination)
  if not os.path.isfile(source):
    raise ValueError(f"{source}: no such file")
  if suffix in EDM_SUFFIXES:
    if network is not None:
      raise ValueError("an EDM pickle records its own network; drop --network")
    return convert_edm_pickle(source, destination, **options)
  if suffix in STATE_DICT_SUFFIXES:
    if network is None:
      raise ValueError(f"a state dict does not record its architecture: name it with --network "
                       f"(e.g. {', '.join(n for n in sorted(nets.presets()) if n.startswith('dit'))})")
    return convert_dit_state_dict(source, destination, network, **options)
  raise ValueError(f"{source}: unknown weights format {suffix!r}; expected one of "
                   f"{', '.join(EDM_SUFFIXES + STATE_DICT_SUFFIXES)}")
