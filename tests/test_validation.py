"""Bad arguments of the Python API: a ValueError naming the argument, or a documented result.

Concrete bad values (σ < 0 / NaN / inf, data outside the image conventions, non-integer sizes, weighted
masks, out-of-range smoothing or λ, rising σ grids) raise; a traced bad σ gives NaN for its sample; an
empty batch (B = 0) gives an empty result from every denoiser and from the sampler.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax import validation
from pspc_jax.data import load_dataset
from pspc_jax.denoisers import registry
from reference import empirical_reference, to_float64

CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
MAPS_FILE = os.path.join(CHECKPOINTS, "digits_ddpmpp_small_maps.npz")
OPTIONS = {"pspc_flex": dict(maps=MAPS_FILE),
           "network": dict(checkpoint=os.path.join(CHECKPOINTS, "digits_ddpmpp_small")),
           "els": dict(patch_schedule=3), "cfdm": dict(num_noise=2),
           "pspc_flex_gaussian": dict(sigmas=[0.5], thresholds=0.5)}
BAD_SIGMAS = (-1.0, float("nan"), float("inf"), -float("inf"))


@functools.lru_cache(maxsize=None)
def digits():
  return load_dataset("digits", max_images=64).images  # uint8 (64, 8, 8, 1)


@functools.lru_cache(maxsize=None)
def registry_denoiser(name):
  return pj.build_denoiser(name, digits(), **OPTIONS.get(name, {}))


def queries(batch=2, sigma=0.5, seed=0):
  x = to_float64(digits()[:batch])
  noise = np.random.default_rng(seed).standard_normal(x.shape)
  return (x + sigma * noise).astype(np.float32)


def maps():
  return pj.load_maps(MAPS_FILE).maps[0]  # (8, 8, 8, 8)


# Every public denoiser as f(z, sigma, data) with valid other arguments.
PUBLIC = {
    "empirical": lambda z, s, d: pj.empirical_denoise(z, s, d),
    "pspc_square": lambda z, s, d: pj.pspc_square_denoise(z, s, d, 3),
    "pspc": lambda z, s, d: pj.pspc_denoise(z, s, d, np.ones((1, 8, 8), bool)),
    "pspc_flex": lambda z, s, d: pj.pspc_flex_denoise(z, s, d, maps(), 0.5),
    "patch_posterior_means": lambda z, s, d: pj.patch_posterior_means(z, s, d, 3),
    "els": lambda z, s, d: pj.els_denoise(z, s, d, 3),
    "cfdm": lambda z, s, d: pj.cfdm_denoise(z, s, d, 0.3, num_noise=2),
    "gaussian": lambda z, s, d: pj.gaussian_denoise(z, s, pj.gaussian_stats(d)),
}


# --- σ ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PUBLIC))
@pytest.mark.parametrize("sigma", BAD_SIGMAS)
def test_concrete_bad_sigma_raises_in_every_public_denoiser(name, sigma):
  with pytest.raises(ValueError, match=r"sigma must be finite and >= 0"):
    PUBLIC[name](queries(), sigma, digits())


@pytest.mark.parametrize("name", registry.available_denoisers())
def test_concrete_bad_sigma_raises_in_every_registry_denoiser(name):
  denoise = registry_denoiser(name)
  for sigma in (-1.0, np.float32(np.nan), jnp.asarray([0.5, np.inf])):
    with pytest.raises(ValueError, match=r"sigma must be finite and >= 0"):
      denoise(queries(), sigma)
  with pytest.raises(ValueError, match=r"got -0.5 at index \(1,\)"):
    denoise(queries(), np.asarray([0.5, -0.5]))


@pytest.mark.parametrize("name", registry.available_denoisers())
def test_traced_bad_sigma_gives_nan_for_its_sample_only(name, tmp_path):
  """Under jit σ cannot be checked: the documented result is NaN for every sample whose σ is negative,
  NaN or infinite (never a plausible image), and an unchanged output for the valid samples."""
  if name == "pspc_flex":  # two maps and one λ: two branches to compile instead of a dozen
    full = pj.load_maps(MAPS_FILE)
    pj.save_maps(tmp_path / "maps.npz", pj.SensitivityMaps(full.sigmas[[0, 11]], full.maps[[0, 11]]))
    denoise = pj.build_denoiser(name, digits(), maps=str(tmp_path / "maps.npz"), thresholds=0.5)
  else:
    denoise = registry_denoiser(name)
  run = jax.jit(denoise)
  z = queries(batch=5)
  out = np.asarray(run(z, np.asarray([0.5, -1.0, np.nan, np.inf, -np.inf], np.float32)))
  assert np.isnan(out[1:]).all()
  valid = np.asarray(run(z, np.full(5, 0.5, np.float32)))
  assert np.isfinite(valid).all()
  np.testing.assert_allclose(out[0], valid[0], atol=1e-6)


def test_traced_bad_sigma_gives_nan_in_the_gaussian_and_public_kernels():
  z = queries(batch=2)
  for name, denoise in PUBLIC.items():
    if name == "patch_posterior_means":
      continue
    out = np.asarray(jax.jit(lambda s, denoise=denoise: denoise(z, s, digits()))(jnp.float32(-1.0)))
    assert np.isnan(out).all(), name


def test_zero_sigma_stays_valid_nearest_neighbour():
  z = queries(batch=3, sigma=0.05)
  got = pj.empirical_denoise(z, 0.0, digits())
  data = to_float64(digits())
  nearest = np.argmin(((z[:, None].astype(np.float64) - data[None]) ** 2).sum(axis=(2, 3, 4)), axis=1)
  np.testing.assert_allclose(got, data[nearest], atol=1e-6)


# --- the sampler's σ grid ------------------------------------------------------------------------------

@pytest.mark.parametrize("sigmas,message", [
    ([0.5, 1.0, 2.0, 0.0], "non-increasing"),
    ([2.0, 1.0, 1.5, 0.0], "entry 2 .* exceeds entry 1"),
    ([2.0, np.nan, 0.0], "finite"),
    ([2.0, -1.0, 0.0], "finite and > 0"),
    ([2.0, 0.0, 0.0], "finite and > 0"),
    ([np.inf, 1.0, 0.0], "finite"),
    ([2.0], "at least 2"),
    ([[2.0, 0.0]], "1-D"),
])
def test_bad_sigma_grid_raises(sigmas, message):
  latents = np.zeros((1, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match=f"sigmas.*{message}"):
    pj.sample(registry_denoiser("empirical"), latents, np.asarray(sigmas, np.float32))


def test_sampler_accepts_non_increasing_grids_and_checks_latents_and_churn():
  latents = pj.latents_from_seeds(jnp.arange(2), (8, 8, 1))
  out = pj.sample(registry_denoiser("empirical"), latents, jnp.asarray([2.0, 2.0, 1.0, 0.0]))
  assert np.isfinite(np.asarray(out)).all()
  with pytest.raises(ValueError, match="latents must be finite"):
    pj.sample(registry_denoiser("empirical"), latents.at[0, 0, 0, 0].set(jnp.nan), pj.edm_sigmas(2))
  for option in ("s_churn", "s_noise"):
    with pytest.raises(ValueError, match=option):
      pj.sample(registry_denoiser("empirical"), latents, pj.edm_sigmas(2), **{option: float("nan")})


# --- data and z ----------------------------------------------------------------------------------------

def bad_data():
  """Training sets that are neither uint8 nor float in [-1, 1], with the dtype the message names."""
  images = digits()
  nan_data = to_float64(images).astype(np.float32)
  nan_data[3, 2, 2, 0] = np.nan
  return [(images.astype(np.int32), "got int32"), (images.astype(np.uint16), "got uint16"),
          (images > 128, "got bool"), (images.astype(np.float32), r"got float32 in \[0, 255\]"),
          (jnp.asarray(images, jnp.float32), r"got float32 in \[0, 255\]"),
          (nan_data, "got float32 with NaN or infinite values")]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_bad_data_raises_in_every_public_denoiser(name, case):
  data, what = bad_data()[case]
  with pytest.raises(ValueError, match=r"data must be uint8 in \[0, 255\] or float in \[-1, 1\]; " + what):
    PUBLIC[name](queries(), 0.5, data)


@pytest.mark.parametrize("name", registry.available_denoisers())
def test_bad_data_raises_when_a_registry_denoiser_is_built(name):
  for data, what in bad_data():
    with pytest.raises(ValueError, match="data must be uint8 in .*; " + what):
      pj.build_denoiser(name, data, **OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", registry.available_denoisers())
def test_registry_refuses_misshapen_data_and_unknown_options(name):
  """Before: 3-D or empty data was accepted until the first call, and an unknown option raised a
  TypeError from the builder."""
  good = digits()
  for data in (good[0], good[:0]):
    with pytest.raises(ValueError, match=r"data must have shape \(N, H, W, C\) with N >= 1"):
      pj.make_denoiser(name, data)
  with pytest.raises(ValueError, match=f"the {name} denoiser takes no option 'bogus'; its options are"):
    pj.make_denoiser(name, good, bogus=1)


def test_bad_data_raises_with_a_mesh_and_traced_data_is_not_scanned():
  with pytest.raises(ValueError, match=r"got float32 in \[0, 255\]"):
    pj.build_denoiser("empirical", digits().astype(np.float32), mesh=pj.make_mesh())
  # The dtype is static and checked under jit; the values of traced data cannot be and are not read.
  z = queries()
  with pytest.raises(ValueError, match="got int32"):
    jax.jit(lambda d: pj.empirical_denoise(z, 0.5, d))(digits().astype(np.int32))
  inside = jnp.asarray(to_float64(digits()), jnp.float32)
  np.testing.assert_allclose(jax.jit(lambda d: pj.empirical_denoise(z, 0.5, d))(inside),
                             empirical_reference(z, 0.5, digits()), atol=1e-5)


def test_float_data_in_range_is_accepted_and_a_jax_array_is_scanned_once():
  data = jnp.asarray(to_float64(digits()) * (1 + 0.5 * validation.DATA_RANGE_TOLERANCE), jnp.float32)
  z = queries()
  np.testing.assert_allclose(pj.empirical_denoise(z, 0.5, data),
                             empirical_reference(z, 0.5, np.asarray(data)), atol=1e-5)
  assert validation._already_accepted(data)
  assert not validation._already_accepted(jnp.asarray(np.asarray(data)))  # a new array is scanned


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_non_finite_z_raises(name):
  for value in (np.nan, np.inf):
    z = queries()
    z[1, 4, 5, 0] = value
    with pytest.raises(ValueError, match=r"z must be finite, got .* at index \(1, 4, 5, 0\)"):
      PUBLIC[name](z, 0.5, digits())


# --- integer arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [2.5, 3.0, True, np.float32(3), 0, -1, "3"])
def test_positive_int_refuses_floats_bools_and_small_values(value):
  with pytest.raises(ValueError, match=r"size must be an integer >= 1, got"):
    validation.positive_int(value, "size")


def test_positive_int_accepts_numpy_integers():
  assert validation.positive_int(np.int64(3), "size") == 3
  assert validation.positive_int(np.asarray(5, np.int32), "size") == 5
  assert validation.positive_int(None, "size", optional=True) is None
  assert validation.positive_int(0, "size", minimum=0) == 0


@pytest.mark.parametrize("call,name", [
    (lambda z, d: pj.pspc_square_denoise(z, 0.5, d, 2.5), "patch_size"),
    (lambda z, d: pj.pspc_square_denoise(z, 0.5, d, True), "patch_size"),
    (lambda z, d: pj.pspc_square_denoise(z, 0.5, d, 3, cache_bytes=1.5), "cache_bytes"),
    (lambda z, d: pj.patch_posterior_means(z, 0.5, d, 3.0), "patch_size"),
    (lambda z, d: pj.els_denoise(z, 0.5, d, 3.0), "patch_size"),
    (lambda z, d: pj.ls_denoise(z, 0.5, d, True), "patch_size"),
    (lambda z, d: pj.empirical_denoise(z, 0.5, d, chunk_size=2.5), "chunk_size"),
    (lambda z, d: pj.empirical_denoise(z, 0.5, d, chunk_size=0), "chunk_size"),
    (lambda z, d: pj.pspc_square_denoise(z, 0.5, d, 3, chunk_size=True), "chunk_size"),
    (lambda z, d: pj.els_denoise(z, 0.5, d, 3, chunk_size=4.0), "chunk_size"),
    (lambda z, d: pj.cfdm_denoise(z, 0.5, d, 0.3, num_noise=2.5), "num_noise"),
    (lambda z, d: pj.cfdm_denoise(z, 0.5, d, 0.3, noise_seed=1.5), "noise_seed"),
    (lambda z, d: pj.gaussian_stats(d, rank=2.5), "rank"),
    (lambda z, d: pj.gaussian_stats(d, chunk_size=8.0), "chunk_size"),
    (lambda z, d: pj.make_denoiser("pspc_square", d, patch_schedule=2.5), "patch_schedule"),
    (lambda z, d: pj.make_denoiser("pspc_square", d, patch_schedule=True), "patch_schedule"),
    (lambda z, d: pj.make_denoiser("pspc_square", d, patch_schedule=pj.SigmaSchedule((1.0,), (2.5,))),
     "patch_schedule"),
    (lambda z, d: pj.make_denoiser("els", d, patch_schedule=3.0), "patch_schedule"),
    (lambda z, d: pj.make_denoiser("empirical", d, chunk_size=1.5), "chunk_size"),
    (lambda z, d: pj.make_denoiser("cfdm", d, num_noise=2.5), "num_noise"),
    (lambda z, d: pj.make_denoiser("gaussian", d, rank=3.0), "rank"),
])
def test_non_integer_sizes_raise(call, name):
  with pytest.raises(ValueError, match=f"{name} must be an integer"):
    call(queries(), digits())


def test_numpy_integer_sizes_are_accepted():
  z, data = queries(), digits()
  np.testing.assert_array_equal(pj.pspc_square_denoise(z, 0.5, data, np.int64(3)),
                                pj.pspc_square_denoise(z, 0.5, data, 3))
  np.testing.assert_array_equal(pj.make_denoiser("pspc_square", data, patch_schedule=np.int32(3))(z, 0.5),
                                pj.pspc_square_denoise(z, 0.5, data, 3))


# --- masks ----------------------------------------------------------------------------------------------

def test_weighted_masks_raise_and_zero_one_masks_equal_bool_masks():
  rng = np.random.default_rng(3)
  masks = rng.random((5, 8, 8)) < 0.4
  masks[0] = True
  z, data = queries(), digits()
  expected = np.asarray(pj.pspc_denoise(z, 0.5, data, masks))
  for same in (masks.astype(np.float32), masks.astype(np.int32), masks.tolist(), jnp.asarray(masks)):
    np.testing.assert_array_equal(pj.pspc_denoise(z, 0.5, data, same), expected)
  weighted = masks.astype(np.float32)
  weighted[1] *= 0.5
  with pytest.raises(ValueError, match="masks must be bool or hold only 0 and 1, got float32 .* 0.5"):
    pj.pspc_denoise(z, 0.5, data, weighted)
  with pytest.raises(ValueError, match="masks must be bool when traced"):
    jax.jit(lambda m: pj.pspc_denoise(z, 0.5, data, m))(masks.astype(np.float32))


def test_empty_or_misshapen_mask_sets_raise():
  z, data = queries(), digits()
  with pytest.raises(ValueError, match="masks must hold at least one mask"):
    pj.pspc_denoise(z, 0.5, data, np.zeros((0, 8, 8), bool))
  with pytest.raises(ValueError, match=r"masks must have shape \(M, H, W\), got \(0,\)"):
    pj.pspc_denoise(z, 0.5, data, [])
  with pytest.raises(ValueError, match=r"masks must have shape \(M, H, W\)"):
    pj.pspc_denoise(z, 0.5, data, np.ones((8, 8), bool))


# --- smoothing and thresholds ------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [np.float32(-0.1), np.asarray(-0.1), -1, float("nan"), np.inf,
                                       np.asarray([0.1, 0.2]), True])
def test_bad_cfdm_smoothing_raises(smoothing):
  with pytest.raises(ValueError, match="smoothing must be a finite real number >= 0"):
    pj.cfdm_denoise(queries(), 0.5, digits(), smoothing, num_noise=2)
  with pytest.raises(ValueError, match="smoothing must be a finite real number >= 0"):
    pj.make_denoiser("cfdm", digits(), smoothing=smoothing)


def test_numpy_cfdm_smoothing_is_accepted():
  z, data = queries(), digits()
  np.testing.assert_allclose(pj.cfdm_denoise(z, 0.5, data, np.float32(0.25), num_noise=2),
                             pj.cfdm_denoise(z, 0.5, data, 0.25, num_noise=2), atol=1e-6)


@pytest.mark.parametrize("threshold", [0.0, -0.2, 1.5, float("nan"), np.float32(np.inf)])
def test_flex_threshold_outside_unit_interval_raises(threshold):
  with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
    pj.pspc_flex_denoise(queries(), 0.5, digits(), maps(), threshold)
  with pytest.raises(ValueError, match=r"threshold .*outside \(0, 1\]"):
    pj.build_denoiser("pspc_flex", digits(), maps=MAPS_FILE, thresholds=threshold)


# --- empty batches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", registry.available_denoisers())
def test_empty_batch_gives_empty_result_in_every_registry_denoiser(name):
  denoise = registry_denoiser(name)
  empty = np.zeros((0, 8, 8, 1), np.float32)
  for sigma in (0.5, np.zeros((0,), np.float32)):
    out = denoise(empty, sigma)
    assert out.shape == (0, 8, 8, 1) and out.dtype == jnp.float32
  assert jax.jit(denoise)(empty, 0.5).shape == (0, 8, 8, 1)
  samples = pj.sample(denoise, empty, pj.edm_sigmas(2))
  assert samples.shape == (0, 8, 8, 1)


def test_empty_batch_in_public_functions_and_the_sharded_path():
  empty = np.zeros((0, 8, 8, 1), np.float32)
  for name, denoise in PUBLIC.items():
    out = denoise(empty, 0.5, digits())
    expected = (0, 6, 6, 3, 3, 1) if name == "patch_posterior_means" else (0, 8, 8, 1)
    assert out.shape == expected and out.dtype == jnp.float32, name
  with pytest.raises(ValueError, match="sigma must be finite"):  # still validated
    pj.empirical_denoise(empty, -1.0, digits())
  sharded = pj.build_denoiser("pspc_square", digits(), mesh=pj.make_mesh(), patch_schedule=3)
  assert sharded(empty, 0.5).shape == (0, 8, 8, 1)
  samples, path = pj.sample(registry_denoiser("empirical"), empty, pj.edm_sigmas(3),
                            return_trajectory=True)
  assert samples.shape == (0, 8, 8, 1) and path.z.shape == (4, 0, 8, 8, 1)


def test_grid_mesh_and_latent_sizes_raise_value_errors():
  """Before: ZeroDivisionError (make_mesh), an MLIR error (a negative latent side), TypeError and
  NaN-length errors (edm_sigmas), and a 2.5-step grid accepted."""
  for kwargs, name in (({"data_devices": 0}, "data_devices"), ({"batch_devices": 0}, "batch_devices")):
    with pytest.raises(ValueError, match=name):
      pj.make_mesh(**kwargs)
  with pytest.raises(ValueError, match="shape must be an integer >= 1"):
    pj.latents_from_seeds([0], (8, -8, 1))
  for steps in ("abc", float("nan"), 2.5, 0):
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
      pj.edm_sigmas(steps)
