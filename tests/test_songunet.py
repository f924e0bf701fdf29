"""SongUNet (DDPM++ / NCSN++): parameter counts, shapes, embeddings, init statistics, layer parity with
PyTorch functional ops, and EDM preconditioning."""

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax.nets import make_network, presets, songunet
from pspc_jax.nets.layers import (Conv2d, GroupNorm, UNetBlock, fourier_embedding, positional_embedding,
                                  self_attention)
from pspc_jax.nets.precond import edm_denoiser, precond_apply

TINY = {"img_resolution": 8, "in_channels": 1, "model_channels": 16, "channel_mult": [1, 2],
        "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.1}
TINY_NCSN = {**TINY, "embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
             "resample_filter": [1, 3, 3, 1], "label_dim": 3, "augment_dim": 2}


def _param_count(net) -> int:
  x = jnp.zeros((1, net.img_resolution, net.img_resolution, net.in_channels))
  variables = jax.eval_shape(lambda key: net.init(key, x, jnp.zeros((1,))), jax.random.key(0))
  assert list(variables) == ["params"]
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name, count", [("ddpmpp_cifar10", 55_733_891), ("ncsnpp_cifar10", 56_397_827),
                                         ("ddpmpp_small", 1_032_353)])
def test_preset_parameter_counts(name, count):
  assert _param_count(make_network(name)) == count


def test_presets_are_json_and_small_preset_overridable():
  for name in ("ddpmpp_cifar10", "ncsnpp_cifar10", "ddpmpp_small"):
    config = presets()[name]
    assert config["arch"] == "songunet" and json.loads(json.dumps(config)) == config
  net = make_network({**presets()["ddpmpp_small"], "img_resolution": 16, "in_channels": 3,
                      "attn_resolutions": [8]})
  x = jnp.zeros((2, 16, 16, 3))
  out = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x, jnp.zeros((2,)))[0])
  assert out.shape == (2, 16, 16, 3)


def test_config_of_round_trips():
  net = songunet.build(**TINY_NCSN, fourier_freqs=[0.5] * 16)
  config = songunet.config_of(net)
  assert json.loads(json.dumps(config)) == config
  assert make_network(config) == net


def _random_params(module, *args, seed=0):
  """Random params of the module's shapes (kernels N(0, 1/fan_in), scales 1 ± 0.1, biases N(0, 0.1²)),
  drawn with NumPy: no compiled init."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1].key == "kernel":
      return noise / math.sqrt(math.prod(leaf.shape[:-1]))
    return 1 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _tiny(kind: str):
  """(net, random params, jitted apply(params, x, noise, labels, augment, key, train)) of a tiny net."""
  net = songunet.build(**(TINY if kind == "ddpmpp" else TINY_NCSN))
  params = _random_params(net, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))

  @functools.partial(jax.jit, static_argnames="train")
  def apply(params, x, noise, labels=None, augment=None, key=None, train=False):
    rngs = {"dropout": key} if train else None
    return net.apply({"params": params}, x, noise, class_labels=labels, augment_labels=augment,
                     train=train, rngs=rngs)

  return net, params, apply


X = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
NOISE = jnp.log(jnp.array([0.01, 1.0, 50.0])) / 4


def test_tiny_ncsnpp_forward_labels_augmentation_and_dropout():
  _, params, apply = _tiny("ncsnpp")
  labels, augment = jnp.zeros((3, 3)), jnp.zeros((3, 2))
  out = apply(params, X, NOISE, labels, augment)
  assert out.shape == (3, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.abs(apply(params, X, NOISE, jnp.eye(3), augment) - out).max()) > 1e-3
  assert float(jnp.abs(apply(params, X, NOISE, labels, augment + 1) - out).max()) > 1e-3
  key = jax.random.key(2, impl="unsafe_rbg")  # compiles faster than threefry
  train = apply(params, X, NOISE, labels, augment, key, train=True)
  np.testing.assert_array_equal(train, apply(params, X, NOISE, labels, augment, key, train=True))
  assert float(jnp.abs(train - out).max()) > 1e-3


def test_positional_embedding_is_cos_then_sin():
  x = jnp.array([-1.5, 0.0, 0.7])
  half = 4
  for endpoint, denom in ((False, half), (True, half - 1)):
    freqs = (1 / 10000) ** (np.arange(half) / denom)
    angles = np.asarray(x)[:, None] * freqs
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    np.testing.assert_allclose(positional_embedding(x, 2 * half, endpoint=endpoint), expected, atol=1e-6)


def test_network_feeds_sin_then_cos():
  x = jnp.array([-1.5, 0.7])
  positional = songunet.build(**TINY)
  emb = positional.apply({}, x, method=lambda m, n: m._noise_embedding(n))
  cos_sin = positional_embedding(x, 16, endpoint=True)
  np.testing.assert_array_equal(emb, jnp.concatenate([cos_sin[:, 8:], cos_sin[:, :8]], axis=1))
  fourier = songunet.build(**TINY_NCSN)
  freqs = songunet.fourier_frequencies(fourier)
  assert freqs.shape == (16,) and 10 < freqs.std() < 25
  angles = np.asarray(x)[:, None] * (2 * np.pi * freqs).astype(np.float32)  # float32, as EDM rounds
  emb = fourier.apply({}, x, method=lambda m, n: m._noise_embedding(n))
  np.testing.assert_allclose(emb, np.concatenate([np.sin(angles), np.cos(angles)], axis=1), atol=1e-5)
  np.testing.assert_allclose(fourier_embedding(x, freqs)[:, :16], np.cos(angles), atol=1e-5)


def test_fresh_params_follow_edm_initialisation():
  net = songunet.build(**{**TINY, "model_channels": 32})
  key = jax.random.key(0, impl="unsafe_rbg")  # compiles far faster than threefry for a whole init
  out, variables = jax.jit(net.init_with_output)(key, X, NOISE)
  assert out.shape == X.shape and bool(jnp.all(jnp.isfinite(out)))
  params = variables["params"]

  def bound(kernel):
    receptive = math.prod(kernel.shape[:-2])
    return math.sqrt(6 / (receptive * (kernel.shape[-2] + kernel.shape[-1])))

  block = params["enc_8x8_block0"]
  for kernel, scale in ((block["conv0"]["kernel"], 1.0), (params["map_layer1"]["kernel"], 1.0),
                        (params["dec_4x4_in0"]["qkv"]["kernel"], math.sqrt(0.2)),
                        (block["conv1"]["kernel"], 1e-5), (params["dec_8x8_aux_conv"]["kernel"], 1e-5)):
    limit = scale * bound(kernel)
    assert float(jnp.abs(kernel).max()) <= limit
    np.testing.assert_allclose(float(kernel.std()), limit / math.sqrt(3), rtol=0.1)
  biases = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "bias"]
  assert all(not np.any(b) for b in biases)
  np.testing.assert_array_equal(block["norm0"]["scale"], 1.0)


def test_groupnorm_rejects_indivisible_channels():
  with pytest.raises(ValueError, match="groups"):
    GroupNorm().init(jax.random.key(0), jnp.zeros((1, 2, 2, 144)))


class _Affine(nn.Module):
  """A stand-in raw network F(x, c_noise) = 2x + c_noise + labels, with dropout in training."""

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
    out = 2 * x * self.param("gain", nn.initializers.ones, ()) + noise_labels[:, None, None, None]
    if class_labels is not None:
      out = out + class_labels[:, :1, None, None]
    return nn.Dropout(0.5, deterministic=not train)(out)


def test_precond_matches_the_edm_formula():
  net, params = _Affine(), {"gain": jnp.ones(())}
  z = 2.0 * np.random.default_rng(0).standard_normal((3, 4, 4, 1)).astype(np.float32)
  sigma = np.array([0.05, 1.0, 20.0], np.float32)
  sd = 0.5
  s = sigma.astype(np.float64)[:, None, None, None]
  c_out = s * sd / np.sqrt(s**2 + sd**2)
  expected = sd**2 / (s**2 + sd**2) * z + c_out * (2 * z / np.sqrt(s**2 + sd**2) + np.log(s) / 4)
  denoise = jax.jit(edm_denoiser(net, params, sigma_data=sd))
  np.testing.assert_allclose(denoise(z, sigma), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(denoise(z, np.float32(1.0))[1], expected[1], rtol=1e-5, atol=1e-6)
  labelled = jax.jit(edm_denoiser(net, params, sigma_data=sd, class_labels=jnp.ones((3, 1))))(z, sigma)
  np.testing.assert_allclose(np.asarray(labelled) - expected, np.broadcast_to(c_out, z.shape),
                             rtol=1e-4, atol=1e-5)
  train = jax.jit(lambda z, sigma, key: precond_apply(net, params, z, sigma, sigma_data=sd, train=True,
                                                     rngs={"dropout": key}))
  trained = train(z, sigma, jax.random.key(3, impl="unsafe_rbg"))
  assert trained.shape == z.shape and np.abs(np.asarray(trained) - expected).max() > 1e-3


# ---- layer parity with PyTorch functional ops (EDM's layouts: NCHW, OIHW weights) ----------------


def _filter(taps):
  f = np.asarray(taps, np.float32)
  return np.outer(f, f) / f.sum() ** 2


def _torch_conv(torch, x, w, b, taps=None, up=False, down=False, fused=False):
  """EDM's Conv2d arithmetic with torch.nn.functional: resample (depthwise filter), conv, bias."""
  F = torch.nn.functional
  pad_w = w.shape[-1] // 2
  if up or down:
    f = torch.from_numpy(_filter(taps))[None, None]
    pad_f = (len(taps) - 1) // 2
  if fused:
    x = F.conv2d(x, w, padding=pad_w + pad_f)
    x = F.conv2d(x, f.tile([w.shape[0], 1, 1, 1]), groups=w.shape[0], stride=2)
  else:
    if up:
      x = F.conv_transpose2d(x, (4 * f).tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2,
                             padding=pad_f)
    if down:
      x = F.conv2d(x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=pad_f)
    x = F.conv2d(x, w, padding=pad_w)
  return x + b[None, :, None, None]


def _nchw(torch, x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("mode", ["plain", "up", "down", "fused"])
@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_conv2d_matches_torch(mode, taps):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 5)).astype(np.float32)
  w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
  b = rng.standard_normal(6).astype(np.float32)
  flags = dict(up=mode == "up", down=mode in ("down", "fused"), fused=mode == "fused")
  conv = Conv2d(6, 3, resample_filter=taps, **flags)
  ours = conv.apply({"params": {"kernel": w.transpose(2, 3, 1, 0), "bias": b}}, x)
  theirs = _torch_conv(torch, _nchw(torch, x), torch.from_numpy(w), torch.from_numpy(b), taps, **flags)
  np.testing.assert_allclose(ours, _nhwc(theirs), atol=1e-5)


def test_groupnorm_and_attention_match_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 4, 4, 48)).astype(np.float32) * 3 + 1
  scale, bias = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
  ours = GroupNorm(1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
  theirs = torch.nn.functional.group_norm(_nchw(torch, x), 12, torch.from_numpy(scale),
                                          torch.from_numpy(bias), 1e-6)
  np.testing.assert_allclose(ours, _nhwc(theirs), atol=1e-5)
  qkv = rng.standard_normal((2, 4, 4, 3 * 16)).astype(np.float32)
  q, k, v = _nchw(torch, qkv).reshape(2, 16, 3, 16).unbind(2)  # channel 3c + j -> (c, j)
  weights = torch.einsum("ncq,nck->nqk", q, k / 4.0).softmax(dim=2)
  theirs = torch.einsum("nqk,nck->ncq", weights, v).reshape(2, 16, 4, 4)
  np.testing.assert_allclose(self_attention(jnp.asarray(qkv)), _nhwc(theirs), atol=1e-5)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_unet_block_matches_torch(taps):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  block = UNetBlock(32, down=True, attention=True, resample_filter=taps)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  emb = jax.random.normal(jax.random.key(1), (2, 24))
  params = _random_params(block, x, emb)
  ours = block.apply({"params": params}, x, emb)

  t = {name: {leaf: torch.from_numpy(v) for leaf, v in sub.items()} for name, sub in params.items()}
  w = lambda name: t[name]["kernel"].permute(3, 2, 0, 1)  # HWIO -> OIHW
  norm = lambda h, name: F.group_norm(h, min(32, h.shape[1] // 4), t[name]["scale"], t[name]["bias"], 1e-6)
  xt, et = _nchw(torch, x), torch.from_numpy(np.array(emb))
  h = _torch_conv(torch, F.silu(norm(xt, "norm0")), w("conv0"), t["conv0"]["bias"], taps, down=True)
  h = h + (et @ t["affine"]["kernel"] + t["affine"]["bias"])[:, :, None, None]
  h = _torch_conv(torch, F.silu(norm(h, "norm1")), w("conv1"), t["conv1"]["bias"])
  h = (h + _torch_conv(torch, xt, w("skip"), t["skip"]["bias"], taps, down=True)) * math.sqrt(0.5)
  qkv = _torch_conv(torch, norm(h, "norm2"), w("qkv"), t["qkv"]["bias"]).reshape(2, 32, 3, 16)
  q, k, v = qkv.unbind(2)
  attn = torch.einsum("nqk,nck->ncq", torch.einsum("ncq,nck->nqk", q, k / math.sqrt(32)).softmax(2), v)
  h = (_torch_conv(torch, attn.reshape(2, 32, 4, 4), w("proj"), t["proj"]["bias"]) + h) * math.sqrt(0.5)
  np.testing.assert_allclose(ours, _nhwc(h), atol=2e-5)
