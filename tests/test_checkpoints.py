"""Tests for orbax checkpoints: rotation, atomic saves, network loading, the "network" denoiser."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_training as tt
from pspc_jax import checkpoints, nets, training
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.registry import make_denoiser
from pspc_jax.nets.precond import precond_apply

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_UNET = {"arch": "songunet", "img_resolution": 8, "in_channels": 1, "model_channels": 8,
              "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@pytest.fixture
def tiny_arch(monkeypatch):
  monkeypatch.setitem(nets._ARCH_MODULES, "tiny", tt.__name__)


def _random_params(module, seed=0):
  """Normal(0, 0.3) parameters of the right shapes, without compiling the network's initialiser."""
  shapes = jax.eval_shape(lambda: training.init_params(module, (8, 8, 1), jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def _tiny_params():
  return _random_params(tt.TinyNet(features=8))


def test_training_checkpoints_rotate_and_load(tmp_path, tiny_arch):
  state = training.train(tt._config(), tt._images(), str(tmp_path), num_steps=5, checkpoint_every=1,
                         keep_checkpoints=2, sample_every=4, num_samples=4, sample_steps=2)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]
  assert sorted(os.listdir(tmp_path / "samples")) == ["00000004.png", "00000005.png"]
  for where in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "5"):
    module, params, meta = checkpoints.load_network(str(where))
    assert module == tt.TinyNet(features=8)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params), strict=True):
      np.testing.assert_array_equal(a, b)
  assert meta["step"] == 5 and meta["image_shape"] == [8, 8, 1] and meta["network"] == tt.TINY
  assert meta["train"] == tt._config().to_json() and meta["dataset"]["num_images"] == 40
  assert checkpoints.read_meta(str(tmp_path / "checkpoints" / "4"))["step"] == 4


_CRASH = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from pspc_jax import checkpoints
    meta = {"network": {"arch": "tiny"}, "image_shape": [8, 8, 1], "sigma_data": 0.5}
    manager = checkpoints.open_manager(sys.argv[1])
    checkpoints.save_checkpoint(manager, 1, ema_params={"w": jnp.ones(3)}, train_state={"s": jnp.ones(2)},
                                meta=meta)
    async def crash(*args, **kwargs):  # the process dies after the arrays, before the sidecar
      os._exit(3)
    ocp.JsonCheckpointHandler._save_fn = crash
    checkpoints.save_checkpoint(manager, 2, ema_params={"w": jnp.zeros(3)},
                                train_state={"s": jnp.zeros(2)}, meta=meta)
""")


def test_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path):
  root = tmp_path / "checkpoints"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  crashed = subprocess.run([sys.executable, "-c", _CRASH, str(root)], capture_output=True, text=True,
                           env=env, timeout=120)
  assert crashed.returncode == 3, crashed.stderr
  assert sorted(os.listdir(root)) == ["1", "2.orbax-checkpoint-tmp"]
  assert checkpoints.find_checkpoint(str(root)) == str(root / "1")

  manager = checkpoints.open_manager(str(root))
  assert manager.latest_step() == 1
  ema, rest = checkpoints.restore_checkpoint(manager, 1, ema_params={"w": jnp.zeros(3)},
                                             train_state={"s": jnp.zeros(2)})
  np.testing.assert_array_equal(ema["w"], np.ones(3))
  np.testing.assert_array_equal(rest["s"], np.ones(2))
  manager.close()
  assert sorted(os.listdir(root)) == ["1"]  # the next manager removed the partial save


def test_network_denoiser_matches_the_preconditioned_network(tmp_path, tiny_arch):
  params = _tiny_params()
  checkpoints.save_params(str(tmp_path / "net"), params, tt.TINY, {"source": "test"},
                          image_shape=(8, 8, 1))
  data = jnp.asarray(tt._images())
  denoise = build_denoiser("network", data, checkpoint=str(tmp_path / "net"))
  z = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  sigma = jnp.array([0.05, 1.0, 30.0])  # one batch, three noise levels
  want = precond_apply(tt.TinyNet(features=8), params, z, sigma)
  np.testing.assert_allclose(denoise(z, sigma), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(denoise(z, 1.0)[1], want[1], rtol=1e-5, atol=1e-6)
  meta = checkpoints.read_meta(str(tmp_path / "net"))
  assert meta["extra"] == {"source": "test"} and meta["format"] == checkpoints.FORMAT_VERSION

  with pytest.raises(ValueError, match="already exists"):
    checkpoints.save_params(str(tmp_path / "net"), params, tt.TINY, image_shape=(8, 8, 1))


def test_bad_checkpoints_give_clear_errors(tmp_path, tiny_arch):
  data = jnp.asarray(tt._images())
  with pytest.raises(ValueError, match="needs a checkpoint"):
    make_denoiser("network", data)
  with pytest.raises(ValueError, match="does not exist"):
    build_denoiser("network", data, checkpoint=str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no pspc_jax checkpoint in"):
    checkpoints.load_network(str(tmp_path / "empty"))

  checkpoints.save_params(str(tmp_path / "net"), _tiny_params(), tt.TINY, image_shape=(8, 8, 1))
  rgb = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  with pytest.raises(ValueError, match=r"is for images of shape \(8, 8, 1\), not \(8, 8, 3\)"):
    build_denoiser("network", rgb, checkpoint=str(tmp_path / "net"))

  sidecar = tmp_path / "net" / "meta" / "metadata"
  meta = json.loads(sidecar.read_text())
  sidecar.write_text(json.dumps({**meta, "format": 99}))
  with pytest.raises(ValueError, match="format 99 is newer"):
    checkpoints.load_network(str(tmp_path / "net"))
  sidecar.write_text("{not json")
  with pytest.raises(ValueError, match="cannot read checkpoint"):
    checkpoints.load_network(str(tmp_path / "net"))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_data_files_give_one_clear_error(tmp_path, tiny_arch, damage):
  checkpoints.save_params(str(tmp_path / "net"), _tiny_params(), tt.TINY, image_shape=(8, 8, 1))
  # TensorStore's data files: the arrays and their zarr metadata.
  for path in (tmp_path / "net" / "ema_params").glob("**/d/*"):
    if damage == "delete":
      os.remove(path)
    else:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match=r"cannot read checkpoint .* \(damaged or incomplete\): "
                                       r"\w+: Error (reading|opening)") as err:
    build_denoiser("network", jnp.asarray(tt._images()), checkpoint=str(tmp_path / "net"))
  assert "\n" not in str(err.value)


def _tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", args[0]), *args[1:]],
                        capture_output=True, text=True, env=env, timeout=300)


def test_bin_sample_and_denoise_with_a_songunet_checkpoint(tmp_path):
  params = _random_params(nets.make_network(SMALL_UNET))
  checkpoints.save_params(str(tmp_path / "unet"), params, SMALL_UNET, image_shape=(8, 8, 1))

  sampled = _tool("sample", "--denoiser=network", f"--checkpoint={tmp_path / 'unet'}", "--seeds=0-1",
                  "--steps=2", f"--outdir={tmp_path / 'samples'}")
  assert sampled.returncode == 0, sampled.stderr
  with np.load(tmp_path / "samples" / "samples.npz") as saved:
    assert saved["samples"].shape == (2, 8, 8, 1) and np.isfinite(saved["samples"]).all()

  missing = _tool("denoise", "--denoisers=network,gaussian", f"--checkpoint={tmp_path / 'nothing'}",
                  f"--outdir={tmp_path / 'denoised'}")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1] == (
      f"error: checkpoint {tmp_path / 'nothing'} does not exist")


def test_committed_digits_baseline_denoises_digits():
  from pspc_jax.data import load_dataset
  digits = load_dataset("digits").images
  denoise = build_denoiser("network", digits,
                           checkpoint=os.path.join(REPO, "checkpoints", "digits_ddpmpp_small"))
  x = jnp.asarray(digits[:8], jnp.float32) / 127.5 - 1
  noise = jax.random.normal(jax.random.key(0), x.shape)
  sigma = jnp.array([0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0])
  out = denoise(x + sigma[:, None, None, None] * noise, sigma)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  # Trained: far better than returning z at small σ, and about the dataset mean at large σ.
  err = jnp.mean((out - x) ** 2, axis=(1, 2, 3))
  data_mean = jnp.mean(jnp.asarray(digits, jnp.float32) / 127.5 - 1, axis=0)
  mean_err = jnp.mean((data_mean - x) ** 2, axis=(1, 2, 3))
  assert bool(jnp.all(err[:4] < 0.6 * sigma[:4] ** 2)), err
  assert bool(jnp.all(err[4:] < 1.1 * mean_err[4:])), (err, mean_err)
