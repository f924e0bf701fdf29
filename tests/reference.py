"""Independent brute-force references in NumPy float64: one explicit loop over masks and queries."""

import numpy as np


def to_float64(data):
  data = np.asarray(data)
  return data / 127.5 - 1.0 if data.dtype == np.uint8 else data.astype(np.float64)


def square_masks(height, width, size):
  """All size×size windows fully inside the image, as a list of bool (H, W) arrays."""
  masks = []
  for i in range(height - size + 1):
    for j in range(width - size + 1):
      mask = np.zeros((height, width), bool)
      mask[i:i + size, j:j + size] = True
      masks.append(mask)
  return masks


def pspc_reference(z, sigma, data, masks):
  """Eq. 11 by definition: for each mask and query, softmax over the dataset of the cropped distance."""
  z = np.asarray(z, np.float64)
  x = to_float64(data)
  sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (z.shape[0],))
  out = np.zeros_like(z)
  count = np.zeros(z.shape[1:3])
  for mask in masks:
    count += mask
    for b in range(z.shape[0]):
      dist = ((z[b][mask][None] - x[:, mask]) ** 2).sum(axis=(1, 2))
      logits = -dist / (2 * sigmas[b] ** 2)
      weights = np.exp(logits - logits.max())
      weights /= weights.sum()
      out[b][mask] += np.einsum("i,ipc->pc", weights, x[:, mask])
  return out / count[..., None]


def empirical_reference(z, sigma, data):
  return pspc_reference(z, sigma, data, [np.ones(np.shape(z)[1:3], bool)])
