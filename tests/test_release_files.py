"""Files in the official release's layouts (pspc_jax.release_files): z files for bin/evaluate --z,
initial latents for bin/sample --latents, samples for bin/sample --export_release.

Every file in the release's layout is made here, from tiny arrays, with plain NumPy in the layouts the
release's scripts use (denoise.py: z (steps, N, C, H, W) indexed by the step of its edm_t_schedule;
sample.py: z_init (N, C, H, W) = randn · t_max, samples (N, C, H, W)), independently of the code under
test.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax import release_files
from pspc_jax.data import load_dataset
from pspc_jax.evaluation import GivenSet, default_sigmas, forward_set
from pspc_jax.jobs.evaluate import evaluate_run
from pspc_jax.jobs.sample import read_sample_run, sample_run
from pspc_jax.sampling import latents_from_seeds, sample
from test_cli_errors import assert_one_line_error, run_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _release_grid(steps, t_min=2e-3, t_max=80.0, rho=7):
  """The release's edm_t_schedule, in float32 as it computes it (no final 0)."""
  i = np.arange(steps, dtype=np.float32)
  lo, hi = np.float32(t_min) ** np.float32(1 / rho), np.float32(t_max) ** np.float32(1 / rho)
  return (hi + i / np.float32(steps - 1) * (lo - hi)) ** np.float32(rho)


def _digits(count=24):
  return load_dataset("digits", max_images=count).images


def _write_release_z(path, z_nhwc):
  """A z file as the release's denoise.py reads it: (steps, N, C, H, W) float32."""
  np.save(path, np.ascontiguousarray(np.asarray(z_nhwc, np.float32).transpose(0, 1, 4, 2, 3)))


# ---- z files ----------------------------------------------------------------------------------------


def test_release_z_file_reads_as_nhwc_on_the_edm_grid(tmp_path):
  z = np.random.default_rng(0).standard_normal((5, 7, 3, 4, 6)).astype(np.float32)  # NCHW
  np.save(tmp_path / "z.npy", z)
  given = release_files.load_z_set(tmp_path / "z.npy", count=4)
  assert given.source == "z.npy" and given.z.shape == (5, 4, 4, 6, 3)
  np.testing.assert_array_equal(given.z, z[:, :4].transpose(0, 1, 3, 4, 2))
  np.testing.assert_allclose(given.sigmas, _release_grid(5), rtol=1e-6)
  assert given.sigmas[0] == 80 and np.isclose(given.sigmas[-1], 0.002, rtol=1e-6)
  assert release_files.load_z_set(tmp_path / "z.npy").z.shape == (5, 7, 4, 6, 3)


def test_npz_z_file_and_given_set_selection(tmp_path):
  states = np.random.default_rng(1).standard_normal((3, 6, 4, 4, 1)).astype(np.float32)
  np.savez(tmp_path / "z.npz", sigmas=np.array([0.5, 2.0, 0.1]), states=states, seeds=np.arange(6))
  given = release_files.load_z_set(tmp_path / "z.npz", count=5)
  assert given.z.shape == (3, 5, 4, 4, 1) and given.sigmas.dtype == np.float32
  chosen = given.select([2.0, 0.1, 7.0], count=2)
  np.testing.assert_array_equal(chosen.sigmas, np.float32([2.0, 0.1]))  # descending, 7 ignored
  np.testing.assert_array_equal(chosen.z, states[[1, 2], :2])
  np.testing.assert_array_equal(given.select(None, 5).sigmas, np.float32([2.0, 0.5, 0.1]))
  np.testing.assert_array_equal(chosen.at(0.1), states[2, :2])
  assert chosen.fingerprint() == given.select([0.1, 2.0], 2).fingerprint()
  assert chosen.fingerprint() != given.select([0.1, 2.0], 3).fingerprint()
  with pytest.raises(ValueError, match="holds 5 z per σ; fewer than the 6 asked for"):
    given.select(None, 6)
  with pytest.raises(ValueError, match=r"none of the σ of z.npz .* is among --sigmas"):
    given.select([1.0], 2)
  with pytest.raises(ValueError, match="σ = 1 is not a noise level of z.npz"):
    given.at(1.0)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text("hello"), "not a z file"),
    (lambda p: np.save(p, np.zeros((2, 3, 1, 4))), r"must be a float array \(steps, N, C, H, W\)"),
    (lambda p: np.save(p, np.zeros((2, 3, 1, 4, 4), np.int32)), "must be a float array"),
    (lambda p: np.save(p, np.array([None, 1], dtype=object)), "not a z file"),
    (lambda p: np.save(p, np.full((2, 3, 1, 4, 4), np.nan, np.float32)), "NaN or infinite"),
])
def test_bad_release_z_files_are_refused(tmp_path, make, fragment):
  path = tmp_path / "z.npy"
  make(path)
  with pytest.raises(ValueError, match=fragment):
    release_files.load_z_set(path)


@pytest.mark.parametrize("arrays, fragment", [
    (dict(states=np.zeros((1, 2, 4, 4, 1))), "no 'sigmas' array"),
    (dict(sigmas=np.ones(2), states=np.zeros((1, 2, 4, 4, 1))), "2 sigmas for 1 sets of z"),
    (dict(sigmas=np.array([1.0, 1.0]), states=np.zeros((2, 2, 4, 4, 1))), "positive and distinct"),
    (dict(sigmas=np.array([0.0]), states=np.zeros((1, 2, 4, 4, 1))), "positive and distinct"),
    (dict(sigmas=np.ones(1), states=np.zeros((2, 4, 4, 1))), r"states must be a float array \(S, K"),
])
def test_bad_npz_z_files_are_refused(tmp_path, arrays, fragment):
  np.savez(tmp_path / "z.npz", **arrays)
  with pytest.raises(ValueError, match=fragment):
    release_files.load_z_set(tmp_path / "z.npz")
  with pytest.raises(ValueError, match="no such z file"):
    release_files.load_z_set(tmp_path / "missing.npy")


def test_evaluating_given_forward_z_equals_the_forward_set(tmp_path):
  """The release's forward-process z file of our own forward set gives our forward-set rows."""
  images = _digits()
  steps, count = 3, 4
  grid = default_sigmas(steps)  # the file's σ: the release's grid as pspc_jax computes it
  drawn = forward_set(images, count, seed=3)
  _write_release_z(tmp_path / "forward_z.npy", np.stack([drawn.z(s) for s in grid]))
  given = release_files.load_z_set(tmp_path / "forward_z.npy", count)
  common = dict(denoisers=["empirical", "gaussian"], count=count, batch_size=4, steps=steps,
                plot=False)
  forward = evaluate_run(images, sets=["forward"], seed=3, outdir=str(tmp_path / "forward"), **common)
  from_file = evaluate_run(images, sets=["given"], given=given, outdir=str(tmp_path / "given"),
                           **common)
  assert [r["set"] for r in from_file["mse"]] == ["given"] * steps
  for got, want in zip(from_file["mse"], forward["mse"]):
    assert got["sigma"] == want["sigma"] and got["count"] == want["count"] == count
    np.testing.assert_allclose(got["mse"], want["mse"], rtol=1e-6)
  config = json.loads((tmp_path / "given" / "config.json").read_text())
  assert config["given"]["source"] == "forward_z.npy" and config["given"]["sha256"] == given.fingerprint()
  # One σ of the file, with the forward set beside it.
  both = evaluate_run(images, sets=["forward", "given"], given=given, sigmas=[float(grid[1])],
                      outdir=str(tmp_path / "both"), seed=3, **common)
  assert [(r["set"], r["sigma"]) for r in both["mse"]] == [("forward", float(grid[1])),
                                                          ("given", float(grid[1]))]
  np.testing.assert_allclose(both["mse"][0]["mse"], both["mse"][1]["mse"], rtol=1e-6)
  # Other z in the same folder: another configuration.
  _write_release_z(tmp_path / "forward_z.npy", np.stack([drawn.z(s) + 1e-3 for s in grid]))
  with pytest.raises(ValueError, match="different configuration"):
    evaluate_run(images, sets=["given"], given=release_files.load_z_set(tmp_path / "forward_z.npy",
                                                                         count),
                 outdir=str(tmp_path / "given"), **common)


def test_given_set_arguments_are_checked(tmp_path):
  images = _digits()
  given = GivenSet(np.float32([1.0]), np.zeros((1, 2, 8, 8, 1), np.float32), "z.npz")
  common = dict(denoisers=["empirical", "gaussian"], count=2, plot=False, outdir=str(tmp_path / "out"))
  with pytest.raises(ValueError, match="the set 'given' needs z from a file"):
    evaluate_run(images, sets=["given"], **common)
  with pytest.raises(ValueError, match=r"z are given \(z.npz\) but the set 'given' is not in --sets"):
    evaluate_run(images, sets=["forward"], given=given, **common)
  wrong = GivenSet(np.float32([1.0]), np.zeros((1, 2, 8, 8, 3), np.float32), "rgb.npz")
  with pytest.raises(ValueError, match=r"the z of rgb.npz are images of shape \(8, 8, 3\)"):
    evaluate_run(images, sets=["given"], given=wrong, **common)
  assert not (tmp_path / "out").exists()


def test_bin_evaluate_on_a_release_z_file(tmp_path):
  images = _digits(200)
  grid = default_sigmas(4)
  drawn = forward_set(images, 6, seed=0)
  _write_release_z(tmp_path / "z.npy", np.stack([drawn.z(s) for s in grid]))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "bin", "evaluate"), f"--z={tmp_path / 'z.npy'}",
       "--denoisers=empirical,gaussian", "--max_images=200", "--count=5", "--batch=5",
       "--sigmas=edm[0,2]", "--steps=4", f"--outdir={tmp_path / 'out'}"],
      capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "given set, MSE per pixel" in result.stdout
  rows = json.loads((tmp_path / "out" / "mse.json").read_text())
  assert [(r["set"], r["count"]) for r in rows] == [("given", 5)] * 2
  np.testing.assert_allclose([r["sigma"] for r in rows], grid[[0, 2]], rtol=1e-6)


@pytest.mark.parametrize("args, fragment", [
    (["--z=/nonexistent/z.npy"], "/nonexistent/z.npy: no such z file"),
    (["--sets=given"], "the set 'given' needs z from a file (--z=FILE)"),
    (["--z={tmp}/z.npy", "--count=9"], "holds 3 z per σ; fewer than the 9 asked for (--count)"),
    (["--z={tmp}/z.npy", "--sigmas=0.7", "--count=3"], "none of the σ of z.npy"),
    (["--z={tmp}/rgb.npy", "--count=3"], "the z of rgb.npy are images of shape (8, 8, 3)"),
])
def test_bin_evaluate_refuses_bad_z_in_one_line(tmp_path, args, fragment):
  np.save(tmp_path / "z.npy", np.zeros((2, 3, 1, 8, 8), np.float32))
  np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 3, 8, 8), np.float32))
  status, lines = run_in_process("evaluate", *[a.format(tmp=tmp_path) for a in args],
                                 "--denoisers=empirical", "--max_images=20",
                                 f"--outdir={tmp_path / 'out'}")
  assert_one_line_error(status, lines, fragment)
  assert not (tmp_path / "out").exists()


# ---- initial latents and samples ---------------------------------------------------------------------


def _write_release_latents(path, seeds, shape=(8, 8, 1)):
  """z_init as the release's sample.py reads it: (N, C, H, W) = ε · t_max, here ε of our seeds."""
  eps = np.asarray(latents_from_seeds(jnp.asarray(seeds), shape))
  np.save(path, np.ascontiguousarray((eps * np.float32(80.0)).transpose(0, 3, 1, 2)))
  return eps


def test_release_latents_are_our_latents_times_sigma_max(tmp_path):
  eps = _write_release_latents(tmp_path / "z_init.npy", [4, 9, 2])
  latents = release_files.load_release_latents(tmp_path / "z_init.npy")
  assert latents.shape == (3, 8, 8, 1) and latents.dtype == np.float32
  np.testing.assert_allclose(latents, eps, rtol=2e-7, atol=0)
  # The sampler's first state σ_max · latents is the release's z_init within a float32 rounding.
  z_init = np.load(tmp_path / "z_init.npy").transpose(0, 2, 3, 1)
  _, path = sample(lambda z, s: jnp.zeros_like(z), latents, jnp.float32([80.0, 0.0]), solver="euler",
                   return_trajectory=True)
  np.testing.assert_allclose(np.asarray(path.z[0]), z_init, rtol=1.2e-7, atol=0)
  with pytest.raises(ValueError, match=r"latents must be a float array \(N, C, H, W\)"):
    np.save(tmp_path / "bad.npy", np.zeros((3, 8, 8)))
    release_files.load_release_latents(tmp_path / "bad.npy")
  with pytest.raises(ValueError, match="not an .npz"):
    np.savez(tmp_path / "bad.npz", z=np.zeros((3, 1, 8, 8)))
    release_files.load_release_latents(tmp_path / "bad.npz")


def test_sampling_from_release_latents_equals_sampling_from_seeds(tmp_path):
  images = _digits()
  seeds = [3, 0, 5]
  _write_release_latents(tmp_path / "z_init.npy", list(range(6)))
  latents = release_files.load_release_latents(tmp_path / "z_init.npy")
  common = dict(denoiser="gaussian", options={}, seeds=seeds, steps=3, solver="heun", batch_size=2)
  seeded = sample_run(images, outdir=str(tmp_path / "seeded"), **common)
  given = sample_run(images, outdir=str(tmp_path / "given"), latents=latents,
                     export_release=str(tmp_path / "gaussian_samples.npy"), **common)
  assert seeded["export_release"] is None and given["export_release"].endswith("gaussian_samples.npy")
  with np.load(tmp_path / "seeded" / "samples.npz") as a, np.load(tmp_path / "given" / "samples.npz") as b:
    np.testing.assert_allclose(b["samples"], a["samples"], atol=1e-5)
    exported = np.load(tmp_path / "gaussian_samples.npy")
    assert exported.dtype == np.float32 and exported.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(exported, b["samples"].transpose(0, 3, 1, 2))
  config = json.loads((tmp_path / "given" / "config.json").read_text())
  assert config["latents"]["rows"] == 6 and len(config["latents"]["sha256"]) == 64
  with pytest.raises(ValueError, match="sampled from given latents"):
    read_sample_run(str(tmp_path / "given"), images)
  with pytest.raises(ValueError, match="pick rows of the 6 latents; row 7 does not exist"):
    sample_run(images, outdir=str(tmp_path / "beyond"), latents=latents, **dict(common, seeds=[7]))
  with pytest.raises(ValueError, match="samples.txt: samples in the official layout are written to"):
    sample_run(images, outdir=str(tmp_path / "txt"), export_release=str(tmp_path / "samples.txt"),
               **common)
  assert not (tmp_path / "beyond").exists() and not (tmp_path / "txt").exists()


def test_bin_sample_with_release_latents_and_export(tmp_path):
  _write_release_latents(tmp_path / "z_init.npy", [0, 1])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  export = tmp_path / "export" / "gaussian_samples.npy"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "bin", "sample"), "--denoiser=gaussian",
       f"--latents={tmp_path / 'z_init.npy'}", "--num_samples=2", "--steps=2", "--max_images=30",
       f"--export_release={export}", f"--outdir={tmp_path / 'out'}"],
      capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"official release's layout (N, C, H, W) to {export}" in result.stdout
  with np.load(tmp_path / "out" / "samples.npz") as saved:
    np.testing.assert_array_equal(np.load(export), saved["samples"].transpose(0, 3, 1, 2))


@pytest.mark.parametrize("args, fragment", [
    (["--latents=/nonexistent/z.npy", "--seeds=0-1"], "/nonexistent/z.npy: no such latents file"),
    (["--latents={tmp}/rgb.npy", "--seeds=0-1"], "--latents holds images of shape (8, 8, 3)"),
    (["--latents={tmp}/z.npy", "--seeds=0-2"], "pick rows of the 2 latents; row 2 does not exist"),
    (["--export_release={tmp}/samples.npz", "--seeds=0-1"], "samples.npz: samples in the official"),
])
def test_bin_sample_refuses_bad_latents_in_one_line(tmp_path, args, fragment):
  np.save(tmp_path / "z.npy", np.zeros((2, 1, 8, 8), np.float32))
  np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 8, 8), np.float32))
  status, lines = run_in_process("sample", *[a.format(tmp=tmp_path) for a in args], "--steps=2",
                                 "--max_images=20", f"--outdir={tmp_path / 'out'}")
  assert_one_line_error(status, lines, fragment)
  assert not (tmp_path / "out").exists()
