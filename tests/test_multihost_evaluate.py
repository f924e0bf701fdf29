"""bin/evaluate on 2 JAX processes on 127.0.0.1 (Gloo CPU collectives, `launch.run_processes`) gives
the MSE tables of 1 process, and only process 0 writes outputs and reports.

Both sides of the comparison run through `launch`, so they compile with the same XLA flags. The tool
reads the digits from a .npy file (`digits`), which spares each process the import of scikit-learn
that loading the embedded digits takes.
"""

import json
import os

import numpy as np
import pytest

from launch import REPO, python, run_processes
from pspc_jax.data import load_dataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """--dataset=<a .npy file of the first 64 digits>."""
  path = tmp_path_factory.mktemp("data") / "digits.npy"
  np.save(path, load_dataset("digits", max_images=64).images)
  return f"--dataset={path}"


def _run_on_1_and_2_processes(argv, tmp_path):
  """Runs a tool whose outputs go to a relative folder in 1 process, then in 2 processes
  (--multihost --devices=all), each in a folder of its own; returns (1-process folder, process 0's
  folder, process 1's folder, the 2 processes' `launch.ProcessResult`s)."""
  one, first, second = tmp_path / "one", tmp_path / "p0", tmp_path / "p1"
  for folder in (one, first, second):
    folder.mkdir()
  run_processes(argv, num_processes=1, cwd=str(one))
  runs = run_processes([*argv, "--multihost", "--devices=all"], num_processes=2, cwd=[first, second])
  return one, first, second, runs


# Both sets: the forward set's denoiser calls and the reverse set's sampler (an empirical reference,
# sharded too) run as collectives over the 2 processes' devices.
_EVALUATE = python(os.path.join(REPO, "bin", "evaluate"), "--denoisers=empirical,pspc_square",
                   "--sets=forward,reverse", "--reference=empirical", "--sigmas=0.5,2",
                   "--steps=3", "--count=4", "--batch=4", "--patch_schedule=3", "--outdir=out")


def _rows(folder):
  with open(folder / "out" / "mse.json") as f:
    rows = json.load(f)
  keys = [{k: v for k, v in row.items() if k != "mse"} for row in rows]
  return keys, [row["mse"] for row in rows]


def test_bin_evaluate_on_2_processes_equals_1_process(tmp_path, digits):
  one, first, second, runs = _run_on_1_and_2_processes([*_EVALUATE, digits], tmp_path)
  assert os.listdir(second) == []  # process 1 writes nothing
  assert sorted(os.listdir(first / "out")) == sorted(os.listdir(one / "out"))
  keys_one, mse_one = _rows(one)
  keys_two, mse_two = _rows(first)
  assert keys_two == keys_one and len(keys_one) == 2 * 2
  np.testing.assert_allclose(mse_two, mse_one, rtol=1e-5)
  with np.load(one / "out" / "reverse_set.npz") as single, \
      np.load(first / "out" / "reverse_set.npz") as two:
    np.testing.assert_allclose(two["states"], single["states"], atol=1e-5, rtol=1e-5)
  # Only process 0 reports: the tables on stdout, the compilations and bars on stderr.
  assert "forward set, MSE per pixel" in runs[0].stdout and "evaluating" in runs[0].stderr
  assert "MSE" not in runs[1].stdout and "compiling" not in runs[1].stderr
  assert "evaluating" not in runs[1].stderr

  # Rerun: process 0 finds everything done in its folder and tells process 1, whose folder is empty,
  # so neither computes (process 1 alone would wait in the denoisers' collectives).
  again = run_processes([*_EVALUATE, digits, "--multihost", "--devices=all"], num_processes=2,
                        cwd=[first, second])
  assert "nothing left to compute" in again[0].stderr and "compiling" not in again[0].stderr
  assert "(0 (σ, set) computed now)" in again[0].stdout and os.listdir(second) == []
