"""Independent brute-force references in NumPy float64: one explicit loop over masks and queries."""

import jax.numpy as jnp
import numpy as np


def to_float64(data):
  data = np.asarray(data)
  return data / 127.5 - 1.0 if data.dtype == np.uint8 else data.astype(np.float64)


def make_problem(height, width, channels, num, batch, sigma, seed=0, dtype=np.uint8):
  """uint8 (or float) data and forward-process queries z = x + σ ε around training images, as
  (z float32, data) jax arrays."""
  rng = np.random.default_rng(seed)
  data = rng.integers(0, 256, (num, height, width, channels)).astype(np.uint8)
  if dtype != np.uint8:
    data = (data / 127.5 - 1.0).astype(dtype)
  x = to_float64(data)[rng.integers(0, num, batch)]
  sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (batch,))
  z = (x + sigmas[:, None, None, None] * rng.standard_normal(x.shape)).astype(np.float32)
  return jnp.asarray(z), jnp.asarray(data)


def square_masks(height, width, size):
  """Every window of patch size s inside the image, by definition, as a list of bool (H, W) arrays:
  min(s, H) × min(s, W) pixels (s×s squares while s ≤ min(H, W); s ≥ max(H, W) is the whole image)."""
  rows, cols = min(size, height), min(size, width)
  masks = []
  for i in range(height - rows + 1):
    for j in range(width - cols + 1):
      mask = np.zeros((height, width), bool)
      mask[i:i + rows, j:j + cols] = True
      masks.append(mask)
  return masks


def composite_weights_reference(z, sigma, data, masks):
  """a[b, i, h, w] = (1/n_p) Σ_{C ∋ p} softmax_i(−‖Cz − Cx_i‖²/(2σ²)): per mask and query, the softmax
  over the dataset of the cropped distance, added to the mask's pixels, divided by the coverage."""
  z = np.asarray(z, np.float64)
  x = to_float64(data)
  sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (z.shape[0],))
  out = np.zeros((z.shape[0], x.shape[0]) + z.shape[1:3])
  count = np.zeros(z.shape[1:3])
  for mask in masks:
    count += mask
    for b in range(z.shape[0]):
      dist = ((z[b][mask][None] - x[:, mask]) ** 2).sum(axis=(1, 2))
      logits = -dist / (2 * sigmas[b] ** 2)
      w = np.exp(logits - logits.max())
      out[b][:, mask] += (w / w.sum())[:, None]
  return out / count


def pspc_reference(z, sigma, data, masks):
  """Eq. 11 by definition: x̂[p] = Σ_i a_i[p] x_i[p] with the composite weights above."""
  weights = composite_weights_reference(z, sigma, data, masks)
  return np.einsum("bihw,ihwc->bhwc", weights, to_float64(data))


def empirical_reference(z, sigma, data):
  return pspc_reference(z, sigma, data, [np.ones(np.shape(z)[1:3], bool)])
