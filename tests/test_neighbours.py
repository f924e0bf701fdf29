"""Streaming nearest neighbours, and the memorisation property of the optimal denoiser's sampler."""

import jax.numpy as jnp
import numpy as np

import pspc_jax as pj
from pspc_jax.data import load_dataset
from pspc_jax.neighbours import nearest_neighbours


def test_nearest_neighbours_match_brute_force():
  rng = np.random.default_rng(0)
  data = rng.integers(0, 256, (53, 4, 5, 3)).astype(np.uint8)
  queries = rng.standard_normal((6, 4, 5, 3)).astype(np.float32)
  dists, idx = nearest_neighbours(jnp.asarray(queries), jnp.asarray(data), k=3, chunk_size=10)
  full = np.sqrt(((queries[:, None] - (data / 127.5 - 1)[None]) ** 2).sum(axis=(2, 3, 4)))
  np.testing.assert_array_equal(idx, np.argsort(full, axis=1)[:, :3])
  np.testing.assert_allclose(dists, np.sort(full, axis=1)[:, :3], rtol=1e-5)


def test_empirical_sampler_reproduces_training_images_and_pspc_does_not():
  """The optimal denoiser only memorises (Eq. 6-7 sampled to σ=0); PSPC-Square makes new digits."""
  data = jnp.asarray(load_dataset("digits").images)
  latents = pj.latents_from_seeds(jnp.arange(6), (8, 8, 1))
  sigmas = pj.edm_sigmas(12)
  copies = pj.sample(pj.make_denoiser("empirical", data), latents, sigmas)
  novel = pj.sample(pj.make_denoiser("pspc_square", data), latents, sigmas)
  copy_dist = nearest_neighbours(copies, data, k=1)[0][:, 0]
  novel_dist = nearest_neighbours(novel, data, k=1)[0][:, 0]
  assert float(copy_dist.max()) < 1e-3
  assert float(novel_dist.min()) > 0.5
