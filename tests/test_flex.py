"""PSPC-Flex: masks from sensitivity maps, the denoiser against float64 brute force, schedules, CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax import schedules
from pspc_jax.denoisers import flex
from pspc_jax.denoisers.masks import IndexMasks, PixelMasks
from pspc_jax.denoisers.pspc import pixel_major_data
from reference import make_problem, pspc_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def random_maps(height, width, seed=0):
  """Random non-negative (H, W, H, W) maps, heavy-tailed so that masks differ in size; each pixel's own
  entry is raised to the top of its map so that every pixel is covered (by its own mask)."""
  rng = np.random.default_rng(seed)
  maps = rng.random((height, width, height, width)) ** 4
  for h in range(height):
    for w in range(width):
      maps[h, w, h, w] = 1.5 * maps[h, w].max()
  return maps.astype(np.float32)


def bump_maps(height, width, radius):
  """Gaussian bumps of width `radius` pixels centred on each output pixel, (H, W, H, W)."""
  rows, cols = np.arange(height), np.arange(width)
  dh = (rows[:, None, None, None] - rows[None, None, :, None]) ** 2
  dw = (cols[None, :, None, None] - cols[None, None, None, :]) ** 2
  return np.exp(-(dh + dw) / (2.0 * radius ** 2)).astype(np.float32)


def reference_masks(maps, threshold):
  """Float64 NumPy PSPC-Flex masks by definition: stable descending sort, smallest prefix ≥ λ."""
  height, width = maps.shape[:2]
  flat = np.asarray(maps, np.float64).reshape(height * width, -1)
  masks = np.zeros(flat.shape, bool)
  for p, g in enumerate(flat):
    g = g / g.sum()
    order = np.argsort(-g, kind="stable")
    count = len(g) if threshold >= 1 else int(np.argmax(np.cumsum(g[order]) >= threshold)) + 1
    masks[p, order[:count]] = True
  return masks.reshape(-1, height, width)


# --- flex_masks ------------------------------------------------------------------------------------

HAND_MAP = np.array([[4, 2, 1], [1, 0, 0]], np.float32)  # total 8


@pytest.mark.parametrize("threshold,expected", [
    (0.5, [(0, 0)]),                               # 4/8 ≥ 0.5 exactly: one pixel suffices
    (0.6, [(0, 0), (0, 1)]),
    (0.75, [(0, 0), (0, 1)]),                      # 6/8 = 0.75 exactly
    (0.8, [(0, 0), (0, 1), (0, 2)]),               # tie 1 = 1: (0, 2) comes first in row-major order
    (0.9, [(0, 0), (0, 1), (0, 2), (1, 0)]),       # zeros are never needed below λ = 1
    (1.0, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]),
])
def test_flex_masks_keep_smallest_top_set_reaching_the_mass(threshold, expected):
  maps = np.broadcast_to(HAND_MAP * 3.0, (2, 3, 2, 3))  # unnormalised: the masks only see fractions
  masks = np.asarray(pj.flex_masks(maps, threshold))
  assert masks.shape == (6, 2, 3) and masks.dtype == bool
  want = np.zeros((2, 3), bool)
  want[tuple(np.transpose(expected))] = True
  for p in range(6):
    np.testing.assert_array_equal(masks[p], want)


def test_flex_masks_ties_are_stable_and_lambda_one_keeps_everything():
  uniform = np.ones((2, 3, 2, 3), np.float32)
  masks = np.asarray(pj.flex_masks(uniform, 0.5))
  np.testing.assert_array_equal(masks[4], [[True, True, True], [False, False, False]])
  np.testing.assert_array_equal(np.asarray(pj.flex_masks(uniform, 0.34))[0],
                                [[True, True, True], [False, False, False]])
  # A peaked map at λ = 1 (and above) still keeps every pixel, zeros included.
  peaked = np.zeros((2, 3, 2, 3), np.float32)
  peaked[:, :, 0, 0] = 1.0
  for threshold in (1.0, 1.5):
    assert np.asarray(pj.flex_masks(peaked, threshold)).all()
  # An all-zero map keeps its top pixel (the first, by the tie rule) rather than nothing.
  zero = np.asarray(pj.flex_masks(np.zeros((2, 3, 2, 3), np.float32), 0.5))
  assert zero[:, 0, 0].all() and zero.sum() == 6


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.7, 0.95, 1.0])
def test_flex_masks_match_float64_definition_and_trace(threshold):
  maps = random_maps(5, 7, seed=1)
  expected = reference_masks(maps, threshold)
  np.testing.assert_array_equal(np.asarray(pj.flex_masks(maps, threshold)), expected)
  traced = jax.jit(pj.flex_masks)(jnp.asarray(maps), jnp.float32(threshold))
  np.testing.assert_array_equal(np.asarray(traced), expected)


def test_index_masks_equal_the_mask_matrix_in_both_layouts():
  rng = np.random.default_rng(8)
  masks = rng.random((11, 4, 5)) < 0.25
  masks[0] = True
  masks[3] = False
  masks[3, 1, 2] = True
  dense, index = PixelMasks(masks), IndexMasks(masks, method="gather")
  # The index lists are held as gather blocks (steps, rows, block) covering the widest row.
  steps, rows, block = index.owners.shape
  assert index.max_mask_size == 20 and rows == 20 and steps * block >= int(masks.sum(0).max())
  assert jax.tree.leaves(index)  # a pytree: its arrays are leaves
  np.testing.assert_array_equal(index.coverage, np.asarray(dense.coverage))
  e = jnp.asarray(rng.random((2, 3, 4, 5)), jnp.float32)
  w = jnp.asarray(rng.random((2, 3, 11)), jnp.float32)
  np.testing.assert_allclose(index.sums(e), dense.sums(e), rtol=1e-6)
  np.testing.assert_allclose(index.spread(w), dense.spread(w), rtol=1e-6)
  major_e = jnp.moveaxis(e, (2, 3), (0, 1))  # (H, W, 2, 3)
  major_w = jnp.moveaxis(w, 2, 0)             # (M, 2, 3)
  np.testing.assert_allclose(index.sums_major(major_e), dense.sums_major(major_e), rtol=1e-6)
  np.testing.assert_allclose(index.spread_major(major_w), dense.spread_major(major_w), rtol=1e-6)
  # With "auto", the large first mask (all 20 pixels) sends the sums to the matrix product.
  auto = IndexMasks(masks)
  assert not auto.gather_sums
  np.testing.assert_allclose(auto.sums_major(major_e), dense.sums_major(major_e), rtol=1e-6)


# --- the denoiser ----------------------------------------------------------------------------------

SIGMAS = np.array([0.002, 1.0, 80.0], np.float32)  # one query per σ: the masks do not depend on it


def flex_fn(maps, threshold, **kwargs):
  """jitted `f(z, sigma, data)` of PSPC-Flex with concrete maps and λ (one compile per call site)."""
  return jax.jit(lambda z, sigma, data: pj.pspc_flex_denoise(z, sigma, data, maps, threshold,
                                                             **kwargs))


@pytest.mark.parametrize("shape,threshold", [((5, 7, 1), 0.3), ((6, 4, 3), 0.6)])
def test_pspc_flex_matches_float64_per_mask_loop(shape, threshold):
  height, width, channels = shape
  z, data = make_problem(height, width, channels, num=31, batch=3, sigma=SIGMAS, seed=2)
  maps = random_maps(height, width, seed=3)
  masks = reference_masks(maps, threshold)
  sizes = masks.sum(axis=(1, 2))
  assert sizes.min() < sizes.max() < height * width  # irregular, overlapping, not the whole image
  expected = pspc_reference(z, SIGMAS, data, list(masks))
  for method in ("gather", "matmul"):
    got = flex_fn(maps, threshold, chunk_size=8, method=method)(z, jnp.asarray(SIGMAS), data)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0, err_msg=method)


def test_lambda_one_equals_optimal_empirical_denoiser():
  z, data = make_problem(6, 5, 3, num=25, batch=3, sigma=SIGMAS)
  sigma = jnp.asarray(SIGMAS)
  maps = random_maps(6, 5)
  empirical = pj.empirical_denoise(z, sigma, data)
  np.testing.assert_array_equal(pj.pspc_flex_denoise(z, sigma, data, maps, 1.0), empirical)
  matrix_path = flex_fn(maps, 1.0, method="matmul", chunk_size=6)(z, sigma, data)
  np.testing.assert_allclose(matrix_path, empirical, atol=1e-5, rtol=0)
  traced = jax.jit(lambda lam: pj.pspc_flex_denoise(z, sigma, data, maps, lam))(jnp.float32(1.0))
  np.testing.assert_allclose(traced, empirical, atol=1e-5, rtol=0)


def test_gather_path_equals_pixel_mask_matrix_path():
  sigma = jnp.array([0.002, 0.5])
  z, data = make_problem(10, 9, 3, num=40, batch=2, sigma=sigma, seed=4)
  maps = bump_maps(10, 9, radius=1.2)
  masks = flex.flex_mask_set(maps, 0.5, "auto")
  assert isinstance(masks, IndexMasks) and masks.gather_sums and masks.gather_spread
  assert masks.max_mask_size < 20
  fast = flex_fn(maps, 0.5)(z, sigma, data)
  generic = flex_fn(maps, 0.5, method="matmul")(z, sigma, data)
  via_pspc = jax.jit(pj.pspc_denoise)(z, sigma, data, pj.flex_masks(maps, 0.5))
  np.testing.assert_allclose(fast, generic, atol=2e-6, rtol=0)
  np.testing.assert_allclose(fast, via_pspc, atol=2e-6, rtol=0)
  # Traced maps and λ take the matrix path under jit.
  traced = jax.jit(lambda m, lam: pj.pspc_flex_denoise(z, sigma, data, m, lam))(jnp.asarray(maps), 0.5)
  np.testing.assert_allclose(traced, fast, atol=2e-6, rtol=0)


def test_chunk_size_does_not_change_results():
  z, data = make_problem(6, 6, 3, num=29, batch=3, sigma=0.05)
  maps = random_maps(6, 6, seed=5)
  base = flex_fn(maps, 0.4, chunk_size=29, method="gather")(z, 0.05, data)
  for chunk_size in (1, 7, 1000):
    got = flex_fn(maps, 0.4, chunk_size=chunk_size, method="gather")(z, 0.05, data)
    np.testing.assert_allclose(got, base, atol=1e-6, err_msg=f"chunk_size={chunk_size}")
  matrix = flex_fn(maps, 0.4, chunk_size=4, method="matmul")(z, 0.05, data)
  np.testing.assert_allclose(matrix, base, atol=1e-6)


def test_mixed_sigma_batch_equals_per_sample_calls():
  height, width = 7, 6
  map_sigmas = np.array([50.0, 2.0, 0.1, 0.005])
  maps = np.stack([bump_maps(height, width, r) for r in (6.0, 2.0, 1.0, 0.6)])
  maps = maps * random_maps(height, width, seed=6)[None]  # distinct, irregular maps per σ
  thresholds = pj.SigmaSchedule((80.0, 1.0, 0.3, 0.01), (1.0, 0.7, 0.5, 0.3))
  sigmas = np.array([80.0, 5.0, 0.8, 0.05, 0.002], np.float32)
  z, data = make_problem(height, width, 3, num=35, batch=len(sigmas), sigma=sigmas, seed=7)
  denoise = pj.make_flex_denoiser(data, map_sigmas, maps, thresholds, chunk_size=9)
  mixed = jax.jit(denoise)(z, jnp.asarray(sigmas))
  for b, sigma in enumerate(sigmas):
    k = int(np.argmin(np.abs(np.log(map_sigmas) - np.log(sigma))))
    lam = thresholds(float(sigma))
    single = flex_fn(maps[k], lam)(z[b:b + 1], float(sigma), data)
    np.testing.assert_allclose(mixed[b:b + 1], single, atol=1e-5, err_msg=f"σ = {sigma}")
  # The σ = 80 sample (λ = 1) is the optimal denoiser; the others are not.
  np.testing.assert_allclose(mixed[:1], pj.empirical_denoise(z[:1], 80.0, data), atol=1e-6)


def test_make_flex_denoiser_holds_a_pixel_major_copy():
  """The scheduled denoiser reads its full 64-row chunks from a pixel-major copy of the dataset
  (`values.with_pixel_major`): the same bits as without it."""
  height, width = 6, 5
  maps = np.stack([bump_maps(height, width, r) for r in (3.0, 1.0)])
  maps = maps * random_maps(height, width)[None]
  sigmas = np.array([2.0, 0.05, 0.3], np.float32)
  z, data = make_problem(height, width, 3, num=70, batch=3, sigma=sigmas, seed=8)
  denoise = pj.make_flex_denoiser(data, np.array([1.0, 0.1]), maps, 0.5, chunk_size=64)
  np.testing.assert_array_equal(denoise.data_major.blocks, pixel_major_data(data).blocks)
  run = jax.jit(lambda d, z, s: d(z, s))
  np.testing.assert_array_equal(run(denoise, z, jnp.asarray(sigmas)),
                                run(denoise.replace(data_major=None), z, jnp.asarray(sigmas)))


def test_reachable_pairs_cover_every_sigma():
  first = pj.SigmaSchedule((10.0, 1.0, 0.1), (0, 1, 2))
  second = pj.SigmaSchedule((3.0, 0.3), (0.5, 0.3), metric="linear")
  pairs = schedules.reachable_pairs(first, second)
  sigma = np.geomspace(1e-4, 1e3, 20001).astype(np.float32)
  seen = set(zip(np.asarray(first.index(sigma)).tolist(), np.asarray(second.index(sigma)).tolist()))
  assert seen <= set(pairs)
  same = schedules.reachable_pairs(pj.cifar10_flex_schedule(), pj.cifar10_patch_schedule())
  assert same == [(k, k) for k in range(18)]  # identical grids and metric switch together


def test_bad_maps_and_options_raise_clear_errors():
  z, data = make_problem(4, 4, 1, num=5, batch=1, sigma=0.5)
  concentrated = np.zeros((4, 4, 4, 4), np.float32)
  concentrated[..., 0, 0] = 1.0  # every mask is pixel (0, 0) alone
  with pytest.raises(ValueError, match="covered by no mask"):
    pj.pspc_flex_denoise(z, 0.5, data, concentrated, 0.5)
  with pytest.raises(ValueError, match="covered by no mask"):
    pj.pspc_flex_denoise(z, 0.5, data, concentrated, 0.5, method="matmul")
  with pytest.raises(ValueError, match=r"maps must have shape \(4, 4, 4, 4\)"):
    pj.pspc_flex_denoise(z, 0.5, data, np.ones((4, 4, 4, 3)), 0.5)
  with pytest.raises(ValueError, match="unknown PSPC-Flex method"):
    pj.pspc_flex_denoise(z, 0.5, data, bump_maps(4, 4, 1.0), 0.5, method="sparse")
  with pytest.raises(ValueError, match="non-negative"):
    pj.make_flex_denoiser(data, [1.0], -bump_maps(4, 4, 1.0)[None])
  with pytest.raises(ValueError, match=r"shape \(S, H, W, H, W\)"):
    pj.make_flex_denoiser(data, [1.0, 2.0], bump_maps(4, 4, 1.0)[None])
  with pytest.raises(ValueError, match="outside"):
    pj.make_flex_denoiser(data, [1.0], bump_maps(4, 4, 1.0)[None], 1.5)
  with pytest.raises(ValueError, match=r"threshold 2.0 is outside \(0, 1\]"):
    pj.make_flex_denoiser(data, [1.0], bump_maps(4, 4, 1.0)[None], "80:1,1:2")
  with pytest.raises(ValueError, match="needs sensitivity maps"):
    pj.make_denoiser("pspc_flex", data)


# --- registry and command line ---------------------------------------------------------------------

def write_maps(path, height, width, sigmas=(80.0, 1.0, 0.01), radii=(4.0, 1.5, 0.8)):
  maps = np.stack([bump_maps(height, width, r) for r in radii])
  np.savez(path, sigmas=np.asarray(sigmas, np.float64), maps=maps, meta="{}")
  return np.asarray(sigmas), maps


def test_registry_builds_from_maps_file(tmp_path):
  sigmas, maps = write_maps(tmp_path / "maps.npz", 6, 5)
  query_sigmas = np.array([0.9, 0.02, 60.0], np.float32)
  z, data = make_problem(6, 5, 3, num=30, batch=3, sigma=query_sigmas)
  denoise = pj.build_denoiser("pspc_flex", data, maps=str(tmp_path / "maps.npz"),
                             thresholds="80:1,1:0.5,0.01:0.4")
  got = jax.jit(denoise)(z, jnp.asarray(query_sigmas))
  for b, (k, lam) in enumerate([(1, 0.5), (2, 0.4), (0, 1.0)]):
    expected = flex_fn(maps[k], lam)(z[b:b + 1], float(query_sigmas[b]), data)
    np.testing.assert_allclose(got[b:b + 1], expected, atol=1e-5)
  # A plain number is one λ at every σ (the default, the CIFAR-10 schedule, runs in the CLI test).
  constant = pj.build_denoiser("pspc_flex", data, maps=str(tmp_path / "maps.npz"), thresholds=0.5)
  np.testing.assert_allclose(jax.jit(constant)(z[:1], 0.9), flex_fn(maps[1], 0.5)(z[:1], 0.9, data),
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"maps must have shape \(S, H, W, H, W\)"):
    pj.build_denoiser("pspc_flex", data[:, :5], maps=str(tmp_path / "maps.npz"))


def run_tool(tool, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", tool), *args], capture_output=True,
                        text=True, env=env, timeout=300)


def test_sample_pspc_flex_end_to_end(tmp_path):
  write_maps(tmp_path / "maps.npz", 8, 8)  # the embedded digits are 8×8
  out = tmp_path / "run"
  result = run_tool("sample", "--denoiser=pspc_flex", f"--heatmaps={tmp_path / 'maps.npz'}",
                    "--steps=2", "--num_samples=2", f"--outdir={out}")
  assert result.returncode == 0, result.stderr
  with np.load(out / "samples.npz") as saved:
    assert saved["samples"].shape == (2, 8, 8, 1) and np.isfinite(saved["samples"]).all()
  missing = run_tool("sample", "--denoiser=pspc_flex", "--steps=2", f"--outdir={tmp_path / 'o'}")
  assert missing.returncode != 0 and "needs sensitivity maps" in missing.stderr
  assert "Traceback" not in missing.stderr
