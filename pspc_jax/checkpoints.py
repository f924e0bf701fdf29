"""Checkpoints of training runs and of converted networks (orbax-checkpoint) with a JSON sidecar.

Layout. A training run keeps its last few steps in `<workdir>/checkpoints/<step>/` (an orbax
`CheckpointManager`); a converted network (:func:`save_params`) is one such step folder on its own.
A step folder holds the items

  ema_params/   the weights used for inference: the EMA of a training run, or converted weights;
  train_state/  the rest of a training run's state (params, optimiser state, step, PRNG key data);
                absent from converted networks;
  meta/         the JSON sidecar {"format", "step", "network" (a config for
                `pspc_jax.nets.make_network`), "image_shape" [H, W, C], the preconditioning, and, from
                training, "train" (the TrainConfig) and "dataset" (its fingerprint), or "extra" from a
                converter},

so :func:`load_network` rebuilds the module from the sidecar alone. The preconditioning is "sigma_data"
for EDM's (training runs, EDMPrecond pickles, state dicts) or, for another one (EDM's VP and VE
baselines), a "preconditioning" record `pspc_jax.edm.preconditioning_record` in place of "sigma_data";
:func:`preconditioning` reads either.

Atomicity. orbax writes every item of a step into `<step>.orbax-checkpoint-tmp…` and renames that
folder to `<step>` only when all items are complete. An interrupted save therefore leaves the earlier
steps untouched and a temporary folder that readers ignore and the next training run deletes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from pspc_jax import nets
from pspc_jax.edm import (EDMPrecond, Preconditioning, preconditioning_from_record,
                          preconditioning_record)

FORMAT_VERSION = 1
_ARRAY_ITEMS = ("ema_params", "train_state")


def _not_orbax_info(record: logging.LogRecord) -> bool:
  return record.levelno > logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


# orbax logs dozens of INFO lines per save or restore through absl, which absl apps (bin/) print.
logging.getLogger("absl").addFilter(_not_orbax_info)


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Maps each item name to its orbax handler (arrays: StandardCheckpointHandler; meta: JSON)."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in _ARRAY_ITEMS:
    registry.add(item, ocp.args.StandardSave)
    registry.add(item, ocp.args.StandardRestore)
  registry.add("meta", ocp.args.JsonSave)
  registry.add("meta", ocp.args.JsonRestore)
  return registry


def _step_reader() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_handler_registry()))


def _read(step_dir: str, what: str = "restore", **items) -> Any:
  """Restores `items` (name=restore args) of a step folder, or its metadata if what="metadata".

  Raises:
    ValueError: a damaged or incomplete folder (a missing, truncated or corrupt file), with the first
      line of the innermost error orbax or TensorStore gives (which names the array and the file).
  """
  reader = _step_reader()
  try:
    if what == "metadata":
      return reader.metadata(step_dir).item_metadata
    return reader.restore(step_dir, args=ocp.args.Composite(**items))
  except Exception as err:  # pylint: disable=broad-exception-caught
    # orbax wraps TensorStore's read errors of damaged data files in a bare Exception.
    if not (type(err) is Exception or isinstance(err, (KeyError, ValueError, OSError))):
      raise
    raise ValueError(f"cannot read checkpoint {step_dir} (damaged or incomplete): "
                     f"{_first_line(_innermost(err))}") from err


def _innermost(err: BaseException) -> BaseException:
  """The end of the chain of explicit causes (`raise ... from`) of `err`."""
  while err.__cause__ is not None:
    err = err.__cause__
  return err


def _first_line(err: BaseException) -> str:
  text = str(err).strip()
  return text.splitlines()[0][:300] if text else type(err).__name__


def open_manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """An orbax manager of `directory` (created if absent) that keeps the newest `max_to_keep` steps.

  Saves are synchronous; leftover temporary folders of interrupted saves are deleted.
  """
  if max_to_keep < 1:
    raise ValueError(f"must keep at least one checkpoint, got max_to_keep={max_to_keep}")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               handler_registry=_handler_registry())


def _sidecar(meta: dict, step: int) -> dict:
  return {**meta, "format": FORMAT_VERSION, "step": int(step)}


def save_checkpoint(manager: ocp.CheckpointManager, step: int, *, ema_params: Any, train_state: Any,
                    meta: dict) -> None:
  """Saves step `step` atomically, then deletes the steps beyond the manager's `max_to_keep`.

  Args:
    manager: from :func:`open_manager`.
    step: number of training updates done.
    ema_params: inference weights (pytree of arrays).
    train_state: any pytree of arrays: everything else needed to resume.
    meta: JSON-serialisable dict with at least "network", "image_shape" and "sigma_data"; "format" and
      "step" are added.
  """
  manager.save(step, args=ocp.args.Composite(
      ema_params=ocp.args.StandardSave(ema_params),
      train_state=ocp.args.StandardSave(train_state),
      meta=ocp.args.JsonSave(_sidecar(meta, step))))


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, *, ema_params: Any,
                       train_state: Any) -> tuple[Any, Any]:
  """Restores step `step` into the structure, shapes and shardings of the given targets.

  Args:
    manager: from :func:`open_manager`.
    step: a step in `manager.all_steps()`.
    ema_params, train_state: targets: pytrees of arrays or `jax.ShapeDtypeStruct`s with shardings.

  Returns:
    (ema_params, train_state) as arrays placed like the targets.
  """
  restored = manager.restore(step, args=ocp.args.Composite(
      ema_params=ocp.args.StandardRestore(ema_params),
      train_state=ocp.args.StandardRestore(train_state)))
  return restored.ema_params, restored.train_state


def read_meta(path: str) -> dict:
  """The JSON sidecar of a checkpoint (see :func:`find_checkpoint` for what `path` may be)."""
  step_dir = find_checkpoint(path)
  return _read(step_dir, meta=ocp.args.JsonRestore()).meta


def find_checkpoint(path: str) -> str:
  """The step folder that `path` designates.

  Args:
    path: a step folder (holds `meta/`), a manager folder (its newest step), or a training workdir
      (the newest step of its `checkpoints/`).

  Returns:
    Absolute path of a complete step folder.

  Raises:
    ValueError: no checkpoint there.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint {path} does not exist")
  if os.path.isdir(os.path.join(path, "meta")):
    return path
  root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  steps = [int(name) for name in os.listdir(root)
           if name.isdigit() and os.path.isdir(os.path.join(root, name, "meta"))]
  if not steps:
    raise ValueError(f"no pspc_jax checkpoint in {path} (expected a training workdir, its "
                     "checkpoints/ folder, or a step folder holding meta/ and ema_params/)")
  return os.path.join(root, str(max(steps)))


def load_network(path: str, image_shape=None) -> tuple[Any, Any, dict]:
  """Rebuilds a network from a checkpoint's sidecar and loads its inference (EMA) weights.

  Args:
    path: a training workdir, a checkpoint manager folder or a step folder (see :func:`find_checkpoint`).
    image_shape: if given, the (H, W, C) the network must have been made for.

  Returns:
    (module, ema_params, meta): the Flax module from `make_network(meta["network"])`, its parameters on
    the default device, and the sidecar dict (meta["image_shape"] is [H, W, C]).

  Raises:
    ValueError: no readable checkpoint at `path`, a sidecar that lacks a field or holds an invalid
      preconditioning record, or another image shape.
  """
  step_dir = find_checkpoint(path)
  meta = read_meta(step_dir)
  missing = [key for key in ("format", "network", "image_shape") if key not in meta]
  if "sigma_data" not in meta and "preconditioning" not in meta:
    missing.append("sigma_data (or a preconditioning record)")
  if missing:
    raise ValueError(f"{step_dir}: checkpoint sidecar lacks {', '.join(missing)}")
  preconditioning(meta, step_dir)
  if meta["format"] > FORMAT_VERSION:
    raise ValueError(f"{step_dir}: checkpoint format {meta['format']} is newer than this pspc_jax "
                     f"reads ({FORMAT_VERSION})")
  if image_shape is not None and tuple(meta["image_shape"]) != tuple(image_shape):
    raise ValueError(f"the network in {step_dir} is for images of shape {tuple(meta['image_shape'])}, "
                     f"not {tuple(image_shape)}")
  module = nets.make_network(meta["network"])
  stored = _read(step_dir, "metadata").get("ema_params")
  if stored is None:
    raise ValueError(f"cannot read checkpoint {step_dir}: it holds no ema_params")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                        stored.tree)
  return module, _read(step_dir, ema_params=ocp.args.StandardRestore(target)).ema_params, meta


def preconditioning(meta: dict, where: str = "checkpoint") -> Preconditioning:
  """The preconditioning of a checkpoint's sidecar: its "preconditioning" record, else
  `EDMPrecond(meta["sigma_data"])`.

  Raises:
    ValueError: neither field, or an invalid record (the message starts with `where`).
  """
  try:
    if "preconditioning" in meta:
      return preconditioning_from_record(meta["preconditioning"])
    if "sigma_data" in meta:
      return EDMPrecond(meta["sigma_data"])
  except (ValueError, TypeError) as err:
    raise ValueError(f"{where}: invalid preconditioning in the sidecar: {err}") from None
  raise ValueError(f"{where}: the sidecar records no preconditioning (sigma_data)")


def save_params(directory: str, params: Any, network_config: dict, extra: dict | None = None, *,
                image_shape: tuple[int, int, int], precond: Preconditioning = EDMPrecond()) -> None:
  """Writes converted network weights as a step folder that :func:`load_network` reads.

  Args:
    directory: the step folder to create; it must not exist yet (the write is atomic).
    params: the network's parameters (the `params` collection), used for inference.
    network_config: config dict for `pspc_jax.nets.make_network`, e.g. {"arch": "songunet", …}.
    extra: JSON-serialisable provenance (source file, checksums, …), stored as meta["extra"].
    image_shape: (H, W, C) of the images the network denoises.
    precond: the network's preconditioning: stored as "sigma_data" for an `EDMPrecond`, else as a
      "preconditioning" record.

  Raises:
    ValueError: `directory` already exists.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise ValueError(f"{directory} already exists; choose a new folder for the converted network")
  meta = {"network": network_config, "image_shape": [int(n) for n in image_shape],
          "extra": extra or {}}
  if isinstance(precond, EDMPrecond):
    meta["sigma_data"] = precond.sigma_data
  else:
    meta["preconditioning"] = preconditioning_record(precond)
  _step_reader().save(directory, args=ocp.args.Composite(
      ema_params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(_sidecar(meta, 0))))
