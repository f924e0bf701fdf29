"""ELS / LS (Kamb & Ganguli) and σ-CFDM (Scarvelis et al.) against brute-force float64 NumPy."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax.denoisers.cfdm import cfdm_noise
from pspc_jax.denoisers.els import els_patch_schedule_for, parse_els_patch_schedule

from reference import empirical_reference, to_float64

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMAS = (0.002, 0.05, 1.0, 80.0)


def softmax_mean(dists, sigma, values):
  logits = -np.asarray(dists) / (2 * sigma ** 2)
  w = np.exp(logits - logits.max())
  return np.einsum("k,kc->c", w / w.sum(), np.asarray(values))


def els_reference(z, sigma, data, size, equivariant=True, boundary="zeros"):
  """By definition: for each pixel p, every candidate (image i, location q ∈ Q(p)), explicit patches."""
  z = np.asarray(z, np.float64)
  x = to_float64(data)
  _, height, width, _ = z.shape
  r = size // 2
  sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (z.shape[0],))
  pad = ((r, r), (r, r), (0, 0))
  circular = boundary == "circular"
  x_mode = "wrap" if circular and not equivariant else "constant"
  x_pad = [np.pad(xi, pad, mode=x_mode) for xi in x]

  def candidates(p, length):
    interior = list(range(r, length - r))
    if not equivariant:
      return [p]
    if circular:
      return interior
    return interior if p in interior else [p]

  out = np.zeros_like(z)
  for b in range(z.shape[0]):
    z_pad = np.pad(z[b], pad, mode="wrap" if circular else "constant")
    for h in range(height):
      for w in range(width):
        query = z_pad[h:h + size, w:w + size]
        dists, values = [], []
        for i in range(len(x)):
          for qh in candidates(h, height):
            for qw in candidates(w, width):
              dists.append(((query - x_pad[i][qh:qh + size, qw:qw + size]) ** 2).sum())
              values.append(x[i, qh, qw])
        out[b, h, w] = softmax_mean(dists, sigmas[b], values)
  return out


def cfdm_reference(z, sigma, data, smoothing, noise):
  z = np.asarray(z, np.float64)
  x = to_float64(data).reshape(len(data), -1)
  eps = np.asarray(noise, np.float64).reshape(len(noise), -1)
  sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (z.shape[0],))
  out = np.zeros((z.shape[0], x.shape[1]))
  for b in range(z.shape[0]):
    for e in eps:
      query = z[b].reshape(-1) + smoothing * (1 + sigmas[b]) * e
      out[b] += softmax_mean(((query - x) ** 2).sum(1), sigmas[b], x) / len(eps)
  return out.reshape(z.shape)


def cfdm_reference_paper_units(z, sigma, data, smoothing, noise):
  """The same denoiser computed the paper's way, in its (x_t, t) units, with no EDM algebra.

  x_t = t·z with t = 1/(1 + σ); the smoothed score (k_t(x_t + λε) averaged, in its perturbed-logit
  form: logit_i = −‖x_t − t x_i‖²/(2(1−t)²) + λ t ⟨ε, x_i⟩/(1−t)²), minus x_t, over (1 − t)²; then the
  posterior mean of x_1 given x_t, (x_t + (1 − t)² s)/t.
  """
  z = np.asarray(z, np.float64)
  x = to_float64(data).reshape(len(data), -1)
  eps = np.asarray(noise, np.float64).reshape(len(noise), -1)
  sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (z.shape[0],))
  out = np.zeros((z.shape[0], x.shape[1]))
  for b in range(z.shape[0]):
    t = 1.0 / (1.0 + sigmas[b])
    xt = t * z[b].reshape(-1)
    k = np.zeros(x.shape[1])
    for e in eps:
      logits = (-((xt - t * x) ** 2).sum(1) / (2 * (1 - t) ** 2)
                + smoothing * t * (x @ e) / (1 - t) ** 2)
      w = np.exp(logits - logits.max())
      k += (w / w.sum()) @ (t * x) / len(eps)
    score = (k - xt) / (1 - t) ** 2
    out[b] = (xt + (1 - t) ** 2 * score) / t
  return out.reshape(z.shape)


def problem(channels, num=12, batch=4, shape=(6, 5), seed=0, uint8=False):
  rng = np.random.default_rng(seed + channels)
  if uint8:
    data = rng.integers(0, 256, (num,) + shape + (channels,), dtype=np.uint8)
    clean = to_float64(data[:batch])
  else:
    data = rng.uniform(-1, 1, (num,) + shape + (channels,)).astype(np.float32)
    clean = data[:batch].astype(np.float64)
  # Queries near training images (a realistic posterior) and one far from everything.
  z = clean + 0.3 * rng.standard_normal(clean.shape)
  z[-1] = rng.standard_normal(clean.shape[1:])
  return z.astype(np.float32), data


def every_sigma(z, data):
  """Each query at each σ of SIGMAS, as one mixed-σ batch (one compilation per configuration)."""
  return (np.repeat(z, len(SIGMAS), axis=0), np.tile(np.asarray(SIGMAS, np.float32), len(z)), data)


@pytest.mark.parametrize("channels,size,equivariant,boundary", [
    (1, 3, True, "zeros"),
    (3, 3, True, "zeros"),
    (1, 5, True, "zeros"),     # 6×5 with k = 5: 2 interior rows, 1 interior column
    (3, 1, True, "zeros"),     # pixels compared with every pixel of every image
    (1, 3, True, "circular"),
    (3, 3, False, "zeros"),    # LS
    (1, 5, False, "circular"),
])
def test_els_matches_reference(channels, size, equivariant, boundary):
  z, sigma, data = every_sigma(*problem(channels, uint8=channels == 3))
  got = pj.els_denoise(jnp.asarray(z), jnp.asarray(sigma), jnp.asarray(data), size,
                       equivariant=equivariant, boundary=boundary, chunk_size=5)
  want = els_reference(z, sigma, data, size, equivariant, boundary)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_els_chunks_mixed_sigma_and_full_patch_limit():
  z, data = problem(3, num=13)
  z, data = jnp.asarray(z), jnp.asarray(data)
  sigma = jnp.asarray(SIGMAS, jnp.float32)
  denoise = jax.jit(lambda z, s: pj.els_denoise(z, s, data, 3, chunk_size=4))
  mixed = np.asarray(denoise(z, sigma))
  one_chunk = np.asarray(pj.els_denoise(z, sigma, data, 3, chunk_size=64))
  np.testing.assert_allclose(mixed, one_chunk, atol=1e-5)
  for b in range(4):
    single = np.asarray(denoise(z[b:b + 1], sigma[b]))
    np.testing.assert_allclose(mixed[b:b + 1], single, atol=1e-5)
  # k ≥ 2·max(H, W) − 1: every centred patch is the whole image, ELS = LS = the optimal denoiser.
  for equivariant in (True, False):
    full = pj.els_denoise(z, sigma, data, 11, equivariant=equivariant)
    np.testing.assert_allclose(np.asarray(full), empirical_reference(z, sigma, data), atol=1e-4)


def test_circular_els_is_equivariant_to_circular_shifts():
  z, data = problem(1, num=10)
  z, data = jnp.asarray(z), jnp.asarray(data)
  out = pj.els_denoise(z, 0.3, data, 3, boundary="circular")
  moved = pj.els_denoise(jnp.roll(z, (2, -1), axis=(1, 2)), 0.3, data, 3, boundary="circular")
  np.testing.assert_allclose(np.asarray(moved), np.roll(np.asarray(out), (2, -1), axis=(1, 2)),
                             atol=1e-5)


def test_els_refuses_bad_patch_sizes_and_schedules():
  z, data = problem(1, num=3)
  with pytest.raises(ValueError, match="must be odd"):
    pj.els_denoise(jnp.asarray(z), 1.0, jnp.asarray(data), 4)
  with pytest.raises(ValueError, match="at most 5"):
    pj.els_denoise(jnp.asarray(z), 1.0, jnp.asarray(data), 7, boundary="circular")
  assert els_patch_schedule_for(8).values == (15,) * 7 + (7, 5, 3) + (3,) * 8
  assert parse_els_patch_schedule("cifar10", 32).values[0] == 63
  with pytest.raises(ValueError, match="not an odd size"):
    parse_els_patch_schedule("4", 8)


@pytest.mark.parametrize("channels", [1, 3])
def test_cfdm_matches_reference(channels):
  z, sigma, data = every_sigma(*problem(channels, num=20, uint8=channels == 3))
  noise = cfdm_noise(z.shape[1:], 4, noise_seed=3)
  got = pj.cfdm_denoise(jnp.asarray(z), jnp.asarray(sigma), jnp.asarray(data), 0.2, num_noise=4,
                        noise_seed=3, chunk_size=7)
  want = cfdm_reference(z, sigma, data, 0.2, noise)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  # The EDM-unit formula is the paper's smoothed score, converted: same numbers in float64.
  np.testing.assert_allclose(cfdm_reference_paper_units(z, sigma, data, 0.2, noise), want, atol=1e-7)


def test_cfdm_limits_chunks_and_mixed_sigma():
  z, data = problem(3, num=15)
  z, data = jnp.asarray(z), jnp.asarray(data)
  sigma = jnp.asarray(SIGMAS, jnp.float32)
  # smoothing 0: the smoothed score is the closed-form score, i.e. the optimal empirical denoiser.
  np.testing.assert_allclose(np.asarray(pj.cfdm_denoise(z, sigma, data, 0.0)),
                             empirical_reference(z, sigma, data), atol=1e-4)
  # Antithetic pairs: the draws sum to zero, so a linear denoiser would see no smoothing at all.
  draws = np.asarray(cfdm_noise(z.shape[1:], 6))
  np.testing.assert_array_equal(draws[:3], -draws[3:])
  denoise = jax.jit(lambda z, s: pj.cfdm_denoise(z, s, data, 0.5, chunk_size=4))
  mixed = np.asarray(denoise(z, sigma))
  np.testing.assert_allclose(mixed, np.asarray(pj.cfdm_denoise(z, sigma, data, 0.5)), atol=1e-5)
  for b in range(4):
    np.testing.assert_allclose(mixed[b:b + 1], np.asarray(denoise(z[b:b + 1], sigma[b])), atol=1e-5)
  # σ → 0 with smoothing: an average of training images (a barycentre), here not a training image.
  low = np.asarray(pj.cfdm_denoise(z, 0.002, data, 2.0, num_noise=16))
  nearest = np.min(np.abs(low[:, None] - np.asarray(data)[None]).max(axis=(2, 3, 4)), axis=1)
  assert nearest.max() > 1e-2
  # One training image: every denoiser returns it.
  single = pj.cfdm_denoise(z, sigma, data[:1], 0.5)
  np.testing.assert_allclose(np.asarray(single), np.broadcast_to(np.asarray(data[:1]), z.shape),
                             atol=1e-6)


def run_sample(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", "sample"), *args],
                        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("denoiser", ["els", "cfdm"])
def test_bin_sample_end_to_end(tmp_path, denoiser):
  result = run_sample(f"--denoiser={denoiser}", "--steps=2", "--num_samples=2",
                      f"--outdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  with np.load(tmp_path / "samples.npz") as saved:
    assert saved["samples"].shape == (2, 8, 8, 1) and np.isfinite(saved["samples"]).all()
