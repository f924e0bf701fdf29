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
  # On the embedded digits the default schedule is the one tuned for them, and the tool says so.
  chosen = "pspc_square --patch_schedule: checkpoints/digits_schedules/patch_schedule.json (tuned"
  assert chosen in first.stdout
  assert json.loads((out / "config.json").read_text())["options"]["patch_schedule"] == os.path.join(
      REPO, "checkpoints", "digits_schedules", "patch_schedule.json")

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
                    "--holdout=2", f"--outdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert "MSE to clean x: training" in result.stdout and "held-out" in result.stdout
  with np.load(tmp_path / "denoised.npz") as saved:
    # Training images 0-2, then the held-out last 2 of the 1,797 digits.
    assert saved["indices"].tolist() == [0, 1, 2, 1795, 1796]
    assert saved["held_out"].tolist() == [False, False, False, True, True]
    assert saved["empirical"].shape == saved["pspc_square"].shape == (5, 8, 8, 1)
    # σ = 0.3 around a training image: the optimal denoiser returns (nearly) that image; a held-out
    # image is not in its training set, so it returns another one.
    np.testing.assert_allclose(saved["empirical"][:3], saved["clean"][:3], atol=1e-3)
    held_error = np.abs(saved["empirical"][3:] - saved["clean"][3:]).max(axis=(1, 2, 3))
    assert (held_error > 0.1).all()
  assert (tmp_path / "denoised.png").stat().st_size > 0


def test_denoise_holds_out_the_last_images_by_default_and_checks_holdout(tmp_path):
  from pspc_jax.jobs.denoise import denoise_run

  images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 1), dtype=np.uint8)
  errors = denoise_run(images, denoisers={"empirical": {}}, sigma=0.01, indices=[0, 1],
                       noise_seed=0, outdir=str(tmp_path / "a"), holdout=3)
  assert errors["empirical"]["training"] < 1e-6 < errors["empirical"]["held-out"]
  only_training = denoise_run(images, denoisers={"empirical": {}}, sigma=0.01, indices=[0, 1],
                              noise_seed=0, outdir=str(tmp_path / "b"))
  assert list(only_training["empirical"]) == ["training"]
  with pytest.raises(ValueError, match=r"--holdout must lie in \[0, 10\)"):
    denoise_run(images, denoisers={"empirical": {}}, sigma=0.1, indices=[0], noise_seed=0,
                outdir=str(tmp_path / "c"), holdout=10)
  with pytest.raises(ValueError, match=r"indices must lie in \[0, 7\) .* the last 3 of 10"):
    denoise_run(images, denoisers={"empirical": {}}, sigma=0.1, indices=[7], noise_seed=0,
                outdir=str(tmp_path / "c"), holdout=3)
  assert not (tmp_path / "c").exists()
  # bin/denoise holds out 8 images by default.
  assert "--holdout" in run_tool("denoise", "--helpshort").stdout


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


def test_schedule_defaults_resolve_per_dataset_and_denoiser(capsys):
  tuned = os.path.join(REPO, "checkpoints", "digits_schedules")
  flag_values = flags.FlagValues()
  cli.define_dataset_flags(flag_values=flag_values)
  cli.define_denoiser_flags(flag_values=flag_values)
  flag_values(["prog"])
  assert flag_values.patch_schedule == flag_values.thresholds == cli.DATASET_SCHEDULE
  assert cli.denoiser_options("pspc_square", flag_values) == {
      "patch_schedule": os.path.join(tuned, "patch_schedule.json")}
  assert cli.denoiser_options("els", flag_values) == {"patch_schedule": "auto"}  # needs odd sizes
  # λ is a share of a map's mass: the tuned thresholds go with the maps they were tuned with.
  assert cli.denoiser_options("pspc_flex", flag_values) == {"maps": None, "thresholds": "cifar10"}
  maps = os.path.join(REPO, "checkpoints", "digits_ddpmpp_small_maps.npz")
  flag_values(["prog", f"--maps={maps}"])
  assert cli.denoiser_options("pspc_flex", flag_values) == {
      "maps": maps, "thresholds": os.path.join(tuned, "thresholds.json")}
  printed = capsys.readouterr().out
  assert "pspc_square --patch_schedule: " in printed and "(tuned for digits;" in printed
  assert "els --patch_schedule: auto (" in printed
  assert "pspc_flex --thresholds: cifar10 (" in printed
  assert "thresholds.json (tuned for digits; --thresholds=cifar10 for the generic one)" in printed
  # Another dataset: the generic schedules; a schedule the user sets is kept.
  flag_values(["prog", "--dataset=cifar10", "--thresholds=0.5"])
  assert cli.denoiser_options("pspc_square", flag_values) == {"patch_schedule": "auto"}
  assert cli.denoiser_options("pspc_flex", flag_values)["thresholds"] == "0.5"
  assert cli.dataset_schedule("pspc_flex", "thresholds", "cifar10")[0] == "cifar10"
  assert cli.dataset_schedule("pspc_square", "patch_schedule", None)[0] == "auto"


def test_the_committed_digits_schedules_are_the_tuned_ones():
  from pspc_jax import schedules

  folder = os.path.join(REPO, "checkpoints", "digits_schedules")
  sizes = schedules.parse_patch_schedule(os.path.join(folder, "patch_schedule.json"), 8)
  assert sizes.values == (8,) * 10 + (7, 5) + (3,) * 6
  assert sizes.sigmas == schedules.cifar10_patch_schedule().sigmas
  thresholds = schedules.parse_threshold_schedule(os.path.join(folder, "thresholds.json"))
  assert thresholds.values[:8] == (1.0,) * 8 and thresholds.values[8:12] == (0.9, 0.9, 0.8, 0.7)
