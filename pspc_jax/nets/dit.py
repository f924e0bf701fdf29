"""DiT, the diffusion transformer of Peebles & Xie (2023), in Flax linen (docs/design.md §2 "Network", §6).

The image is cut into p×p patches, each embedded by a strided convolution and offset by a fixed 2-D
sin-cos position embedding. The conditioning vector c is the embedding of the noise label (plus a class
embedding when `label_dim` > 0); every transformer block is adaLN-Zero: SiLU(c) -> Linear gives a shift,
a scale and a gate for the attention branch and for the MLP branch, and the gates start at zero, so each
block starts as the identity. The final layer (adaLN shift/scale, then Linear to p²·C) is zero too, so a
freshly initialised network outputs exactly 0.

Differences from the PyTorch original:
  * NHWC in and out; the output has the input's C channels (no learned-sigma channels).
  * Noise labels are EDM's c_noise = ln(sigma) / 4 and are mapped affinely to DiT's timestep range before
    the frequency embedding (see `DiT`).
  * `dropout` (off in the original, whose blocks are built with zero dropout) is applied where timm's
    vision transformer puts `proj_drop`: after the attention output projection and, in the MLP, after the
    activation and after the second Linear. The paper's DiT-B/4 recipe records dropout 0.12 for an
    unconditional model, so it cannot refer to class-label dropout; this is where it goes here.
  * Class labels may be integers (B,) or one-hot rows (B, label_dim) (EDM's convention); None with
    `class_dropout_prob` > 0 selects the "no class" embedding (classifier-free guidance).

Parameter names mirror the PyTorch state dict. A key maps to a Flax path by splitting it at the dots,
joining every all-digit part to the part before it with "_", and renaming the leaf "weight" to "kernel"
("embedding" for the class table): `blocks.3.adaLN_modulation.1.weight` ->
("blocks_3", "adaLN_modulation_1", "kernel"). Linear kernels are the transposed PyTorch weights and the
patch convolution is HWIO (PyTorch: OIHW); `pspc_jax.nets.dit_convert` does the conversion.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Noise-label mapping: c_noise of EDM's sampling range sigma in [0.002, 80] goes onto DiT's t in [0, 1000].
_C_NOISE_MIN = math.log(0.002) / 4.0
_C_NOISE_MAX = math.log(80.0) / 4.0
NOISE_SCALE = 1000.0 / (_C_NOISE_MAX - _C_NOISE_MIN)  # 4000 / ln(40000) ≈ 377.41
NOISE_SHIFT = -NOISE_SCALE * _C_NOISE_MIN  # 1000 ln(500) / ln(40000) ≈ 586.42

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_normal_002 = nn.initializers.normal(stddev=0.02)


def sincos_position_embedding(embed_dim: int, grid_size: int) -> np.ndarray:
  """DiT's fixed 2-D sin-cos position embedding (the MAE recipe), computed in float64.

  Token n = r * grid_size + c (row r, column c, row-major like the flattened patch grid) gets
  [sin(c·w), cos(c·w), sin(r·w), cos(r·w)] with w_k = 10000^(-k / (embed_dim / 4)), k < embed_dim / 4:
  the column index fills the first half of the channels, the row index the second half.

  Args:
    embed_dim: channels D, a multiple of 4.
    grid_size: patches per side G.

  Returns:
    float32 array (G², D).
  """
  if embed_dim % 4:
    raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
  quarter = embed_dim // 4
  omega = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.divmod(np.arange(grid_size * grid_size, dtype=np.float64), grid_size)

  def encode(positions):
    angles = np.outer(positions, omega)
    return [np.sin(angles), np.cos(angles)]

  return np.concatenate(encode(cols) + encode(rows), axis=1).astype(np.float32)


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """DiT's (GLIDE's) sinusoidal timestep embedding, cosines first.

  Args:
    t: (B,) timesteps, typically in [0, 1000]; fractional values are fine.
    dim: even output width 2h.
    max_period: the slowest frequency is 1 / max_period.

  Returns:
    float32 (B, dim): [cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / h), k < h.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """x (B, T, D) · (1 + scale) + shift, with shift and scale (B, D) broadcast over tokens."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


def layer_norm(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """LayerNorm over the last axis without affine parameters: (x - mean) / sqrt(var + eps)."""
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt(jnp.mean(centred**2, axis=-1, keepdims=True) + eps)


def unpatchify(x: jnp.ndarray, patch_size: int, channels: int) -> jnp.ndarray:
  """Reassembles per-token patches (B, G², p·p·C), ordered (p_row, p_col, C), into images (B, Gp, Gp, C)."""
  batch, tokens, _ = x.shape
  grid = math.isqrt(tokens)
  x = x.reshape(batch, grid, grid, patch_size, patch_size, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(batch, grid * patch_size, grid * patch_size, channels)


class PatchEmbed(nn.Module):
  """p×p patches -> tokens by a conv with kernel = stride = p (PyTorch key prefix `x_embedder.proj`).

  The kernel is xavier-uniform over its flattened (p·p·C_in, D) view, as DiT initialises it.
  """
  hidden_size: int
  patch_size: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, (H/p)·(W/p), D), tokens in row-major patch order."""
    kernel_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", kernel_init=kernel_init, name="proj")(x)
    return x.reshape(x.shape[0], -1, self.hidden_size)


class TimestepEmbedder(nn.Module):
  """Frequency embedding of t followed by Linear-SiLU-Linear (`mlp_0`, `mlp_2`), weights normal(0.02)."""
  hidden_size: int
  frequency_embedding_size: int = 256

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    """(B,) timesteps -> (B, D)."""
    h = timestep_embedding(t, self.frequency_embedding_size)
    h = nn.Dense(self.hidden_size, kernel_init=_normal_002, name="mlp_0")(h)
    return nn.Dense(self.hidden_size, kernel_init=_normal_002, name="mlp_2")(nn.silu(h))


class LabelEmbedder(nn.Module):
  """Class embedding table (`embedding_table`), normal(0.02), with DiT's label dropout.

  With `dropout_prob` > 0 the table has an extra last row, the "no class" embedding, which replaces a
  label with probability `dropout_prob` in training and is used for every sample when labels are None.
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float

  @nn.compact
  def __call__(self, labels: jnp.ndarray | None, batch: int, train: bool) -> jnp.ndarray:
    """Integer labels (B,), one-hot rows (B, num_classes) or None -> (B, D)."""
    use_null = self.dropout_prob > 0
    table = nn.Embed(self.num_classes + use_null, self.hidden_size, embedding_init=_normal_002,
                     name="embedding_table").embedding
    if labels is None:
      if not use_null:
        raise ValueError("class_labels are required when label_dim > 0 and class_dropout_prob == 0")
      return jnp.broadcast_to(table[self.num_classes], (batch, self.hidden_size))
    if labels.ndim == 1:
      emb = jnp.take(table, labels, axis=0)
    else:
      emb = jnp.matmul(labels.astype(jnp.float32), table[:self.num_classes],
                       precision=jax.lax.Precision.HIGHEST)
    if train and use_null:
      drop = jax.random.uniform(self.make_rng("dropout"), (batch,)) < self.dropout_prob
      emb = jnp.where(drop[:, None], table[self.num_classes], emb)
    return emb


class Attention(nn.Module):
  """Multi-head self-attention with a fused `qkv` Linear (output laid out as [3, heads, head_dim]) and
  an output Linear `proj`."""
  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """(B, T, D) -> (B, T, D)."""
    batch, tokens, dim = x.shape
    qkv = nn.Dense(3 * dim, kernel_init=_xavier, name="qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    out = nn.Dense(dim, kernel_init=_xavier, name="proj")(out.reshape(batch, tokens, dim))
    return nn.Dropout(self.dropout, deterministic=not train)(out)


class Mlp(nn.Module):
  """`fc1` -> tanh-GELU -> dropout -> `fc2` -> dropout."""
  hidden_features: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """(B, T, D) -> (B, T, D)."""
    h = nn.Dense(self.hidden_features, kernel_init=_xavier, name="fc1")(x)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(h, approximate=True))
    h = nn.Dense(x.shape[-1], kernel_init=_xavier, name="fc2")(h)
    return nn.Dropout(self.dropout, deterministic=not train)(h)


class DiTBlock(nn.Module):
  """Transformer block with adaLN-Zero conditioning.

  (shift, scale, gate) for attention and for the MLP come, in that order, from SiLU(c) -> Linear
  (`adaLN_modulation_1`, zero-initialised); x += gate · branch(modulate(LayerNorm(x), shift, scale)).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Tokens x (B, T, D) and conditioning c (B, D) -> (B, T, D)."""
    dim = x.shape[-1]
    mod = nn.Dense(6 * dim, kernel_init=_zeros, name="adaLN_modulation_1")(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    attn = Attention(self.num_heads, self.dropout, name="attn")
    x = x + gate_msa[:, None] * attn(modulate(layer_norm(x), shift_msa, scale_msa), train)
    mlp = Mlp(int(dim * self.mlp_ratio), self.dropout, name="mlp")
    return x + gate_mlp[:, None] * mlp(modulate(layer_norm(x), shift_mlp, scale_mlp), train)


class FinalLayer(nn.Module):
  """adaLN shift/scale (`adaLN_modulation_1`) then `linear` to p·p·C per token; both zero-initialised."""
  patch_size: int
  out_channels: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """Tokens x (B, T, D) and conditioning c (B, D) -> (B, T, p·p·C)."""
    mod = nn.Dense(2 * x.shape[-1], kernel_init=_zeros, name="adaLN_modulation_1")(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(layer_norm(x), shift, scale)
    return nn.Dense(self.patch_size**2 * self.out_channels, kernel_init=_zeros, name="linear")(x)


class DiT(nn.Module):
  """Diffusion transformer on square NHWC images; returns the raw network output F (B, H, W, C).

  Noise labels: DiT embeds timesteps t ~ 0…1000, but EDM passes c_noise = ln(sigma) / 4 (about
  [-1.55, 1.10] over sigma in [0.002, 80]). The network embeds t = noise_scale · c_noise + noise_shift;
  the defaults `NOISE_SCALE` = 4000 / ln(40000) ≈ 377.41 and `NOISE_SHIFT` = 1000 ln(500) / ln(40000)
  ≈ 586.42 map sigma = 0.002 to t = 0 and sigma = 80 to t = 1000 (t is affine in ln sigma; levels
  outside that range give t outside [0, 1000], which the sinusoids handle). noise_scale = 1,
  noise_shift = 0 feeds the labels to the embedding unchanged, as the original does.

  Attributes:
    img_resolution: image side H = W, a multiple of patch_size.
    in_channels: image channels C (also the output channels).
    patch_size: patch side p; the transformer sees (H / p)² tokens.
    hidden_size: token width D, a multiple of 4 and of num_heads.
    depth: number of DiT blocks (`blocks_0` … `blocks_{depth-1}`).
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    label_dim: number of classes; 0 = unconditional (no `y_embedder`).
    class_dropout_prob: DiT's training-time label dropout (used only when label_dim > 0).
    dropout: dropout in the blocks, in training only (see the module docstring for where).
    noise_scale: multiplier of the noise label before the frequency embedding.
    noise_shift: offset added after scaling.
    frequency_embedding_size: width of the sinusoidal timestep embedding, even.
  """
  img_resolution: int = 32
  in_channels: int = 3
  patch_size: int = 4
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  label_dim: int = 0
  class_dropout_prob: float = 0.1
  dropout: float = 0.0
  noise_scale: float = NOISE_SCALE
  noise_shift: float = NOISE_SHIFT
  frequency_embedding_size: int = 256

  def __post_init__(self):
    if self.img_resolution % self.patch_size:
      raise ValueError(f"img_resolution {self.img_resolution} is not a multiple of patch_size "
                       f"{self.patch_size}")
    if self.hidden_size % 4 or self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 and of num_heads "
                       f"{self.num_heads}")
    if self.frequency_embedding_size % 2:
      raise ValueError(f"frequency_embedding_size must be even, got {self.frequency_embedding_size}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, noise_labels: jnp.ndarray, class_labels: jnp.ndarray | None = None,
               augment_labels: jnp.ndarray | None = None, train: bool = False) -> jnp.ndarray:
    """Runs the network.

    Args:
      x: (B, H, W, C) input, H = W = img_resolution, C = in_channels.
      noise_labels: (B,) or scalar EDM noise labels c_noise.
      class_labels: integers (B,) or one-hot (B, label_dim); must be None when label_dim = 0.
      augment_labels: must be None (DiT has no augmentation conditioning).
      train: enables dropout and label dropout (needs the "dropout" PRNG stream).

    Returns:
      (B, H, W, C) float32.
    """
    batch = x.shape[0]
    expected = (self.img_resolution, self.img_resolution, self.in_channels)
    if x.shape[1:] != expected:
      raise ValueError(f"DiT expects inputs (B, {', '.join(map(str, expected))}), got {x.shape}")
    if augment_labels is not None:
      raise ValueError("DiT has no augmentation conditioning; pass augment_labels=None")
    if class_labels is not None and not self.label_dim:
      raise ValueError("class_labels given to an unconditional DiT (label_dim = 0)")
    grid = self.img_resolution // self.patch_size
    tokens = PatchEmbed(self.hidden_size, self.patch_size, name="x_embedder")(x)
    tokens = tokens + sincos_position_embedding(self.hidden_size, grid)
    t = self.noise_scale * jnp.broadcast_to(noise_labels, (batch,)) + self.noise_shift
    c = TimestepEmbedder(self.hidden_size, self.frequency_embedding_size, name="t_embedder")(t)
    if self.label_dim:
      labels = LabelEmbedder(self.label_dim, self.hidden_size, self.class_dropout_prob, name="y_embedder")
      c = c + labels(class_labels, batch, train)
    for i in range(self.depth):
      block = DiTBlock(self.num_heads, self.mlp_ratio, self.dropout, name=f"blocks_{i}")
      tokens = block(tokens, c, train)
    out = FinalLayer(self.patch_size, self.in_channels, name="final_layer")(tokens, c)
    return unpatchify(out, self.patch_size, self.in_channels)


def build(**kwargs) -> DiT:
  """A DiT from JSON-serialisable keyword arguments (the `DiT` attributes)."""
  return DiT(**kwargs)


_EDM_NOISE = {"noise_scale": NOISE_SCALE, "noise_shift": NOISE_SHIFT}

PRESETS: dict[str, dict] = {
    # DiT-B/4 as the paper's CIFAR-10 baseline: unconditional, 64 tokens; dropout 0.12 in the blocks.
    "dit_b4_cifar10": {"arch": "dit", "img_resolution": 32, "in_channels": 3, "patch_size": 4,
                       "hidden_size": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
                       "label_dim": 0, "dropout": 0.12, **_EDM_NOISE},
    # A small DiT for 8×8 / 16×16 data (override img_resolution / in_channels): 64 tokens at 16×16.
    "dit_small": {"arch": "dit", "img_resolution": 16, "in_channels": 3, "patch_size": 2,
                  "hidden_size": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "label_dim": 0,
                  "dropout": 0.1, **_EDM_NOISE},
}
