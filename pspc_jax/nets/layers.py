"""Layers of EDM's SongUNet (Karras et al. 2022) in Flax linen, NHWC.

Each layer reproduces the arithmetic of EDM's PyTorch layer of the same name and its initialisation:
weights are Xavier-uniform, U(-a, a) with a = init_weight · sqrt(6 / (fan_in + fan_out)), where a
convolution's fans count its k×k taps (fan_in = C_in·k², fan_out = C_out·k²), and biases start at
zero. Parameter leaves are "kernel" (convolutions HWIO, Linear (in, out)), "bias" and, for
GroupNorm, "scale"; `pspc_jax.nets.edm_pickle` maps PyTorch state dicts onto them.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DIMS = ("NHWC", "HWIO", "NHWC")


def xavier_uniform(init_weight: float = 1.0) -> nn.initializers.Initializer:
  """EDM's 'xavier_uniform' weight init scaled by `init_weight`, for HWIO or (in, out) kernels."""
  return nn.initializers.variance_scaling(init_weight**2, "fan_avg", "uniform")


def resample_filter_2d(taps: Sequence[float]) -> np.ndarray:
  """The separable 2-D resampling filter outer(f, f) / sum(f)², shape (len(f), len(f)), float32."""
  f = np.asarray(taps, np.float32)
  return np.outer(f, f) / np.square(f.sum())


def _depthwise(x: jnp.ndarray, filt: np.ndarray, **conv_kwargs) -> jnp.ndarray:
  """Applies the same 2-D filter to every channel of x (B, H, W, C)."""
  channels = x.shape[-1]
  kernel = jnp.broadcast_to(jnp.asarray(filt, x.dtype)[:, :, None, None], (*filt.shape, 1, channels))
  return jax.lax.conv_general_dilated(x, kernel, dimension_numbers=_DIMS,
                                      feature_group_count=channels, **conv_kwargs)


def downsample(x: jnp.ndarray, taps: Sequence[float], pad: bool = True) -> jnp.ndarray:
  """Filters with outer(f, f) / sum(f)² and keeps every second pixel: (B, H, W, C) -> (B, H/2, W/2, C).

  Args:
    x: (B, H, W, C) with even H, W.
    taps: the 1-D filter f, e.g. [1, 1] (box) or [1, 3, 3, 1].
    pad: zero-pad by (len(f) - 1) // 2 on every side (False in the fused conv-then-downsample path,
      whose convolution has already padded for the filter).
  """
  filt = resample_filter_2d(taps)
  p = (len(taps) - 1) // 2 if pad else 0
  return _depthwise(x, filt, window_strides=(2, 2), padding=((p, p), (p, p)))


def upsample(x: jnp.ndarray, taps: Sequence[float]) -> jnp.ndarray:
  """Transposed stride-2 convolution with 4·outer(f, f) / sum(f)²: (B, H, W, C) -> (B, 2H, 2W, C).

  Equals PyTorch's conv_transpose2d(stride=2, padding=(len(f) - 1) // 2) with that filter (which is
  symmetric, so no flip is needed).
  """
  filt = 4.0 * resample_filter_2d(taps)
  p = len(taps) - 1 - (len(taps) - 1) // 2
  return _depthwise(x, filt, window_strides=(1, 1), padding=((p, p), (p, p)), lhs_dilation=(2, 2))


class Linear(nn.Module):
  """Fully connected layer: x @ kernel + bias, kernel (in, out) (EDM's Linear weight transposed).

  Attributes:
    features: output width.
    use_bias: add a bias (zero-initialised).
    init_weight: scale of the Xavier-uniform kernel init.
  """
  features: int
  use_bias: bool = True
  init_weight: float = 1.0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """(..., in) -> (..., features)."""
    kernel = self.param("kernel", xavier_uniform(self.init_weight), (x.shape[-1], self.features))
    y = x @ kernel
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class Conv2d(nn.Module):
  """Square 'same' convolution with optional 2× up- or downsampling, as EDM's Conv2d.

  Resampling (a fixed depthwise filter, see `upsample` / `downsample`) happens before the convolution,
  except in the fused downsampling path (EDM's `fused_resample`), which convolves with extra padding
  (k // 2 + (len(f) - 1) // 2) and then filters and subsamples without padding.

  Attributes:
    features: output channels.
    kernel_size: k (odd), the kernel is (k, k, C_in, features).
    up: upsample 2× first.
    down: downsample 2× (first, or after the convolution when fused).
    resample_filter: the 1-D taps of the resampling filter.
    fused: use the fused convolve-then-downsample path (down only).
    init_weight: scale of the Xavier-uniform kernel init.
  """
  features: int
  kernel_size: int
  up: bool = False
  down: bool = False
  resample_filter: tuple[float, ...] = (1, 1)
  fused: bool = False
  init_weight: float = 1.0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C_in) -> (B, H', W', features), H' = 2H (up), H / 2 (down) or H."""
    if self.up and self.down:
      raise ValueError("Conv2d cannot both upsample and downsample")
    if self.fused and not self.down:
      raise ValueError("the fused resampling path is implemented for downsampling only")
    k = self.kernel_size
    kernel = self.param("kernel", xavier_uniform(self.init_weight), (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    pad = k // 2
    if self.fused:
      pad += (len(self.resample_filter) - 1) // 2
    elif self.up:
      x = upsample(x, self.resample_filter)
    elif self.down:
      x = downsample(x, self.resample_filter)
    x = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DIMS)
    if self.fused:
      x = downsample(x, self.resample_filter, pad=False)
    return x + bias


class GroupNorm(nn.Module):
  """EDM's GroupNorm: min(32, C // 4) groups, biased variance, affine scale (ones) and bias (zeros).

  Attributes:
    eps: added to the variance.
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, H, W, C)."""
    channels = x.shape[-1]
    groups = min(32, channels // 4)
    if groups < 1 or channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into min(32, C // 4) = {groups} groups")
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    g = x.reshape(*x.shape[:-1], groups, channels // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.eps)
    return g.reshape(x.shape) * scale + bias


def positional_embedding(x: jnp.ndarray, num_channels: int, max_positions: int = 10000,
                         endpoint: bool = False) -> jnp.ndarray:
  """DDPM++'s sinusoidal embedding, cosines first: [cos(x·w_j)]_j ++ [sin(x·w_j)]_j.

  w_j = (1 / max_positions)^(j / d), j < h = num_channels / 2, with d = h - 1 if endpoint else h.

  Args:
    x: (B,) positions (noise labels).
    num_channels: even output width 2h.
    max_positions: sets the lowest frequency.
    endpoint: let the exponents reach 1 (SongUNet uses True).

  Returns:
    (B, num_channels).
  """
  half = num_channels // 2
  freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
  freqs = (1.0 / max_positions) ** freqs
  angles = x[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)


def fourier_embedding(x: jnp.ndarray, freqs: jnp.ndarray) -> jnp.ndarray:
  """NCSN++'s random Fourier features, cosines first: [cos(2π f_j x)]_j ++ [sin(2π f_j x)]_j.

  Args:
    x: (B,) noise labels.
    freqs: (h,) fixed frequencies f_j (EDM draws N(0, 16²)).

  Returns:
    (B, 2h).
  """
  angles = x[:, None] * (2 * np.pi * jnp.asarray(freqs, jnp.float32))[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)


def self_attention(qkv: jnp.ndarray) -> jnp.ndarray:
  """Single-head self-attention over pixels from EDM's interleaved qkv layout.

  Channel 3c + j of `qkv` is channel c of q (j = 0), k (j = 1) or v (j = 2), as EDM reshapes its qkv
  convolution's output to (B, C, 3, HW). softmax_k(q·k / sqrt(C)) is formed in float32.

  Args:
    qkv: (B, H, W, 3C).

  Returns:
    (B, H, W, C), the attention-weighted values.
  """
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  qkv = qkv.reshape(b, h * w, c, 3).astype(jnp.float32)
  q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
  weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k / math.sqrt(c)), axis=-1)
  return jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)


class UNetBlock(nn.Module):
  """SongUNet's residual block (EDM's UNetBlock as DDPM++/NCSN++ configure it).

  out = (conv1(dropout(silu(norm1(conv0(silu(norm0(x))) + affine(emb))))) + skip(x)) · sqrt(1/2),
  where conv0 and the 1×1 skip projection resample when up/down and the skip is the identity when
  neither resampling nor a channel change happens; then, with attention,
  out = (proj(attention(qkv(norm2(out)))) + out) · sqrt(1/2). Norms use eps = 1e-6. conv1 and proj
  start near zero (init_weight 1e-5), qkv with init_weight sqrt(0.2).

  Submodules: norm0, conv0, affine, norm1, conv1, skip (if any), norm2, qkv, proj (with attention).

  Attributes:
    out_channels: output channels.
    up: upsample 2×.
    down: downsample 2×.
    attention: add single-head self-attention.
    dropout: dropout rate before conv1 (training only).
    resample_filter: taps of the resampling filter.
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  dropout: float = 0.0
  resample_filter: tuple[float, ...] = (1, 1)

  @nn.compact
  def __call__(self, x: jnp.ndarray, emb: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """x (B, H, W, C_in), emb (B, E) -> (B, H', W', out_channels).

    Args:
      x: input features.
      emb: the conditioning embedding.
      train: apply dropout (needs the "dropout" PRNG stream).
    """
    skip_scale = np.float32(math.sqrt(0.5))
    resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
    orig = x
    x = Conv2d(self.out_channels, 3, **resample, name="conv0")(nn.silu(GroupNorm(1e-6, name="norm0")(x)))
    x = x + Linear(self.out_channels, name="affine")(emb)[:, None, None, :]
    x = nn.silu(GroupNorm(1e-6, name="norm1")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Conv2d(self.out_channels, 3, init_weight=1e-5, name="conv1")(x)
    if self.up or self.down or orig.shape[-1] != self.out_channels:
      orig = Conv2d(self.out_channels, 1, **resample, name="skip")(orig)
    x = (x + orig) * skip_scale
    if self.attention:
      qkv = Conv2d(3 * self.out_channels, 1, init_weight=math.sqrt(0.2), name="qkv")(
          GroupNorm(1e-6, name="norm2")(x))
      attended = self_attention(qkv).astype(x.dtype)
      x = (Conv2d(self.out_channels, 1, init_weight=1e-5, name="proj")(attended) + x) * skip_scale
    return x
