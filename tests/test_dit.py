"""DiT in Flax: shapes, initialisation, fixed embeddings, checkpoint reading and conversion."""

import argparse
import contextlib
import functools
import json
import math
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax.nets import dit, make_network, presets
from pspc_jax.nets.dit_convert import (dit_state_to_flax, flax_path, flax_to_dit_state, load_dit_params,
                                       load_state_dict, read_safetensors, torch_key)

TINY = {"arch": "dit", "img_resolution": 8, "in_channels": 3, "patch_size": 2, "hidden_size": 32,
        "depth": 2, "num_heads": 4, "label_dim": 5}


@functools.lru_cache(maxsize=None)
def tiny():
  """(net, params, x, c_noise, labels) for TINY, every param random (none zero-initialised)."""
  net = make_network(TINY)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  c_noise = jnp.asarray(np.log([0.01, 5.0]) / 4, jnp.float32)
  labels = jnp.array([1, 4])
  shapes = jax.eval_shape(lambda key: net.init(key, x, c_noise, labels), jax.random.key(0))["params"]
  params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), jnp.float32), shapes)
  return net, params, x, c_noise, labels


def test_presets_and_dit_b4_parameter_count():
  for name in ("dit_b4_cifar10", "dit_small"):
    assert json.loads(json.dumps(presets()[name])) == presets()[name]
  net = make_network("dit_b4_cifar10")
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda key: net.init(key, x, jnp.zeros((1,))), jax.random.key(0))
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == 129_583_920
  assert sorted(shapes["params"]) == sorted(
      ["x_embedder", "t_embedder", "final_layer"] + [f"blocks_{i}" for i in range(12)])
  small = make_network({**presets()["dit_small"], "img_resolution": 8, "in_channels": 1})
  x = jax.ShapeDtypeStruct((5, 8, 8, 1), jnp.float32)
  out = jax.eval_shape(lambda x: small.init_with_output(jax.random.key(0), x, jnp.zeros((5,)))[0], x)
  assert out.shape == (5, 8, 8, 1)


def test_small_forward_is_jittable_and_exactly_zero_at_init():
  net = make_network({**presets()["dit_small"], "label_dim": 4})
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  labels = jnp.array([0, 3, 1])

  @jax.jit
  def init_and_apply(x, c_noise):
    variables = net.init(jax.random.key(0), x, c_noise, labels)
    return variables, net.apply(variables, x, c_noise, labels, train=True,
                                rngs={"dropout": jax.random.key(2)})

  variables, out = init_and_apply(x, jnp.log(jnp.array([0.002, 1.0, 80.0])) / 4)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)
  params = variables["params"]
  assert not np.any(params["blocks_0"]["adaLN_modulation_1"]["kernel"])
  assert not np.any(params["final_layer"]["linear"]["kernel"])
  bound = math.sqrt(6 / (3 * 2 * 2 + 128))  # xavier-uniform over the flattened (p·p·C, D) patch kernel
  patch = np.asarray(params["x_embedder"]["proj"]["kernel"])
  assert 0.95 * bound < np.abs(patch).max() <= bound
  assert np.std(params["t_embedder"]["mlp_0"]["kernel"]) == pytest.approx(0.02, rel=0.1)


def test_sincos_position_embedding_matches_hand_formula():
  dim, grid = 16, 3
  emb = dit.sincos_position_embedding(dim, grid)
  assert emb.shape == (grid * grid, dim)
  quarter = dim // 4
  for token in range(grid * grid):
    row, col = divmod(token, grid)
    for k in range(quarter):
      w = 10000.0 ** (-k / quarter)
      expected = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
      np.testing.assert_allclose(emb[token, k::quarter], expected, rtol=0, atol=1e-7)


def test_timestep_embedding_and_noise_mapping():
  t = jnp.array([0.0, 3.5, 1000.0])
  emb = np.asarray(dit.timestep_embedding(t, 8))
  freqs = 10000.0 ** (-np.arange(4) / 4)
  angles = np.outer(np.asarray(t), freqs)
  np.testing.assert_allclose(emb, np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=2e-4)
  for sigma, expected in ((0.002, 0.0), (80.0, 1000.0)):
    assert dit.NOISE_SCALE * math.log(sigma) / 4 + dit.NOISE_SHIFT == pytest.approx(expected, abs=1e-9)


def test_noise_scale_and_shift_are_applied_before_the_embedding():
  net, params, x, c_noise, labels = tiny()
  plain = dit.build(**{**{k: v for k, v in TINY.items() if k != "arch"}, "noise_scale": 1.0,
                       "noise_shift": 0.0})
  out = net.apply({"params": params}, x, c_noise, labels)
  t = net.noise_scale * c_noise + net.noise_shift
  np.testing.assert_allclose(out, plain.apply({"params": params}, x, t, labels), atol=1e-5)
  assert float(jnp.abs(out).max()) > 0.1


def test_class_labels_integer_one_hot_null_and_dropout():
  net, params, x, c_noise, labels = tiny()
  out = net.apply({"params": params}, x, c_noise, labels)
  one_hot = jax.nn.one_hot(labels, TINY["label_dim"])
  np.testing.assert_allclose(net.apply({"params": params}, x, c_noise, one_hot), out, atol=1e-5)
  null = net.apply({"params": params}, x, c_noise, None)
  assert float(jnp.abs(null - out).max()) > 1e-3
  always_drop = net.clone(class_dropout_prob=1.0)
  dropped = always_drop.apply({"params": params}, x, c_noise, labels, train=True,
                              rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(dropped, null, atol=1e-5)


def test_dropout_acts_in_training_only():
  net, params, x, c_noise, labels = tiny()
  net = net.clone(dropout=0.5)
  evaluate = net.apply({"params": params}, x, c_noise, labels)
  np.testing.assert_array_equal(evaluate, net.clone(dropout=0.0).apply({"params": params}, x, c_noise, labels))
  trained = net.apply({"params": params}, x, c_noise, labels, train=True, rngs={"dropout": jax.random.key(1)})
  assert float(jnp.abs(trained - evaluate).max()) > 1e-3


def test_rejects_inputs_the_network_cannot_use():
  net, params, x, c_noise, labels = tiny()
  with pytest.raises(ValueError, match="augment"):
    net.apply({"params": params}, x, c_noise, labels, augment_labels=jnp.zeros((2, 9)))
  with pytest.raises(ValueError, match="expects inputs"):
    net.apply({"params": params}, x[:, :4], c_noise, labels)
  with pytest.raises(ValueError, match="unconditional"):
    make_network({**TINY, "label_dim": 0}).init(jax.random.key(0), x, c_noise, labels)
  with pytest.raises(ValueError, match="multiple"):
    make_network({**TINY, "hidden_size": 30})


def test_path_rule():
  assert flax_path("blocks.3.adaLN_modulation.1.weight") == ("blocks_3", "adaLN_modulation_1", "kernel")
  assert flax_path("t_embedder.mlp.0.bias") == ("t_embedder", "mlp_0", "bias")
  assert flax_path("y_embedder.embedding_table.weight") == ("y_embedder", "embedding_table", "embedding")
  assert torch_key(("blocks_11", "mlp", "fc2", "kernel")) == "blocks.11.mlp.fc2.weight"


def test_conversion_round_trip_and_layouts():
  net, params, x, c_noise, labels = tiny()
  state = flax_to_dit_state(params, TINY)
  assert state["x_embedder.proj.weight"].shape == (32, 3, 2, 2)  # OIHW
  assert state["blocks.0.attn.qkv.weight"].shape == (96, 32)  # (out, in)
  assert state["final_layer.linear.weight"].shape == (12, 32)
  assert state["pos_embed"].shape == (1, 16, 32)
  back = dit_state_to_flax(state, TINY)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  np.testing.assert_allclose(net.apply({"params": back}, x, c_noise, labels),
                             net.apply({"params": params}, x, c_noise, labels), atol=1e-6)


def test_conversion_reports_every_problem():
  _, params, *_ = tiny()
  state = flax_to_dit_state(params, TINY)
  state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"][:5]
  state["extra.weight"] = np.zeros(3)
  state["pos_embed"] = state["pos_embed"] + 0.1
  del state["final_layer.linear.bias"]
  with pytest.raises(ValueError) as err:
    dit_state_to_flax(state, TINY)
  message = str(err.value)
  for part in ("blocks.0.mlp.fc1.weight: shape", "extra.weight: no matching", "pos_embed: differs",
               "final_layer/linear/bias: no state-dict key final_layer.linear.bias"):
    assert part in message
  with pytest.raises(ValueError, match="embedding_table.weight: 6 rows: the network is class-conditional"):
    dit_state_to_flax(flax_to_dit_state(params, TINY), {**TINY, "label_dim": 0})


def _unconditional_state(table_rows, seed=0):
  """(state of an unconditional TINY DiT plus a (table_rows, 32) class table, its params, the table)."""
  rng = np.random.default_rng(seed)
  config = {**TINY, "label_dim": 0}
  _, params, *_ = tiny()
  params = {k: v for k, v in params.items() if k != "y_embedder"}
  table = (0.2 * rng.standard_normal((table_rows, TINY["hidden_size"]))).astype(np.float32)
  state = {**flax_to_dit_state(params, config), "y_embedder.embedding_table.weight": table}
  return state, params, table, config


def test_empty_class_table_of_an_unconditional_dit_is_accepted():
  # DiT(num_classes=0, class_dropout_prob=0) saves an empty (0, D) class table: it holds no parameter.
  state, params, _, config = _unconditional_state(0)
  converted = dit_state_to_flax(state, config)
  jax.tree.map(np.testing.assert_array_equal, converted, jax.tree.map(np.asarray, params))


def test_null_class_table_of_an_unconditional_dit_is_refused_with_advice_or_folded():
  # DiT(num_classes=0) with label dropout holds one row, the null class, and adds it to c for every
  # sample: c = t_embedder(t) + row. The same network is a DiT with one class and no dropout, given
  # label 0 (an independent reference for the folded conversion).
  state, params, table, config = _unconditional_state(1)
  with pytest.raises(ValueError, match="null class .* fold_null_class=True"):
    dit_state_to_flax(state, config)
  folded = dit_state_to_flax(state, config, fold_null_class=True)
  reference = make_network({**TINY, "label_dim": 1, "class_dropout_prob": 0.0})
  reference_params = {**params, "y_embedder": {"embedding_table": {"embedding": table}}}
  _, _, x, c_noise, _ = tiny()
  expected = reference.apply({"params": reference_params}, x, c_noise, jnp.zeros((2,), jnp.int32))
  out = make_network(config).apply({"params": folded}, x, c_noise)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert float(jnp.abs(out - make_network(config).apply({"params": params}, x, c_noise)).max()) > 1e-3
  with pytest.raises(ValueError, match="holds no"):
    dit_state_to_flax(_unconditional_state(0)[0], config, fold_null_class=True)


def test_class_table_with_or_without_a_null_row_names_the_config_to_use():
  _, params, *_ = tiny()  # label_dim 5 with label dropout: 6 rows, the last the null class.
  state = flax_to_dit_state(params, TINY)
  with pytest.raises(ValueError, match="set label_dim to 6 with class_dropout_prob 0 .* or to 5 with "
                                       "class_dropout_prob > 0"):
    dit_state_to_flax(state, {**TINY, "class_dropout_prob": 0.0})


def test_drop_learned_sigma_keeps_the_mean_channels():
  _, params, *_ = tiny()
  state = flax_to_dit_state(params, TINY)
  rng = np.random.default_rng(3)
  for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
    mean = state[key].reshape(4, 3, *state[key].shape[1:])  # (p·p, C, ...)
    state[key] = np.concatenate([mean, rng.standard_normal(mean.shape)], axis=1).reshape(
        24, *state[key].shape[1:])
  with pytest.raises(ValueError, match="final_layer.linear.weight: shape"):
    dit_state_to_flax(state, TINY)
  back = dit_state_to_flax(state, TINY, drop_learned_sigma=True)
  np.testing.assert_array_equal(back["final_layer"]["linear"]["kernel"],
                                params["final_layer"]["linear"]["kernel"])


def _write_safetensors(path, tensors, header_extra=None):
  """Writes the safetensors byte layout by hand: u64 LE header size, JSON header, raw LE buffers."""
  header, chunks, offset = dict(header_extra or {}), [], 0
  for name, (dtype_name, array) in tensors.items():
    raw = array.tobytes()
    header[name] = {"dtype": dtype_name, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  header_bytes = json.dumps(header).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)
  path.write_bytes(np.uint64(len(header_bytes)).astype("<u8").tobytes() + header_bytes + b"".join(chunks))


def test_read_safetensors(tmp_path):
  rng = np.random.default_rng(0)
  f32 = rng.standard_normal((3, 4)).astype("<f4")
  f16 = rng.standard_normal((5,)).astype("<f2")
  i64 = np.arange(6, dtype="<i8").reshape(2, 3)
  bf16_values = np.array([1.0, -2.5, 0.15625], np.float32)
  bf16 = (bf16_values.view(np.uint32) >> 16).astype("<u2")
  path = tmp_path / "w.safetensors"
  _write_safetensors(path, {"a.weight": ("F32", f32), "b": ("F16", f16), "c": ("I64", i64),
                            "d": ("BF16", bf16), "e": ("U8", np.array([7], np.uint8))},
                     {"__metadata__": {"format": "pt"}})
  got = load_state_dict(path)
  assert sorted(got) == ["a.weight", "b", "c", "d", "e"]
  np.testing.assert_array_equal(got["a.weight"], f32)
  np.testing.assert_array_equal(got["b"], f16)
  np.testing.assert_array_equal(got["c"], i64)
  np.testing.assert_array_equal(got["d"], bf16_values)
  assert got["d"].dtype == np.float32 and got["e"].tolist() == [7]
  bad = tmp_path / "bad.safetensors"
  _write_safetensors(bad, {"a": ("F32", f32)})
  bad.write_bytes(bad.read_bytes()[:-4])
  with pytest.raises(ValueError, match="offsets"):
    read_safetensors(bad)


def test_load_dit_params_from_torch_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  _, params, *_ = tiny()
  state = {k: torch.from_numpy(v) for k, v in flax_to_dit_state(params, TINY).items()}
  state["blocks.1.mlp.fc2.bias"] = state["blocks.1.mlp.fc2.bias"].bfloat16()
  path = tmp_path / "ckpt.pt"
  torch.save({"model": {}, "ema": state, "args": argparse.Namespace(model="DiT-B/4")}, path)
  back = load_dit_params(path, TINY)
  np.testing.assert_array_equal(back["blocks_0"]["attn"]["qkv"]["kernel"],
                                params["blocks_0"]["attn"]["qkv"]["kernel"])
  np.testing.assert_allclose(back["blocks_1"]["mlp"]["fc2"]["bias"], params["blocks_1"]["mlp"]["fc2"]["bias"],
                             rtol=1e-2)


def test_torch_checkpoints_without_torch_name_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ValueError, match=r"needs torch \(pip install 'pspc-jax\[convert\]'\)"):
    load_state_dict(tmp_path / "ckpt.pt")


class _FakeTorch(types.ModuleType):
  """Stands for torch: `load` raises what torch raises for the file, after recording its arguments."""

  def __init__(self, error):
    super().__init__("torch")
    self.error, self.calls = error, []
    self.Tensor = type("Tensor", (), {})
    self.serialization = types.SimpleNamespace(safe_globals=lambda allowed: contextlib.nullcontext())

  def load(self, path, **kwargs):
    self.calls.append(kwargs)
    raise self.error


# The message torch 2.6 gives for a file holding code, which advises loading it unsafely.
_TORCH_REFUSAL = (
    "Weights only load failed. This file can still be loaded, to do so you have two options, do those "
    "steps only if you trust the source of the checkpoint.\n\t(1) In PyTorch 2.6, we changed the "
    "default value of the `weights_only` argument in `torch.load` from `False` to `True`. Re-running "
    "`torch.load` with `weights_only` set to `False` will likely succeed, but it can result in "
    "arbitrary code execution.\nWeightsUnpickler error: Unsupported global: GLOBAL posix.system was "
    "not an allowed global by default.")


@pytest.mark.parametrize("error, message", [
    (pickle.UnpicklingError(_TORCH_REFUSAL),
     "holds code or objects that are not tensors \\(it references posix.system\\); it will not be loaded"),
    (RuntimeError("Invalid magic number; corrupt file? (weights_only=False would not help)"),
     "not a readable PyTorch file \\(RuntimeError\\)"),
    (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"),
     "not a readable PyTorch file \\(PytorchStreamReader failed"),
])
def test_torch_files_holding_code_are_refused_without_unsafe_advice(tmp_path, monkeypatch, error,
                                                                     message):
  fake = _FakeTorch(error)
  monkeypatch.setitem(sys.modules, "torch", fake)
  with pytest.raises(ValueError, match=message) as refused:
    load_state_dict(tmp_path / "payload.pt")
  assert "weights_only" not in str(refused.value) and "False" not in str(refused.value)
  assert fake.calls == [{"map_location": "cpu", "weights_only": True}]


def _torch_block(torch, state, x, c, heads):
  """A DiT block in plain torch.nn.functional math, from a block's PyTorch-layout weights."""
  F = torch.nn.functional
  w = {k: torch.from_numpy(v) for k, v in state.items()}
  mod = F.linear(F.silu(c), w["adaLN_modulation.1.weight"], w["adaLN_modulation.1.bias"])
  shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, None].chunk(6, dim=-1)
  batch, tokens, dim = x.shape
  norm = lambda h: F.layer_norm(h, (dim,), eps=1e-6)
  h = norm(x) * (1 + scale1) + shift1
  q, k, v = F.linear(h, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(
      batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
  attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1) @ v
  attn = F.linear(attn.transpose(1, 2).reshape(batch, tokens, dim), w["attn.proj.weight"], w["attn.proj.bias"])
  x = x + gate1 * attn
  h = norm(x) * (1 + scale2) + shift2
  h = F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"]), approximate="tanh")
  return x + gate2 * F.linear(h, w["mlp.fc2.weight"], w["mlp.fc2.bias"])


def test_block_matches_torch_functional_math():
  torch = pytest.importorskip("torch")
  heads, dim = 4, 32
  block = dit.DiTBlock(num_heads=heads)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, dim)).astype(np.float32)
  c = rng.standard_normal((2, dim)).astype(np.float32)
  params = block.init(jax.random.key(0), x, c)["params"]
  params = jax.tree.map(lambda p: (0.2 * rng.standard_normal(p.shape)).astype(np.float32), params)
  state = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(entry.key for entry in path)
    state[torch_key(keys)] = np.ascontiguousarray(value.T if keys[-1] == "kernel" else value)
  expected = _torch_block(torch, state, torch.from_numpy(x), torch.from_numpy(c), heads).numpy()
  np.testing.assert_allclose(block.apply({"params": params}, x, c), expected, atol=1e-5)
