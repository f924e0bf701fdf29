"""Tests for batch evaluation (pspc_jax.evaluation, pspc_jax.jobs.evaluate / compare, bin/evaluate):
MSE tables, evaluation sets, resumption, progress, patch posterior means (Fig. 4), sample similarity
and memorisation statistics."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax import evaluation as ev
from pspc_jax import tuning
from pspc_jax.denoisers.empirical import empirical_denoise
from pspc_jax.denoisers.pspc import patch_posterior_means, window_posterior_means
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.registry import make_denoiser
from pspc_jax.edm import edm_sigmas
from pspc_jax.forward_process import forward_samples
from pspc_jax.jobs.compare import compare_run
from pspc_jax.jobs.evaluate import BatchedDenoiser, evaluate_run
from pspc_jax.sampling import latents_from_seeds, sample
from reference import to_float64

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(count=12, shape=(6, 5, 1), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count,) + shape, dtype=np.uint8)


class Interrupt(Exception):
  pass


class _Bar:
  """A stand-in for a tqdm bar: counts updates, keeps postfixes."""

  def __init__(self, recorder, total, desc, initial):
    self.recorder, self.total, self.desc, self.n = recorder, total, desc, initial
    self.initial, self.postfixes = initial, []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def update(self, n=1):
    self.n += n

  def set_postfix_str(self, text, refresh=True):
    del refresh
    self.postfixes.append(text)
    if self.recorder.interrupt_at and text.startswith(self.recorder.interrupt_at):
      raise Interrupt


class _Recorder:
  """A `pspc_jax.progress.Progress` that records notes, phases and bars, and raises `Interrupt` when a
  bar's postfix starts with `interrupt_at` (the output about to be computed)."""

  def __init__(self, interrupt_at=None):
    self.notes, self.phases, self.bars = [], [], []
    self.interrupt_at = interrupt_at

  def note(self, message):
    self.notes.append(message)

  @contextlib.contextmanager
  def phase(self, label):
    self.phases.append(label)
    yield

  def bar(self, total, desc, unit="it", initial=0):
    del unit
    self.bars.append(_Bar(self, total, desc, initial))
    return self.bars[-1]

  def compiled(self):
    return [label for label in self.phases if label.startswith("compiling")]


def test_mse_table_equals_direct_numpy(tmp_path):
  images = _images()
  options = {"pspc_square": {"patch_schedule": 3}}
  sigmas = [0.7, 0.05]
  progress = _Recorder()
  summary = evaluate_run(images, denoisers=["empirical", "gaussian", "pspc_square"],
                         options=options, sigmas=sigmas, sets=["forward"], count=5, seed=4,
                         batch_size=2, outdir=str(tmp_path), progress=progress)
  rows = summary["mse"]
  assert len(rows) == 2 * 3
  # One compilation per denoiser, before the one bar over the 2 σ × 3 outputs.
  assert progress.compiled() == ["compiling denoiser empirical", "compiling denoiser gaussian",
                                 "compiling denoiser pspc_square"]
  [bar] = progress.bars
  assert (bar.desc, bar.initial, bar.n, bar.total) == ("evaluating", 0, 6, 6)
  assert bar.postfixes[0] == "σ=0.7 forward empirical"
  data = jnp.asarray(images)
  for sigma in sigmas:
    z = forward_samples(data, np.float32(sigma), jnp.arange(5), seed=4)
    out = {name: np.asarray(build_denoiser(name, data, **options.get(name, {}))(z, np.float32(sigma)),
                            np.float64)
           for name in ("empirical", "gaussian", "pspc_square")}
    for a, b in [("empirical", "gaussian"), ("empirical", "pspc_square"), ("gaussian", "pspc_square")]:
      expected = np.mean((out[a] - out[b]) ** 2)
      got = ev.mse_lookup(rows, "forward", a, b)[float(np.float32(sigma))]
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)
  # The CSV and JSON views hold the same rows.
  with open(tmp_path / "mse.json") as f:
    assert json.load(f) == rows
  lines = (tmp_path / "mse.csv").read_text().splitlines()
  assert lines[0] == "sigma,set,denoiser_a,denoiser_b,mse,count" and len(lines) == 7
  assert (tmp_path / "mse.png").stat().st_size > 0


def test_batched_denoiser_pads_last_batch():
  calls = []

  def denoise(z, sigma):
    calls.append(z.shape)  # traced once
    return z * sigma[:, None, None, None]

  progress = _Recorder()
  batched = BatchedDenoiser(denoise, 4, (2, 2, 1), progress, label="times σ")
  assert calls == [(4, 2, 2, 1)] and progress.phases == ["compiling times σ"]  # on construction
  z = np.arange(7 * 2 * 2).reshape(7, 2, 2, 1).astype(np.float32)
  out = batched(z, 0.5)
  np.testing.assert_allclose(out, 0.5 * z)
  out = batched(z[:3], np.float32(2.0))
  np.testing.assert_allclose(out, 2.0 * z[:3])
  assert calls == [(4, 2, 2, 1)] and batched.calls == 3


def test_forward_set_is_reproducible_and_per_image():
  images = _images(20)
  a = ev.forward_set(images, 7, seed=3)
  b = ev.forward_set(images, 7, seed=3)
  for field in a._fields:
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  short = ev.forward_set(images, 4, seed=3)  # entry k does not depend on the count
  np.testing.assert_array_equal(short.noise, a.noise[:4])
  np.testing.assert_array_equal(short.indices, a.indices[:4])
  np.testing.assert_allclose(a.x, images[a.indices] / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_allclose(a.z(0.3), a.x + np.float32(0.3) * a.noise)
  other = ev.forward_set(images, 7, seed=4)
  assert np.abs(other.noise - a.noise).max() > 0.5
  assert abs(float(a.noise.std()) - 1.0) < 0.2


def test_forward_set_is_the_forward_process_convention():
  # bin/evaluate's forward z at seed s are bin/tune_schedule's and bin/sensitivity's z at seed s.
  images = _images(15, (5, 4, 3), seed=7)
  for seed in (0, 9):
    fs = ev.forward_set(images, 6, seed=seed)
    for sigma in (80.0, 0.3, 0.002):
      want = forward_samples(images, sigma, jnp.arange(6), seed)
      np.testing.assert_allclose(fs.z(sigma), np.asarray(want), rtol=1e-6, atol=1e-6)
      # bin/tune_schedule draws its forward z through tuning.forward_set.
      np.testing.assert_allclose(tuning.forward_set(images, sigma, 6, seed), fs.z(sigma),
                                 rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="count must be at least 1"):
    ev.forward_set(images, 0)


def test_reverse_set_equals_trajectory_states():
  images = _images(10, (4, 4, 1))
  denoise = make_denoiser("gaussian", jnp.asarray(images))
  steps = 6
  grid = np.asarray(edm_sigmas(steps))
  sigmas = [grid[2], grid[4]]
  progress = _Recorder()
  states = ev.reverse_set(denoise, (4, 4, 1), sigmas, [5, 6, 7], steps=steps, batch_size=2,
                          progress=progress)
  assert states.shape == (2, 3, 4, 4, 1)
  assert progress.compiled() == ["compiling reverse-set sampler (6 heun steps)"]
  assert [(bar.desc, bar.n, bar.total) for bar in progress.bars] == [("reverse set", 3, 3)]
  _, path = sample(denoise, latents_from_seeds(jnp.asarray([5, 6, 7]), (4, 4, 1)), grid,
                   return_trajectory=True)
  np.testing.assert_allclose(states, np.asarray(path.z)[[2, 4]], atol=1e-5)
  # Reproducible.
  again = ev.reverse_set(denoise, (4, 4, 1), sigmas, [5, 6, 7], steps=steps, batch_size=3)
  np.testing.assert_allclose(again, states, atol=1e-5)
  # An off-grid σ joins the sampler grid, and its state is the trajectory's state there.
  union = ev.reverse_grid([0.5], steps)
  assert np.float32(0.5) in union and len(union) == len(grid) + 1 and union[-1] == 0
  off = ev.reverse_set(denoise, (4, 4, 1), [0.5], [5], steps=steps, batch_size=1)
  _, path = sample(denoise, latents_from_seeds(jnp.asarray([5]), (4, 4, 1)), union,
                   return_trajectory=True)
  np.testing.assert_allclose(off[0], np.asarray(path.z)[int(np.flatnonzero(union == np.float32(0.5))[0])],
                             atol=1e-5)


def _counting_maker(data, counts):
  def make(name):
    base = make_denoiser(name, data)

    def denoise(z, sigma):
      jax.debug.callback(lambda s: counts.__setitem__(name, counts.get(name, 0) + 1), sigma)
      return base(z, sigma)
    return denoise
  return make


def test_resumption_skips_finished_sigma(tmp_path):
  images = _images(10, (4, 4, 1))
  data = jnp.asarray(images)
  sigmas = [2.0, 0.5, 0.1]
  common = dict(denoisers=["empirical", "gaussian"], sigmas=sigmas, sets=["forward", "reverse"],
                reference="gaussian", steps=4, count=3, batch_size=2)
  reference_run = evaluate_run(images, outdir=str(tmp_path / "full"), plot=False, **common)

  counts = {}
  # Killed after (2, fwd), (2, rev), (0.5, fwd) were saved.
  with pytest.raises(Interrupt):
    evaluate_run(images, outdir=str(tmp_path / "cut"), make=_counting_maker(data, counts),
                 progress=_Recorder(interrupt_at="σ=0.5 reverse"), plot=False, **common)
  with open(tmp_path / "cut" / "results.json") as f:
    assert len(json.load(f)["finished"]) == 3
  counts.clear()
  progress = _Recorder()
  resumed = evaluate_run(images, outdir=str(tmp_path / "cut"), make=_counting_maker(data, counts),
                         progress=progress, plot=False, **common)
  assert any(line.startswith("resuming: 3/6") for line in progress.notes)
  assert any("reverse set loaded" in line for line in progress.notes)
  # The bar starts at the 3 finished (σ, set) × 2 denoisers; nothing compiles but the denoisers.
  [bar] = progress.bars
  assert (bar.initial, bar.n, bar.total) == (6, 12, 12)
  assert progress.compiled() == ["compiling denoiser empirical", "compiling denoiser gaussian"]
  assert resumed["computed"] == [(0.5, "reverse"), (float(np.float32(0.1)), "forward"),
                                 (float(np.float32(0.1)), "reverse")]
  # 3 (σ, set) left × ceil(3 / 2) batches per denoiser; the reverse set was not sampled again.
  assert counts == {"empirical": 6, "gaussian": 6}
  assert len(resumed["mse"]) == len(reference_run["mse"]) == 6
  for got, want in zip(resumed["mse"], reference_run["mse"]):
    assert (got["sigma"], got["set"], got["denoiser_a"]) == (want["sigma"], want["set"],
                                                              want["denoiser_a"])
    np.testing.assert_allclose(got["mse"], want["mse"], rtol=1e-5)
  counts.clear()
  progress = _Recorder()
  done = evaluate_run(images, outdir=str(tmp_path / "cut"), make=_counting_maker(data, counts),
                      plot=False, progress=progress, **common)
  assert done["computed"] == [] and counts == {}
  assert progress.notes[-1] == f"nothing left to compute in {tmp_path / 'cut'}"
  assert not progress.phases and not progress.bars
  with pytest.raises(ValueError, match="different configuration"):
    evaluate_run(images, outdir=str(tmp_path / "cut"), plot=False, **dict(common, count=4))


def _patch_means_reference(z, sigma, data, size):
  """Brute force in float64: for every window, the softmax over the dataset of its own distance."""
  z = np.asarray(z, np.float64)
  x = to_float64(data)
  batch, height, width, channels = z.shape
  sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (batch,))
  out = np.zeros((batch, height - size + 1, width - size + 1, size, size, channels))
  for b in range(batch):
    for i in range(height - size + 1):
      for j in range(width - size + 1):
        patches = x[:, i:i + size, j:j + size]
        dist = ((z[b, i:i + size, j:j + size][None] - patches) ** 2).sum(axis=(1, 2, 3))
        logits = -dist / (2 * sigmas[b] ** 2)
        weights = np.exp(logits - logits.max())
        out[b, i, j] = np.einsum("k,kuvc->uvc", weights / weights.sum(), patches)
  return out


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_patch_posterior_means_match_brute_force(size):
  data = _images(11, (6, 5, 2), seed=1)
  rng = np.random.default_rng(2)
  z = (to_float64(data[[0, 3, 7]]) + rng.normal(size=(3, 6, 5, 2)) * 0.3).astype(np.float32)
  sigma = np.asarray([0.05, 0.5, 2.0], np.float32)
  got = patch_posterior_means(jnp.asarray(z), jnp.asarray(sigma), jnp.asarray(data), size,
                              chunk_size=4)
  want = _patch_means_reference(z, sigma, data, size)
  assert got.shape == want.shape == (3, 7 - size, 6 - size, size, size, 2)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  # The default chunking gives the same numbers; the window layout matches extract_patches.
  np.testing.assert_allclose(np.asarray(patch_posterior_means(jnp.asarray(z), sigma, data, size)),
                             want, atol=2e-5)
  np.testing.assert_array_equal(ev.extract_patches(z, size)[1, 1, 0], z[1, 1:1 + size, 0:size])


@pytest.mark.parametrize("size", [2, 3, 6])
def test_window_posterior_means_match_brute_force(size):
  data = _images(11, (6, 5, 2), seed=5)
  rng = np.random.default_rng(6)
  z = (to_float64(data[[1, 4]]) + rng.normal(size=(2, 6, 5, 2)) * 0.3).astype(np.float32)
  sigma = np.asarray([0.08, 1.5], np.float32)
  positions = ev.window_grid(6, 5, size, 2)
  side_w = min(size, 5)
  assert positions == tuple((r, c) for r in sorted({0, 6 - min(size, 6)})
                           for c in sorted({0, 5 - side_w}))
  got = window_posterior_means(jnp.asarray(z), jnp.asarray(sigma), jnp.asarray(data), size, positions,
                               chunk_size=3)
  want = _patch_means_reference(z, sigma, data, size) if size <= 5 else None
  assert got.shape == (2, len(positions), min(size, 6), side_w, 2)
  for k, (i, j) in enumerate(positions):
    if want is not None:
      np.testing.assert_allclose(np.asarray(got[:, k]), want[:, i, j], atol=2e-5)
  # Its windows of the target are cut by the same positions.
  np.testing.assert_array_equal(ev.extract_patches(z, size, positions)[:, -1],
                                z[:, positions[-1][0]:positions[-1][0] + min(size, 6),
                                  positions[-1][1]:positions[-1][1] + side_w])
  with pytest.raises(ValueError, match="positions"):
    window_posterior_means(jnp.asarray(z), sigma, jnp.asarray(data), size, [(7, 0)])
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match="patch_positions"):
      ev.window_grid(6, 5, size, bad)
  assert ev.window_grid(6, 5, size, 0) is None


def test_patch_analysis_on_a_window_grid_equals_those_windows_of_every_window(tmp_path):
  images = _images(10, (6, 6, 1), seed=7)
  common = dict(denoisers=["empirical"], sigmas=[0.7], sets=["forward"], count=3, batch_size=2,
                patch_sizes=[3], plot=False)
  every = evaluate_run(images, outdir=str(tmp_path / "every"), **common)["patch_mse"][0]
  grid = evaluate_run(images, outdir=str(tmp_path / "grid"), patch_positions=2,
                      **common)["patch_mse"][0]
  assert (every["windows"], grid["windows"]) == (16, 4)
  z = ev.forward_set(images, 3, 0).z(0.7)
  means = patch_posterior_means(jnp.asarray(z), 0.7, jnp.asarray(images), 3)
  target = empirical_denoise(jnp.asarray(z), 0.7, jnp.asarray(images))
  corners = (0, 3)
  want = np.mean([np.square(np.asarray(means[:, i, j], np.float64)
                            - ev.extract_patches(np.asarray(target), 3)[:, i, j]).mean()
                  for i in corners for j in corners])
  np.testing.assert_allclose(grid["mse"], want, rtol=1e-4)


def test_full_image_patch_is_the_optimal_denoiser():
  data = _images(9, (5, 5, 3), seed=3)
  z = np.random.default_rng(4).normal(size=(2, 5, 5, 3)).astype(np.float32)
  for sigma in (0.1, 1.0):
    means = patch_posterior_means(jnp.asarray(z), sigma, jnp.asarray(data), 5)
    assert means.shape == (2, 1, 1, 5, 5, 3)
    np.testing.assert_allclose(np.asarray(means[:, 0, 0]),
                               np.asarray(empirical_denoise(jnp.asarray(z), sigma, jnp.asarray(data))),
                               atol=1e-5)


def test_patch_analysis_rows(tmp_path):
  images = _images(10, (5, 5, 1))
  progress = _Recorder()
  summary = evaluate_run(images, denoisers=["gaussian"], sigmas=[1.0, 0.1], sets=["forward"],
                         count=3, batch_size=2, patch_sizes=[2, 5], outdir=str(tmp_path),
                         progress=progress)
  assert progress.notes == ["patch analysis on the forward set compares with empirical: "
                            "evaluating it too"]
  assert progress.compiled() == ["compiling denoiser gaussian", "compiling denoiser empirical",
                                 "compiling patch means s=2", "compiling patch means s=5"]
  rows = summary["patch_mse"]
  assert [(r["sigma"], r["patch_size"], r["target"]) for r in rows] == [
      (1.0, 2, "empirical"), (1.0, 5, "empirical"), (float(np.float32(0.1)), 2, "empirical"),
      (float(np.float32(0.1)), 5, "empirical")]
  # The full-image patch posterior mean is the optimal denoiser: zero error.
  assert all(r["mse"] < 1e-10 for r in rows if r["patch_size"] == 5)
  # Small patches at large σ are not the optimal denoiser's windows (at σ = 0.1 both pick x itself).
  assert rows[0]["mse"] > 1e-4
  assert (tmp_path / "patch_mse.csv").exists() and (tmp_path / "patch_mse.png").exists()


def test_similarity_matrix_on_hand_made_samples():
  data = np.stack([np.full((2, 2, 1), v, np.float32) for v in (-0.8, -0.2, 0.4, 0.9)])
  data[:, 0, 0, 0] += np.asarray([0.1, -0.1, 0.05, 0.0], np.float32)  # no exact symmetries
  a = data[[0, 2, 3]] + 0.01
  samples = {"a": a, "same": a.copy(), "negated": -a, "scaled": 2 * a}
  names, pixel = ev.similarity_matrix(samples, data, "pixel")
  assert names == ["a", "same", "negated", "scaled"]
  np.testing.assert_allclose(np.diag(pixel), 1.0)
  np.testing.assert_allclose(pixel[0, 1], 1.0)
  np.testing.assert_allclose(pixel[0, 2], -1.0)
  np.testing.assert_allclose(pixel[0, 3], 1.0)
  np.testing.assert_allclose(pixel, pixel.T)
  # Nearest training images: a → 0, 2, 3; scaled (2a, clipped nowhere) → 0, 3, 3: 2 of 3 agree.
  _, nn = ev.similarity_matrix({"a": a, "scaled": 2 * a}, data, "nearest_training")
  np.testing.assert_allclose(nn, [[1.0, 2 / 3], [2 / 3, 1.0]])
  # A user descriptor through the hook.
  ev.register_descriptor("mean_sign", lambda s, d: np.sign(s.reshape(len(s), -1).mean(1))[:, None],
                         similarity="equal")
  assert "mean_sign" in ev.available_descriptors()
  _, signs = ev.similarity_matrix({"a": a, "negated": -a}, data, "mean_sign")
  np.testing.assert_allclose(signs, [[1.0, 0.0], [0.0, 1.0]])
  with pytest.raises(ValueError, match="unknown descriptor"):
    ev.similarity_matrix(samples, data, "sscd")


def test_memorisation_stats():
  data = _images(8, (4, 4, 1), seed=5)
  x = data / 127.5 - 1.0
  copies = x[[0, 3, 5]].astype(np.float32)
  stats = ev.memorisation_stats(copies, data)
  np.testing.assert_allclose(stats["nn_distance"], 0.0, atol=1e-3)
  np.testing.assert_array_equal(stats["nn_index"], [0, 3, 5])
  assert stats["fraction_memorised"] == 1.0 and stats["median_nn_ratio"] < 1e-3
  # The midpoint of two training images is equally far from both (if nothing else is closer).
  mid = ((x[1] + x[2]) / 2)[None].astype(np.float32)
  mid_stats = ev.memorisation_stats(mid, data)
  d = np.sqrt(((x - mid) ** 2).sum(axis=(1, 2, 3)))
  ranked = np.sort(d)
  np.testing.assert_allclose(mid_stats["nn_ratio"][0], ranked[0] / ranked[1], rtol=1e-4)
  assert mid_stats["fraction_memorised"] == float(ranked[0] / ranked[1] < 1 / 3)


def test_compare_run_on_tiny_data(tmp_path):
  images = _images(12, (4, 4, 1), seed=6)
  progress = _Recorder()
  summary = compare_run(images, denoisers=["empirical", "gaussian"], seeds=[0, 1, 2], steps=4,
                        batch_size=2, outdir=str(tmp_path), progress=progress)
  assert progress.compiled() == ["compiling empirical sampler", "compiling gaussian sampler"]
  assert [(bar.desc, bar.n, bar.total) for bar in progress.bars] == [
      ("empirical sampler", 3, 3), ("gaussian sampler", 3, 3)]
  for name in ("samples_empirical.npz", "samples_gaussian.npz", "samples.png", "trajectory_0.png",
               "trajectory_1.png", "similarity_pixel.png", "similarity.csv", "memorisation.csv"):
    assert (tmp_path / name).stat().st_size > 0, name
  with np.load(tmp_path / "samples_empirical.npz") as saved:
    assert saved["trajectory_z"].shape == (5, 3, 4, 4, 1)
    np.testing.assert_array_equal(saved["trajectory_z"][-1], saved["samples"])
    # Shared latents: both denoisers start from the same z_0.
    with np.load(tmp_path / "samples_gaussian.npz") as other:
      np.testing.assert_array_equal(saved["trajectory_z"][0], other["trajectory_z"][0])
  # The optimal empirical denoiser's sampler reproduces training images (Eq. 6-7 at σ → 0).
  assert summary["memorisation"]["empirical"]["fraction_memorised"] == 1.0
  matrix = np.asarray(summary["similarity"]["pixel"]["matrix"])
  np.testing.assert_allclose(np.diag(matrix), 1.0)
  again = _Recorder()
  compare_run(images, denoisers=["empirical", "gaussian"], seeds=[0, 1, 2], steps=4,
              batch_size=2, outdir=str(tmp_path), progress=again)
  assert sum("loaded" in line for line in again.notes) == 2 and not again.phases


def test_parse_sigmas():
  grid = np.asarray(edm_sigmas(18))[:-1]
  np.testing.assert_array_equal(ev.parse_sigmas("edm"), grid)
  np.testing.assert_array_equal(ev.parse_sigmas("edm[0,17]"), grid[[0, 17]])
  np.testing.assert_array_equal(ev.parse_sigmas("edm:3"), np.asarray(edm_sigmas(3))[:-1])
  np.testing.assert_array_equal(ev.parse_sigmas("0.1,1"), np.float32([1.0, 0.1]))
  for bad in ("x", "0,1", "edm[99]"):
    with pytest.raises(ValueError):
      ev.parse_sigmas(bad)


def run_tool(tool, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", tool), *args], capture_output=True,
                        text=True, env=env, timeout=300)


def test_bin_evaluate_end_to_end_on_digits(tmp_path):
  args = ["--denoisers=network,empirical,gaussian,pspc_square", "--sets=forward,reverse",
          f"--checkpoint={os.path.join(REPO, 'checkpoints', 'digits_ddpmpp_small')}",
          "--sigmas=1,0.1", "--steps=3", "--count=5", "--batch=4", "--patch_sizes=3,8",
          "--patch_schedule=3", "--max_images=200", f"--outdir={tmp_path}"]
  first = run_tool("evaluate", *args)
  assert first.returncode == 0, first.stderr
  # Progress on stderr: builds and compilations as phases, then bars (tqdm) whose ETA excludes them.
  assert "compiling denoiser pspc_square…" in first.stderr
  assert "compiling reverse-set sampler (5 heun steps)…" in first.stderr  # EDM grid ∪ {1, 0.1}
  assert "reverse set: 100%" in first.stderr and "5/5" in first.stderr
  # 2 σ × 2 sets × (4 denoisers + 2 patch sizes) outputs.
  assert "evaluating: 100%" in first.stderr and "24/24" in first.stderr
  assert "forward set, MSE per pixel" in first.stdout
  with open(tmp_path / "mse.json") as f:
    rows = json.load(f)
  assert len(rows) == 2 * 2 * 6 and all(r["count"] == 5 for r in rows)
  with open(tmp_path / "patch_mse.json") as f:
    patch_rows = json.load(f)
  assert {(r["set"], r["target"]) for r in patch_rows} == {("forward", "empirical"),
                                                           ("reverse", "network")}
  for name in ("mse.csv", "mse.png", "patch_mse.csv", "patch_mse.png", "reverse_set.npz"):
    assert (tmp_path / name).stat().st_size > 0
  second = run_tool("evaluate", *args)
  assert second.returncode == 0 and "nothing left to compute" in second.stderr
  bad = run_tool("evaluate", "--denoisers=empirical,nope", f"--outdir={tmp_path / 'bad'}")
  assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_agreement_sigmas_is_the_largest_sigma_below_which_every_patch_mse_is_small():
  rows = [{"set": "forward", "patch_size": 3, "sigma": s, "mse": m}
          for s, m in [(0.01, 0.0), (0.1, 1e-4), (1.0, 5e-3), (2.0, 1e-4)]]
  rows += [{"set": "forward", "patch_size": 5, "sigma": s, "mse": m} for s, m in [(0.01, 2e-3)]]
  assert ev.agreement_sigmas(rows) == {("forward", 3): 0.1, ("forward", 5): None}
  assert ev.agreement_sigmas(rows, tolerance=1e-2)[("forward", 3)] == 2.0


def test_evaluate_refuses_non_finite_sigmas_and_nothing_to_compare(tmp_path):
  images = _images(6, (4, 4, 1))
  with pytest.raises(ValueError, match="positive and finite"):
    ev.parse_sigmas("1,nan")
  with pytest.raises(ValueError, match="positive and finite"):
    evaluate_run(images, denoisers=["empirical", "gaussian"], sigmas=[float("inf")], count=2,
                 sets=["forward"], outdir=str(tmp_path / "a"))
  with pytest.raises(ValueError, match="nothing to compare"):
    evaluate_run(images, denoisers=["empirical"], sigmas=[1.0], count=2, sets=["forward"],
                 outdir=str(tmp_path / "b"))
