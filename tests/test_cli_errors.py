"""Bad input at the command line: every tool in bin/ answers with one line on stderr and exit status 2,
before any JAX compilation and before it writes anything.

Most cases run a tool in-process: `tool_main` executes the script (defining its flags on absl's global
FLAGS, as the script does), parses the arguments with `cli.parse_flags` and runs its `main` through
`cli.guarded`, which are the two halves of `cli.run`; afterwards it removes the script's flags again. A
few cases run the scripts as subprocesses, through absl's `app.run`.
"""

import contextlib
import importlib.util
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from pspc_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CHECKPOINT = os.path.join(REPO, "checkpoints", "digits_ddpmpp_small")
TOOLS = ("sample", "denoise", "sensitivity", "tune_schedule", "evaluate", "compare_samples",
         "attribute", "benchmark", "train", "convert")
# A flag of each tool given a value of the wrong type.
BAD_VALUES = {"sample": "--steps=abc", "denoise": "--sigma=abc", "sensitivity": "--num_z=abc",
              "tune_schedule": "--num_z=1.5", "evaluate": "--count=abc", "compare_samples": "--batch=x",
              "attribute": "--k=abc", "benchmark": "--batch=abc", "train": "--steps=abc",
              "convert": "--sigma_data=abc"}
MISSING = "/nonexistent/data.npz"


@contextlib.contextmanager
def tool_flags(tool):
  """Defines the flags of bin/<tool> on absl's FLAGS and yields its `main`; removes them afterwards."""
  before = set(flags.FLAGS)
  namespace = runpy.run_path(os.path.join(REPO, "bin", tool), run_name=f"bin_{tool}")
  try:
    yield namespace["main"]
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def run_in_process(tool, *args):
  """(exit status, stderr lines) of bin/<tool> with `args`, run in this process like `cli.run`."""
  with tool_flags(tool) as main, contextlib.redirect_stderr(_Capture()) as err:
    try:
      argv = cli.parse_flags([tool, *args])
      cli.guarded(main)(argv)
      status = 0
    except SystemExit as done:
      status = done.code
  return status, err.lines()


class _Capture:
  def __init__(self):
    self.text = ""

  def write(self, text):
    self.text += text

  def flush(self):
    pass

  def lines(self):
    return self.text.strip().splitlines()


def assert_one_line_error(status, lines, *fragments):
  assert status == 2, lines
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  for fragment in fragments:
    assert fragment in lines[0], lines


def run_tool(tool, *args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", tool), *args], capture_output=True,
                        text=True, cwd=cwd, env=env, timeout=120)


def test_one_line_joins_multi_line_messages():
  assert cli.one_line("cannot convert:\n  a: x\n  b: y") == "cannot convert: a: x; b: y"
  assert cli.one_line("first.\nsecond\nthird") == "first. second; third"
  assert cli.one_line("single") == "single"


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("case", ["bad_value", "unknown_flag", "missing_input", "positional"])
def test_every_tool_reports_bad_input_in_one_line(tmp_path, monkeypatch, tool, case):
  monkeypatch.chdir(tmp_path)  # default output folders would go here: none may appear
  if case == "bad_value":
    args, fragment = [BAD_VALUES[tool]], BAD_VALUES[tool].split("=")[0]
  elif case == "unknown_flag":
    args, fragment = ["--nope=1"], "nope"
  elif case == "positional":
    args, fragment = ["extra"], "unexpected arguments: extra"
  elif tool == "convert":
    args, fragment = [], "no such file"
  else:
    args, fragment = [f"--dataset={MISSING}"], MISSING
  required = ["--source=/nonexistent/net.pkl", "--outdir=out/c"] if tool == "convert" else []
  status, lines = run_in_process(tool, *required, *args)
  assert_one_line_error(status, lines, fragment)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tool, args, fragment", [
    ("sample", ["--nope"], "Unknown command line flag 'nope'"),
    ("train", ["--steps=abc"], "--steps=abc"),
    ("convert", [], "--source"),  # required flags missing
])
def test_scripts_report_flag_errors_in_one_line(tmp_path, tool, args, fragment):
  result = run_tool(tool, *args, cwd=tmp_path)
  assert_one_line_error(result.returncode, result.stderr.strip().splitlines(), fragment)


@pytest.mark.parametrize("sigma", ["nan", "inf", "-1", "0"])
def test_denoise_refuses_sigma_that_is_not_positive_and_finite(tmp_path, sigma):
  out = tmp_path / "out"
  status, lines = run_in_process("denoise", f"--sigma={sigma}", "--denoisers=empirical",
                                 "--num_images=2", f"--outdir={out}")
  assert_one_line_error(status, lines, "--sigma must be positive and finite")
  assert not out.exists()


def _damaged_checkpoint(tmp_path, how):
  """A copy of the committed digits network with its largest ema_params data file removed or cut."""
  copy = tmp_path / f"ckpt_{how}"
  shutil.copytree(DIGITS_CHECKPOINT, copy)
  files = [os.path.join(root, name) for root, _, names in os.walk(copy / "ema_params") for name in names]
  largest = max(files, key=os.path.getsize)
  if how == "missing":
    os.remove(largest)
  else:
    with open(largest, "r+b") as f:
      f.truncate(os.path.getsize(largest) // 2)
  return copy


@pytest.mark.parametrize("make_options, fragment", [
    (lambda tmp: ["--denoiser=pspc_flex", f"--heatmaps={REPO}/README.md"],
     "README.md: not a sensitivity-maps file"),
    (lambda tmp: ["--denoiser=pspc_flex", f"--heatmaps={tmp}/none.npz"], "no such sensitivity-maps"),
    (lambda tmp: ["--patch_schedule=missing.json"], "patch schedule file missing.json: no such file"),
    (lambda tmp: ["--thresholds=missing.json", "--denoiser=pspc_flex",
                  f"--heatmaps={REPO}/checkpoints/digits_ddpmpp_small_maps.npz"],
     "threshold schedule file missing.json: no such file"),
    (lambda tmp: ["--denoiser=network", f"--checkpoint={_damaged_checkpoint(tmp, 'missing')}"],
     "damaged or incomplete"),
    (lambda tmp: ["--denoiser=network", f"--checkpoint={_damaged_checkpoint(tmp, 'truncated')}"],
     "damaged or incomplete"),
    (lambda tmp: ["--solver=rk4"], "--solver"),
])
def test_sample_validates_options_before_writing_anything(tmp_path, make_options, fragment):
  out = tmp_path / "out"
  status, lines = run_in_process("sample", *make_options(tmp_path), "--seeds=0-1", "--steps=2",
                                 "--max_images=32", f"--outdir={out}")
  assert_one_line_error(status, lines, fragment)
  assert "allow_pickle" not in lines[0]
  assert not out.exists()


@pytest.mark.parametrize("tool, args, fragment", [
    # Before: "cannot parse --seeds" and "--num_samples must be at least 1" for bin/denoise's flags.
    ("denoise", ["--indices=abc"], "cannot parse --indices='abc'"),
    ("denoise", ["--num_images=0"], "--num_images must be at least 1"),
    # Before: exit 0 and an output folder with no denoiser in it.
    ("denoise", ["--denoisers="], "--denoisers is empty"),
    # Before: sampled, then failed on the second-nearest neighbour, leaving config.json and samples.
    ("sample", ["--max_images=1", "--steps=2", "--seeds=0"], "at least 2 training images"),
    # Before: seed 2³² silently sampled seed 0.
    ("sample", ["--seeds=4294967296", "--steps=2"], "must give values in [0, 2147483648)"),
])
def test_flag_errors_name_the_flag_and_write_nothing(tmp_path, tool, args, fragment):
  out = tmp_path / "out"
  status, lines = run_in_process(tool, *args, f"--outdir={out}")
  assert_one_line_error(status, lines, fragment)
  assert not out.exists()


def test_api_seeds_outside_the_int32_range_raise():
  import pspc_jax as pj

  for seeds in ([2**32], [-1], [2**31]):
    with pytest.raises(ValueError, match=r"seeds must lie in \[0, 2147483648\)"):
      pj.latents_from_seeds(seeds, (2, 2, 1))
  assert pj.latents_from_seeds([2**31 - 1], (2, 2, 1)).shape == (1, 2, 2, 1)


@pytest.mark.parametrize("bad_value, fragment", [(np.nan, "NaN"), (3.0, "must be in [-1, 1]")])
def test_sample_refuses_datasets_with_nan_or_out_of_range_floats(tmp_path, bad_value, fragment):
  images = np.full((4, 8, 8, 1), 0.5, np.float32)
  images[2, 3, 4, 0] = bad_value
  np.save(tmp_path / "data.npy", images)
  status, lines = run_in_process("sample", f"--dataset={tmp_path / 'data.npy'}",
                                 f"--outdir={tmp_path / 'out'}")
  assert_one_line_error(status, lines, fragment, "data.npy")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_convert_refuses_a_damaged_training_checkpoint(tmp_path, how):
  status, lines = run_in_process("convert", f"--source={_damaged_checkpoint(tmp_path, how)}",
                                 f"--outdir={tmp_path / 'out'}")
  assert_one_line_error(status, lines, "cannot read checkpoint", "damaged or incomplete")
  assert not (tmp_path / "out").exists()


def test_convert_refuses_empty_and_foreign_pickles(tmp_path):
  empty = tmp_path / "empty.pkl"
  empty.write_bytes(b"")
  status, lines = run_in_process("convert", f"--source={empty}", f"--outdir={tmp_path / 'a'}")
  assert_one_line_error(status, lines, "empty.pkl", "empty or truncated")
  garbage = tmp_path / "garbage.pkl"
  garbage.write_bytes(b"hello\n")
  status, lines = run_in_process("convert", f"--source={garbage}", f"--outdir={tmp_path / 'b'}")
  assert_one_line_error(status, lines, "garbage.pkl: cannot read it as an EDM pickle")


def test_convert_of_a_pt_file_without_torch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  source = tmp_path / "dit.pt"
  source.write_bytes(b"PK")
  status, lines = run_in_process("convert", f"--source={source}", "--network=dit_small",
                                 f"--outdir={tmp_path / 'out'}")
  assert_one_line_error(status, lines, "needs torch", "pspc-jax[convert]", ".safetensors")


def test_convert_script_without_torch_prints_one_line(tmp_path):
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed")
  source = tmp_path / "dit.pt"
  source.write_bytes(b"PK")
  result = run_tool("convert", f"--source={source}", "--network=dit_small", "--outdir=out",
                    cwd=tmp_path)
  assert_one_line_error(result.returncode, result.stderr.strip().splitlines(), "needs torch")



def test_an_interrupted_tool_says_so_in_one_line_and_exits_130():
  def interrupted(argv):
    raise KeyboardInterrupt

  with contextlib.redirect_stderr(_Capture()) as err, pytest.raises(SystemExit) as done:
    cli.guarded(interrupted)(["tool"])
  assert done.value.code == 130
  assert err.lines() == ["interrupted; rerun the same command to resume"]
