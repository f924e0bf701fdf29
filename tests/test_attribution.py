"""Attribution of queries and samples to training images against float64 brute force."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax import attribution
from pspc_jax.denoisers.masks import PixelMasks
from reference import composite_weights_reference, make_problem, square_masks, to_float64

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-5


def check_top_k(indices, weights, reference, k):
  """Top-k weights equal the reference's k largest; indices agree wherever weights are not tied."""
  ref = np.moveaxis(reference, 1, -1)  # (B, H, W, N)
  ref_sorted = -np.sort(-ref, axis=-1)
  np.testing.assert_allclose(weights, ref_sorted[..., :k], atol=TOL, rtol=0)
  picked = np.take_along_axis(ref, np.asarray(indices), axis=-1)
  np.testing.assert_allclose(picked, weights, atol=TOL, rtol=0)
  assert len(set(np.asarray(indices).reshape(-1, k)[0].tolist())) == k


@pytest.mark.parametrize("sigma", [0.002, 1.0, 80.0])
@pytest.mark.parametrize("shape,patch_size", [((6, 5, 1), 3), ((8, 8, 3), 4), ((8, 8, 3), 8)])
def test_pixel_weights_match_float64_per_mask_loop(sigma, shape, patch_size):
  z, data = make_problem(*shape, num=37, batch=3, sigma=sigma)
  ref = composite_weights_reference(z, sigma, data, square_masks(shape[0], shape[1], patch_size))
  np.testing.assert_allclose(ref.sum(axis=1), 1.0, atol=1e-12)
  result = attribution.pixel_attribution(z, sigma, data, patch_size, k=4, chunk_size=8)
  check_top_k(result.indices, result.weights, ref, 4)
  np.testing.assert_allclose(result.totals, ref.mean(axis=(2, 3)), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(result.totals).sum(axis=1), 1.0, atol=1e-5)


def test_all_k_weights_sum_to_one_per_pixel():
  z, data = make_problem(6, 5, 1, num=23, batch=2, sigma=0.3)
  indices, weights = attribution.pixel_top_k(z, 0.3, data, 2, k=23, chunk_size=5)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
  assert (np.sort(np.asarray(indices), axis=-1) == np.arange(23)).all()


def test_arbitrary_masks_and_mixed_sigma_batch():
  rng = np.random.default_rng(3)
  masks = rng.random((7, 6, 5)) < 0.4
  masks[0] = True
  sigma = np.asarray([0.05, 1.0, 5.0], np.float32)
  z, data = make_problem(6, 5, 3, num=29, batch=3, sigma=sigma, seed=4)
  ref = composite_weights_reference(z, sigma, data, list(masks))
  result = attribution.pixel_attribution(z, sigma, data, PixelMasks(masks), k=3, chunk_size=6)
  check_top_k(result.indices, result.weights, ref, 3)
  np.testing.assert_allclose(result.totals, ref.mean(axis=(2, 3)), atol=TOL, rtol=0)


def test_schedule_uses_each_queries_patch_size_also_under_jit():
  schedule = pj.SigmaSchedule((2.0, 0.1), (6, 2))
  sigma = np.asarray([3.0, 0.08, 0.5], np.float32)
  z, data = make_problem(6, 6, 1, num=31, batch=3, sigma=sigma, seed=5)
  expected = [composite_weights_reference(z[b:b + 1], sigma[b], data,
                                          square_masks(6, 6, schedule(sigma[b])))[0]
              for b in range(3)]
  ref = np.stack(expected)
  eager = attribution.pixel_attribution(z, sigma, data, schedule, k=3, chunk_size=7)
  check_top_k(eager.indices, eager.weights, ref, 3)
  jitted = jax.jit(lambda z, s: attribution.pixel_attribution(z, s, data, schedule, k=3,
                                                              chunk_size=7))(z, jnp.asarray(sigma))
  check_top_k(jitted.indices, jitted.weights, ref, 3)
  np.testing.assert_allclose(jitted.totals, eager.totals, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_chunk_size_does_not_change_results(chunk_size):
  z, data = make_problem(8, 8, 3, num=41, batch=2, sigma=2.0, seed=6)
  base = attribution.pixel_attribution(z, 2.0, data, 3, k=5, chunk_size=41)
  got = attribution.pixel_attribution(z, 2.0, data, 3, k=5, chunk_size=chunk_size)
  np.testing.assert_allclose(got.weights, base.weights, atol=1e-6)
  np.testing.assert_allclose(got.totals, base.totals, atol=1e-6)
  gaps = np.diff(np.asarray(base.weights), axis=-1)
  untied = np.concatenate([gaps < -1e-5, np.ones(gaps.shape[:-1] + (1,), bool)], axis=-1)
  untied &= np.concatenate([np.ones(gaps.shape[:-1] + (1,), bool), gaps < -1e-5], axis=-1)
  assert untied.mean() > 0.5
  np.testing.assert_array_equal(np.asarray(got.indices)[untied], np.asarray(base.indices)[untied])


def test_training_image_at_tiny_sigma_is_its_own_top1():
  _, data = make_problem(8, 8, 3, num=20, batch=1, sigma=0.0)
  z = jnp.asarray(to_float64(data)[[4, 11]], jnp.float32)
  indices, weights = attribution.pixel_top_k(z, 0.002, data, 3, k=2)
  assert (np.asarray(indices)[0, ..., 0] == 4).all() and (np.asarray(indices)[1, ..., 0] == 11).all()
  np.testing.assert_allclose(np.asarray(weights)[..., 0], 1.0, atol=1e-6)


def test_sample_of_the_optimal_denoiser_is_a_copy_attributed_everywhere():
  rng = np.random.default_rng(7)
  data = jnp.asarray(rng.integers(0, 256, (12, 6, 5, 1)).astype(np.uint8))
  sigmas = pj.edm_sigmas(8)
  denoise = pj.make_denoiser("empirical", data)
  samples, path = pj.sample(denoise, pj.latents_from_seeds(jnp.arange(3), (6, 5, 1)), sigmas,
                            return_trajectory=True)
  copies = np.argmin(((np.asarray(samples)[:, None] - to_float64(data)[None]) ** 2).sum((2, 3, 4)),
                     axis=1)
  np.testing.assert_allclose(samples, to_float64(data)[copies], atol=1e-3)
  # The last step alone (σ_min) explains the sample exactly: the copy is top-1 with weight ≈ 1.
  last = pj.attribute(path, data, 3, sigmas=sigmas, k=2, sigma_range=(0.0, 0.01))
  assert (np.asarray(last.indices)[..., 0] == copies[:, None, None]).all()
  np.testing.assert_allclose(np.asarray(last.weights)[..., 0], 1.0, atol=1e-5)
  np.testing.assert_allclose(last.totals[np.arange(3), copies], 1.0, atol=1e-5)
  # Averaged over the whole trajectory the copy still dominates every pixel.
  full = pj.attribute(path, data, "auto", sigmas=sigmas, k=2)
  assert (np.asarray(full.indices)[..., 0] == copies[:, None, None]).all()
  np.testing.assert_allclose(np.asarray(full.totals).sum(1), 1.0, atol=1e-5)


def test_trajectory_mean_equals_mean_of_per_step_weights():
  z, data = make_problem(6, 5, 1, num=19, batch=2, sigma=0.4, seed=8)
  pairs = [(z, 2.0), (z * 0.9, 0.4), (z * 0.8, 0.0)]  # the σ = 0 step is not counted
  schedule = pj.SigmaSchedule((2.0, 0.4), (5, 2))
  ref = np.mean([composite_weights_reference(zt, s, data, square_masks(6, 5, schedule(s)))
                 for zt, s in pairs[:2]], axis=0)
  got = pj.attribute(pairs, data, schedule, k=4, chunk_size=4)
  check_top_k(got.indices, got.weights, ref, 4)
  np.testing.assert_allclose(got.totals, ref.mean(axis=(2, 3)), atol=TOL, rtol=0)
  traced = jax.jit(lambda z1, z2: pj.attribute([(z1, 2.0), (z2, 0.4), (z * 0.8, 0.0)], data,
                                               schedule, k=4, chunk_size=4))(z, z * 0.9)
  check_top_k(traced.indices, traced.weights, ref, 4)


def test_contributor_counts_and_summary_on_a_hand_made_case():
  totals = np.asarray([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05],
                       [0.05, 0.05, 0.6, 0.1, 0.1, 0.1],
                       [1 / 6] * 6])
  counts = pj.contributor_counts(totals, (0.5, 0.9, 1.0))
  np.testing.assert_array_equal(counts, [[1, 4, 6], [1, 4, 6], [3, 6, 6]])
  summary = attribution.summarise(totals, top=2)
  assert summary[1]["images_for_50%"] == 1 and summary[1]["images_for_90%"] == 4
  assert summary[1]["top"][0] == {"index": 2, "share": 0.6}
  with pytest.raises(ValueError, match="shares"):
    pj.contributor_counts(totals, (0.0,))


def test_bad_inputs_raise_clear_errors():
  z, data = make_problem(6, 5, 1, num=5, batch=1, sigma=1.0)
  with pytest.raises(ValueError, match="k must be between 1 and the dataset size 5"):
    attribution.pixel_top_k(z, 1.0, data, 3, k=6)
  with pytest.raises(ValueError, match="patch size 0 must be at least 1"):
    attribution.pixel_top_k(z, 1.0, data, 0)  # 7 ≥ max(H, W) would be the whole image
  with pytest.raises(ValueError, match="needs the sampler's σ grid"):
    pj.attribute(pj.Trajectory(z[None].repeat(2, 0), z[None]), data)


def run_tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", "attribute"), *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_bin_attribute_end_to_end_on_digits(tmp_path):
  result = run_tool("--seeds=0-2", "--steps=4", "--k=3", "--max_images=300", f"--outdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert "attribution" in result.stdout
  with np.load(tmp_path / "attribution.npz") as saved:
    assert saved["indices"].shape == saved["weights"].shape == (3, 8, 8, 3)
    assert saved["totals"].shape == (3, 300)
    assert (saved["weights"][..., :-1] >= saved["weights"][..., 1:]).all()
    np.testing.assert_allclose(saved["totals"].sum(1), 1.0, atol=1e-4)
  summary = json.loads((tmp_path / "attribution.json").read_text())
  assert len(summary["samples"]) == 3
  first = summary["samples"][0]
  assert 1 <= first["images_for_50%"] <= first["images_for_90%"] <= 300
  assert len(first["top"]) == 5
  assert (tmp_path / "attribution.png").stat().st_size > 0
  bad = run_tool("--k=0", f"--outdir={tmp_path / 'bad'}")
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "k" in bad.stderr


def test_bin_attribute_from_a_sample_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = tmp_path / "run"
  sampled = subprocess.run([sys.executable, os.path.join(REPO, "bin", "sample"), "--denoiser=gaussian",
                            "--seeds=3-4", "--steps=3", "--max_images=300", f"--outdir={run}"],
                           capture_output=True, text=True, env=env, timeout=300)
  assert sampled.returncode == 0, sampled.stderr
  result = run_tool(f"--from_run={run}", "--max_images=300", "--k=2", "--show=2",
                    f"--outdir={tmp_path / 'a'}")
  assert result.returncode == 0, result.stderr
  gap = float(result.stdout.split("samples.npz by at most ")[1].split()[0])
  assert gap < 1e-3  # the same denoiser, seeds, steps and solver re-create the samples
  with np.load(tmp_path / "a" / "attribution.npz") as saved, np.load(run / "samples.npz") as sample:
    assert saved["seeds"].tolist() == [3, 4] and saved["indices"].shape == (2, 8, 8, 2)
    assert len(saved["sigmas"]) == 3  # the 3-step grid without its final 0
    np.testing.assert_allclose(saved["samples"], sample["samples"], atol=1e-3)
  assert json.loads((tmp_path / "a" / "attribution.json").read_text())["denoiser"] == "gaussian"
  other = run_tool(f"--from_run={run}", "--max_images=200", f"--outdir={tmp_path / 'b'}")
  assert other.returncode == 2 and "was sampled on 300 images" in other.stderr


def test_dominance_helpers_for_figures():
  indices = np.asarray([[[3, 1], [3, 2]], [[7, 3], [1, 3]]])  # (2, 2, k=2)
  weights = np.asarray([[[0.6, 0.4], [0.5, 0.5]], [[0.9, 0.1], [0.8, 0.2]]])
  # Scores: 3 → 1.1, 7 → 0.9, 1 → 0.8, 2 → 0 (never top-1).
  np.testing.assert_array_equal(attribution.dominant_images(indices, weights, 3), [3, 7, 1])
  which, strength = attribution.dominance_map(indices, weights, [7, 3])
  np.testing.assert_array_equal(which, [[1, 1], [0, -1]])
  np.testing.assert_allclose(strength, [[0.6, 0.5], [0.9, 0.8]])


def test_figure_images_come_in_the_order_of_the_share_the_figure_prints():
  # Image 5 dominates most pixels but holds 0 % of the total weight (large σ spread it elsewhere);
  # image 2 dominates fewer pixels and holds 1 %; image 9 is never top-1 but has the largest total.
  indices = np.asarray([[[5, 2], [5, 2]], [[2, 5], [5, 9]]])  # (2, 2, k=2)
  weights = np.asarray([[[0.9, 0.1], [0.8, 0.2]], [[0.6, 0.4], [0.7, 0.3]]])
  totals = np.zeros(12)
  totals[[5, 2, 9, 0]] = [0.001, 0.01, 0.3, 0.3]
  np.testing.assert_array_equal(attribution.dominant_images(indices, weights, 2), [5, 2])
  # Dominant images first picked, filled with the largest totals (0 before 9: ties to the lower
  # index), then ordered by decreasing total share.
  np.testing.assert_array_equal(attribution.figure_images(indices, weights, totals, 2), [2, 5])
  np.testing.assert_array_equal(attribution.figure_images(indices, weights, totals, 4),
                                [0, 9, 2, 5])
