"""PyTorch DiT state dicts <-> Flax `pspc_jax.nets.dit.DiT` params, and checkpoint readers.

The path rule (see `pspc_jax.nets.dit`): split a state-dict key at the dots, join every all-digit part to
the part before it with "_", and rename the leaf by `_LEAF_RULES`, whose first matching row also gives the
array transform (Linear weights (out, in) are transposed to kernels (in, out); the patch convolution goes
from OIHW to HWIO). The fixed `pos_embed` buffer has no parameter: it is checked against the embedding
the Flax module computes.

Reading `.pt` files needs torch (`pip install 'pspc-jax[convert]'`); `.safetensors` files are parsed
here with NumPy alone.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pspc_jax.nets import dit
from pspc_jax.nets.state_dicts import (LeafRule, identity, match_rule, module_from_config,
                                      param_shapes)

Array = np.ndarray


# (state-dict key pattern, Flax leaf name, PyTorch -> Flax transform, Flax -> PyTorch transform);
# the first row whose pattern matches the whole key applies.
_LEAF_RULES: tuple[LeafRule, ...] = (
    (re.compile(r"x_embedder\.proj\.weight"), "kernel",
     lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
    (re.compile(r"y_embedder\.embedding_table\.weight"), "embedding", identity, identity),
    (re.compile(r".+\.weight"), "kernel", np.transpose, np.transpose),
    (re.compile(r".+\.bias"), "bias", identity, identity),
)
_POS_EMBED = "pos_embed"
_CLASS_TABLE = "y_embedder.embedding_table.weight"
_T_EMBED_BIAS = ("t_embedder", "mlp_2", "bias")
_FINAL_LINEAR = ("final_layer.linear.weight", "final_layer.linear.bias")
_POS_EMBED_TOL = 1e-5

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _rule(key: str):
  return match_rule(_LEAF_RULES, key)


def flax_path(key: str) -> tuple[str, ...] | None:
  """The Flax param path of a PyTorch DiT state-dict key, or None if no rule covers it.

  Example: "blocks.3.adaLN_modulation.1.weight" -> ("blocks_3", "adaLN_modulation_1", "kernel").
  """
  rule = _rule(key)
  if rule is None:
    return None
  modules = []
  for part in key.split(".")[:-1]:
    if part.isdigit() and modules:
      modules[-1] = f"{modules[-1]}_{part}"
    else:
      modules.append(part)
  return (*modules, rule[0])


def torch_key(path: tuple[str, ...]) -> str:
  """The PyTorch state-dict key of a Flax param path (the inverse of `flax_path`)."""
  modules = [re.sub(r"_(\d+)$", r".\1", name) for name in path[:-1]]
  leaf = "bias" if path[-1] == "bias" else "weight"
  return ".".join(modules + [leaf])


def _network(config: Mapping | dit.DiT) -> dit.DiT:
  return module_from_config(config, dit.DiT, "dit", dit.build)


def _param_shapes(net: dit.DiT) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the network's params, without allocating them."""
  return param_shapes(net, jnp.zeros((1,), jnp.int32) if net.label_dim else None)


def _drop_sigma_channels(value: Array, net: dit.DiT) -> Array:
  """Keeps the first C of 2C output channels of the final Linear, whose rows are ordered (p, q, c)."""
  patch_area = net.patch_size**2
  if value.shape[0] != 2 * patch_area * net.in_channels:
    raise ValueError(f"drop_learned_sigma: final_layer.linear has {value.shape[0]} outputs, expected "
                     f"2·p²·C = {2 * patch_area * net.in_channels}")
  split = value.reshape(patch_area, 2 * net.in_channels, *value.shape[1:])
  return split[:, :net.in_channels].reshape(patch_area * net.in_channels, *value.shape[1:])


def _check_pos_embed(value: Array, net: dit.DiT) -> str | None:
  grid = net.img_resolution // net.patch_size
  expected = dit.sincos_position_embedding(net.hidden_size, grid)
  value = value.reshape(-1, value.shape[-1])
  if value.shape != expected.shape:
    return f"{_POS_EMBED}: shape {value.shape} does not fit {grid}×{grid} tokens of width {net.hidden_size}"
  if np.max(np.abs(value - expected)) > _POS_EMBED_TOL:
    return f"{_POS_EMBED}: differs from DiT's fixed 2-D sin-cos embedding"
  return None


def _class_table_problem(value: Array, net: dit.DiT, expected: tuple[int, ...] | None) -> str:
  """Why DiT's class table `value` does not fit `net` (whose table has shape `expected`, None when
  unconditional), and what to do about it."""
  rows = value.shape[0] if value.ndim else 0
  fold = ("convert with fold_null_class=True (bin/convert --fold_null_class) to add it to "
          "t_embedder.mlp.2.bias, which is exact")
  if rows == 0:
    return f"{_CLASS_TABLE}: empty: the network is unconditional; set label_dim to 0 in --network"
  if rows == 1 and not net.label_dim:
    return (f"{_CLASS_TABLE}: 1 row in an unconditional DiT: the null class of the original's "
            "classifier-free guidance (num_classes=0, class_dropout_prob > 0), which it adds to every "
            f"conditioning vector; {fold}")
  null_class = (f"or to {rows - 1} with class_dropout_prob > 0 (the last row is the null class of "
                "classifier-free guidance)" if rows > 1 else
                f"or to 0 if the row is the original's null class of an unconditional DiT, and {fold}")
  advice = f"set label_dim to {rows} with class_dropout_prob 0 (no null class), {null_class}"
  if not net.label_dim:
    return f"{_CLASS_TABLE}: {rows} rows: the network is class-conditional; in --network, {advice}"
  return f"{_CLASS_TABLE}: shape {value.shape}, this config expects {expected}; in --network, {advice}"


def dit_state_to_flax(state: Mapping[str, Array], config: Mapping | dit.DiT,
                      drop_learned_sigma: bool = False, fold_null_class: bool = False) -> dict:
  """Converts a PyTorch DiT state dict to Flax params for the DiT that `config` describes.

  Args:
    state: flat {key: array} as from `load_state_dict` (torch tensors must be made NumPy first).
      Empty tensors that match no parameter (the (0, D) class table of an original DiT built with
      num_classes=0 and no label dropout) carry nothing and are skipped.
    config: a DiT config dict (as in `dit.PRESETS`, "arch" optional) or a `dit.DiT`. For an
      unconditional network (label_dim 0) the state must not hold a non-empty class table unless
      `fold_null_class`.
    drop_learned_sigma: the PyTorch model was built with learn_sigma=True (2C output channels); keep the
      first C output channels (the mean prediction) of the final Linear.
    fold_null_class: for an unconditional network whose state holds a (1, D) class table (the original
      with num_classes=0 and class_dropout_prob > 0 adds that null-class row to every conditioning
      vector c = t_embedder(t) + row): add the row to the bias of t_embedder's last Linear, which gives
      the same c.

  Returns:
    Nested {"x_embedder": {...}, ...} of float32 NumPy arrays, for `net.apply({"params": params}, ...)`.

  Raises:
    ValueError: listing every key without a rule or a matching param, every shape mismatch (for the
      class table: which label_dim / class_dropout_prob fits), every param left without a key, and a
      `pos_embed` that is not the fixed embedding.
  """
  net = _network(config)
  shapes = _param_shapes(net)
  problems, params, matched = [], {}, set()
  null_row = None
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    if key == _POS_EMBED:
      problems.append(_check_pos_embed(value, net))
      continue
    path = flax_path(key)
    if (path is None or path not in shapes) and value.size == 0:
      continue
    if key == _CLASS_TABLE and not net.label_dim:
      if fold_null_class and value.shape == (1, net.hidden_size):
        null_row = value[0]
      else:
        problems.append(_class_table_problem(value, net, None))
      continue
    if path is None or path not in shapes:
      problems.append(f"{key}: no matching Flax parameter" + (f" {'/'.join(path)}" if path else ""))
      continue
    matched.add(path)
    if drop_learned_sigma and key in _FINAL_LINEAR:
      value = _drop_sigma_channels(value, net)
    value = _rule(key)[1](value)
    if value.shape != shapes[path]:
      problems.append(_class_table_problem(value, net, shapes[path]) if key == _CLASS_TABLE else
                      f"{key}: shape {value.shape} after conversion, Flax {'/'.join(path)} expects "
                      f"{shapes[path]}")
      continue
    params[path] = np.ascontiguousarray(value)
  if fold_null_class and null_row is None:
    problems.append(f"fold_null_class: the state dict holds no (1, {net.hidden_size}) {_CLASS_TABLE} "
                    "of an unconditional DiT to fold")
  problems += [f"{'/'.join(path)}: no state-dict key {torch_key(path)}"
               for path in shapes if path not in matched]
  problems = [p for p in problems if p]
  if problems:
    raise ValueError("cannot convert the DiT state dict:\n  " + "\n  ".join(problems))
  if null_row is not None:
    params[_T_EMBED_BIAS] = params[_T_EMBED_BIAS] + null_row
  return traverse_util.unflatten_dict(params)


def flax_to_dit_state(params: Mapping, config: Mapping | dit.DiT) -> dict[str, Array]:
  """The PyTorch DiT state dict (NumPy arrays, `pos_embed` included) of Flax params; the inverse of
  `dit_state_to_flax` without learned sigma."""
  net = _network(config)
  state = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    key = torch_key(path)
    state[key] = np.array(_rule(key)[2](np.asarray(value)), order="C")
  grid = net.img_resolution // net.patch_size
  state[_POS_EMBED] = dit.sincos_position_embedding(net.hidden_size, grid)[None]
  return state


def read_safetensors(path: str | Path) -> dict[str, Array]:
  """Reads a .safetensors file with NumPy: an 8-byte little-endian header length n, n bytes of JSON
  {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}, then the raw
  little-endian tensor bytes (offsets relative to the end of the header). BF16 is widened to float32.
  """
  raw = Path(path).read_bytes()
  if len(raw) < 8:
    raise ValueError(f"{path}: too short for a safetensors file")
  header_len = int(np.frombuffer(raw, "<u8", count=1)[0])
  if 8 + header_len > len(raw):
    raise ValueError(f"{path}: header length {header_len} exceeds the file size {len(raw)}")
  try:
    header = json.loads(raw[8:8 + header_len])
  except (ValueError, UnicodeDecodeError) as err:
    raise ValueError(f"{path}: the safetensors header is not valid JSON ({err})") from None
  if not isinstance(header, dict) or not all(isinstance(v, dict) and {"dtype", "shape", "data_offsets"}
                                             <= v.keys() for k, v in header.items()
                                             if k != "__metadata__"):
    raise ValueError(f"{path}: the safetensors header is not a table of tensors "
                     "{name: {dtype, shape, data_offsets}}")
  header.pop("__metadata__", None)
  buffer = memoryview(raw)[8 + header_len:]
  return {name: _safetensors_array(name, info, buffer) for name, info in header.items()}


def _safetensors_array(name: str, info: dict, buffer: memoryview) -> Array:
  dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
  dtype = np.dtype("<u2" if dtype_name == "BF16" else _SAFETENSORS_DTYPES.get(dtype_name, "V"))
  if dtype.kind == "V":
    raise ValueError(f"safetensors tensor {name!r}: unsupported dtype {dtype_name}")
  if not 0 <= begin <= end <= len(buffer) or end - begin != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(f"safetensors tensor {name!r}: offsets [{begin}, {end}) do not hold {dtype_name} "
                     f"{list(shape)} in a {len(buffer)}-byte buffer")
  array = np.frombuffer(buffer[begin:end], dtype).reshape(shape)
  if dtype_name == "BF16":
    return (array.astype(np.uint32) << 16).view(np.float32)
  return array.astype(dtype.newbyteorder("="))


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError("reading PyTorch .pt/.pth files needs torch (pip install 'pspc-jax[convert]'); "
                     "a .safetensors copy of the state dict is read without it") from None
  return torch


def _torch_load(torch, path: Path):
  """torch.load(path, weights_only=True): tensors, plain containers and argparse.Namespace only.

  Raises:
    ValueError: the file holds other objects (code that `weights_only=False` would run: this message,
      unlike torch's, never suggests that), or it is not a readable PyTorch file.
  """
  import argparse  # pylint: disable=import-outside-toplevel
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f" (it references {named.group(1)})" if named else ""
    raise ValueError(f"{path}: holds code or objects that are not tensors{what}; it will not be "
                     "loaded: only state dicts of tensors are read") from None
  except (RuntimeError, EOFError, OSError, ValueError) as err:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "weights_only" in reason:  # never relay advice to load the file unsafely
      reason = type(err).__name__
    raise ValueError(f"{path}: not a readable PyTorch file ({reason})") from None


def _torch_state(path: Path, entry: str | None) -> dict[str, Array]:
  torch = _import_torch()
  obj = _torch_load(torch, path)
  if entry is None and isinstance(obj, Mapping) and "ema" in obj:
    entry = "ema"
  if entry is not None:
    if not isinstance(obj, Mapping) or entry not in obj:
      keys = ", ".join(map(str, obj)) if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
      raise ValueError(f"{path}: no entry {entry!r} (it holds {keys})")
    obj = obj[entry]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: not a state dict (it holds a {type(obj).__name__})")
  bad = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
  if bad:
    raise ValueError(f"{path}: not a state dict of tensors (entries {bad[:5]}); pick one with `entry`")
  return {key: value.detach().cpu().float().numpy() if value.dtype == torch.bfloat16
          else value.detach().cpu().numpy() for key, value in obj.items()}


def load_state_dict(path: str | Path, entry: str | None = None) -> dict[str, Array]:
  """A flat {key: NumPy array} state dict from a `.safetensors` or a PyTorch (`.pt`, `.pth`) file.

  PyTorch files are read with `torch.load(weights_only=True)`. A DiT training checkpoint
  ({"model", "ema", "opt", "args"}) yields its "ema" weights, as DiT's sampler uses; `entry` picks
  another top-level entry.

  Raises:
    ValueError: a PyTorch file without torch installed, a file that holds code or objects other than
      tensors (never loaded), a malformed file, or no state dict of tensors at `entry`.
  """
  path = Path(path)
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  return _torch_state(path, entry)


def load_dit_params(path: str | Path, config: Mapping | dit.DiT, drop_learned_sigma: bool = False,
                    entry: str | None = None, fold_null_class: bool = False) -> dict:
  """`dit_state_to_flax(load_state_dict(path, entry), config, drop_learned_sigma, fold_null_class)`."""
  return dit_state_to_flax(load_state_dict(path, entry), config, drop_learned_sigma, fold_null_class)
