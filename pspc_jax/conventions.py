"""Array conventions shared by every module (docs/design.md §1).

Images are NHWC. Model-space images are float32 in [-1, 1]; datasets may be held as uint8 in [0, 255]
and are converted chunk by chunk with :func:`to_model_range`, so a 100,000-image CIFAR-10 set costs
300 MB of memory instead of 1.2 GB. Any other dtype (int32, uint16, bool, ...) is refused, and so is
concrete float data outside [-1, 1] (`pspc_jax.validation.check_data`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pspc_jax import validation


def to_model_range(x):
  """Converts images to float32 in [-1, 1].

  Args:
    x: images of any shape; uint8 in [0, 255] (mapped by x / 127.5 - 1) or floating point already in
      [-1, 1] (cast to float32).

  Returns:
    float32 array of the same shape.

  Raises:
    ValueError: any other dtype (int32, uint16, bool: a range cannot be assumed for them).
  """
  validation.check_image_dtype(x.dtype, "images")
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 127.5 - 1.0
  return x.astype(jnp.float32)


def to_uint8(x) -> np.ndarray:
  """Converts [-1, 1] float images to uint8 in [0, 255] (rounded, clipped), as a NumPy array."""
  x = np.asarray(x, dtype=np.float32)
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def sigma_per_sample(sigma, batch_size: int):
  """Broadcasts a noise level to one per sample.

  A concrete σ must be finite and ≥ 0 (ValueError otherwise). A traced σ (under `jax.jit`, `grad`,
  ...) cannot be checked: its negative or non-finite entries become NaN here, so every denoiser's
  output for such a sample is NaN, never a plausible-looking image.

  Args:
    sigma: a scalar or an array of shape (batch_size,); EDM's sigma (the paper's t), ≥ 0.
    batch_size: B.

  Returns:
    float32 array of shape (B,).

  Raises:
    ValueError: a wrong shape, or a concrete σ that is negative, NaN or infinite.
  """
  if sigma is not None:
    validation.check_sigma(sigma)
  sigma = jnp.asarray(sigma, dtype=jnp.float32)
  if sigma.ndim == 0:
    sigma = jnp.full((batch_size,), sigma)
  elif sigma.shape != (batch_size,):
    raise ValueError(f"sigma must be a scalar or have shape ({batch_size},), got {sigma.shape}")
  return jnp.where((sigma >= 0) & (sigma < jnp.inf), sigma, jnp.nan)


def check_query_and_data(z, data) -> None:
  """Raises ValueError unless z is (B, H, W, C) with finite values (when concrete), data is
  (N, H, W, C) with N ≥ 1 training images, uint8 or float in [-1, 1] (`validation.check_data`).
  B = 0 is allowed: the denoisers then return an empty (0, H, W, C) batch. (σ is checked by
  `sigma_per_sample`.)"""
  if z.ndim != 4:
    raise ValueError(f"z must have shape (B, H, W, C), got {z.shape}")
  if data.ndim != 4:
    raise ValueError(f"data must have shape (N, H, W, C), got {data.shape}")
  if data.shape[0] == 0:
    raise ValueError("the dataset is empty")
  if z.shape[1:] != data.shape[1:]:
    raise ValueError(f"z images {z.shape[1:]} and data images {data.shape[1:]} differ in shape")
  validation.check_finite(z, "z")
  validation.check_data(data)
