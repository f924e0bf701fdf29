"""Smoke tests of the benchmark library and bin/benchmark on tiny synthetic data (no timing thresholds)."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax import benchmarking as bm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(dataset="synthetic", num_images=30, batch=2, patch_sizes=(3, 5), repeats=2,
            synthetic_shape=(8, 8, 3))


def check_structure(result: bm.BenchmarkResult, patch_sizes):
  rows = [(c.denoiser, c.patch_size) for c in result.cases]
  assert rows == [("empirical", None)] + [("pspc_square", s) for s in patch_sizes]
  empirical = result.cases[0].seconds
  for case in result.cases:
    assert case.seconds > 0 and case.compile_seconds > 0
    assert len(case.all_seconds) == 2 and case.seconds == min(case.all_seconds)
    assert math.isclose(case.ratio_to_empirical, case.seconds / empirical, rel_tol=1e-9)
  assert result.cases[0].ratio_to_empirical == 1.0
  for key in ("cpu", "cores", "jax", "device"):
    assert result.machine[key]
  assert result.dataset["num_images"] == 30 and result.dataset["image_shape"] == [8, 8, 3]


def test_run_benchmark_table_json_and_loop_reference():
  result = bm.run_benchmark(bm.BenchmarkConfig(**TINY, loop_reference=True))
  check_structure(result, (3, 5))
  for case in result.cases[1:]:
    # The whole loop ran (tiny), so its output was compared with the fast denoiser.
    assert case.speedup_vs_loop > 0 and "all" in case.note and "max |fast − loop|" in case.note
    assert case.loop_max_abs_diff < 1e-4 and case.loop_compile_seconds > 0
  assert result.cases[0].speedup_vs_loop is None

  table = bm.format_table(result)
  lines = table.splitlines()
  assert lines[0].startswith("machine:") and "jax" in lines[0]
  assert lines[1].startswith("dataset: synthetic, N = 30")
  assert lines[2].split()[:3] == ["denoiser", "s", "sigma"]
  assert len(lines) == 4 + len(result.cases)
  assert lines[4].split()[:2] == ["empirical", "-"] and lines[5].split()[:2] == ["pspc_square", "3"]

  parsed = json.loads(result.to_json())
  assert parsed["config"]["patch_sizes"] == [3, 5]
  cases = parsed["cases"]
  assert [c["patch_size"] for c in cases] == [None, 3, 5]
  for c in cases:
    assert math.isclose(c["ratio_to_empirical"], c["seconds"] / cases[0]["seconds"], rel_tol=1e-9)
  for c in cases[1:]:
    assert math.isclose(c["speedup_vs_loop"], c["loop_seconds"] / c["seconds"], rel_tol=1e-9)


def test_loop_reference_is_pspc_square_and_subsets_extrapolate():
  rng = np.random.default_rng(0)
  data = jnp.asarray(rng.integers(0, 256, (20, 6, 7, 3), dtype=np.uint8))
  z = jnp.asarray(rng.standard_normal((2, 6, 7, 3)).astype(np.float32))
  np.testing.assert_allclose(bm.loop_reference_denoise(z, 0.7, data, 3),
                             pj.pspc_square_denoise(z, 0.7, data, 3), atol=1e-5)
  seconds, _, note, out = bm.time_loop_reference(z, jnp.float32(0.7), data, 4, budget_s=0.0, subset=3)
  assert seconds > 0 and out is None and note == "loop: extrapolated from 3 of 12 positions"


def test_schedule_sigma_follows_the_cifar10_schedule():
  schedule = pj.cifar10_patch_schedule() if hasattr(pj, "cifar10_patch_schedule") else None
  for size in (3, 7, 11, 15, 23, 32):
    sigma = bm.schedule_sigma(size, 32)
    if schedule is not None:
      assert schedule(sigma) == size
  assert bm.schedule_sigma(32, 32) > bm.schedule_sigma(23, 32) > bm.schedule_sigma(3, 32)


def test_memory_worker_and_bin_benchmark_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "bin", "benchmark"), "--dataset=synthetic",
       "--num_images=24", "--batch=2", "--patch_sizes=3", "--repeats=1", "--memory", "--sigma=0.5",
       f"--json={out}"],
      capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  assert "pspc_square" in proc.stdout and "machine:" in proc.stdout
  report = json.loads(out.read_text())
  assert [c["denoiser"] for c in report["cases"]] == ["empirical", "pspc_square"]
  for case in report["cases"]:
    assert case["sigma"] == 0.5 and case["seconds"] > 0
    # Includes the Python/JAX runtime; a 32x32 call on 24 images needs far less than 10 GB.
    assert 10 < case["peak_rss_mb"] < 10_000


def test_bad_benchmark_config_raises():
  with pytest.raises(ValueError, match="unknown benchmark denoiser"):
    bm.run_benchmark(bm.BenchmarkConfig(**dict(TINY, denoisers=("nope",))))
  with pytest.raises(ValueError, match="patch size 9"):
    bm.run_benchmark(bm.BenchmarkConfig(**dict(TINY, patch_sizes=(9,))))
