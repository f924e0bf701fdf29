"""Dataset sharded over devices (pspc_jax.distributed): sharded results equal the single-device ones.

The multi-device checks run once, in one child Python started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (read when that child imports jax), so this process
and the rest of the suite keep their single CPU device. The child (`python tests/test_distributed.py
OUT.json`) runs every case and writes the largest |sharded − single device| per case; the tests below
only read that file. N = 37 rows (not divisible by 4 or 8) and N = 3 on 8 data devices (five devices
hold padding only); batches at σ = 0.002, 1, 80 and one mixed-σ batch whose two batch shards need
different branches of the scheduled denoisers.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
TOL = 1e-6
# At σ = 80 the patch distances are ~3e5 (|z| ~ 80), so their float32 rounding (ulp 0.03) moves the
# weights by ~0.03 / (2σ²) ≈ 2e-6 relatively: on one device, chunk_size=1 and chunk_size=3 already
# differ by 1.1e-6 on the N = 3 problem below (both 1.1-1.3e-6 from float64). Batches with σ = 80 get
# that much more room; everywhere else the sharded results are within 1e-6.
TOL_80 = 2e-6
HEIGHT, WIDTH, CHANNELS = 6, 6, 2
SIGMA_BATCHES = {"0.002": [0.002] * 4, "1": [1.0] * 4, "80": [80.0] * 4,
                 "mixed": [0.002, 80.0, 1.0, 0.3]}
# Scheduled PSPC-Square: 80 → the whole image (the empirical branch), 1 and 0.3 → 4, 0.002 → 2.
# In the mixed batch on 2 batch devices, shard 0 (σ 0.002, 80) needs branches {2, 6}, shard 1 {4}.
SCHEDULE = ((80.0, 1.0, 0.002), (6, 4, 2))
FLEX_SIGMAS = (80.0, 1.0, 0.002)
FLEX_THRESHOLDS = (1.0, 0.6, 0.3)

DENOISERS = ("empirical", "square3", "square5_cached", "square_scheduled", "flex_fixed",
             "flex_scheduled", "flex_registry")
# (denoiser, data devices, batch devices, N)
CASES = ([(d, 4, 2, 37) for d in DENOISERS]
         + [(d, 8, 1, 37) for d in ("empirical", "square3", "square5_cached", "square_scheduled",
                                    "flex_scheduled")]
         + [(d, 8, 1, 3) for d in ("empirical", "square5_cached", "square_scheduled",
                                   "flex_scheduled")])
BIT_CASES = ("empirical", "square3", "square5_cached", "square_scheduled", "flex_fixed",
             "flex_scheduled")


def case_name(denoiser, data_devices, batch_devices, num):
  return f"{denoiser}-{data_devices}x{batch_devices}-N{num}"


# --- the child process ---------------------------------------------------------------------------

def _problem(num, seed=0):
  rng = np.random.default_rng(seed)
  data = rng.integers(0, 256, (num, HEIGHT, WIDTH, CHANNELS)).astype(np.uint8)
  x = data[rng.integers(0, num, 4)] / 127.5 - 1.0
  noise = rng.standard_normal(x.shape)
  queries = {name: (x + np.asarray(s)[:, None, None, None] * noise).astype(np.float32)
             for name, s in SIGMA_BATCHES.items()}
  return data, queries


def _maps(seed=0):
  """(S, H, W, H, W) heavy-tailed random sensitivity maps; each pixel tops its own map (coverage)."""
  rng = np.random.default_rng(seed)
  maps = rng.random((len(FLEX_SIGMAS), HEIGHT, WIDTH, HEIGHT, WIDTH)) ** 4
  for h in range(HEIGHT):
    for w in range(WIDTH):
      maps[:, h, w, h, w] = 1.5 * maps[:, h, w].max(axis=(1, 2))
  return maps.astype(np.float32)


def _worker(out_path):
  import jax
  import jax.numpy as jnp

  import pspc_jax as pj
  from pspc_jax import distributed
  from pspc_jax.denoisers.flex import SensitivityMaps, flex_mask_set
  from pspc_jax.denoisers.values import make_flex_denoiser
  from pspc_jax.maps_files import save_maps

  assert jax.device_count() == DEVICES, jax.devices()
  maps = _maps()
  maps_file = os.path.join(os.path.dirname(out_path), "maps.npz")
  save_maps(maps_file, SensitivityMaps(np.asarray(FLEX_SIGMAS), maps))
  schedule = pj.SigmaSchedule(*SCHEDULE)
  thresholds = pj.SigmaSchedule(FLEX_SIGMAS, FLEX_THRESHOLDS)
  registry_options = {
      "empirical": ("empirical", {"chunk_size": 3}),
      "square3": ("pspc_square", {"patch_schedule": 3, "chunk_size": 3}),
      "square5_cached": ("pspc_square", {"patch_schedule": 5, "chunk_size": 3}),
      "square_scheduled": ("pspc_square", {"patch_schedule": schedule}),
      "flex_registry": ("pspc_flex", {"maps": maps_file, "thresholds": thresholds,
                                      "chunk_size": 4}),
  }

  def kernel(denoiser, data):
    """The denoiser value over `data`."""
    if denoiser in registry_options:
      name, options = registry_options[denoiser]
      return pj.build_denoiser(name, data, **options)
    if denoiser == "flex_fixed":
      return pj.PSPCDenoiser(data, flex_mask_set(maps[1], 0.5), chunk_size=3)
    return make_flex_denoiser(data, FLEX_SIGMAS, maps, thresholds, chunk_size=3)

  def sharded(denoiser, data, mesh):
    if denoiser in registry_options:  # the registry path: build_denoiser(..., mesh=mesh)
      name, options = registry_options[denoiser]
      return pj.build_denoiser(name, data, mesh=mesh, **options)
    return distributed.shard(kernel(denoiser, data), mesh)  # any denoiser value, from outside

  start = time.perf_counter()
  results = {}
  references = {}
  problems = {num: _problem(num) for num in (37, 3)}

  def reference(denoiser, num):
    # The unsharded denoiser, jitted with the dataset as an argument. (Closed over as a constant,
    # XLA may fold its conversion to float32 at compile time and change last bits, sharded or not.)
    if (denoiser, num) not in references:
      data, queries = problems[num]
      fn = jax.jit(lambda z, s, d: kernel(denoiser, d)(z, s))
      references[denoiser, num] = {
          k: np.asarray(fn(z, jnp.asarray(SIGMA_BATCHES[k]), jnp.asarray(data)))
          for k, z in queries.items()}
    return references[denoiser, num]

  for denoiser, data_devices, batch_devices, num in CASES:
    data, queries = problems[num]
    mesh = distributed.make_mesh(data_devices, batch_devices)
    fn = sharded(denoiser, data, mesh)
    expected = reference(denoiser, num)
    diffs = {k: float(np.max(np.abs(np.asarray(fn(z, jnp.asarray(SIGMA_BATCHES[k]))) - expected[k])))
             for k, z in queries.items()}
    name = case_name(denoiser, data_devices, batch_devices, num)
    results[name] = diffs
    print(f"{time.perf_counter() - start:6.1f} s  {name}", file=sys.stderr, flush=True)

  # A 1-device mesh: the same bits as the unsharded (jitted) denoiser.
  data, queries = problems[37]
  one = distributed.make_mesh(1, 1)
  for denoiser in BIT_CASES:
    fn = sharded(denoiser, data, one)
    expected = reference(denoiser, 37)
    results[f"bits-{denoiser}"] = all(
        np.array_equal(np.asarray(fn(z, jnp.asarray(SIGMA_BATCHES[k]))), expected[k])
        for k, z in queries.items())
    print(f"{time.perf_counter() - start:6.1f} s  bits-{denoiser}", file=sys.stderr, flush=True)

  # Shard shapes: N_padded / data devices rows per device, every device of the mesh.
  for data_devices, batch_devices, num in ((4, 2, 37), (8, 1, 37), (8, 1, 3)):
    dataset = distributed.shard_dataset(problems[num][0], distributed.make_mesh(data_devices,
                                                                                batch_devices))
    shards = dataset.images.addressable_shards
    results[f"shards-{data_devices}x{batch_devices}-N{num}"] = {
        "valid_rows": dataset.valid_rows, "global": list(dataset.images.shape),
        "devices": len({s.device for s in shards}),
        "shapes": sorted(set(tuple(s.data.shape) for s in shards))}

  # Odd batch (padded to the 2 batch devices), scalar σ, and the denoiser inside an outer jit and
  # inside the sampler's scan.
  mesh = distributed.make_mesh(4, 2)
  for denoiser in ("empirical", "square_scheduled"):
    name, options = registry_options[denoiser]
    fn = pj.build_denoiser(name, data, mesh=mesh, **options)
    single = jax.jit(pj.build_denoiser(name, jnp.asarray(data), **options))
    z = queries["mixed"][:3]
    sigma = jnp.asarray(SIGMA_BATCHES["mixed"][:3])
    got = {"odd_batch": fn(z, sigma), "scalar_sigma": fn(z, 0.3)}
    want = {"odd_batch": single(z, sigma), "scalar_sigma": single(z, 0.3)}
    if denoiser == "empirical":
      got["outer_jit"] = jax.jit(lambda z, s: fn(z, s))(z, sigma)
      want["outer_jit"] = single(z, sigma)
      latents = pj.latents_from_seeds([0, 1, 2], (HEIGHT, WIDTH, CHANNELS))
      sigmas = pj.edm_sigmas(3)
      run = jax.jit(lambda d, l: pj.sample(d, l, sigmas))  # the denoiser value is an argument
      got["sample"] = run(fn, latents)
      want["sample"] = run(pj.build_denoiser(name, jnp.asarray(data), **options), latents)
    for key in got:
      results[f"{key}-{denoiser}"] = float(np.max(np.abs(np.asarray(got[key]) - np.asarray(want[key]))))
    print(f"{time.perf_counter() - start:6.1f} s  drop-in {denoiser}", file=sys.stderr, flush=True)

  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


# --- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("distributed") / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], capture_output=True,
                        text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(out) as f:
    return json.load(f)


@pytest.mark.parametrize("case", CASES, ids=lambda c: case_name(*c))
def test_sharded_equals_single_device(results, case):
  diffs = results[case_name(*case)]
  assert set(diffs) == set(SIGMA_BATCHES)
  for key, diff in diffs.items():
    assert diff <= (TOL_80 if 80.0 in SIGMA_BATCHES[key] else TOL), diffs


@pytest.mark.parametrize("denoiser", BIT_CASES)
def test_one_device_mesh_gives_the_same_bits(results, denoiser):
  assert results[f"bits-{denoiser}"] is True


@pytest.mark.parametrize("mesh,num,rows", [("4x2", 37, 10), ("8x1", 37, 5), ("8x1", 3, 1)])
def test_each_device_holds_its_shard_only(results, mesh, num, rows):
  info = results[f"shards-{mesh}-N{num}"]
  data_devices = int(mesh.split("x")[0])
  assert info["valid_rows"] == num
  assert info["global"] == [rows * data_devices, HEIGHT, WIDTH, CHANNELS]
  assert info["devices"] == DEVICES
  assert info["shapes"] == [[rows, HEIGHT, WIDTH, CHANNELS]]


@pytest.mark.parametrize("check,denoiser", [
    ("odd_batch", "empirical"), ("scalar_sigma", "empirical"), ("outer_jit", "empirical"),
    ("sample", "empirical"), ("odd_batch", "square_scheduled"), ("scalar_sigma", "square_scheduled")])
def test_sharded_denoiser_is_a_drop_in_denoiser(results, check, denoiser):
  """Any batch size, scalar σ, inside an outer jit and inside the sampler's scan (3 Heun steps from
  σ = 80, where the ODE amplifies rounding: 1e-5)."""
  assert results[f"{check}-{denoiser}"] <= (1e-5 if check == "sample" else TOL)


# --- single-device checks (this process) ---------------------------------------------------------

def test_padding_rows_get_no_weight_on_one_device():
  import jax
  import jax.numpy as jnp

  import pspc_jax as pj

  data, queries = _problem(11)
  padded = jnp.asarray(np.concatenate([data, np.zeros((5,) + data.shape[1:], np.uint8)]))
  kernels = (lambda z, s, d, **kw: pj.empirical_denoise(z, s, d, chunk_size=4, **kw),
             lambda z, s, d, **kw: pj.pspc_square_denoise(z, s, d, 3, chunk_size=4, **kw),
             lambda z, s, d, **kw: pj.pspc_square_denoise(z, s, d, 5, chunk_size=4, **kw))
  for kernel in kernels:
    with_padding = jax.jit(lambda z, s, d, kernel=kernel: kernel(z, s, d, valid_rows=11))
    without = jax.jit(kernel)
    for key, z in queries.items():
      sigma = jnp.asarray(SIGMA_BATCHES[key])
      np.testing.assert_allclose(with_padding(z, sigma, padded), without(z, sigma, jnp.asarray(data)),
                                 atol=TOL, rtol=0)


def test_shard_drops_the_pixel_major_copy():
  """The copy holds the unsharded dataset, so the sharded value streams its shard without it."""
  import jax
  import jax.numpy as jnp

  import pspc_jax as pj
  from pspc_jax import distributed
  from pspc_jax.denoisers.values import with_pixel_major

  data, queries = _problem(70)
  denoiser = pj.make_denoiser("pspc_square", data, patch_schedule=3, chunk_size=64)
  denoiser = with_pixel_major(denoiser)
  assert denoiser.data_major is not None
  sharded = distributed.shard(denoiser, distributed.make_mesh(1, 1))
  assert sharded.inner.data_major is None
  sigma = jnp.asarray(SIGMA_BATCHES["mixed"])
  np.testing.assert_allclose(sharded(queries["mixed"], sigma),
                             jax.jit(lambda d, z, s: d(z, s))(denoiser, queries["mixed"], sigma),
                             atol=TOL, rtol=0)


def test_mesh_specs_and_errors():
  import jax

  import pspc_jax as pj
  from pspc_jax import distributed

  assert distributed.mesh_from_spec(None) is None and distributed.mesh_from_spec("") is None
  mesh = distributed.mesh_from_spec("all")
  assert dict(mesh.shape) == {"batch": 1, "data": jax.device_count()}
  assert dict(distributed.mesh_from_spec("1x1").shape) == {"batch": 1, "data": 1}
  with pytest.raises(ValueError, match="cannot parse --devices"):
    distributed.mesh_from_spec("two")
  with pytest.raises(ValueError, match="cannot make a mesh"):
    distributed.make_mesh(jax.device_count() + 1)
  data, _ = _problem(5)
  with pytest.raises(ValueError, match="cannot shard a training set"):
    pj.build_denoiser("gaussian", data, mesh=mesh)
  with pytest.raises(ValueError, match="already sharded"):
    pj.shard(pj.build_denoiser("empirical", data, mesh=mesh), mesh)
  with pytest.raises(ValueError, match="patch_schedule"):
    pj.build_denoiser("pspc_square", data, mesh=mesh, patch_schedule=0)


if __name__ == "__main__":
  _worker(sys.argv[1])


def test_bin_sample_shards_over_devices(tmp_path):
  """bin/sample --devices=4x2 on 8 simulated devices gives the single-device samples."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
  outs = {}
  for name, extra in (("sharded", ["--devices=4x2"]), ("single", [])):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bin", "sample"), "--num_samples=3", "--steps=3",
         f"--outdir={tmp_path / name}", *extra], capture_output=True, text=True, env=env,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outs[name] = np.load(tmp_path / name / "samples.npz")["samples"]
  # Each denoiser call agrees within ~1e-6; the ODE carries that through 3 Heun steps (6 calls).
  np.testing.assert_allclose(outs["sharded"], outs["single"], atol=1e-4)
  bad = subprocess.run([sys.executable, os.path.join(REPO, "bin", "sample"), "--devices=3x5",
                        f"--outdir={tmp_path / 'bad'}"], capture_output=True, text=True, env=env,
                       timeout=300)
  assert bad.returncode == 2 and "cannot make a mesh" in bad.stderr
