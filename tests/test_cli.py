"""End-to-end runs of bin/sample and bin/denoise on the embedded digits, their refusals, and the shared
denoiser flags of pspc_jax.cli."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from pspc_jax import cli
from pspc_jax.denoisers import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(tool, *args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", tool), *args], capture_output=True,
                        text=True, cwd=cwd, env=env, timeout=300)


def final_bar(stderr, desc):
  """The last state of the tqdm bar `desc` in a tool's stderr (tqdm redraws it after a carriage
  return)."""
  return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith(desc)][-1]


def test_sample_pspc_square_end_to_end_and_resume(tmp_path):
  out = tmp_path / "run"
  args = ["--seeds=0-3", "--steps=4", "--batch=2", f"--outdir={out}"]
  first = run_tool("sample", *args)
  assert first.returncode == 0, first.stderr
  # Compilation is its own phase; then one bar over the batches, its postfix the sampler's last step.
  assert "compiling sampler: " in first.stderr
  assert "| 2/2 [" in final_bar(first.stderr, "sampling:")
  assert "step 4/4 σ=0.002" in final_bar(first.stderr, "sampling:")
  for name in ("samples.npz", "samples.png", "nearest.png", "config.json"):
    assert (out / name).stat().st_size > 0
  with np.load(out / "samples.npz") as saved:
    samples, seeds = saved["samples"], saved["seeds"]
    assert samples.shape == (4, 8, 8, 1) and list(seeds) == [0, 1, 2, 3]
    assert np.isfinite(samples).all() and saved["images"].dtype == np.uint8
    assert (saved["nn_distances"][:, 0] <= saved["nn_distances"][:, 1]).all()
  assert json.loads((out / "config.json").read_text())["denoiser"] == "pspc_square"

  # An interrupted run left two of four samples: the rerun computes only the missing two, and the
  # result equals the uninterrupted run (image k depends only on seed k).
  np.savez(out / "samples.npz", seeds=seeds[:2], samples=samples[:2])
  second = run_tool("sample", *args)
  assert second.returncode == 0, second.stderr
  assert "resuming: 2/4" in second.stderr and "| 1/1 [" in final_bar(second.stderr, "sampling:")
  with np.load(out / "samples.npz") as saved:
    np.testing.assert_allclose(saved["samples"], samples, atol=1e-6)

  changed = run_tool("sample", "--seeds=0-3", "--steps=5", "--batch=2", f"--outdir={out}")
  assert changed.returncode == 2 and "different configuration" in changed.stderr


def test_sample_seed_is_independent_of_batch_size(tmp_path):
  a = run_tool("sample", "--denoiser=gaussian", "--seeds=5-7", "--steps=3", "--batch=3",
               f"--outdir={tmp_path / 'a'}")
  b = run_tool("sample", "--denoiser=gaussian", "--seeds=6", "--steps=3", "--batch=1",
               f"--outdir={tmp_path / 'b'}")
  assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
  with np.load(tmp_path / "a" / "samples.npz") as sa, np.load(tmp_path / "b" / "samples.npz") as sb:
    # Same seed, same latent: equal up to float32 rounding carried through the ODE (a wrong latent
    # would differ by O(1)).
    np.testing.assert_allclose(sa["samples"][1], sb["samples"][0], atol=2e-3)
    assert np.abs(sa["samples"][0] - sb["samples"][0]).max() > 0.1


def test_denoise_writes_outputs_and_errors(tmp_path):
  result = run_tool("denoise", "--sigma=0.3", "--denoisers=empirical,pspc_square", "--num_images=3",
                    f"--outdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert "MSE to clean x" in result.stdout
  with np.load(tmp_path / "denoised.npz") as saved:
    assert saved["empirical"].shape == saved["pspc_square"].shape == (3, 8, 8, 1)
    # σ = 0.3 around a training image: the optimal denoiser returns (nearly) that image.
    np.testing.assert_allclose(saved["empirical"], saved["clean"], atol=1e-3)
  assert (tmp_path / "denoised.png").stat().st_size > 0


@pytest.mark.parametrize("args,message", [
    (["--denoiser=magic"], "unknown --denoiser='magic'"),
    (["--patch_schedule=9"], "patch size 9 does not fit 8×8"),
    (["--patch_schedule=3,x"], "cannot parse patch schedule"),
    (["--dataset=/nonexistent/file.npz"], "/nonexistent/file.npz"),
    (["--seeds=a-b"], "cannot parse --seeds"),
])
def test_sample_refuses_bad_input_with_one_line(tmp_path, args, message):
  result = run_tool("sample", "--steps=2", f"--outdir={tmp_path}", *args)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_sample_refuses_bad_datasets(tmp_path):
  (tmp_path / "empty").mkdir()
  two_channels = tmp_path / "two.npy"
  np.save(two_channels, np.zeros((4, 8, 8, 2), np.uint8))
  unreadable = tmp_path / "broken.npz"
  unreadable.write_bytes(b"not a zip file")
  for path in (tmp_path / "empty", two_channels, unreadable):
    result = run_tool("sample", f"--dataset={path}", "--steps=2", f"--outdir={tmp_path / 'o'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert str(path.name) in result.stderr.strip().splitlines()[-1]


def test_denoiser_options_from_the_shared_flags():
  flag_values = flags.FlagValues()
  cli.define_denoiser_flags(denoiser="gaussian", flag_values=flag_values)
  flag_values(["prog", "--rank=3", "--heatmaps=maps.npz", "--thresholds=0.5", "--smoothing=0.1"])
  assert flag_values.denoiser == "gaussian"
  assert cli.denoiser_options("gaussian", flag_values) == {"rank": 3}
  assert cli.denoiser_options("pspc_square", flag_values) == {"patch_schedule": "auto"}
  assert cli.denoiser_options("els", flag_values) == {"patch_schedule": "auto"}
  assert cli.denoiser_options("pspc_flex", flag_values) == {"maps": "maps.npz",
                                                            "thresholds": "0.5"}
  assert cli.denoiser_options("cfdm", flag_values) == {"smoothing": 0.1}
  assert cli.denoiser_options("network", flag_values) == {"checkpoint": None}
  assert cli.denoiser_options("empirical", flag_values) == {}
  # --heatmaps (the official release's flag name) is an alias of --maps.
  by_name = flags.FlagValues()
  cli.define_denoiser_flags(flag_values=by_name)
  by_name(["prog", "--maps=maps.npz"])
  assert cli.denoiser_options("pspc_flex", by_name)["maps"] == "maps.npz"
  with pytest.raises(ValueError, match="unknown --denoiser='magic'; choose one of"):
    cli.denoiser_options("magic", flag_values)
  # Every option is a keyword its builder takes, with the builder's default as the flag default.
  defaults = flags.FlagValues()
  cli.define_denoiser_flags(flag_values=defaults)
  defaults(["prog"])
  assert "denoiser" not in defaults
  for name in registry.available_denoisers():
    parameters = inspect.signature(registry._BUILDERS[name]).parameters
    for option, value in cli.denoiser_options(name, defaults).items():
      if option in ("maps", "checkpoint"):  # files: read by build_denoiser into maps / params
        continue
      assert parameters[option].default == value, (name, option)


@pytest.mark.parametrize("tool", ["attribute", "sensitivity"])
def test_tools_share_the_denoiser_flags_and_refusal(tmp_path, tool):
  result = run_tool(tool, "--denoiser=magic", "--smoothing=0.2", "--thresholds=0.5",
                    f"--outdir={tmp_path}" if tool == "attribute" else f"--out={tmp_path / 'm.npz'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().count("\n") == 0 and "unknown --denoiser='magic'" in result.stderr
