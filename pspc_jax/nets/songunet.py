"""EDM's SongUNet (DDPM++ and NCSN++, Song et al. 2021 as re-implemented by Karras et al. 2022) in Flax.

`SongUNet` computes EDM's raw network F(x, c_noise) on NHWC images; `pspc_jax.nets.precond` adds the
EDM preconditioning. With the same weights it matches EDM's PyTorch SongUNet to float32 round-off
for the options DDPM++ and NCSN++ use: positional or Fourier noise embedding, standard or residual
encoder, standard decoder, any symmetric resampling filter. Its keyword arguments carry EDM's names
and defaults (out_channels may be left out: it then equals in_channels), so an EDM checkpoint's
`init_kwargs` are a config as they stand.

Parameter names mirror EDM's state dict. A state-dict key maps to a Flax param path by:
  1. splitting the key at the dots;
  2. joining "enc" / "dec" to the next part with "_" (`enc.16x16_block0` -> `enc_16x16_block0`);
  3. renaming the leaf: a convolution's or Linear's "weight" -> "kernel" (convolutions OIHW -> HWIO,
     Linear (out, in) -> (in, out)), a GroupNorm's "weight" -> "scale", "bias" -> "bias".
e.g. `dec.16x16_block4.qkv.weight` -> ("dec_16x16_block4", "qkv", "kernel") and
`map_layer0.weight` -> ("map_layer0", "kernel"). EDM's buffers hold no parameters here: the resampling
filters follow from `resample_filter`, and NCSN++'s Fourier frequencies are the `fourier_freqs`
attribute, a fixed constant of the architecture, never trained, so `params` holds exactly the
trainable weights (EDM's parameter counts) and `net.apply({"params": p}, ...)` needs nothing else.
`pspc_jax.nets.edm_pickle` implements the rule.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax.nets.layers import Conv2d, GroupNorm, Linear, UNetBlock, fourier_embedding, positional_embedding

FOURIER_SCALE = 16.0  # EDM's FourierEmbedding draws frequencies from N(0, 16²).

# EDM's SongUNet arguments in its positional order; `SongUNet` adds `fourier_freqs` and `fourier_seed`.
EDM_ARGS = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim",
            "model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions",
            "dropout", "label_dropout", "embedding_type", "channel_mult_noise", "encoder_type",
            "decoder_type", "resample_filter")
CONFIG_KEYS = EDM_ARGS + ("fourier_freqs", "fourier_seed")


def default_fourier_freqs(num_freqs: int, seed: int = 0) -> tuple[float, ...]:
  """NCSN++ frequencies for a fresh network: N(0, 16²) from NumPy's legacy `RandomState(seed)`, whose
  stream NumPy keeps fixed across versions, rounded to float32."""
  freqs = np.random.RandomState(seed).standard_normal(num_freqs) * FOURIER_SCALE
  return tuple(float(f) for f in freqs.astype(np.float32))


def fourier_frequencies(net: "SongUNet") -> np.ndarray:
  """The (model_channels · channel_mult_noise / 2,) float32 Fourier frequencies a SongUNet uses."""
  count = net.model_channels * net.channel_mult_noise // 2
  freqs = net.fourier_freqs
  if freqs is None:
    freqs = default_fourier_freqs(count, net.fourier_seed)
  if len(freqs) != count:
    raise ValueError(f"fourier_freqs has {len(freqs)} entries, the network needs {count}")
  return np.asarray(freqs, np.float32)


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net (EDM's SongUNet), NHWC.

  Mapping: the noise embedding (halves swapped to [sin, cos], as EDM does), plus Linear(labels ·
  sqrt(label_dim)) and Linear(augment_labels) when enabled, then two SiLU Linear layers. Encoder per
  resolution r = img_resolution / 2^level: `enc_{r}x{r}_conv` (level 0) or the downsampling block
  `enc_{r}x{r}_down` (then, residual encoder, `enc_{r}x{r}_aux_residual` on the running input
  pyramid), then `enc_{r}x{r}_block{i}`, i < num_blocks. Decoder from the lowest resolution:
  `dec_{r}x{r}_in0` (attention) and `_in1` at the bottom, else `dec_{r}x{r}_up`, then
  `dec_{r}x{r}_block{i}`, i <= num_blocks, each fed [features, the latest unused skip] (concatenated
  along channels in that order), then `dec_{r}x{r}_aux_norm` / `_aux_conv` at full resolution.

  Attributes:
    img_resolution: H = W of the input.
    in_channels: input channels.
    out_channels: output channels (None: in_channels).
    label_dim: number of classes (one-hot / soft labels), 0 = unconditional.
    augment_dim: width of EDM's augmentation labels, 0 = none.
    model_channels: base channel count.
    channel_mult: per-resolution channel multipliers (level 0 = full resolution).
    channel_mult_emb: embedding width = model_channels · channel_mult_emb.
    num_blocks: residual blocks per resolution in the encoder (num_blocks + 1 in the decoder).
    attn_resolutions: resolutions whose last block has self-attention.
    dropout: dropout rate in the blocks (training only).
    label_dropout: probability of zeroing a sample's class label (training only).
    embedding_type: "positional" (DDPM++) or "fourier" (NCSN++).
    channel_mult_noise: noise embedding width = model_channels · channel_mult_noise.
    encoder_type: "standard" (DDPM++) or "residual" (NCSN++).
    decoder_type: "standard" (both).
    resample_filter: 1-D resampling taps, (1, 1) for DDPM++, (1, 3, 3, 1) for NCSN++.
    fourier_freqs: the fixed Fourier frequencies (model_channels · channel_mult_noise / 2 of them;
      EDM's `map_noise.freqs` buffer); None draws them with `default_fourier_freqs(n, fourier_seed)`.
    fourier_seed: seed for the frequencies when fourier_freqs is None.
  """
  img_resolution: int
  in_channels: int
  out_channels: int | None = None
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: tuple[float, ...] = (1, 1)
  fourier_freqs: tuple[float, ...] | None = None
  fourier_seed: int = 0

  def _noise_embedding(self, noise_labels: jnp.ndarray) -> jnp.ndarray:
    """(B,) -> (B, noise_channels), [sin, cos] halves."""
    channels = self.model_channels * self.channel_mult_noise
    if self.embedding_type == "positional":
      emb = positional_embedding(noise_labels, channels, endpoint=True)
    else:
      emb = fourier_embedding(noise_labels, fourier_frequencies(self))
    cos, sin = jnp.split(emb, 2, axis=1)
    return jnp.concatenate([sin, cos], axis=1)

  def _embedding(self, noise_labels, class_labels, augment_labels, batch: int, train: bool):
    """The conditioning vector (B, emb_channels)."""
    noise_channels = self.model_channels * self.channel_mult_noise
    emb_channels = self.model_channels * self.channel_mult_emb
    emb = self._noise_embedding(jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32), (batch,)))
    if self.label_dim:
      labels = jnp.zeros((batch, self.label_dim)) if class_labels is None else jnp.asarray(class_labels)
      if train and self.label_dropout:
        keep = jax.random.uniform(self.make_rng("dropout"), (batch, 1)) >= self.label_dropout
        labels = labels * keep
      emb = emb + Linear(noise_channels, name="map_label")(labels * math.sqrt(self.label_dim))
    if self.augment_dim:
      augment = jnp.zeros((batch, self.augment_dim)) if augment_labels is None else augment_labels
      emb = emb + Linear(noise_channels, use_bias=False, name="map_augment")(augment)
    emb = nn.silu(Linear(emb_channels, name="map_layer0")(emb))
    return nn.silu(Linear(emb_channels, name="map_layer1")(emb))

  def _check(self, x: jnp.ndarray):
    if self.embedding_type not in ("positional", "fourier"):
      raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {self.embedding_type!r}")
    if self.encoder_type not in ("standard", "residual"):
      raise ValueError(f"encoder_type must be 'standard' or 'residual', got {self.encoder_type!r}")
    if self.decoder_type != "standard":
      raise ValueError(f"decoder_type must be 'standard', got {self.decoder_type!r}")
    expected = (self.img_resolution, self.img_resolution, self.in_channels)
    if x.ndim != 4 or x.shape[1:] != expected:
      raise ValueError(f"x must be (B, {', '.join(map(str, expected))}), got {x.shape}")
    if self.img_resolution % 2 ** (len(self.channel_mult) - 1):
      raise ValueError(f"img_resolution {self.img_resolution} cannot be halved "
                       f"{len(self.channel_mult) - 1} times")

  @nn.compact
  def __call__(self, x: jnp.ndarray, noise_labels: jnp.ndarray, class_labels: jnp.ndarray | None = None,
               augment_labels: jnp.ndarray | None = None, train: bool = False) -> jnp.ndarray:
    """The raw network output F.

    Args:
      x: (B, H, W, in_channels), the preconditioned input c_in · z.
      noise_labels: (B,) or scalar, EDM's c_noise = ln(sigma) / 4.
      class_labels: (B, label_dim) or (1, label_dim); None = zeros (EDM's default). Ignored when
        label_dim is 0.
      augment_labels: (B, augment_dim); None = zeros (no augmentation). Ignored when augment_dim is 0.
      train: enable dropout (needs the "dropout" PRNG stream).

    Returns:
      (B, H, W, out_channels).
    """
    self._check(x)
    emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0], train)
    block = dict(dropout=self.dropout, resample_filter=self.resample_filter)
    skips, x = self._encode(x, emb, block, train)
    return self._decode(x, skips, emb, block, train)

  def _encode(self, x, emb, block: dict, train: bool):
    """Runs the encoder; returns (skips, x)."""
    skips = []
    aux = x
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      prefix = f"enc_{res}x{res}"
      if level == 0:
        x = Conv2d(self.model_channels, 3, name=f"{prefix}_conv")(x)
      else:
        x = UNetBlock(x.shape[-1], down=True, name=f"{prefix}_down", **block)(x, emb, train)
        if self.encoder_type == "residual":
          residual = Conv2d(x.shape[-1], 3, down=True, fused=True, resample_filter=self.resample_filter,
                            name=f"{prefix}_aux_residual")(aux)
          x = aux = (x + residual) / np.float32(math.sqrt(2))
      skips.append(x)
      for idx in range(self.num_blocks):
        x = UNetBlock(self.model_channels * mult, attention=res in self.attn_resolutions,
                      name=f"{prefix}_block{idx}", **block)(x, emb, train)
        skips.append(x)
    return skips, x

  def _decode(self, x, skips: list, emb, block: dict, train: bool):
    """Runs the decoder on the encoder's output and skips; returns (B, H, W, out_channels)."""
    bottom = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      prefix = f"dec_{res}x{res}"
      channels = x.shape[-1]
      if level == bottom:
        x = UNetBlock(channels, attention=True, name=f"{prefix}_in0", **block)(x, emb, train)
        x = UNetBlock(channels, name=f"{prefix}_in1", **block)(x, emb, train)
      else:
        x = UNetBlock(channels, up=True, name=f"{prefix}_up", **block)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        attention = idx == self.num_blocks and res in self.attn_resolutions
        x = UNetBlock(self.model_channels * mult, attention=attention, name=f"{prefix}_block{idx}",
                      **block)(x, emb, train)
    x = nn.silu(GroupNorm(1e-6, name=f"{prefix}_aux_norm")(x))
    out_channels = self.in_channels if self.out_channels is None else self.out_channels
    return Conv2d(out_channels, 3, init_weight=1e-5, name=f"{prefix}_aux_conv")(x)


def _tuple(value):
  return None if value is None else tuple(value)


def build(**kwargs) -> SongUNet:
  """A SongUNet from JSON-serialisable keyword arguments (the `SongUNet` attributes; lists allowed)."""
  unknown = set(kwargs) - set(CONFIG_KEYS)
  if unknown:
    raise TypeError(f"unknown SongUNet arguments: {', '.join(sorted(unknown))}")
  for name in ("channel_mult", "attn_resolutions", "resample_filter", "fourier_freqs"):
    if name in kwargs:
      kwargs[name] = _tuple(kwargs[name])
  return SongUNet(**kwargs)


def config_of(net: SongUNet) -> dict:
  """The full JSON-serialisable config of a SongUNet ("arch" included; tuples as lists)."""
  config = {"arch": "songunet"}
  for name in CONFIG_KEYS:
    value = getattr(net, name)
    config[name] = list(value) if isinstance(value, tuple) else value
  return config


_CIFAR10 = {"arch": "songunet", "img_resolution": 32, "in_channels": 3, "label_dim": 0, "augment_dim": 9,
            "model_channels": 128, "channel_mult": [2, 2, 2], "channel_mult_emb": 4, "num_blocks": 4,
            "attn_resolutions": [16], "dropout": 0.13}

PRESETS: dict[str, dict] = {
    # EDM's unconditional CIFAR-10 DDPM++ (55,733,891 parameters).
    "ddpmpp_cifar10": {**_CIFAR10, "embedding_type": "positional", "channel_mult_noise": 1,
                       "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1]},
    # EDM's unconditional CIFAR-10 NCSN++ (56,397,827 parameters).
    "ncsnpp_cifar10": {**_CIFAR10, "embedding_type": "fourier", "channel_mult_noise": 2,
                       "encoder_type": "residual", "decoder_type": "standard",
                       "resample_filter": [1, 3, 3, 1]},
    # A small DDPM++ for 8×8 single-channel data (1,032,353 parameters); attention at 4×4. For 16×16
    # data override img_resolution and set attn_resolutions [8]; override in_channels for colour.
    "ddpmpp_small": {"arch": "songunet", "img_resolution": 8, "in_channels": 1, "label_dim": 0,
                     "augment_dim": 0, "model_channels": 32, "channel_mult": [1, 2], "channel_mult_emb": 4,
                     "num_blocks": 2, "attn_resolutions": [4], "dropout": 0.1,
                     "embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
                     "decoder_type": "standard", "resample_filter": [1, 1]},
}
