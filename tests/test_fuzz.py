"""Fuzz: every denoiser at every patch size, σ from 0 to 1e4, queries near and far from the data.

Each configuration runs one mixed-σ batch (every σ of SIGMAS × every kind of query of KINDS: one
compilation). Every output must be finite; the posterior means (all but the Gaussian and the network)
must be convex combinations of the training values they average; and where float32 can resolve the
answer (`queries`), they must be within 1e-4 of the float64 references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax.data import load_dataset
from pspc_jax.denoisers.cfdm import cfdm_noise
from pspc_jax.denoisers.empirical import SIGMA_FLOOR
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.registry import available_denoisers
from reference import empirical_reference, pspc_reference, square_masks, to_float64
from test_els_cfdm import cfdm_reference, els_reference
from test_flex import random_maps, reference_masks

TOL = 1e-4
SIGMAS = (0.0, 1e-6, 1e-3, 0.002, 0.05, 1.0, 80.0, 1e4)
# Queries z = x + shift + noise·ε around a training image x: (noise, shift), None meaning noise σ.
KINDS = {"near": None, "x + 100ε": (100.0, 0.0), "x + 100": (1.0, 100.0),
         "x - 100": (1.0, -100.0), "x + 1e4": (1.0, 1e4), "x - 1e4": (1.0, -1e4)}
NETWORK = "checkpoints/digits_ddpmpp_small"
OPTIONS = {"pspc_flex": dict(maps="checkpoints/digits_ddpmpp_small_maps.npz"),
           "network": dict(checkpoint=NETWORK)}


@pytest.fixture(scope="module")
def datasets():
  """8×8×1 digits (32 images) and a 5×7×3 uniform random uint8 set (24 images)."""
  digits = np.asarray(load_dataset("digits", max_images=32).images)
  colour = np.random.default_rng(1).integers(0, 256, (24, 5, 7, 3), dtype=np.uint8)
  return {"digits": digits, "colour": colour}


def queries(data, seed=0):
  """One mixed-σ batch: every σ of SIGMAS with every kind of KINDS (48 queries).

  Returns:
    (z float32 (48, H, W, C), σ float32 (48,), resolved bool (48,)): resolved marks the queries whose
    float32 answer is determined to 1e-4: near the data, or far with σ ≥ half the distance. Far from
    the data at smaller σ, rounding z − x (|z| up to 1e4, one ulp 1e-3) moves the logits by more
    than the gaps between training images, so float32 and float64 may pick different neighbours.
  """
  rng = np.random.default_rng(seed)
  x = to_float64(data)
  z, sigmas, resolved = [], [], []
  for sigma in SIGMAS:
    for kind in KINDS.values():
      noise, shift = (sigma, 0.0) if kind is None else kind
      clean = x[rng.integers(len(x))]
      z.append(clean + shift + noise * rng.standard_normal(clean.shape))
      sigmas.append(sigma)
      resolved.append(kind is None or sigma >= max(noise, abs(shift)) / 2)
  return np.asarray(z, np.float32), np.asarray(sigmas, np.float32), np.asarray(resolved)


def describe(sigma, index):
  return f"σ = {sigma[index]:g}, z {list(KINDS)[index % len(KINDS)]}"


def check(out, z, sigma, resolved, data, reference=None, pooled=False):
  """Asserts finite outputs; for posterior means (`data` given) values inside the range of the
  training values at each pixel (`pooled`: over all pixels, for ELS); and agreement with
  `reference(z, σ)` (float64 NumPy; σ floored at SIGMA_FLOOR as in the denoisers) where resolved."""
  out = np.asarray(out)
  finite = np.isfinite(out).all(axis=(1, 2, 3))
  assert finite.all(), f"non-finite output at {describe(sigma, np.argmin(finite))}"
  if data is not None:
    x = to_float64(data)
    axes = (0, 1, 2) if pooled else 0
    outside = np.maximum(x.min(axis=axes) - out, out - x.max(axis=axes)).max(axis=(1, 2, 3))
    worst = describe(sigma, np.argmax(outside))
    assert outside.max() <= 1e-5, f"output outside the data range at {worst}"
  if reference is not None:
    want = reference(z[resolved], np.maximum(sigma[resolved], SIGMA_FLOOR))
    error = np.abs(out[resolved] - want).max(axis=(1, 2, 3))
    worst = np.flatnonzero(resolved)[np.argmax(error)]
    assert error.max() <= TOL, f"error {error.max():.2g} against float64 at {describe(sigma, worst)}"


# 5×7: squares up to 5, and 7 = the whole image (the bands of s = 6 belong to the non-square tests).
SQUARE_CASES = [("digits", s) for s in range(1, 9)] + [("colour", s) for s in (1, 2, 3, 4, 5, 7)]


@pytest.mark.parametrize("dataset,size", SQUARE_CASES)
def test_pspc_square_every_patch_size(datasets, dataset, size):
  data = datasets[dataset]
  z, sigma, resolved = queries(data, seed=size)
  out = jax.jit(pj.pspc_square_denoise, static_argnums=3)(z, sigma, data, size)
  if size <= min(data.shape[1:3]):
    masks = square_masks(*data.shape[1:3], size)
    check(out, z, sigma, resolved, data, lambda z, s: pspc_reference(z, s, data, masks))
  else:  # one window: the whole image
    check(out, z, sigma, resolved, data, lambda z, s: empirical_reference(z, s, data))


# ELS at every size on 5×7 (13: every patch is the whole image), LS at a few; on digits the sizes of the
# reported NaNs.
ELS_CASES = ([("colour", k, True) for k in range(1, 14, 2)] + [("colour", k, False) for k in (1, 3, 13)]
             + [("digits", k, eq) for k in (1, 3) for eq in (True, False)])


@pytest.mark.parametrize("dataset,size,equivariant", ELS_CASES)
def test_els_and_ls_every_patch_size(datasets, dataset, size, equivariant):
  data = datasets[dataset]
  z, sigma, resolved = queries(data, seed=size)
  denoise = jax.jit(pj.els_denoise, static_argnames=("patch_size", "equivariant"))
  out = denoise(z, sigma, data, patch_size=size, equivariant=equivariant)
  reference = lambda z, s: els_reference(z, s, data, size, equivariant)  # noqa: E731
  if equivariant:  # the loop reference is slow with many candidate locations: a few near queries
    resolved &= np.arange(len(z)) % (2 * len(KINDS)) == 0
    reference = reference if dataset == "colour" else None
  check(out, z, sigma, resolved, data, reference, pooled=equivariant)


@pytest.mark.parametrize("threshold", [0.05, 0.4, 0.8, 1.0])
def test_pspc_flex_thresholds(datasets, threshold):
  data = datasets["colour"]
  z, sigma, resolved = queries(data, seed=3)
  maps = random_maps(*data.shape[1:3], seed=4)
  out = jax.jit(lambda z, s, d: pj.pspc_flex_denoise(z, s, d, maps, threshold))(z, sigma, data)
  masks = list(reference_masks(maps, threshold))
  check(out, z, sigma, resolved, data, lambda z, s: pspc_reference(z, s, data, masks))


@pytest.mark.parametrize("dataset", ["digits", "colour"])
def test_empirical_and_cfdm(datasets, dataset):
  data = datasets[dataset]
  z, sigma, resolved = queries(data, seed=5)
  out = jax.jit(pj.empirical_denoise)(z, sigma, data)
  check(out, z, sigma, resolved, data, lambda z, s: empirical_reference(z, s, data))
  noise = cfdm_noise(data.shape[1:], num_noise=2)
  out = jax.jit(lambda z, s, d: pj.cfdm_denoise(z, s, d, 0.3, num_noise=2))(z, sigma, data)
  check(out, z, sigma, resolved, data, lambda z, s: cfdm_reference(z, s, data, 0.3, noise))


@pytest.mark.parametrize("name", available_denoisers())
def test_every_registry_denoiser_with_its_defaults(datasets, name):
  data = datasets["digits"]
  z, sigma, resolved = queries(data, seed=6)
  denoiser = build_denoiser(name, data, **OPTIONS.get(name, {}))
  out = jax.jit(lambda denoiser, z, sigma: denoiser(z, sigma))(denoiser, z, sigma)
  posterior_mean = name not in ("gaussian", "network")
  check(out, z, sigma, resolved, data if posterior_mean else None, pooled=name == "els")


def nearest_values(z, values):
  """Each entry of z replaced by the nearest of `values` (the σ → 0 limit of a one-pixel softmax over
  them, for one channel)."""
  values = np.unique(values)
  return values[np.argmin(np.abs(np.asarray(z, np.float64)[..., None] - values), axis=-1)]


def test_patch_size_one_far_from_the_data(datasets):
  """The reported cases: a constant z = 101 at σ = 1e-3 (PSPC s = 1 and LS k = 1: NaN pixels), and ELS
  k = 1 at σ = 0.002 with z = x + 100ε (NaN pixels). At these σ every pixel takes the nearest training
  value at that pixel (PSPC, LS) or anywhere (ELS)."""
  data = datasets["digits"]
  x = to_float64(data)
  z = np.full((1, 8, 8, 1), 101.0, np.float32)
  want = x.max(axis=0, keepdims=True)
  for denoise in (pj.pspc_square_denoise, pj.ls_denoise):
    got = jax.jit(denoise, static_argnums=3)(z, 1e-3, data, 1)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=denoise.__name__)
  rng = np.random.default_rng(0)
  z = (x[:4] + 100 * rng.standard_normal((4, 8, 8, 1))).astype(np.float32)
  got = jax.jit(pj.els_denoise, static_argnums=3)(z, 0.002, data, 1)
  np.testing.assert_allclose(got, nearest_values(z, x), atol=TOL, rtol=0)
