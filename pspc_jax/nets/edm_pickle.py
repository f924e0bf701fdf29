"""EDM network pickles and SongUNet state dicts -> Flax params, without EDM's code and without torch.

EDM saves networks with `torch_utils.persistence`: each network object pickles as a call
`_reconstruct_persistent_obj(meta)`, where meta holds the source code of the network's Python module,
the class name and the object's state (its `__dict__`: `_parameters`, `_buffers`, `_modules`,
`_init_args`, `_init_kwargs`, ...). Unpickling normally executes that source. `load_pickle` uses a
`pickle.Unpickler` that resolves only a fixed table of globals: the reconstruct function becomes
`PersistentObject`, a record of meta whose source is kept as text and never run; plain torch containers
become `TorchModule` records; tensors are decoded by NumPy from the bytes torch writes for each storage
(torch's legacy serialisation format); every other global is refused with `pickle.UnpicklingError`.

State-dict keys map to Flax param paths by the rule in `pspc_jax.nets.songunet`, row by row of
`_LEAF_RULES`; buffers carry no params and are checked instead: resampling filters against the config's
`resample_filter`, NCSN++'s `map_noise.freqs` against the config's `fourier_freqs`.

`load_edm_pickle` recognises the preconditioning by the class the pickle names: EDMPrecond (EDM's own
networks), VPPrecond and VEPrecond (EDM's VP and VE baselines), each around a SongUNet; their settings
become a preconditioning value of `pspc_jax.edm`.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, NamedTuple

import ml_dtypes
import numpy as np
from flax import traverse_util

from pspc_jax.edm import EDMPrecond, Preconditioning, VEPrecond, VPPrecond
from pspc_jax.nets import songunet
from pspc_jax.nets.layers import resample_filter_2d
from pspc_jax.nets.state_dicts import (LeafRule, identity, match_rule, module_from_config,
                                      param_shapes)

Array = np.ndarray

# ---------------------------------------------------------------------------------------------------
# State dict <-> Flax params.


# (state-dict key pattern, Flax leaf, PyTorch -> Flax, Flax -> PyTorch); the first full match applies.
_LEAF_RULES: tuple[LeafRule, ...] = (
    (re.compile(r".*(\.norm\d|_aux_norm)\.weight"), "scale", identity, identity),
    (re.compile(r"(map_\w+|.+\.affine)\.weight"), "kernel", np.transpose, np.transpose),
    (re.compile(r".+\.weight"), "kernel",
     lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
    (re.compile(r".+\.bias"), "bias", identity, identity),
)
# Convolutions that resample, i.e. hold a `resample_filter` buffer in EDM.
_RESAMPLING_CONV = re.compile(r"(enc|dec)\.\d+x\d+_(down|up)\.(conv0|skip)|enc\.\d+x\d+_aux_residual")
_FILTER_SUFFIX = ".resample_filter"
_FREQS = "map_noise.freqs"


def _rule(key: str):
  return match_rule(_LEAF_RULES, key)


def flax_path(key: str) -> tuple[str, ...] | None:
  """The Flax param path of an EDM SongUNet state-dict key, or None for a key no rule covers.

  Example: "enc.16x16_block0.conv0.weight" -> ("enc_16x16_block0", "conv0", "kernel").
  """
  rule = _rule(key)
  if rule is None:
    return None
  parts = key.split(".")[:-1]
  if parts[0] in ("enc", "dec") and len(parts) > 1:
    parts = [f"{parts[0]}_{parts[1]}", *parts[2:]]
  return (*parts, rule[0])


def torch_key(path: tuple[str, ...]) -> str:
  """The EDM state-dict key of a Flax param path (the inverse of `flax_path`)."""
  modules = [re.sub(r"^(enc|dec)_", r"\1.", path[0]), *path[1:-1]]
  return ".".join([*modules, "bias" if path[-1] == "bias" else "weight"])


def _network(config: Mapping | songunet.SongUNet) -> songunet.SongUNet:
  return module_from_config(config, songunet.SongUNet, "songunet", songunet.build)


def _check_buffer(key: str, value: Array, net: songunet.SongUNet,
                  modules: set[tuple[str, ...]]) -> str | None:
  """None if the buffer `key` is consistent with the network, else the problem."""
  if key == _FREQS:
    if net.embedding_type != "fourier":
      return f"{key}: the config's embedding_type is {net.embedding_type!r}, not 'fourier'"
    expected = songunet.fourier_frequencies(net)
    if value.shape != expected.shape or not np.array_equal(value.astype(np.float32), expected):
      return (f"{key}: differs from the config's fourier_freqs (set config['fourier_freqs'] = "
              f"state['{_FREQS}'].tolist())")
    return None
  conv = key[:-len(_FILTER_SUFFIX)]
  if not _RESAMPLING_CONV.fullmatch(conv) or flax_path(conv + ".weight")[:-1] not in modules:
    return f"{key}: no resampling convolution {conv} in this network"
  expected = resample_filter_2d(net.resample_filter)
  if value.size != expected.size or not np.allclose(value.reshape(expected.shape), expected, atol=1e-7):
    return f"{key}: is not the filter of resample_filter={list(net.resample_filter)}"
  return None


def torch_state_to_flax(state: Mapping[str, Array], config: Mapping | songunet.SongUNet) -> dict:
  """Converts an EDM SongUNet state dict to Flax params for the SongUNet that `config` describes.

  Args:
    state: flat {key: array} with EDM's keys (no "model." prefix); torch tensors must be NumPy first.
      Buffers may be present (they are checked, not converted) or absent.
    config: a SongUNet config dict ("arch" optional) or a `SongUNet`. For NCSN++ its `fourier_freqs`
      must equal the state's `map_noise.freqs`.

  Returns:
    Nested {"map_layer0": {"kernel": ..., ...}, ...} of float32 NumPy arrays.

  Raises:
    ValueError: listing every key without a rule or a matching param, every shape mismatch, every
      param without a key, and every buffer inconsistent with the config.
  """
  net = _network(config)
  shapes = param_shapes(net)
  modules = {path[:-1] for path in shapes}
  problems, params = [], {}
  for key, value in state.items():
    value = np.asarray(value)
    if key == _FREQS or key.endswith(_FILTER_SUFFIX):
      problems.append(_check_buffer(key, value, net, modules))
      continue
    path = flax_path(key)
    if path is None or path not in shapes:
      problems.append(f"{key}: no matching Flax parameter" + (f" {'/'.join(path)}" if path else ""))
      continue
    converted = _rule(key)[1](value.astype(np.float32))
    if converted.shape != shapes[path]:
      problems.append(f"{key}: shape {value.shape} converts to {converted.shape}, {'/'.join(path)} "
                      f"expects {shapes[path]}")
      continue
    params[path] = np.ascontiguousarray(converted)
  problems += [f"{'/'.join(path)}: no state-dict key {torch_key(path)}" for path in shapes
               if torch_key(path) not in state]
  problems = [p for p in problems if p]
  if problems:
    raise ValueError("cannot convert the SongUNet state dict:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(params)


def flax_to_torch_state(params: Mapping, config: Mapping | songunet.SongUNet) -> dict[str, Array]:
  """EDM's state dict (NumPy float32, buffers included) of Flax SongUNet params; inverts
  `torch_state_to_flax`."""
  net = _network(config)
  state = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    key = torch_key(path)
    state[key] = np.ascontiguousarray(_rule(key)[2](np.asarray(value, np.float32)))
    conv = key[:-len(".weight")]
    if key.endswith(".weight") and _RESAMPLING_CONV.fullmatch(conv):
      state[conv + _FILTER_SUFFIX] = resample_filter_2d(net.resample_filter)[None, None]
  if net.embedding_type == "fourier":
    state[_FREQS] = songunet.fourier_frequencies(net)
  return state


# ---------------------------------------------------------------------------------------------------
# Restricted unpickling.


class PersistentObject:
  """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` would have rebuilt, as data.

  Attributes:
    class_name: the class's name in its (never executed) module source.
    module_src: that source, as text.
    version: the persistence format version.
    state: the object's `__dict__` (for a torch module: `_parameters`, `_buffers`, `_modules`, ...).
    init_args: the constructor's positional arguments (empty tuple if not recorded).
    init_kwargs: the constructor's keyword arguments (empty dict if not recorded).
  """

  def __init__(self, meta: Mapping):
    if not isinstance(meta, Mapping) or meta.get("type") != "class":
      raise pickle.UnpicklingError("persistent object meta is not a 'class' record")
    self.class_name = str(meta.get("class_name"))
    self.module_src = meta.get("module_src", "")
    self.version = meta.get("version")
    self.state = dict(meta.get("state") or {})
    self.init_args = tuple(self.state.get("_init_args") or ())
    self.init_kwargs = dict(self.state.get("_init_kwargs") or {})

  def __repr__(self) -> str:
    return f"PersistentObject({self.class_name})"


class TorchModule:
  """A plain torch.nn container (ModuleDict, ModuleList, Sequential) as data: its `state` dict."""
  class_name = "Module"

  def __setstate__(self, state: Mapping):
    self.state = dict(state)

  def __repr__(self) -> str:
    return f"TorchModule({self.class_name})"


_CONTAINERS = {name: type(name, (TorchModule,), {"class_name": name})
               for name in ("ModuleDict", "ModuleList", "Sequential")}


class _TensorType:
  """Stands for torch.Tensor / torch.nn.Parameter where a rebuild function names the type."""


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
  """A torch.<X>Storage class named in a storage pickle: just its NumPy dtype."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _StorageUnpickler(pickle.Unpickler):
  """Unpickles the inner pickles of torch's legacy format: storage types and storage references."""

  def __init__(self, file: BinaryIO):
    super().__init__(file)
    self.storages: dict[str, tuple[np.dtype, int]] = {}

  def find_class(self, module: str, name: str):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    raise pickle.UnpicklingError(f"refusing global {module}.{name} in a tensor storage")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}")
    _, storage_type, key, _, numel, view = pid
    if view is not None:
      raise pickle.UnpicklingError("storage views are not supported")
    self.storages[str(key)] = (storage_type.dtype, int(numel))
    return str(key)


def _load_storage(data: bytes) -> Array:
  """A 1-D array from the bytes of torch's `storage.__reduce__` (`torch.save` in the legacy format).

  The format: pickles of the magic number, the protocol version and system info, then a pickle of the
  storage whose persistent id names (type, key, location, numel, view), then the sorted storage keys,
  then per key an int64 element count and the raw little-endian data.
  """
  if not isinstance(data, (bytes, bytearray)):
    raise pickle.UnpicklingError("tensor storage is not a byte string")
  f = io.BytesIO(data)
  if _StorageUnpickler(f).load() != _LEGACY_MAGIC or _StorageUnpickler(f).load() != _LEGACY_PROTOCOL:
    raise pickle.UnpicklingError("tensor storage is not in torch's legacy serialisation format")
  if not _StorageUnpickler(f).load().get("little_endian", False):
    raise pickle.UnpicklingError("big-endian tensor storages are not supported")
  unpickler = _StorageUnpickler(f)
  key = unpickler.load()
  arrays = {}
  for stored in _StorageUnpickler(f).load():
    dtype, numel = unpickler.storages[str(stored)]
    count = int(np.frombuffer(f.read(8), "<i8")[0])
    raw = f.read(count * dtype.itemsize)
    if count != numel or len(raw) != count * dtype.itemsize:
      raise pickle.UnpicklingError("truncated or inconsistent tensor storage")
    arrays[str(stored)] = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype)
  return arrays[key]


def _rebuild_tensor(storage: Array, offset: int, size, stride, *unused) -> Array:
  """torch._utils._rebuild_tensor(_v2): a strided view of a storage, copied into a NumPy array."""
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise pickle.UnpicklingError("tensor without a decoded storage")
  size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise pickle.UnpicklingError(f"invalid tensor geometry size={size} stride={stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size} runs past its storage of {storage.size}")
  strides = tuple(s * storage.itemsize for s in stride)
  return np.lib.stride_tricks.as_strided(storage[offset:], size, strides).copy()


def _rebuild_parameter(data: Array, *unused) -> Array:
  """torch._utils._rebuild_parameter(_with_state): the parameter's data."""
  return data


def _rebuild_from_type(func: Callable, new_type, args: tuple, state) -> Array:
  """torch._tensor._rebuild_from_type_v2 for plain tensors and parameters."""
  if new_type is not _TensorType or func not in (_rebuild_tensor, _rebuild_parameter):
    raise pickle.UnpicklingError("unsupported tensor subclass")
  return func(*args)


def _numpy_globals() -> dict[tuple[str, str], Any]:
  """NumPy's array, scalar and dtype reconstructors under their NumPy 1 and 2 module names."""
  found = {"_reconstruct": np.array(0).__reduce__()[0], "scalar": np.float64(0).__reduce__()[0],
           "_frombuffer": np.arange(2).__reduce_ex__(5)[0]}
  table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
  for core in ("numpy.core", "numpy._core"):
    table[(f"{core}.multiarray", "_reconstruct")] = found["_reconstruct"]
    table[(f"{core}.multiarray", "scalar")] = found["scalar"]
    table[(f"{core}.numeric", "_frombuffer")] = found["_frombuffer"]
  return table


_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._tensor", "Tensor"): _TensorType,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): dict,
    **{("torch.nn.modules.container", name): cls for name, cls in _CONTAINERS.items()},
    **_numpy_globals(),
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of `_GLOBALS`; refuses everything else (and persistent ids)."""

  def find_class(self, module: str, name: str):
    try:
      return _GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from an EDM pickle") from None

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")


def load_pickle(source: str | Path | bytes | BinaryIO) -> Any:
  """Unpickles an EDM pickle safely: persistent network objects become `PersistentObject` records,
  tensors NumPy arrays; no code from the pickle runs and neither EDM nor torch is imported.

  Args:
    source: a path, the pickle's bytes, or a binary file object.

  Raises:
    pickle.UnpicklingError: on any global outside the allowed table, a malformed tensor, or a file that
      is empty, truncated or not a pickle.
  """
  if isinstance(source, (bytes, bytearray)):
    return _unpickle(io.BytesIO(source))
  if isinstance(source, (str, Path)):
    with open(source, "rb") as f:
      return _unpickle(f)
  return _unpickle(source)


def _unpickle(file: BinaryIO) -> Any:
  """`_RestrictedUnpickler(file).load()`; the errors of malformed data become `UnpicklingError`."""
  try:
    return _RestrictedUnpickler(file).load()
  except EOFError:
    raise pickle.UnpicklingError("the file is empty or truncated (not a complete pickle)") from None
  except (ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
    if isinstance(err, pickle.UnpicklingError):
      raise
    raise pickle.UnpicklingError(f"not a readable pickle ({type(err).__name__}: {err})") from None


def describe(obj: Any) -> str:
  """A short description of an unpickled object for error messages, e.g. "a persistent EDMLoss
  object", "a dict with keys 'a', 'b'", "a float32 array of shape (3, 4)"."""
  if isinstance(obj, PersistentObject):
    return f"a persistent {obj.class_name} object"
  if isinstance(obj, TorchModule):
    return f"a torch.nn.{obj.class_name} container"
  if isinstance(obj, np.ndarray):
    return f"a {obj.dtype} array of shape {obj.shape}"
  if isinstance(obj, Mapping):
    if not obj:
      return "an empty dict"
    keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
    return f"a dict with keys {keys}"
  if isinstance(obj, (list, tuple)):
    return f"a {type(obj).__name__} of {len(obj)} items"
  return "None" if obj is None else f"a {type(obj).__name__}"


def state_dict(module: PersistentObject | TorchModule, prefix: str = "") -> dict[str, Array]:
  """The flat PyTorch-style state dict of a module record: parameters and persistent buffers (skipping
  None entries), then submodules, keys joined with dots.
  """
  state = module.state
  skipped = set(state.get("_non_persistent_buffers_set") or ())
  out = {}
  for group in ("_parameters", "_buffers"):
    for name, value in (state.get(group) or {}).items():
      if value is None or (group == "_buffers" and name in skipped):
        continue
      if not isinstance(value, np.ndarray):
        raise ValueError(f"{prefix}{name}: expected an array, got {type(value).__name__}")
      out[prefix + name] = value
  for name, child in (state.get("_modules") or {}).items():
    if child is not None:
      out.update(state_dict(child, f"{prefix}{name}."))
  return out


def songunet_config(model: PersistentObject) -> dict:
  """The full SongUNet config of an EDM SongUNet record (its init args; Fourier frequencies from its
  `map_noise.freqs` buffer)."""
  if model.class_name != "SongUNet":
    raise ValueError(f"the network's model is a {model.class_name}; only SongUNet is supported")
  if len(model.init_args) > len(songunet.EDM_ARGS):
    raise ValueError(f"SongUNet was built with {len(model.init_args)} positional arguments")
  kwargs = {**dict(zip(songunet.EDM_ARGS, model.init_args)), **model.init_kwargs}
  unknown = set(kwargs) - set(songunet.EDM_ARGS)
  if unknown:
    raise ValueError(f"unsupported SongUNet arguments in the pickle: {', '.join(sorted(unknown))}")
  if kwargs.get("embedding_type") == "fourier":
    kwargs["fourier_freqs"] = np.asarray(state_dict(model)[_FREQS], np.float32).tolist()
  return songunet.config_of(songunet.build(**kwargs))


# The preconditioning classes `load_edm_pickle` converts: their value in `pspc_jax.edm`, built from the
# attributes of the same names (VPPrecond, VEPrecond: EDM's VP and VE baselines).
_PRECONDS = {"EDMPrecond": (EDMPrecond, ("sigma_data",)),
             "VPPrecond": (VPPrecond, ("beta_d", "beta_min", "M", "epsilon_t")),
             "VEPrecond": (VEPrecond, ("sigma_min", "sigma_max"))}
_COMMON_ATTRS = {"label_dim": int, "use_fp16": bool, "img_resolution": int, "img_channels": int,
                 "sigma_min": float, "sigma_max": float}


class EDMNetwork(NamedTuple):
  """A network read from an EDM pickle.

  Attributes:
    config: the SongUNet config (for `pspc_jax.nets.make_network`).
    params: its Flax params.
    precond: the preconditioning value (`pspc_jax.edm.EDMPrecond`, `VPPrecond` or `VEPrecond`).
    info: the preconditioning object's settings as stored: {"class_name", "label_dim", "use_fp16",
      "img_resolution", "img_channels", "sigma_min", "sigma_max"} and the class's own fields
      ("sigma_data"; "beta_d", "beta_min", "M", "epsilon_t"; none for VEPrecond).
  """
  config: dict
  params: dict
  precond: Preconditioning
  info: dict


def _precond_of(net: PersistentObject) -> tuple[Preconditioning, dict]:
  """(the preconditioning value, the stored settings) of an EDMPrecond/VPPrecond/VEPrecond record.

  Raises:
    ValueError: an attribute is missing or invalid.
  """
  cls, fields = _PRECONDS[net.class_name]
  state = net.state
  missing = [name for name in (*_COMMON_ATTRS, *fields) if name not in state]
  if missing:
    raise ValueError(f"the {net.class_name} lacks {', '.join(missing)}")
  try:
    info = {"class_name": net.class_name,
            **{name: kind(state[name]) for name, kind in _COMMON_ATTRS.items()},
            **{name: state[name] for name in fields}}
    precond = cls(**{name: info[name] for name in fields})
  except (TypeError, ValueError) as err:
    raise ValueError(f"the {net.class_name} has invalid settings: {err}") from None
  return precond, {**info, **{name: getattr(precond, name) for name in fields}}


def load_edm_pickle(source: str | Path | bytes | BinaryIO, key: str = "ema") -> EDMNetwork:
  """Reads an EDM network pickle into a SongUNet and its preconditioning.

  EDM's own networks (edm-cifar10-32x32-uncond-vp.pkl, ...) are EDMPrecond objects; its baselines
  (baseline-cifar10-32x32-uncond-vp.pkl / -ve.pkl, ...) are VPPrecond and VEPrecond objects. The
  class the pickle names decides the preconditioning (`pspc_jax.edm`, Table 1 of Karras et al.).

  Args:
    source: as for `load_pickle`.
    key: the entry of the pickled dict holding the network ("ema" in EDM's snapshots); ignored when
      the pickle holds the network itself.

  Returns:
    EDMNetwork(config, params, precond, info).

  Raises:
    pickle.UnpicklingError: see `load_pickle`.
    ValueError: the pickle holds no EDMPrecond/VPPrecond/VEPrecond-wrapped SongUNet (iDDPMPrecond is
      refused), its settings are incomplete, or its state does not convert.
  """
  root = load_pickle(source)
  net = root
  if isinstance(root, Mapping):
    if key not in root:
      raise ValueError(f"the pickle has no {key!r} entry; it has {', '.join(map(str, root))}")
    net = root[key]
  if isinstance(net, PersistentObject) and net.class_name == "iDDPMPrecond":
    raise ValueError("the network is an iDDPMPrecond: EDM's iDDPM baseline (a DhariwalUNet with "
                     "learned variances) is not supported; convert an EDMPrecond, VPPrecond or "
                     "VEPrecond network")
  if not isinstance(net, PersistentObject) or net.class_name not in _PRECONDS:
    where = f"entry {key!r}" if isinstance(root, Mapping) else "pickle"
    raise ValueError(f"expected an EDMPrecond, VPPrecond or VEPrecond network, but the {where} holds "
                     f"{describe(net)}")
  model = (net.state.get("_modules") or {}).get("model")
  if not isinstance(model, PersistentObject):
    raise ValueError(f"the {net.class_name} has no persistent 'model' submodule")
  precond, info = _precond_of(net)
  config = songunet_config(model)
  params = torch_state_to_flax(state_dict(model), config)
  return EDMNetwork(config, params, precond, info)
