"""Derivatives of every registry denoiser in z and σ, forward (jvp) and reverse (vjp) mode.

For L(z, σ) = ⟨w, D(z, σ)⟩ with a random w, the directional derivative along dz and the σ-derivative
are compared with central differences: fourth-order stencils of the float32 function itself (the
whole probe is one compilation), and for the reported cases second-order central differences of the
float64 references. The sensitivity maps of bin/sensitivity (batched VJPs) are compared with
finite-difference Jacobians.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax import checkpoints
from pspc_jax.data import load_dataset
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.cfdm import cfdm_noise
from pspc_jax.denoisers.pspc import pixel_major_data
from pspc_jax.denoisers.registry import available_denoisers, make_denoiser
from pspc_jax.maps_files import load_maps
from pspc_jax.sensitivity import abs_jacobian_sum
from reference import empirical_reference, pspc_reference, square_masks, to_float64
from test_checkpoints import _tiny_params, tiny_arch  # noqa: F401 (a fixture)
from test_els_cfdm import cfdm_reference
from test_training import TINY

# Every schedule is constant on [σ − 2h, σ + 2h] (the 8×8 grid switches at 1.45 and 2.50).
SIGMA = 1.7
STEP = 1e-2
MAPS = "checkpoints/digits_ddpmpp_small_maps.npz"


@pytest.fixture(scope="module")
def digits():
  return np.asarray(load_dataset("digits", max_images=200).images)


def small_network(directory, data):
  """A tiny network with random weights saved as a checkpoint (the `tiny_arch` fixture registers its
  architecture): the registry's network path (loading, EDM preconditioning) at a small compile cost."""
  checkpoints.save_params(str(directory), _tiny_params(), TINY, image_shape=data.shape[1:])
  return {"checkpoint": str(directory)}


def flex_denoiser(data):
  """PSPC-Flex with the digits maps nearest to SIGMA and λ = 0.5: one branch (one compilation)."""
  maps = load_maps(MAPS)
  k = int(np.argmin(np.abs(np.log(maps.sigmas / SIGMA))))
  return pj.make_flex_denoiser(data, maps.sigmas[k:k + 1], maps.maps[k:k + 1], 0.5)


def probe(denoise, z, sigma, dz, w, h):
  """Derivatives of L = ⟨w, D(z, σ)⟩ along dz and σ: (jvp, vjp, central difference) for each.

  One batch holds z and the stencil points z ± h·dz, z ± 2h·dz (at σ) and z at σ ± h, σ ± 2h (the
  denoisers take per-sample σ and treat samples independently), so one linearisation of the batch
  gives the forward-mode derivatives, its transpose the reverse-mode ones, and its value the
  differences.
  """
  batch = z.shape[0]
  offsets = h * jnp.array([1.0, -1.0, 2.0, -2.0])
  zs = jnp.concatenate([z] + [z + t * dz for t in offsets] + [z] * 4)
  sigmas = jnp.repeat(jnp.concatenate([jnp.full(5, sigma), sigma + offsets]), batch)
  base = jnp.arange(9 * batch) < batch
  out, linear = jax.linearize(denoise, zs, sigmas)
  tangent_z = jnp.where(base[:, None, None, None], jnp.tile(dz, (9, 1, 1, 1)), 0.0)
  tangent_sigma = jnp.where(base, 1.0, 0.0)
  jvp_z = jnp.vdot(w, linear(tangent_z, jnp.zeros_like(sigmas))[:batch])
  jvp_sigma = jnp.vdot(w, linear(jnp.zeros_like(zs), tangent_sigma)[:batch])
  cotangent = jnp.where(base[:, None, None, None], jnp.tile(w, (9, 1, 1, 1)), 0.0)
  grad_z, grad_sigma = jax.linear_transpose(linear, zs, sigmas)(cotangent)
  losses = jnp.sum((out * jnp.tile(w, (9, 1, 1, 1))).reshape(9, -1), axis=1)

  def stencil(f1, f_1, f2, f_2):  # fourth-order central difference
    return (8 * (f1 - f_1) - (f2 - f_2)) / (12 * h)

  return {"z": (jvp_z, jnp.vdot(grad_z[:batch], dz), stencil(*losses[1:5])),
          "σ": (jvp_sigma, jnp.sum(grad_sigma[:batch]), stencil(*losses[5:9]))}


def assert_derivatives_agree(denoise, data):
  """jvp = vjp = central differences for L = ⟨w, D(z, σ)⟩ along a random dz and along σ = SIGMA."""
  rng = np.random.default_rng(0)
  x = to_float64(data[:2])
  z = jnp.asarray(x + SIGMA * rng.standard_normal(x.shape), jnp.float32)
  dz = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  results = jax.jit(lambda z, s: probe(denoise, z, s, dz, w, STEP))(z, jnp.float32(SIGMA))
  for variable, (forward, reverse, difference) in results.items():
    forward, reverse, difference = float(forward), float(reverse), float(difference)
    message = f"d/d{variable}: jvp {forward}, vjp {reverse}, central difference {difference}"
    assert abs(difference) > 1e-2, f"a trivial derivative tests nothing: {message}"
    assert abs(forward - reverse) <= 1e-5 * (1 + abs(difference)), message
    assert abs(forward - difference) <= 1e-3 * (1 + abs(difference)), message


@pytest.mark.parametrize("name", available_denoisers())
def test_every_registry_denoiser_is_differentiable_in_z_and_sigma(digits, tmp_path, tiny_arch, name):
  data = digits[:48]
  options = {"pspc_square": {"patch_schedule": 3}, "els": {"patch_schedule": 3},
             "cfdm": {"num_noise": 2},
             "pspc_flex_gaussian": {"sigmas": [SIGMA], "thresholds": 0.5}}.get(name, {})
  if name == "network":
    options = small_network(tmp_path / "net", data)
  assert_derivatives_agree(flex_denoiser(data) if name == "pspc_flex"
                           else build_denoiser(name, data, **options), data)


# Kernel paths the registry defaults do not take on 48 digits: padding rows (+inf distances, rows 44-47)
# in both denoisers, PSPC's pass-1 weights cache (3 of the 6 chunks: 9 masks · 2 queries · 8 rows ·
# 4 bytes each), and a pixel-major dataset copy (72 rows: one 64-row chunk from it, 8 from the dataset).
PATHS = {
    "pspc_square cache and padding": lambda z, s, d: pj.pspc_square_denoise(
        z, s, d, 6, chunk_size=8, cache_bytes=3 * 576, valid_rows=44),
    "empirical padding": lambda z, s, d: pj.empirical_denoise(z, s, d, chunk_size=8, valid_rows=44),
    "pspc_square pixel-major copy": lambda z, s, d: pj.pspc_square_denoise(
        z, s, np.concatenate([d, d[:24]]), 3, chunk_size=64,
        data_major=pixel_major_data(np.concatenate([d, d[:24]]))),
}


@pytest.mark.parametrize("path", PATHS)
def test_cache_and_padding_paths_are_differentiable(digits, path):
  data = digits[:48]
  assert_derivatives_agree(lambda z, s: PATHS[path](z, s, data), data)


def float64_difference(reference, sigma, h=1e-5):
  return (reference(sigma + h) - reference(sigma - h)) / (2 * h)


def test_reported_sigma_derivatives_match_float64(digits):
  """The reported cases (NaN before): jax.grad in σ of the optimal denoiser and σ-CFDM, and forward
  mode of PSPC-Square s = 3, at σ = 0.5 for two digits + 0.5·noise, against float64 differences."""
  rng = np.random.default_rng(0)
  x = to_float64(digits[:2])
  z = (x + 0.5 * rng.standard_normal(x.shape)).astype(np.float32)
  noise = cfdm_noise(z.shape[1:])
  cases = {
      "empirical": (lambda s: pj.empirical_denoise(z, s, digits),
                    lambda s: empirical_reference(z, s, digits)),
      "cfdm": (lambda s: pj.cfdm_denoise(z, s, digits),
               lambda s: cfdm_reference(z, s, digits, 0.3, noise)),
      "pspc_square": (lambda s: pj.pspc_square_denoise(z, s, digits, 3),
                      lambda s: pspc_reference(z, s, digits, square_masks(8, 8, 3))),
  }
  for name, (denoise, reference) in cases.items():
    want = float64_difference(lambda s: reference(s).sum(), 0.5)
    loss = lambda s: denoise(s).sum()  # noqa: E731
    both = jax.jit(lambda s: (jax.grad(loss)(s), jax.jvp(loss, (s,), (jnp.ones_like(s),))[1]))
    for mode, got in zip(("grad", "jvp"), both(jnp.float32(0.5))):
      assert abs(float(got) - want) <= 1e-3 * (1 + abs(want)), f"{name} {mode}: {got} vs {want}"


@pytest.mark.parametrize("name,radius", [("pspc_square", 2), ("els", 1)])
def test_sensitivity_maps_reverse_mode_through_window_sums(digits, name, radius):
  """`bin/sensitivity`'s batched VJPs (`abs_jacobian_sum`) of PSPC-Square s = 3 and ELS k = 3 (before:
  "Linearization failed" in the window sums): the |Jacobian| equals central differences and is zero
  beyond the patch reach (PSPC: windows through p reach 2 pixels; ELS: the 3×3 patch around p)."""
  data = digits[:16]
  denoise = make_denoiser(name, data, patch_schedule=3)
  rng = np.random.default_rng(1)
  z = jnp.asarray(to_float64(data[:1]) + rng.standard_normal((1, 8, 8, 1)), jnp.float32)
  got = np.asarray(abs_jacobian_sum(denoise, z, 1.0))  # (H, W, H, W): output pixel, input pixel
  h = 1e-2
  basis = np.eye(64, dtype=np.float32).reshape(64, 8, 8, 1)
  stencil = jnp.concatenate([z + h * basis, z - h * basis])
  out = np.asarray(jax.jit(lambda z: denoise(z, 1.0))(stencil))
  jacobian = (out[:64] - out[64:]).reshape(64, 64).T / (2 * h)  # [output pixel, input pixel]
  np.testing.assert_allclose(got.reshape(64, 64), np.abs(jacobian), atol=2e-3, rtol=2e-2)
  rows, cols = np.indices((8, 8))
  reach = np.maximum(abs(rows[:, :, None, None] - rows), abs(cols[:, :, None, None] - cols))
  assert np.all(got[reach > radius] == 0) and got[reach == radius].sum() > 0.1
