"""Smoke tests of the benchmark job, its instruments, bin/benchmark and bin/accelerator_suite on tiny
synthetic data (structure and consistency only, no timing thresholds)."""

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
from pspc_jax.conventions import to_model_range
from pspc_jax.jobs import benchmark as job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ENV = dict(os.environ, JAX_PLATFORMS="cpu")

TINY = dict(dataset="synthetic", max_images=30, batch=2, patch_sizes=(3, 5), repeats=2,
            synthetic_shape=(8, 8, 3), denoisers=("empirical", "pspc_square", "gaussian"),
            samplers=(), memory=False)


def test_run_benchmark_rows_ratios_json_and_loop_reference(tmp_path):
  out = tmp_path / "bench.json"
  config = job.BenchmarkConfig(**dict(TINY, loop_reference=True, samplers=("empirical", "pspc_square"),
                                      sample_batch=3, steps=2))
  result = job.run_benchmark(config, json_path=str(out))
  rows = [(c.data_dtype, c.denoiser, c.patch_size) for c in result.cases]
  assert rows == [(dtype, name, size) for dtype in ("uint8", "float32")
                  for name, size in (("empirical", None), ("pspc_square", 3), ("pspc_square", 5),
                                     ("gaussian", None))]
  for dtype in ("uint8", "float32"):
    mine = [c for c in result.cases if c.data_dtype == dtype]
    assert mine[0].ratio_to_empirical == 1.0
    for case in mine:
      assert case.seconds > 0 and case.compile_seconds >= 0 and case.setup_seconds >= 0
      assert len(case.all_seconds) == 2 and case.seconds == min(case.all_seconds)
      assert math.isclose(case.ratio_to_empirical, case.seconds / mine[0].seconds, rel_tol=1e-9)
    for case in mine[1:3]:
      # The whole loop ran (tiny), so its output was compared with the fast denoiser.
      assert case.speedup_vs_loop > 0 and "max |fast − loop|" in case.note
      assert case.loop_max_abs_diff < 1e-4 and case.loop_compile_seconds >= 0
  assert "shared" in result.cases[-1].note  # the float32 row reuses the Gaussian fit

  empirical, square = result.samplers
  assert (empirical.denoiser, square.denoiser) == ("empirical", "pspc_square")
  for sampler in result.samplers:
    assert sampler.data_dtype == "uint8" and sampler.batch == 3 and sampler.calls == 3
    assert sampler.seconds > 0 and math.isclose(sampler.seconds_per_call, sampler.seconds / 3)
  assert empirical.ratio_to_empirical == 1.0
  assert math.isclose(square.ratio_to_empirical, square.seconds / empirical.seconds, rel_tol=1e-9)

  for key in ("cpu", "cores", "jax", "device", "device_kind", "device_count", "platform"):
    assert result.machine[key]
  assert result.dataset["num_images"] == 30 and result.dataset["image_shape"] == [8, 8, 3]
  assert json.loads(out.read_text()) == json.loads(result.to_json())

  lines = job.format_table(result).splitlines()
  assert lines[0].startswith("machine:") and "jax" in lines[0]
  assert lines[1].startswith("dataset: synthetic, N = 30")
  assert lines[2].split()[:4] == ["data", "denoiser", "s", "sigma"]
  assert lines[4].split()[:3] == ["uint8", "empirical", "-"]
  assert lines[5].split()[:3] == ["uint8", "pspc_square", "3"]
  assert lines[8].split()[:2] == ["float32", "empirical"]
  assert lines[13].startswith("samplers: 2-step Heun, the same 3 latents")
  assert lines[16].split()[:5] == ["empirical", "uint8", "3", "2", "3"]


def test_flex_cases_agree_across_paths_and_dtypes():
  config = job.BenchmarkConfig(**dict(TINY, denoisers=("empirical", "pspc_flex"), thresholds=(0.5,),
                                      flex_methods=("gather", "matmul"), flex_radius=1.0, repeats=1))
  result = job.run_benchmark(config)
  assert [(c.data_dtype, c.denoiser, c.threshold, c.method) for c in result.cases] == [
      (d, *row) for d in ("uint8", "float32")
      for row in (("empirical", None, None), ("pspc_flex", 0.5, "gather"),
                  ("pspc_flex", 0.5, "matmul"))]
  for case in (result.cases[2], result.cases[5]):
    assert float(case.note.rsplit("= ", 1)[1]) < 1e-5  # max |matmul − gather|
  row = job.format_table(result).splitlines()[5].split()
  assert row[:2] == ["uint8", "pspc_flex"] and row[4:6] == ["0.5", "gather"]


def test_samplers_only_run_the_same_latents():
  config = job.BenchmarkConfig(**dict(TINY, denoisers=(), samplers=("empirical", "pspc_flex"),
                                      sample_batch=2, steps=2, data_dtypes=("float32",)))
  result = job.run_benchmark(config)
  assert result.cases == [] and [s.data_dtype for s in result.samplers] == ["float32"] * 2
  assert "λ schedule cifar10" in result.samplers[1].note
  assert "samplers:" in job.format_table(result)


def test_loop_reference_is_pspc_square_and_subsets_extrapolate():
  rng = np.random.default_rng(0)
  data = jnp.asarray(rng.integers(0, 256, (20, 6, 7, 3), dtype=np.uint8))
  z = jnp.asarray(rng.standard_normal((2, 6, 7, 3)).astype(np.float32))
  np.testing.assert_allclose(bm.loop_reference_denoise(z, 0.7, data, 3),
                             pj.pspc_square_denoise(z, 0.7, data, 3), atol=1e-5)
  seconds, _, note, out = bm.time_loop_reference(z, jnp.float32(0.7), data, 4, budget_s=0.0, subset=3)
  assert seconds > 0 and out is None and note == "loop: extrapolated from 3 of 12 positions"


def test_schedule_sigma_follows_the_cifar10_schedule():
  schedule = pj.cifar10_patch_schedule()
  for size in (3, 5, 7, 11, 15, 23, 32):
    assert schedule(bm.schedule_sigma(size, 32)) == size
  assert bm.schedule_sigma(32, 32) > bm.schedule_sigma(23, 32) > bm.schedule_sigma(3, 32)


def test_float_data_is_the_same_images_in_model_range():
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  assert bm.as_data_dtype(images, "uint8") is images
  floats = bm.as_data_dtype(images, "float32")
  assert floats.dtype == np.float32
  np.testing.assert_array_equal(floats, to_model_range(images))
  np.testing.assert_allclose(floats, images / 127.5 - 1.0, atol=1e-7, rtol=0)
  with pytest.raises(ValueError, match="data_dtypes"):
    bm.as_data_dtype(images, "float16")


class _Device:
  def __init__(self, platform, stats):
    self.platform, self.stats = platform, stats

  def memory_stats(self):
    return self.stats


def test_auto_chunk_size_from_the_device_memory_limit():
  assert bm.auto_chunk_size(16, (32, 32, 3), 50_000) is None  # CPU: the denoisers' defaults
  assert bm.auto_chunk_size(16, (32, 32, 3), 50_000, _Device("cpu", None)) is None
  assert bm.auto_chunk_size(16, (32, 32, 3), 50_000, _Device("gpu", None)) is None
  gpu = _Device("gpu", {"bytes_limit": 105_000_000_000})
  # 105e9 / 8 bytes over 4 copies of B·3072 float32 values per row, down to a power of two.
  assert bm.auto_chunk_size(256, (32, 32, 3), 100_000, gpu) == 1024
  assert bm.auto_chunk_size(1024, (32, 32, 3), 100_000, gpu) == 256
  assert bm.auto_chunk_size(1, (32, 32, 3), 10**6, gpu) == 262144
  assert bm.auto_chunk_size(1, (32, 32, 3), 1000, gpu) == 1000  # at most N
  assert bm.auto_chunk_size(1 << 20, (32, 32, 3), 1000, gpu) == 8  # at least 8


def test_chunk_size_reaches_the_denoisers():
  result = job.run_benchmark(job.BenchmarkConfig(**dict(TINY, chunk_size=7, repeats=1,
                                                        data_dtypes=("uint8",))))
  assert [c.chunk_size for c in result.cases] == [7, 7, 7, None]
  assert "chunk rows 7" in job.format_table(result).splitlines()[1]


def test_bad_benchmark_config_raises():
  bad = {"denoisers": ("nope",), "samplers": ("gaussian",), "data_dtypes": ("int8",),
         "flex_methods": ("dense",), "chunk_size": 0, "batch": 0, "sample_batch": 0}
  for field, value in bad.items():
    with pytest.raises(ValueError, match=field):
      job.run_benchmark(job.BenchmarkConfig(**dict(TINY, **{field: value})))
  with pytest.raises(ValueError, match="nothing to measure"):
    job.run_benchmark(job.BenchmarkConfig(**dict(TINY, denoisers=(), samplers=())))
  with pytest.raises(ValueError, match="thresholds"):
    job.run_benchmark(job.BenchmarkConfig(**dict(TINY, thresholds=(1.5,))))
  with pytest.raises(ValueError, match="patch_sizes: 9"):
    job.run_benchmark(job.BenchmarkConfig(**dict(TINY, patch_sizes=(9,))))


def test_bin_benchmark_memory_and_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "bin", "benchmark"), "--dataset=synthetic",
       "--max_images=24", "--batch=2", "--patch_sizes=3", "--repeats=1", "--sigma=0.5",
       "--denoisers=empirical,pspc_square", "--data_dtypes=uint8", "--samplers=empirical",
       "--sample_batch=2", "--steps=2", f"--json={out}"],
      capture_output=True, text=True, timeout=600, env=CPU_ENV)
  assert proc.returncode == 0, proc.stderr
  assert "pspc_square" in proc.stdout and "machine:" in proc.stdout
  assert "compiling uint8 pspc_square s=3" in proc.stderr  # progress: visible compile phases
  report = json.loads(out.read_text())
  assert [c["denoiser"] for c in report["cases"]] == ["empirical", "pspc_square"]
  assert [s["denoiser"] for s in report["samplers"]] == ["empirical"]
  assert report["machine"]["device_count"] >= 1
  for case in report["cases"]:
    assert case["sigma"] == 0.5 and case["seconds"] > 0
    # Includes the Python/JAX runtime; a 32x32 call on 24 images needs far less than 10 GB.
    assert 10 < case["peak_rss_mb"] < 10_000


@pytest.mark.parametrize("flag,message", [("--patch_sizes=3,x", "--patch_sizes: cannot parse 'x'"),
                                          ("--chunk_size=big", "--chunk_size: cannot parse"),
                                          ("--data_dtypes=int8", "data_dtypes: unknown 'int8'")])
def test_bin_benchmark_bad_flags_are_one_line_errors(flag, message):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "bin", "benchmark"),
                         "--dataset=synthetic", flag], capture_output=True, text=True, timeout=300,
                        env=CPU_ENV)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert message in lines[0]


def test_accelerator_suite_smoke(tmp_path):
  """bin/accelerator_suite --smoke: every stage at tiny sizes on CPU, results under $OUT."""
  proc = subprocess.run(["bash", os.path.join(REPO, "bin", "accelerator_suite"), "--smoke",
                         f"--python={sys.executable}"], capture_output=True, text=True,
                        timeout=900, env=dict(CPU_ENV, OUT=str(tmp_path)))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [s["status"] for s in summary["stages"]] == ["passed"] * len(summary["stages"])
  assert {s["name"] for s in summary["stages"]} >= {"tests", "bench_b256", "sampler", "bench_b1024"}
  for name in ("bench_b256", "sampler", "bench_b1024", "memory_b256"):
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert report["machine"]["jax"]
  assert (tmp_path / "suite.log").exists()
