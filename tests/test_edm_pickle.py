"""EDM state dicts <-> Flax params, and the restricted reader of EDM's persistence pickles."""

import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pspc_jax import edm
from pspc_jax.edm import EDMPrecond, VEPrecond, VPPrecond
from pspc_jax.nets import edm_pickle, songunet
from pspc_jax.nets.precond import precond_apply

CONFIG = {"arch": "songunet", "img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": 3,
          "augment_dim": 2, "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
          "attn_resolutions": [4], "embedding_type": "fourier", "channel_mult_noise": 2,
          "encoder_type": "residual", "resample_filter": [1, 3, 3, 1]}


def _net(**overrides):
  return songunet.build(**{k: v for k, v in CONFIG.items() if k != "arch"}, **overrides)


def _params():
  rng = np.random.default_rng(0)
  flat = {path: rng.standard_normal(shape).astype(np.float32)
          for path, shape in edm_pickle.param_shapes(_net()).items()}
  return traverse_util.unflatten_dict(flat)


def _assert_same(a, b):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg="/".join(path))


def test_key_path_rule():
  cases = {"enc.8x8_conv.weight": ("enc_8x8_conv", "kernel"),
           "enc.4x4_down.norm0.weight": ("enc_4x4_down", "norm0", "scale"),
           "dec.4x4_in0.qkv.bias": ("dec_4x4_in0", "qkv", "bias"),
           "dec.8x8_aux_norm.weight": ("dec_8x8_aux_norm", "scale"),
           "map_layer0.weight": ("map_layer0", "kernel"),
           "enc.4x4_block0.affine.weight": ("enc_4x4_block0", "affine", "kernel")}
  for key, path in cases.items():
    assert edm_pickle.flax_path(key) == path and edm_pickle.torch_key(path) == key
  assert edm_pickle.flax_path("map_noise.freqs") is None


def test_state_round_trip_and_torch_layouts():
  params = _params()
  state = edm_pickle.flax_to_torch_state(params, CONFIG)
  assert state["enc.8x8_conv.weight"].shape == (16, 1, 3, 3)  # OIHW
  assert state["map_layer0.weight"].shape == (64, 32)  # Linear (out, in)
  np.testing.assert_array_equal(state["map_layer0.weight"], params["map_layer0"]["kernel"].T)
  np.testing.assert_array_equal(state["enc.8x8_conv.weight"][4, 0],
                                params["enc_8x8_conv"]["kernel"][:, :, 0, 4])
  f = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64
  for key in ("enc.4x4_down.conv0", "enc.4x4_down.skip", "enc.4x4_aux_residual", "dec.8x8_up.conv0"):
    np.testing.assert_allclose(state[key + ".resample_filter"], f[None, None])
  assert "enc.8x8_block0.conv0.resample_filter" not in state
  np.testing.assert_array_equal(state["map_noise.freqs"], songunet.fourier_frequencies(_net()))
  _assert_same(edm_pickle.torch_state_to_flax(state, CONFIG), params)


def test_conversion_reports_every_problem():
  state = edm_pickle.flax_to_torch_state(_params(), CONFIG)
  del state["dec.8x8_block1.conv1.bias"]
  state["enc.8x8_block0.conv0.weight"] = state["enc.8x8_block0.conv0.weight"][:, :, :1]
  state["enc.8x8_block0.extra.weight"] = np.zeros((2, 2))
  state["enc.8x8_block0.conv0.resample_filter"] = np.zeros((1, 1, 4, 4))
  state["enc.4x4_down.conv0.resample_filter"] = np.ones((1, 1, 4, 4))
  state["map_noise.freqs"] = state["map_noise.freqs"] + 1
  with pytest.raises(ValueError) as err:
    edm_pickle.torch_state_to_flax(state, CONFIG)
  message = str(err.value)
  for fragment in ("dec_8x8_block1/conv1/bias: no state-dict key dec.8x8_block1.conv1.bias",
                   "enc.8x8_block0.conv0.weight: shape (16, 16, 1, 3) converts to (1, 3, 16, 16)",
                   "enc.8x8_block0.extra.weight: no matching Flax parameter",
                   "enc.8x8_block0.conv0.resample_filter: no resampling convolution",
                   "enc.4x4_down.conv0.resample_filter: is not the filter",
                   "map_noise.freqs: differs from the config's fourier_freqs"):
    assert fragment in message


# ---- pickles in EDM's persistence layout ------------------------------------------------------------


def _reconstruct_persistent_obj(meta):
  raise AssertionError("the reader must never call the pickled reconstruct function")


@pytest.fixture
def persistence(monkeypatch):
  """A fake `torch_utils.persistence` so that pickles name its reconstruct function, as EDM's do."""
  package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
  _reconstruct_persistent_obj.__module__ = module.__name__
  module._reconstruct_persistent_obj = _reconstruct_persistent_obj
  package.persistence = module
  monkeypatch.setitem(sys.modules, "torch_utils", package)
  monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)


def _source(marker):
  """Module source that, if anything executed it, would leave a marker file and fail."""
  return f"open({str(marker)!r}, 'w').write('executed')\nraise RuntimeError('embedded source ran')\n"


def _meta(source, class_name, state):
  return {"type": "class", "version": 6, "module_src": source, "class_name": class_name, "state": state}


class _NumpyPersistent:
  """Pickles as EDM's persistent objects do, with NumPy arrays for tensors."""

  def __init__(self, source, class_name, state):
    self.meta = _meta(source, class_name, state)

  def __reduce__(self):
    return _reconstruct_persistent_obj, (self.meta,)


def _nest(state):
  tree = {}
  for key, value in state.items():
    *modules, leaf = key.split(".")
    node = tree
    for name in modules:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


_BUFFERS = ("resample_filter", "freqs")


def _numpy_module(source, class_name, tree, **attrs):
  params = {k: v for k, v in tree.items() if not isinstance(v, dict) and k not in _BUFFERS}
  buffers = {k: v for k, v in tree.items() if k in _BUFFERS}
  if getattr(params.get("weight"), "ndim", 0) == 4:
    buffers.setdefault("resample_filter", None)  # EDM registers None for non-resampling convs
  modules = {k: _numpy_module(source, "Module", v) for k, v in tree.items() if isinstance(v, dict)}
  state = {"training": False, "_parameters": params, "_buffers": buffers, "_modules": modules,
           "_non_persistent_buffers_set": set(), **attrs}
  return _NumpyPersistent(source, class_name, state)


def _torch_module(torch, source, class_name, tree, **attrs):
  """A torch.nn.Module whose pickle is EDM's persistence layout (state = its __dict__)."""

  class Persistent(torch.nn.Module):

    def __reduce__(self):
      return _reconstruct_persistent_obj, (_meta(source, class_name, dict(self.__dict__)),)

  module = Persistent()
  for name, value in tree.items():
    if isinstance(value, dict):
      child = torch.nn.ModuleDict() if name in ("enc", "dec") else None
      if child is None:
        module.add_module(name, _torch_module(torch, source, "Module", value))
      else:
        for sub, subtree in value.items():
          child[sub] = _torch_module(torch, source, "Module", subtree)
        module.add_module(name, child)
    elif name in _BUFFERS:
      module.register_buffer(name, torch.from_numpy(value))
    else:
      module.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value), requires_grad=False))
  module.__dict__.update(attrs)
  return module


# The attributes EDM's preconditioning classes set in __init__ beside the common ones, as a VPPrecond
# stores them (sigma_min/max = σ(epsilon_t), σ(1) evaluated by EDM in float32).
PRECOND_ATTRS = {
    "EDMPrecond": {"sigma_min": 0, "sigma_max": float("inf"), "sigma_data": 0.5},
    "VPPrecond": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5,
                  "sigma_min": 0.0009765625, "sigma_max": 152.16697692871094},
    "VEPrecond": {"sigma_min": 0.02, "sigma_max": 100},
}


def _edm_pickle(tmp_path, backend, protocol, precond="EDMPrecond"):
  """The bytes of a fabricated EDM snapshot {"ema": <precond>(model=SongUNet), ...} and its params;
  `precond` is EDMPrecond, VPPrecond or VEPrecond (their attributes: `PRECOND_ATTRS`)."""
  params = _params()
  state = edm_pickle.flax_to_torch_state(params, CONFIG)
  source = _source(tmp_path / "marker")
  model_kwargs = {k: v for k, v in CONFIG.items() if k not in ("arch", "img_resolution", "in_channels")}
  model_attrs = {"_init_args": (8, 1), "_init_kwargs": model_kwargs, "label_dropout": 0}
  precond_attrs = {"_init_args": (), "_init_kwargs": {"img_resolution": 8, "img_channels": 1},
                   "img_resolution": 8, "img_channels": 1, "label_dim": 3, "use_fp16": False,
                   **PRECOND_ATTRS[precond]}
  if backend == "torch":
    torch = pytest.importorskip("torch")
    model = _torch_module(torch, source, "SongUNet", _nest(state), **model_attrs)
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    net = _torch_module(torch, source, precond, {}, **precond_attrs)
    net.add_module("model", model)
  else:
    model = _numpy_module(source, "SongUNet", _nest(state), **model_attrs)
    model.meta["state"]["_buffers"]["scratch"] = np.zeros(2)
    model.meta["state"]["_non_persistent_buffers_set"] = {"scratch"}
    net = _numpy_module(source, precond, {}, **precond_attrs)
    net.meta["state"]["_modules"]["model"] = model
  loss = _NumpyPersistent(source, "EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5})
  snapshot = {"ema": net, "loss_fn": loss, "augment_pipe": None, "dataset_kwargs": {"path": "x.zip"}}
  return pickle.dumps(snapshot, protocol=protocol), params


@pytest.mark.parametrize("backend, protocol", [("numpy", 4), ("numpy", 5), ("torch", 4)])
def test_reads_edm_snapshot_without_running_its_code(tmp_path, persistence, backend, protocol):
  data, params = _edm_pickle(tmp_path, backend, protocol)
  assert b"_reconstruct_persistent_obj" in data and b"embedded source ran" in data
  config, loaded, precond, info = edm_pickle.load_edm_pickle(data)
  assert not (tmp_path / "marker").exists()
  _assert_same(loaded, params)
  expected = songunet.config_of(_net(fourier_freqs=songunet.fourier_frequencies(_net()).tolist()))
  assert config == expected
  assert precond == EDMPrecond(0.5)
  assert info == {"class_name": "EDMPrecond", "sigma_data": 0.5, "sigma_min": 0.0,
                  "sigma_max": float("inf"), "label_dim": 3, "use_fp16": False, "img_resolution": 8,
                  "img_channels": 1}
  snapshot = edm_pickle.load_pickle(data)
  assert snapshot["loss_fn"].class_name == "EDMLoss" and snapshot["loss_fn"].state["P_std"] == 1.2
  assert snapshot["ema"].module_src.startswith("open(")
  if backend == "torch":
    model = snapshot["ema"].state["_modules"]["model"]
    assert isinstance(model.state["_modules"]["enc"], edm_pickle.TorchModule)


def test_torch_tensors_decode_without_torch():
  torch = pytest.importorskip("torch")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {"f32": base, "f16": base.half(), "i64": base.long(), "bool": base > 5,
             "transposed": base.t(), "slice": base[1:, 2:5], "scalar": torch.tensor(3.5),
             "param": torch.nn.Parameter(base.double()), "bf16": base.bfloat16()}
  decoded = edm_pickle.load_pickle(pickle.dumps(tensors, protocol=4))
  for name, tensor in tensors.items():
    expected = tensor.detach().float().numpy() if name == "bf16" else tensor.detach().numpy()
    np.testing.assert_array_equal(np.asarray(decoded[name], expected.dtype), expected, err_msg=name)
    assert decoded[name].shape == tuple(tensor.shape)


@pytest.mark.parametrize("payload", [os.system, eval, types.SimpleNamespace(a=1)])
def test_refuses_foreign_globals(payload):
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    edm_pickle.load_pickle(pickle.dumps({"ema": payload}))


def test_rejects_pickles_without_an_edm_precond(tmp_path, persistence):
  data, _ = _edm_pickle(tmp_path, "numpy", 4)
  with pytest.raises(ValueError, match="no 'model' entry"):
    edm_pickle.load_edm_pickle(data, key="model")
  with pytest.raises(ValueError, match="expected an EDMPrecond, VPPrecond or VEPrecond network"):
    edm_pickle.load_edm_pickle(data, key="loss_fn")


@pytest.mark.parametrize("data, message", [
    (b"", "empty or truncated"),
    (pickle.dumps({"ema": [1, 2, 3]})[:-5], "truncated"),
    (b"hello world\n", "Memo value not found"),
    # An allowed global called with arguments it cannot take: OrderedDict(1).
    (b"\x80\x04ccollections\nOrderedDict\nK\x01\x85R.", r"not a readable pickle \(TypeError"),
])
def test_malformed_pickles_raise_unpickling_errors(data, message):
  with pytest.raises(pickle.UnpicklingError, match=message):
    edm_pickle.load_pickle(data)


def test_refusals_say_what_the_pickle_holds(tmp_path, persistence):
  data, _ = _edm_pickle(tmp_path, "numpy", 4)
  with pytest.raises(ValueError, match="the entry 'loss_fn' holds a persistent EDMLoss object$"):
    edm_pickle.load_edm_pickle(data, key="loss_fn")
  with pytest.raises(ValueError, match="the entry 'dataset_kwargs' holds a dict with keys 'path'$"):
    edm_pickle.load_edm_pickle(data, key="dataset_kwargs")
  with pytest.raises(ValueError, match=r"the pickle holds a float32 array of shape \(2, 3\)$"):
    edm_pickle.load_edm_pickle(pickle.dumps(np.zeros((2, 3), np.float32)))
  iddpm = _NumpyPersistent(_source(tmp_path / "marker"), "iDDPMPrecond", {})
  with pytest.raises(ValueError, match="the network is an iDDPMPrecond: EDM's iDDPM baseline"):
    edm_pickle.load_edm_pickle(pickle.dumps({"ema": iddpm}))
  assert not (tmp_path / "marker").exists()


# ---- EDM's VP and VE baselines: Table 1 of Karras et al. (2022) -------------------------------------


def _table1(name, sigma, beta_d=19.9, beta_min=0.1, M=1000, sigma_data=0.5):
  """(c_skip, c_out, c_in, c_noise) of Table 1 in float64 NumPy, each formula as the paper writes it."""
  sigma = np.asarray(sigma, np.float64)
  one = np.ones_like(sigma)
  if name == "vp":
    sigma_inv = (np.sqrt(beta_min**2 + 2 * beta_d * np.log(1 + sigma**2)) - beta_min) / beta_d
    return one, -sigma, 1 / np.sqrt(sigma**2 + 1), (M - 1) * sigma_inv
  if name == "ve":
    return one, sigma, one, np.log(0.5 * sigma)
  var = sigma**2 + sigma_data**2
  return sigma_data**2 / var, sigma * sigma_data / np.sqrt(var), 1 / np.sqrt(var), np.log(sigma) / 4


SIGMAS = np.array([0.002, 0.02, 0.3, 1.0, 2.0, 7.5, 80.0, 150.0])


@pytest.mark.parametrize("precond", [EDMPrecond(0.5), EDMPrecond(0.3), VPPrecond(), VEPrecond(),
                                     VPPrecond(beta_d=10.0, beta_min=0.5, M=500)])
def test_preconditioning_coefficients_match_table_1_in_float64(precond):
  fields = {k: v for k, v in edm.preconditioning_record(precond).items()
            if k in ("beta_d", "beta_min", "M", "sigma_data")}
  expected = _table1(precond.name, SIGMAS, **fields)
  got = precond.coefficients(SIGMAS)
  for name, want, have in zip(("c_skip", "c_out", "c_in", "c_noise"), expected, got):
    assert np.asarray(have).dtype == np.float32 and np.shape(have) == SIGMAS.shape
    np.testing.assert_allclose(np.asarray(have, np.float64), want, rtol=2e-6, atol=1e-7, err_msg=name)


def test_vp_sigma_and_its_inverse_match_table_1():
  t = np.array([1e-5, 1e-3, 0.1, 0.5, 1.0])
  sigma = np.sqrt(np.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
  np.testing.assert_allclose(np.asarray(edm.vp_sigma(t), np.float64), sigma, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(edm.vp_sigma_inv(sigma), np.float64), t, rtol=2e-6)
  assert float(edm.vp_sigma_inv(0.0)) == 0.0
  low, high = VPPrecond().noise_range()
  np.testing.assert_allclose([low, high], sigma[[0, -1]], rtol=2e-6)
  assert VEPrecond().noise_range() == (0.02, 100.0)


def test_preconditioning_values_are_hashable_records():
  for precond in (EDMPrecond(0.25), VPPrecond(M=10), VEPrecond(sigma_max=50.0)):
    record = edm.preconditioning_record(precond)
    assert edm.preconditioning_from_record(record) == precond
    assert hash(edm.preconditioning_from_record(record)) == hash(precond)
  with pytest.raises(ValueError, match="sigma_data must be positive"):
    EDMPrecond(0.0)
  with pytest.raises(ValueError, match="M must be an integer >= 2"):
    VPPrecond(M=1.5)
  with pytest.raises(ValueError, match="one of edm, vp, ve"):
    edm.preconditioning_from_record({"name": "iddpm"})
  with pytest.raises(ValueError, match="unknown fields of the 've' preconditioning: sigma_data"):
    edm.preconditioning_from_record({"name": "ve", "sigma_data": 0.5})


@pytest.mark.parametrize("class_name, expected", [
    ("VPPrecond", VPPrecond(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)),
    ("VEPrecond", VEPrecond(sigma_min=0.02, sigma_max=100.0)),
])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_reads_vp_and_ve_baselines_and_denoises_as_table_1(tmp_path, persistence, class_name,
                                                          expected, backend):
  data, params = _edm_pickle(tmp_path, backend, 4, precond=class_name)
  config, loaded, precond, info = edm_pickle.load_edm_pickle(data)
  assert precond == expected and not (tmp_path / "marker").exists()
  _assert_same(loaded, params)
  assert info["class_name"] == class_name and info["img_resolution"] == 8
  assert info["sigma_max"] == float(PRECOND_ATTRS[class_name]["sigma_max"])
  # D(z, σ) = c_skip z + c_out F(c_in z, c_noise) with the float64 coefficients of Table 1.
  module = songunet.build(**{k: v for k, v in config.items() if k != "arch"})
  z = np.random.default_rng(2).standard_normal((4, 8, 8, 1)).astype(np.float32) * 3
  sigma = np.array([0.002, 0.5, 3.0, 80.0])
  c_skip, c_out, c_in, c_noise = (c[:, None, None, None] if c.ndim else c
                                  for c in _table1(precond.name, sigma))
  raw = np.asarray(module.apply({"params": loaded}, jnp.asarray(c_in * z, jnp.float32),
                                jnp.asarray(c_noise.reshape(-1), jnp.float32)), np.float64)
  expected_d = c_skip * z + c_out * raw
  got = np.asarray(jax.jit(lambda z, s: precond_apply(module, loaded, z, s, precond=precond))(z, sigma))
  np.testing.assert_allclose(got, expected_d, rtol=1e-4, atol=1e-4 * np.abs(expected_d).max())
  # σ = 0: D = z exactly, also for VE, whose c_noise = ln(σ/2) is −inf there.
  zero = np.asarray(precond_apply(module, loaded, z[:1], 0.0, precond=precond))
  np.testing.assert_array_equal(zero, z[:1])


def test_baseline_pickles_with_missing_or_bad_settings_are_refused(tmp_path, persistence):
  data, _ = _edm_pickle(tmp_path, "numpy", 4, precond="VPPrecond")
  snapshot = edm_pickle.load_pickle(data)
  source = _source(tmp_path / "marker")
  # Settings are read before the model, which may then be an empty stand-in.
  state = dict(snapshot["ema"].state, _modules={"model": _NumpyPersistent(source, "SongUNet", {})})
  del state["beta_d"]
  with pytest.raises(ValueError, match="the VPPrecond lacks beta_d"):
    edm_pickle.load_edm_pickle(pickle.dumps({"ema": _NumpyPersistent(source, "VPPrecond", state)}))
  state["sigma_min"] = -1.0
  with pytest.raises(ValueError, match="the VEPrecond has invalid settings: sigma_min must be positive"):
    edm_pickle.load_edm_pickle(pickle.dumps({"ema": _NumpyPersistent(source, "VEPrecond", state)}))
