"""Sensitivity maps (Eq. 8): Jacobian sums, the Fig. 3 capture statistic, files, bin/sensitivity."""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax import empirical_denoise, gaussian_denoise, gaussian_stats, maps_files
from pspc_jax import sensitivity as sens
from pspc_jax.denoisers.flex import SensitivityMaps
from pspc_jax.forward_process import forward_samples
from pspc_jax.jobs import sensitivity as sensitivity_job
from pspc_jax.progress import TerminalProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(num, shape, seed=0):
  """Correlated float data in [-1, 1]."""
  rng = np.random.default_rng(seed)
  dim = int(np.prod(shape))
  mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return np.tanh(0.2 + rng.normal(size=(num, dim)) @ mix).reshape(num, *shape).astype(np.float32)


def _abs_channel_sum(jac, shape):
  """(D, D) Jacobian in flattened (H, W, C) order -> (H, W, H, W) sums of |J| over c and c'."""
  h, w, c = shape
  return np.abs(np.asarray(jac, np.float64)).reshape(h, w, c, h, w, c).sum(axis=(2, 5))


def _gaussian(shape, num=40):
  stats = gaussian_stats(_data(num, shape))
  return stats, (lambda z, sigma: gaussian_denoise(z, sigma, stats))


@pytest.mark.parametrize("shape", [(4, 4, 1), (6, 5, 3)])
@pytest.mark.parametrize("sigma", [0.02, 0.5, 10.0])
def test_gaussian_maps_equal_analytic_jacobian(shape, sigma):
  stats, denoise = _gaussian(shape)
  lam = np.asarray(stats.eigvals, np.float64)
  vecs = np.asarray(stats.eigvecs, np.float64)
  expected = _abs_channel_sum(vecs @ np.diag(lam / (lam + sigma**2)) @ vecs.T, shape)
  got = sens.sensitivity_map(denoise, _data(10, shape, seed=3), sigma, num_z=3, batch_size=2)
  assert got.shape == shape[:2] * 2 and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def _tanh_denoiser(shape, seed=0):
  """A cheap nonlinear denoiser whose Jacobian depends on z: tanh(A z / (1 + σ))."""
  dim = int(np.prod(shape))
  mix = jnp.asarray(np.random.default_rng(seed).normal(size=(dim, dim)) / np.sqrt(dim), jnp.float32)

  def denoise(z, sigma):
    flat = jnp.matmul(z.reshape(z.shape[0], -1), mix, precision=jax.lax.Precision.HIGHEST)
    return jnp.tanh(flat / (1.0 + jnp.reshape(sigma, (-1, 1)))).reshape(z.shape)
  return denoise


def test_chunk_and_batch_sizes_do_not_change_results():
  shape = (6, 5, 3)  # 30 output pixels: chunks of 7 leave a tail of 2.
  data = _data(8, shape, seed=1)
  denoise = _tanh_denoiser(shape)
  reference = sens.sensitivity_map(denoise, data, 0.4, num_z=5, batch_size=5, chunk_size=30)
  for chunk, batch in [(1, 5), (7, 2), (None, 8)]:
    got = sens.sensitivity_map(denoise, data, 0.4, num_z=5, batch_size=batch, chunk_size=chunk)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind, shape", [("empirical", (3, 4, 3)), ("tanh", (4, 4, 1))])
def test_nonlinear_denoiser_matches_jacfwd_expectation(kind, shape):
  data = _data(7, shape, seed=2)
  sigma, num_z, seed = 1.5, 5, 11
  if kind == "empirical":
    def denoise(z, sigma):
      return empirical_denoise(z, sigma, data)
  else:
    denoise = _tanh_denoiser(shape, seed=3)

  z = forward_samples(data, sigma, jnp.arange(num_z), seed)
  one = lambda v: denoise(v[None], sigma)[0]  # noqa: E731
  jacobian = jax.jit(jax.jacfwd(one))
  jacs = [np.asarray(jacobian(zk)).reshape(z[0].size, z[0].size) for zk in z]
  per_z = [_abs_channel_sum(j, shape) for j in jacs]
  expected = np.mean(per_z, axis=0)
  got = sens.sensitivity_map(denoise, data, sigma, num_z=num_z, seed=seed, batch_size=2,
                             chunk_size=3)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  # The expectation really averages different z: the single-z maps differ.
  assert np.abs(per_z[0] - per_z[1]).max() > 1e-3
  single = sens.abs_jacobian_sum(denoise, z[:1], sigma)
  np.testing.assert_allclose(single, per_z[0], rtol=1e-4, atol=1e-6)


def test_forward_samples_are_reproducible_and_batch_independent():
  data = _data(9, (4, 4, 1))
  forward = jax.jit(forward_samples)
  a = forward(data, 0.5, jnp.arange(6), 4)
  b = forward(data, 0.5, jnp.arange(3, 6), 4)
  np.testing.assert_array_equal(a[3:], b)
  c = forward(data, 2.0, jnp.arange(6), 4)
  x = np.asarray(a) - 0.5 * (np.asarray(c) - np.asarray(a)) / 1.5  # same x and ε at every σ.
  dist = ((x[:, None] - data[None]) ** 2).sum(axis=(2, 3, 4)).min(axis=1)
  np.testing.assert_allclose(dist, 0, atol=1e-9)
  assert not np.allclose(a, forward(data, 0.5, jnp.arange(6), 5))


def test_sensitivity_maps_over_sigmas_with_progress():
  shape = (4, 4, 1)
  stats, denoise = _gaussian(shape)
  progress = TerminalProgress(io.StringIO())
  result = sens.sensitivity_maps(denoise, _data(5, shape), [1.0, 0.1, 10.0], num_z=2,
                                 progress=progress)
  assert result.maps.shape == (3, 4, 4, 4, 4) and result.sigmas.tolist() == [1.0, 0.1, 10.0]
  np.testing.assert_array_equal(result.maps[1], sens.sensitivity_map(denoise, _data(5, shape), 0.1,
                                                                     num_z=2))
  # Compiled once, as its own phase before the bar over σ.
  text = progress.file.getvalue()
  assert text.count("compiling sensitivity step…") == 1
  assert text.index("compiling sensitivity step:") < text.index("sensitivity maps: 100%")
  assert "3/3" in text
  # The Gaussian denoiser shrinks more at large σ.
  assert result.maps[2].sum() < result.maps[0].sum() < result.maps[1].sum()
  refused = TerminalProgress(io.StringIO())
  with pytest.raises(ValueError, match="positive"):
    sens.sensitivity_maps(denoise, _data(5, shape), [1.0, 0.0], num_z=1, progress=refused)
  with pytest.raises(ValueError, match="positive"):
    sens.sensitivity_map(denoise, _data(5, shape), np.inf, num_z=1, progress=refused)
  assert refused.file.getvalue() == ""  # refused before compiling
  with pytest.raises(ValueError, match="num_z"):
    sens.sensitivity_maps(denoise, _data(5, shape), [1.0], num_z=0)


def _maps(num_sigmas=2, shape=(3, 4), seed=0):
  rng = np.random.default_rng(seed)
  return SensitivityMaps(np.geomspace(10, 0.1, num_sigmas),
                         rng.random((num_sigmas, *shape, *shape)).astype(np.float32))


def test_save_load_round_trip(tmp_path):
  maps = _maps()
  path = tmp_path / "sub" / "maps.npz"
  maps_files.save_maps(path, maps, {"denoiser": "gaussian", "num_z": 4})
  loaded = maps_files.load_maps(path)
  np.testing.assert_array_equal(loaded.maps, maps.maps)
  np.testing.assert_array_equal(loaded.sigmas, maps.sigmas)
  assert loaded.maps.dtype == np.float32 and loaded.sigmas.dtype == np.float64
  assert maps_files.load_maps_meta(path) == {"denoiser": "gaussian", "num_z": 4}
  with np.load(path) as f:
    assert sorted(f.files) == ["maps", "meta", "sigmas"]
    assert json.loads(str(f["meta"]))["num_z"] == 4
  maps_files.save_maps(path, maps)
  assert maps_files.load_maps_meta(path) == {}


@pytest.mark.parametrize("change, message", [
    (lambda s, m: (s, -m), "negative"),
    (lambda s, m: (s, np.where(m > 0.5, np.nan, m)), "NaN"),
    (lambda s, m: (s, m[:, :, :, :2]), "shape"),
    (lambda s, m: (s[:1], m), "shape"),
    (lambda s, m: (s, m[0]), "shape"),
    (lambda s, m: (-s, m), "positive"),
    (lambda s, m: (s * np.inf, m), "finite"),
    (lambda s, m: (s.reshape(2, 1), m), "1-D"),
])
def test_load_rejects_bad_files(tmp_path, change, message):
  maps = _maps()
  sigmas, arrays = change(maps.sigmas, maps.maps)
  path = tmp_path / "bad.npz"
  np.savez(path, sigmas=sigmas, maps=arrays, meta=np.array("{}"))
  with pytest.raises(ValueError, match=message):
    maps_files.load_maps(path)
  with pytest.raises(ValueError, match=message):
    maps_files.save_maps(tmp_path / "other.npz", SensitivityMaps(sigmas, arrays))


def test_load_rejects_missing_arrays_and_unreadable_files(tmp_path):
  np.savez(tmp_path / "a.npz", sigmas=np.ones(2))
  with pytest.raises(ValueError, match="missing maps"):
    maps_files.load_maps(tmp_path / "a.npz")
  (tmp_path / "b.npz").write_text("not a zip")
  with pytest.raises(ValueError, match="b.npz: not a sensitivity-maps file"):
    maps_files.load_maps(tmp_path / "b.npz")
  with pytest.raises(ValueError, match="JSON"):
    maps_files.save_maps(tmp_path / "c.npz", _maps(), {"bad": object()})


@pytest.mark.parametrize("content", [b"# README\n\nplain text\n", b""])
def test_files_that_are_not_maps_are_named_as_such_without_pickle_advice(tmp_path, content):
  path = tmp_path / "README.md"
  path.write_bytes(content)
  for read in (maps_files.load_maps, maps_files.load_maps_meta):
    with pytest.raises(ValueError, match="README.md: not a sensitivity-maps file") as err:
      read(path)
    assert "pickle" not in str(err.value)
  with pytest.raises(ValueError, match="none.npz: no such sensitivity-maps file"):
    maps_files.load_maps(tmp_path / "none.npz")


def _edm_grid(num_steps):
  """EDM's σ_i (Karras et al. 2022, Eq. 5; σ_max 80, σ_min 0.002, ρ 7), float64, without the final 0."""
  ramp = np.arange(num_steps) / (num_steps - 1)
  return (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7


def test_official_release_npy_is_read_on_the_edm_grid(tmp_path):
  maps = np.random.default_rng(0).random((18, 3, 4, 3, 4)).astype(np.float32)
  np.save(tmp_path / "maps.npy", maps)
  loaded = maps_files.load_maps(tmp_path / "maps.npy")
  np.testing.assert_allclose(loaded.sigmas, _edm_grid(18), rtol=1e-6)  # float32-rounded grid
  np.testing.assert_array_equal(loaded.maps, maps)
  assert maps_files.load_maps_meta(tmp_path / "maps.npy") == {}
  np.save(tmp_path / "flat.npy", maps.reshape(18, 12, 12))
  with pytest.raises(ValueError, match=r"official layout \(L, H, W, H, W\), got shape \[18, 12, 12\]"):
    maps_files.load_maps(tmp_path / "flat.npy")
  np.save(tmp_path / "negative.npy", -maps)
  with pytest.raises(ValueError, match="negative"):
    maps_files.load_maps(tmp_path / "negative.npy")


def test_bin_sample_with_official_release_maps(tmp_path):
  # The official layout read as the same maps on the EDM grid is pinned above; here the tool runs
  # with it (it crashed with a TypeError before).
  from test_cli_errors import run_in_process  # pylint: disable=import-outside-toplevel
  np.save(tmp_path / "maps.npy", np.random.default_rng(1).random((18, 8, 8, 8, 8)).astype(np.float32))
  out = tmp_path / "out"
  status, lines = run_in_process("sample", "--denoiser=pspc_flex", f"--heatmaps={tmp_path}/maps.npy",
                                 "--seeds=0-1", "--steps=3", "--max_images=64", f"--outdir={out}")
  assert status == 0, lines
  with np.load(out / "samples.npz") as saved:
    assert saved["samples"].shape == (2, 8, 8, 1) and np.isfinite(saved["samples"]).all()


def test_maps_for_sigma_nearest_in_log_sigma():
  levels = np.arange(3, dtype=np.float32)[:, None, None, None, None]
  maps = SensitivityMaps(np.array([0.01, 1.0, 100.0]), levels * np.ones((3, 2, 2, 2, 2), np.float32))
  # 0.09 is nearer 0.01 in log σ (factor 9 vs 11) but nearer 1.0 linearly.
  for sigma, index in [(0.09, 0), (0.11, 1), (5.0, 1), (20.0, 2), (1e9, 2), (0.0, 0), (1e-9, 0)]:
    assert sens.nearest_sigma_index(maps.sigmas, sigma) == index
    np.testing.assert_array_equal(sens.maps_for_sigma(maps, sigma), maps.maps[index])
  batch = sens.maps_for_sigma(maps, np.array([0.09, 20.0]))
  assert batch.shape == (2, 2, 2, 2, 2) and batch[:, 0, 0, 0, 0].tolist() == [0, 2]
  traced = jax.jit(lambda s: sens.maps_for_sigma(maps, s))(jnp.array([0.09, 0.11, 20.0]))
  np.testing.assert_array_equal(traced[:, 0, 0, 0, 0], [0, 1, 2])


def _brute_capture(maps, pixel, fraction):
  """Smallest odd side of a centred (clipped) square around `pixel` holding >= fraction of the mass."""
  h, w = pixel
  m = maps[h, w] / maps[h, w].sum()
  for r in range(max(m.shape)):
    if m[max(0, h - r):h + r + 1, max(0, w - r):w + r + 1].sum() >= fraction - 1e-9:
      return 2 * r + 1


def test_capture_sides_on_hand_made_maps():
  height, width = 9, 9
  delta = np.eye(height * width, dtype=np.float32).reshape(height, width, height, width)
  assert sens.square_capture_sides(delta).tolist() == [1, 1, 1]
  assert sens.square_capture_sides(delta, pixel=(0, 8)).tolist() == [1, 1, 1]
  uniform = np.ones((height, width, height, width), np.float32)
  # Centre pixel: squares of side 5, 7, 9 hold 25/81, 49/81, 81/81 of the mass.
  assert sens.square_capture_sides(uniform, pixel=(4, 4)).tolist() == [7, 9, 9]
  # Corner pixel: side 2r+1 clipped to (r+1)²; 0.5·81 needs r = 6, 0.75·81 needs r = 7.
  assert sens.square_capture_sides(uniform, (0.5, 0.75, 0.95, 1.0), pixel=(0, 0)).tolist() == \
      [13, 15, 17, 17]
  curve = sens.captured_mass(uniform, pixel=(4, 4))
  np.testing.assert_allclose(curve, [1 / 81, 9 / 81, 25 / 81, 49 / 81, 1, 1, 1, 1, 1])
  # Several σ at once, and the all-pixel average against a brute force.
  rng = np.random.default_rng(0)
  rand = rng.random((2, 5, 6, 5, 6)) ** 4
  sides = sens.square_capture_sides(rand, (0.5, 0.9))
  assert sides.shape == (2, 2)
  for k in range(2):
    for fraction in (0.5, 0.9):
      assert sens.square_capture_sides(rand[k], (fraction,), pixel=(2, 3))[0] == \
          _brute_capture(rand[k], (2, 3), fraction)
    curve = sens.captured_mass(rand[k])
    brute = np.mean([[(rand[k, h, w] / rand[k, h, w].sum())[max(0, h - r):h + r + 1,
                                                           max(0, w - r):w + r + 1].sum()
                      for r in range(6)] for h in range(5) for w in range(6)], axis=0)
    np.testing.assert_allclose(curve, brute, rtol=1e-12)
    assert sides[k].tolist() == [2 * np.argmax(brute >= f - 1e-9) + 1 for f in (0.5, 0.9)]
  # Zero maps are left out of the average; all-zero gives NaN.
  partly = uniform.copy()
  partly[0, 0] = 0
  others = [sens.captured_mass(uniform, (h, w)) for h in range(9) for w in range(9) if h or w]
  np.testing.assert_allclose(sens.captured_mass(partly), np.mean(others, axis=0))
  assert np.isnan(sens.square_capture_sides(np.zeros((2, 2, 2, 2)))).all()
  with pytest.raises(ValueError, match="fractions"):
    sens.square_capture_sides(uniform, (0.0,))
  with pytest.raises(ValueError, match="outside"):
    sens.square_capture_sides(uniform, pixel=(9, 0))


def run_tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", "sensitivity"), *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_bin_sensitivity_end_to_end_and_resume(tmp_path):
  out = tmp_path / "s" / "maps.npz"
  args = ["--denoiser=gaussian", "--sigmas=2,0.05", "--num_z=2", "--pixels=4,4;0,7", f"--out={out}"]
  first = run_tool(*args)
  assert first.returncode == 0, first.stderr
  assert "compiling sensitivity step" in first.stderr and "2/2" in first.stderr
  assert "(2 noise levels computed, 0 reused)" in first.stdout
  for name in ("maps.npz", "maps_heatmaps.png", "maps_capture.png", "maps_capture.json"):
    assert (tmp_path / "s" / name).stat().st_size > 0
  assert not (tmp_path / "s" / "maps_parts").exists()
  maps = maps_files.load_maps(out)
  assert maps.maps.shape == (2, 8, 8, 8, 8) and maps.sigmas.tolist() == [2.0, 0.05]
  meta = maps_files.load_maps_meta(out)
  assert meta["denoiser"] == "gaussian" and meta["num_z"] == 2 and meta["dataset"] == "digits"
  capture = json.loads((tmp_path / "s" / "maps_capture.json").read_text())
  assert np.asarray(capture["sides"]).shape == (2, 3)

  # Interrupted after the first σ: only its part file exists. The rerun computes only the second σ
  # and reproduces the uninterrupted result.
  parts = tmp_path / "s" / "maps_parts"
  maps_files.save_maps(sensitivity_job.part_path(str(parts), 2.0),
                       SensitivityMaps(maps.sigmas[:1], maps.maps[:1]), meta)
  out.unlink()
  second = run_tool(*args)
  assert second.returncode == 0, second.stderr
  assert "resuming: 1/2" in second.stderr and "2/2" in second.stderr
  assert "(1 noise levels computed, 1 reused)" in second.stdout
  np.testing.assert_allclose(maps_files.load_maps(out).maps, maps.maps, rtol=1e-6)

  # A different configuration is refused with one line on stderr.
  third = run_tool(*args[:-3], "--num_z=3", f"--out={out}")
  assert third.returncode == 2 and third.stderr.strip().count("\n") == 0
  assert "different configuration" in third.stderr
