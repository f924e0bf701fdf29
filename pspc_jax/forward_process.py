"""The forward process z = x + σ·ε on training images, with one random convention for every tool.

Sample k of seed s: key_k = fold_in(key(s), k), split in two; the first key draws the training image
index i_k uniformly from [0, N), the second ε_k ~ N(0, I). So z_k depends only on (s, k, σ): the same
x and ε at every σ, and sample k does not depend on how many samples are drawn or how they are batched.
`bin/evaluate` (forward set), `bin/tune_schedule` (forward z) and `bin/sensitivity` (E_z of Eq. 8) all
draw through `forward_indices_and_noise`, so one seed gives the same z in every tool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pspc_jax.conventions import to_model_range


def forward_indices_and_noise(num_images: int, image_shape, sample_ids, seed: int = 0
                              ) -> tuple[jax.Array, jax.Array]:
  """Training-image indices (K,) int32 and noise ε (K, *image_shape) float32 of sample ids (K,)."""
  base = jax.random.key(seed)

  def one(k):
    key_index, key_noise = jax.random.split(jax.random.fold_in(base, k))
    index = jax.random.randint(key_index, (), 0, num_images)
    return index, jax.random.normal(key_noise, tuple(image_shape), jnp.float32)

  return jax.vmap(one)(jnp.asarray(sample_ids))


def forward_samples(data, sigma, sample_ids, seed: int = 0) -> jax.Array:
  """Forward-process z_k = x_{i_k} + σ·ε_k for sample ids k, reproducibly (see the module doc).

  Args:
    data: (N, H, W, C) training images, uint8 or float in [-1, 1].
    sigma: noise level, a scalar or (K,).
    sample_ids: (K,) integer sample ids k.
    seed: base seed.

  Returns:
    float32 (K, H, W, C).
  """
  data = jnp.asarray(data)
  index, noise = forward_indices_and_noise(data.shape[0], data.shape[1:], sample_ids, seed)
  sigma = jnp.asarray(sigma, jnp.float32).reshape(-1, *([1] * (data.ndim - 1)))
  return to_model_range(data[index]) + sigma * noise
