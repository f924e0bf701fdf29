"""Schedule tuning (pspc_jax.tuning, pspc_jax.jobs.tune, bin/tune_schedule): known answers, files,
resumption, CLI."""

import csv
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax import schedules, tuning
from pspc_jax.denoisers.flex import SensitivityMaps
from pspc_jax.denoisers.registry import make_denoiser
from pspc_jax.edm import edm_sigmas
from pspc_jax.jobs.tune import tune_run
from pspc_jax.progress import TerminalProgress
from pspc_jax.sampling import latents_from_seeds, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 6


def tiny_data(num=40, seed=0):
  """Random 6×6 images of moderate contrast ([-0.5, 0.5] in model units), so that at the σ used here
  the candidates differ (at small σ every patch size returns the nearest training image)."""
  return np.random.default_rng(seed).integers(64, 193, (num, SIDE, SIDE, 1)).astype(np.uint8)


def bump_maps(radius):
  """Gaussian bumps around each output pixel, (H, W, H, W): every pixel tops its own map."""
  idx = np.arange(SIDE)
  dh = (idx[:, None, None, None] - idx[None, None, :, None]) ** 2
  dw = (idx[None, :, None, None] - idx[None, None, None, :]) ** 2
  return np.exp(-(dh + dw) / (2.0 * radius ** 2)).astype(np.float32)


def square_surface(data, reference, sigmas, sizes, num_z=12):
  """The square-size error surface by the pure functions (forward-process z)."""
  candidates = tuning.square_candidates(data, sizes)
  rows = []
  for sigma in sigmas:
    z = tuning.forward_set(data, sigma, num_z, seed=1)
    ref = tuning.batched_outputs(jax.jit(reference), z, sigma, batch_size=5)
    rows.append(tuning.evaluate_candidates(z, sigma, ref, candidates, batch_size=5))
  return tuning.ErrorSurface(np.asarray(sigmas), tuple(sizes), np.stack(rows),
                             np.full(len(sigmas), num_z))


def test_argmin_schedule_ties_and_unavailable_candidates():
  mse = np.array([[3.0, 1.0, 1.0], [np.inf, 2.0, 5.0], [0.5, np.inf, 0.7]])
  schedule = tuning.argmin_schedule([4.0, 1.0, 0.1], (3, 5, 7), mse)
  assert schedule.values == (5, 5, 3) and schedule.sigmas == (4.0, 1.0, 0.1)
  assert schedule.metric == "log"
  assert tuning.argmin_schedule([4.0, 1.0, 0.1], (3, 5, 7), mse, "linear").metric == "linear"
  with pytest.raises(ValueError, match="no candidate"):
    tuning.argmin_schedule([1.0], (3, 5), [[np.inf, np.nan]])
  with pytest.raises(ValueError, match="shape"):
    tuning.argmin_schedule([1.0, 2.0], (3, 5), [[1.0, 2.0]])
  assert tuning.candidate_patch_sizes(8) == (3, 5, 7, 8)
  assert tuning.candidate_patch_sizes(32) == schedules.PAPER_PATCH_SIZES
  assert tuning.candidate_patch_sizes(4, (3, 5, 9)) == (3, 4)


def test_recovers_a_made_up_square_schedule_with_zero_error():
  data = tiny_data()
  sigmas = (3.0, 1.0, 0.5)
  truth = schedules.SigmaSchedule(sigmas, (6, 3, 5))
  reference = make_denoiser("pspc_square", jnp.asarray(data), patch_schedule=truth)
  surface = square_surface(data, reference, sigmas, (3, 5, 6))
  assert surface.best_values() == truth.values
  best = surface.mse[np.arange(3), surface.best_index()]
  assert np.all(best <= 1e-13), surface.mse
  others = np.where(np.arange(3)[None, :] == surface.best_index()[:, None], np.inf, surface.mse)
  assert np.all(others.min(axis=1) > 1e-11), surface.mse


def test_empirical_reference_prefers_the_full_image():
  # σ large enough that no two candidates coincide in float32 (at tiny σ every patch size returns the
  # nearest training image and all candidates tie; ties go to the first candidate).
  data = tiny_data()
  reference = make_denoiser("empirical", jnp.asarray(data))
  surface = square_surface(data, reference, (4.0, 1.0, 0.5), (3, 5, 6))
  assert surface.best_values() == (6, 6, 6)
  assert np.all(surface.mse[:, 2] <= 1e-13) and np.all(surface.mse[:, :2] > 1e-11), surface.mse


def test_flex_candidates_mark_uncovered_masks_unavailable():
  data = tiny_data()
  peaked = np.zeros((SIDE, SIDE, SIDE, SIDE), np.float32)
  peaked[..., 0, 0] = 1.0  # every map's top pixel is (0, 0): λ < 1 masks cover nothing else
  peaked += 1e-3
  candidates = tuning.flex_candidates(data, peaked, (0.1, 1.0))
  assert candidates[0] is None and candidates[1] is not None
  z = tuning.forward_set(data, 1.0, 4)
  ref = tuning.batched_outputs(jax.jit(make_denoiser("empirical", jnp.asarray(data))), z, 1.0, 4)
  mse = tuning.evaluate_candidates(z, 1.0, ref, candidates, batch_size=4)
  assert mse[0] == np.inf and mse[1] < 1e-8
  # Both mask forms give the same errors.
  maps = bump_maps(1.0)
  errors = [tuning.evaluate_candidates(z, 1.0, ref, tuning.flex_candidates(
      data, maps, (0.3, 0.7), method=method), batch_size=4) for method in ("matmul", "gather")]
  np.testing.assert_allclose(errors[0], errors[1], rtol=1e-4)


def run_tuner(tmp_path, name, data, reference, sigmas, **kwargs):
  options = dict(outdir=str(tmp_path / name), config={"reference": "test"}, num_z=6, seed=0,
                 batch_size=4)
  options.update(kwargs)
  return tune_run(data, reference, sigmas, **options)


def test_written_files_parse_back_to_the_chosen_values(tmp_path):
  data = tiny_data()
  reference = make_denoiser("empirical", jnp.asarray(data))
  sigmas = [4.0, 1.5]
  maps = SensitivityMaps(np.array([3.0, 0.5]), np.stack([bump_maps(2.0), bump_maps(0.7)]))
  summary = run_tuner(tmp_path, "t", data, reference, sigmas, maps=maps, thresholds=(0.3, 0.6, 1.0),
                      compare={"square": ("auto", schedules.patch_schedule_for(SIDE))})
  tuned = summary["schedules"]
  assert tuned["square"].values == (6, 6) and tuned["flex"].values == (1.0, 1.0)
  paths = summary["paths"]
  square = schedules.parse_patch_schedule(paths["square"], SIDE)
  flex = schedules.parse_threshold_schedule(paths["flex"])
  assert square == tuned["square"] and flex == tuned["flex"]
  for k, sigma in enumerate(sigmas):
    assert square(sigma) == tuned["square"].values[k] and isinstance(square(sigma), int)
    assert flex(sigma) == tuned["flex"].values[k]
  # The schedules drive the denoisers directly.
  make_denoiser("pspc_square", jnp.asarray(data), patch_schedule=paths["square"])
  saved = json.loads((tmp_path / "t" / "errors.json").read_text())
  assert saved["square"]["values"] == [3, 5, 6] and saved["flex"]["values"] == [0.3, 0.6, 1.0]
  np.testing.assert_allclose(saved["square"]["mse"], summary["surfaces"]["square"].mse)
  assert saved["num_z"] == [6, 6] and saved["config"]["z_source"] == "forward"
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 3 + 2 * 3
  assert sum(int(r["chosen"]) for r in rows) == 4
  assert {r["kind"] for r in rows} == {"square", "flex"}
  assert (tmp_path / "t" / "tune_schedule.png").stat().st_size > 0
  assert not (tmp_path / "t" / "parts").exists()


class Interrupt(Exception):
  pass


def counting(monkeypatch, name, stop_after=None):
  """Counts calls of tuning.<name>; raises Interrupt on the call after `stop_after`."""
  calls = []
  original = getattr(tuning, name)

  def wrapper(*args, **kwargs):
    if stop_after is not None and len(calls) >= stop_after:
      raise Interrupt
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(tuning, name, wrapper)
  return calls


@pytest.mark.parametrize("z_source", ["forward", "reverse"])
def test_resume_recomputes_nothing_finished(tmp_path, monkeypatch, z_source):
  data = tiny_data()
  reference = make_denoiser("empirical", jnp.asarray(data))
  sigmas = [80.0, 2.0, 0.5]
  maps = SensitivityMaps(np.array([1.0]), bump_maps(1.0)[None])
  kwargs = dict(maps=maps, thresholds=(0.5, 1.0), z_source=z_source)
  whole = run_tuner(tmp_path, "whole", data, reference, sigmas, **kwargs)

  # Interrupted during the third σ (two evaluations per σ: square and flex).
  with monkeypatch.context() as patch:
    counting(patch, "evaluate_candidates", stop_after=4)
    with pytest.raises(Interrupt):
      run_tuner(tmp_path, "cut", data, reference, sigmas, **kwargs)
  parts = sorted(os.listdir(tmp_path / "cut" / "parts"))
  assert len([p for p in parts if p.startswith("sigma_")]) == 2
  assert ("reverse_z.npz" in parts) == (z_source == "reverse")

  progress = TerminalProgress(io.StringIO())
  with monkeypatch.context() as patch:
    evaluations = counting(patch, "evaluate_candidates")
    trajectories = counting(patch, "reverse_set")
    resumed = run_tuner(tmp_path, "cut", data, reference, sigmas, progress=progress, **kwargs)
  assert len(evaluations) == 2 and not trajectories
  text = progress.file.getvalue()
  assert "resuming: 2/3" in text
  assert ("resuming: the reverse-process set" in text) == (z_source == "reverse")
  # What every σ runs is compiled once, before the bar over σ.
  compiled = ["PSPC-Square s=3", "PSPC-Square s=5", "PSPC-Square s=6", "PSPC-Flex (traced masks)"]
  if z_source == "forward":
    compiled.append("reference")
  for label in compiled:
    assert text.count(f"compiling {label}…") == 1, text
    assert text.index(f"compiling {label}:") < text.index("tuning:"), text
  assert "3/3" in text and "σ = 0.5: size" in text
  assert resumed["computed"] == 1 and resumed["reused"] == 2
  for kind in ("square", "flex"):
    np.testing.assert_allclose(resumed["surfaces"][kind].mse, whole["surfaces"][kind].mse,
                               rtol=1e-6, atol=1e-14)
  assert not (tmp_path / "cut" / "parts").exists()

  # A finished run is reused whole; another configuration is refused.
  with monkeypatch.context() as patch:
    evaluations = counting(patch, "evaluate_candidates")
    again = run_tuner(tmp_path, "cut", data, reference, sigmas, **kwargs)
  assert not evaluations and again["reused"] == 3
  assert again["schedules"] == whole["schedules"]
  with pytest.raises(ValueError, match="different configuration"):
    run_tuner(tmp_path, "cut", data, reference, sigmas, **{**kwargs, "thresholds": (1.0,)})


def test_reverse_set_is_the_recorded_trajectory():
  data = tiny_data()
  reference = make_denoiser("empirical", jnp.asarray(data))
  grid = np.asarray(edm_sigmas(18))
  latents = latents_from_seeds(jnp.arange(3), data.shape[1:])
  _, path = jax.jit(lambda lat: sample(reference, lat, jnp.asarray(grid), solver="heun",
                                       return_trajectory=True))(latents)
  states = np.asarray(path.z)[:18]  # z_i at σ_i, i = 0 … 17 (the last is the sample at σ = 0)
  shuffle = np.random.default_rng(0).permutation(18)
  z, out = tuning.reverse_set(reference, latents, grid[:-1][shuffle], batch_size=2)
  assert z.shape == (18, 3, SIDE, SIDE, 1) and out.shape == z.shape
  np.testing.assert_allclose(z, states[shuffle], rtol=1e-5, atol=1e-5)
  for i in (0, 9, 17):
    k = shuffle[i]
    expected = np.asarray(reference(jnp.asarray(z[i]), float(grid[k])))
    np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-5)


def run_tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", "tune_schedule"), *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_bin_tune_schedule_end_to_end_on_digits(tmp_path):
  out = tmp_path / "tune"
  args = ["--dataset=digits", "--reference=empirical", "--sigmas=2,0.05", "--num_z=4", "--batch=4",
          f"--heatmaps={os.path.join(REPO, 'checkpoints', 'digits_ddpmpp_small_maps.npz')}",
          "--lambdas=0.4,1", f"--outdir={out}"]
  first = run_tool(*args)
  assert first.returncode == 0, first.stderr
  assert "--patch_schedule=" in first.stdout
  assert "(2 noise levels computed, 0 reused)" in first.stdout
  assert "compiling PSPC-Square s=8" in first.stderr and "2/2" in first.stderr
  assert "σ = 0.05: size" in first.stderr
  for name in ("patch_schedule.json", "thresholds.json", "errors.json", "errors.csv",
               "tune_schedule.png"):
    assert (out / name).stat().st_size > 0
  square = schedules.parse_patch_schedule(str(out / "patch_schedule.json"), 8)
  flex = schedules.parse_threshold_schedule(str(out / "thresholds.json"))
  saved = json.loads((out / "errors.json").read_text())
  assert square.values == tuple(saved["square"]["best"]) and square(2.0) == 8
  assert flex.values == tuple(saved["flex"]["best"]) and saved["square"]["values"] == [3, 5, 7, 8]

  bad = run_tool(*args[:-2], "--lambdas=0,1", f"--outdir={tmp_path / 'bad'}")
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
  assert "(0, 1]" in bad.stderr
