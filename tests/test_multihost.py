"""Multi-process runs of the command-line tools: 2 JAX processes on 127.0.0.1 (Gloo CPU collectives,
`launch.run_processes`) give the results of 1 process, and only process 0 writes outputs.

Every run goes through `launch`, so both sides of a comparison compile with the same XLA flags. The
tools read the digits from a .npy file (`digits`), which spares each process the import of
scikit-learn that loading the embedded digits takes.
"""

import json
import os
import signal

import jax
import numpy as np
import pytest

from launch import REPO, python, run_processes
from pspc_jax import checkpoints, nets
from pspc_jax.data import load_dataset
from test_training import TINY


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """--dataset=<a .npy file of the first 64 digits>."""
  path = tmp_path_factory.mktemp("data") / "digits.npy"
  np.save(path, load_dataset("digits", max_images=64).images)
  return f"--dataset={path}"


# bin/train with the tests' 169-parameter network "tiny" registered (see test_training).
_TRAIN = python("-c", "import runpy, sys; from pspc_jax import nets; "
                "nets._ARCH_MODULES['tiny'] = 'test_training'; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')",
                os.path.join(REPO, "bin", "train"), f"--network={json.dumps(TINY)}",
                "--max_images=40", "--steps=2", "--batch=8", "--lr=0.01", "--warmup=3",
                "--ema_halflife=0.02", "--flip", "--seed=3", "--checkpoint_every=2",
                "--sample_every=2", "--log_every=1")


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_bin_train_on_2_processes_equals_1_process(tmp_path, monkeypatch, digits):
  one, two = tmp_path / "one", tmp_path / "two"
  run_processes([*_TRAIN, digits, f"--workdir={one}"], num_processes=1, devices_per_process=2)
  runs = run_processes([*_TRAIN, digits, f"--workdir={two}", "--multihost"], num_processes=2)
  assert "training 2 steps on 2 device(s) of 2 process(es)" in runs[0].stdout
  assert "loss" not in runs[1].stdout and "trained" not in runs[1].stdout  # only process 0 prints

  # One set of files, as one process writes: metrics.jsonl has one line per window, not two.
  for workdir in (one, two):
    assert sorted(os.listdir(workdir)) == ["checkpoints", "loss.png", "metrics.jsonl", "samples"]
    assert os.listdir(workdir / "samples") == ["00000002.png"]
    assert os.listdir(workdir / "checkpoints") == ["2"]
  steps_one, losses_one = zip(*_losses(one))
  steps_two, losses_two = zip(*_losses(two))
  assert steps_one == steps_two == (1, 2)
  np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6)

  # The checkpoint written by both processes together reads in one process and holds the same EMA.
  monkeypatch.setitem(nets._ARCH_MODULES, "tiny", "test_training")
  ema_one = checkpoints.load_network(str(one))[1]
  ema_two = checkpoints.load_network(str(two))[1]
  for a, b in zip(jax.tree.leaves(ema_one), jax.tree.leaves(ema_two), strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)


def test_bin_train_refuses_devices_that_leave_out_a_process(tmp_path, digits):
  # Process 1 would own no device of the mesh: it crashed while process 0 trained on, then hung.
  runs = run_processes([*_TRAIN, digits, f"--workdir={tmp_path}", "--multihost", "--devices=1"],
                       num_processes=2, check=False)
  # Each refuses at once; the first to exit gets the others killed by `run_processes`.
  refused = [run for run in runs if run.returncode == 2]
  assert refused and all(run in refused or run.returncode == -signal.SIGKILL for run in runs)
  for run in refused:
    assert run.stderr.strip().splitlines()[-1] == (
        "error: devices must include devices of all 2 processes, got 1 device(s) of process(es) "
        "[0]; use every device (--devices=all)")
  assert not os.listdir(tmp_path)


def _run_on_1_and_2_processes(argv, tmp_path):
  """Runs a tool whose outputs go to a relative folder in 1 process, then in 2 processes
  (--multihost --devices=all), each in a folder of its own; returns (1-process folder, process 0's
  folder, process 1's folder)."""
  one, first, second = tmp_path / "one", tmp_path / "p0", tmp_path / "p1"
  for folder in (one, first, second):
    folder.mkdir()
  run_processes(argv, num_processes=1, cwd=str(one))
  run_processes([*argv, "--multihost", "--devices=all"], num_processes=2, cwd=[first, second])
  return one, first, second


_SAMPLE = python(os.path.join(REPO, "bin", "sample"), "--denoiser=empirical",
                 "--num_samples=4", "--steps=4", "--batch=2", "--outdir=out")


def _final_bar(stderr):
  """The last state of the "sampling" bar (tqdm redraws it after a carriage return)."""
  return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("sampling:")][-1]


def test_bin_sample_on_2_processes_equals_1_process_and_resumes(tmp_path, digits):
  one, first, second = _run_on_1_and_2_processes([*_SAMPLE, digits], tmp_path)
  with np.load(one / "out" / "samples.npz") as single, \
      np.load(first / "out" / "samples.npz") as two:
    np.testing.assert_array_equal(two["seeds"], single["seeds"])
    np.testing.assert_allclose(two["samples"], single["samples"], atol=1e-5, rtol=0)
    interrupted = {"seeds": two["seeds"][:2], "samples": two["samples"][:2]}
    uninterrupted = two["samples"]
  assert os.listdir(second) == []  # only process 0 writes: process 1's relative --outdir stays empty

  # An interrupted run left 2 of the 4 samples, in process 0's folder only: process 0 tells process 1
  # which seeds are missing, and both sample the one batch left.
  np.savez(first / "out" / "samples.npz", **interrupted)
  multihost = [*_SAMPLE, digits, "--multihost", "--devices=all"]
  runs = run_processes(multihost, num_processes=2, cwd=[first, second])
  assert "resuming: 2/4" in runs[0].stderr and "| 1/1 [" in _final_bar(runs[0].stderr)
  assert "wrote 4 samples" in runs[0].stdout
  for text in ("resuming", "compiling", "sampling", "wrote"):  # only process 0 reports
    assert text not in runs[1].stdout + runs[1].stderr
  with np.load(first / "out" / "samples.npz") as resumed:
    np.testing.assert_allclose(resumed["samples"], uninterrupted, atol=1e-6, rtol=0)
  assert os.listdir(second) == []

  # A folder of another configuration: process 0 refuses it and tells process 1, which stops too
  # (unless `run_processes` killed it first, once process 0 had exited) instead of waiting for
  # process 0 in the sampler's collectives.
  runs = run_processes([*multihost, "--steps=5"], num_processes=2, cwd=[first, second], check=False)
  assert runs[0].returncode == 2
  assert "holds a run with a different configuration" in runs[0].stderr.strip().splitlines()[-1]
  if runs[1].returncode != -signal.SIGKILL:
    assert runs[1].returncode == 2
    assert runs[1].stderr.strip().splitlines()[-1] == (
        "error: process 0 refused --outdir=out (see its error)")
  assert os.listdir(second) == []

