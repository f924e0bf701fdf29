"""Tests for the EDM training loss, schedules, data order, resume determinism and data parallelism.

The runs use `TinyNet`, a 169-parameter network with the call signature of `pspc_jax.nets`, registered
as the architecture "tiny" (this module's `build`) so that configs and checkpoints can name it.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspc_jax import checkpoints, nets, training
from pspc_jax.data import load_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"arch": "tiny", "features": 8}


class TinyNet(nn.Module):
  """conv → + embedding of the noise label → SiLU → dropout → conv; same call signature as nets."""
  channels: int = 1
  features: int = 8
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
    emb = nn.Dense(self.features)(noise_labels[:, None])
    h = nn.Conv(self.features, (3, 3))(x) + emb[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    return nn.Conv(self.channels, (3, 3))(h)


def build(**config):
  return TinyNet(**config)


PRESETS = {"tiny": TINY}


@pytest.fixture
def tiny_arch(monkeypatch):
  monkeypatch.setitem(nets._ARCH_MODULES, "tiny", __name__)


def _images(count=40):
  return load_dataset("digits", max_images=count).images


def _config(**overrides):
  base = dict(network=TINY, batch_size=8, lr=1e-2, warmup_steps=3, ema_halflife_kimg=0.02,
              xflip=True, seed=3)
  return training.TrainConfig(**{**base, **overrides})


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state,
                                                  state.step, state.rng))]


class Affine(nn.Module):
  """F(x, c) = a·x + c with a learnable scalar a: a network whose output is known in closed form."""

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
    return self.param("a", nn.initializers.constant(0.7), ()) * x + noise_labels[:, None, None, None]


def test_edm_loss_matches_hand_computation():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 3, 2))
  eps = rng.normal(size=x.shape)
  sigma = np.array([0.3, 2.0])
  module = Affine()
  params = module.init(jax.random.key(0), jnp.zeros((1, 3, 3, 2)), jnp.zeros((1,)))["params"]
  got = training.edm_loss(params, module, jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32),
                          jnp.asarray(eps, jnp.float32))

  sd, s = 0.5, sigma[:, None, None, None]
  z = x + s * eps
  c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2)
  c_in, c_noise = 1 / np.sqrt(s**2 + sd**2), np.log(s) / 4
  denoised = c_skip * z + c_out * (0.7 * c_in * z + c_noise)
  weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
  want = weight * ((denoised - x) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_noise_levels_and_flips():
  log_sigma = np.log(np.asarray(training.sample_sigmas(jax.random.key(1), 200_000, -1.2, 1.2)))
  assert abs(log_sigma.mean() + 1.2) < 0.01 and abs(log_sigma.std() - 1.2) < 0.01

  x = jnp.asarray(np.random.default_rng(0).normal(size=(400, 2, 5, 1)), jnp.float32)
  flipped = np.asarray(training.random_xflip(jax.random.key(2), x))
  mirrored = (flipped == np.asarray(x)[:, :, ::-1]).all(axis=(1, 2, 3))
  unchanged = (flipped == np.asarray(x)).all(axis=(1, 2, 3))
  assert (mirrored ^ unchanged).all() and 160 < mirrored.sum() < 240


def test_warmup_schedule_drives_adam():
  config = _config(lr=1e-3, warmup_steps=4)
  lrs = [float(training.learning_rate(config, k)) for k in range(6)]
  np.testing.assert_allclose(lrs, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  assert float(training.learning_rate(_config(lr=3e-4, warmup_steps=0), 0)) == pytest.approx(3e-4)

  # Adam's update with a constant gradient is -lr_k · g/(|g| + eps) ≈ -lr_k: the schedule is wired in.
  optimizer = training.make_optimizer(config)
  params = jnp.zeros(())
  state = optimizer.init(params)
  for k in range(6):
    updates, state = optimizer.update(jnp.ones(()), state, params)
    assert float(updates) == pytest.approx(-lrs[k], rel=1e-4)

  clipped = training.make_optimizer(_config(grad_clip=0.5, warmup_steps=0, lr=1.0, adam_eps=10.0))
  updates, _ = clipped.update(jnp.full((4,), 3.0), clipped.init(jnp.zeros(4)), jnp.zeros(4))
  # Clipped to global norm 0.5 (0.25 per entry), then Adam's first step 0.25 / (0.25 + 10).
  np.testing.assert_allclose(updates, -0.25 / 10.25, rtol=1e-5)


def test_ema_decay_and_update():
  config = _config(batch_size=100, ema_halflife_kimg=2.0, ema_rampup_ratio=None)
  beta = float(training.ema_beta(config, 1000))
  assert beta ** 20 == pytest.approx(0.5, rel=1e-5)  # 20 updates of 100 images = one half-life
  ramped = _config(batch_size=100, ema_halflife_kimg=2.0, ema_rampup_ratio=0.05)
  assert float(training.ema_beta(ramped, 0)) == 0.0  # the first EMA is the first params
  # After 40 updates (4,000 images) the half-life is capped at 200 images = 2 updates.
  assert float(training.ema_beta(ramped, 40)) == pytest.approx(0.5 ** 0.5, rel=1e-6)
  assert float(training.ema_beta(ramped, 10_000)) == pytest.approx(beta, rel=1e-6)
  assert float(training.ema_beta(_config(ema_decay=0.999), 0)) == pytest.approx(0.999)

  ema = {"w": jnp.array([1.0, 2.0])}
  new = training.ema_update(ema, {"w": jnp.array([3.0, 0.0])}, 0.75)
  np.testing.assert_allclose(new["w"], [1.5, 1.5])


def test_data_order_is_a_deterministic_epoch_stream():
  n, batch = 10, 4
  stream = np.concatenate([training.batch_indices(7, k, batch, n) for k in range(15)])  # 6 epochs
  for epoch in range(6):
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
  np.testing.assert_array_equal(stream[:n], training.epoch_permutation(7, 0, n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])
  # Batch 2 straddles epochs 0 and 1; any step can be computed alone, in any order.
  np.testing.assert_array_equal(training.batch_indices(7, 2, batch, n), stream[8:12])
  np.testing.assert_array_equal(training.batch_indices(7, 11, batch, n), stream[44:48])
  assert not np.array_equal(training.batch_indices(8, 0, batch, n), stream[:batch])
  big = training.batch_indices(0, 1, 25, n)  # a batch larger than the dataset spans 3 epochs
  assert big.shape == (25,) and np.bincount(big, minlength=n).min() >= 2


def test_interrupt_and_resume_is_bit_identical(tmp_path, tiny_arch):
  images, config = _images(), _config()
  straight = training.train(config, images, str(tmp_path / "a"), num_steps=8, checkpoint_every=4,
                            log_every=2)
  # "Crash" after 6 steps whose last checkpoint is step 4: the checkpoint of step 6 never happened.
  training.train(config, images, str(tmp_path / "b"), num_steps=6, checkpoint_every=4, log_every=2)
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  resumed = training.train(config, images, str(tmp_path / "b"), num_steps=8, checkpoint_every=4,
                           log_every=2)
  for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(resumed.step) == 8
  # The resumed log drops the lost steps 5-6 and then matches the uninterrupted one.
  losses = [[r["loss"] for r in training.read_metrics(tmp_path / d / "metrics.jsonl")] for d in "ab"]
  assert losses[0] == losses[1] and len(losses[0]) == 4
  for name in ("loss.png", "checkpoints/8"):
    assert (tmp_path / "b" / name).exists()

  with pytest.raises(ValueError, match="different configuration \\(lr\\)"):
    training.train(_config(lr=5e-3), images, str(tmp_path / "b"), num_steps=9)
  with pytest.raises(ValueError, match="different dataset"):
    training.train(config, _images(30), str(tmp_path / "b"), num_steps=9)


def test_train_rejects_bad_setups(tmp_path, tiny_arch):
  with pytest.raises(ValueError, match="maps images of shape \\(8, 8, 1\\) to \\(8, 8, 3\\)"):
    training.train(_config(network={**TINY, "channels": 3}), _images(), str(tmp_path), num_steps=1)
  with pytest.raises(ValueError, match="batch size must be >= 1"):
    _config(batch_size=0)
  with pytest.raises(ValueError, match="unknown network 'nope'"):
    training.resolve_network_config("nope")
  with pytest.raises(ValueError, match="bad network config: .*bogus"):
    training.resolve_network_config({**TINY, "bogus": 1})
  config_file = tmp_path / "net.json"
  config_file.write_text(json.dumps(TINY))
  assert training.resolve_network_config(str(config_file)) == TINY
  assert training.resolve_network_config(json.dumps(TINY)) == TINY


_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from pspc_jax import checkpoints, nets, training
    import test_training as t
    nets._ARCH_MODULES["tiny"] = "test_training"
    assert jax.device_count() == int(sys.argv[2])
    try:
      training.train(t._config(batch_size=12), t._images(), sys.argv[1] + "/odd", num_steps=1)
    except ValueError as err:
      print("REFUSED:", err)
    state = training.train(t._config(), t._images(), sys.argv[1] + "/run", num_steps=6, log_every=3)
    np.savez(sys.argv[1] + "/leaves.npz", *t._leaves(state))
""")


def _subprocess_env(cache_dir, **extra):
  """Environment of a child Python that can import this module and shares compiled programs with its
  siblings through a persistent compilation cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}/tests{os.pathsep}{REPO}",
              JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def _run_worker(folder, devices):
  env = _subprocess_env(folder / "jax-cache",
                        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  result = subprocess.run([sys.executable, "-c", _WORKER, str(folder), str(devices)],
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr
  with np.load(folder / "leaves.npz") as saved:
    return result.stdout, [saved[k] for k in saved.files]


def test_data_parallel_on_8_devices_matches_1_device(tmp_path, tiny_arch):
  (tmp_path / "8").mkdir()
  log, leaves8 = _run_worker(tmp_path / "8", 8)
  assert "training 6 steps on 8 device(s)" in log
  assert "REFUSED: the batch of 12 images cannot be split evenly over 8 devices" in log
  one = training.train(_config(), _images(), str(tmp_path / "1"), num_steps=6, log_every=3,
                       devices=jax.local_devices()[:1])
  for a, b in zip(_leaves(one), leaves8, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def _train_cli(workdir, steps):
  runner = ("import runpy, sys; from pspc_jax import nets; nets._ARCH_MODULES['tiny'] = 'test_training'; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
  args = [os.path.join(REPO, "bin", "train"), f"--network={json.dumps(TINY)}", "--max_images=40",
          f"--steps={steps}", "--batch=8", "--lr=0.01", "--warmup=3", "--ema_halflife=0.02", "--flip",
          "--checkpoint_every=3", "--sample_every=0", "--log_every=3", "--seed=3", f"--workdir={workdir}"]
  env = _subprocess_env(os.path.join(os.path.dirname(workdir), "jax-cache"))
  return subprocess.run([sys.executable, "-c", runner, *args], capture_output=True, text=True,
                        env=env, timeout=300)


def test_bin_train_resumes_bit_identically(tmp_path, tiny_arch):
  first = _train_cli(tmp_path / "run", 3)
  assert first.returncode == 0, first.stderr
  assert "step 3/3 loss" in first.stdout and (tmp_path / "run" / "loss.png").exists()
  second = _train_cli(tmp_path / "run", 6)
  assert second.returncode == 0, second.stderr
  assert "resuming from the checkpoint at step 3" in second.stdout

  straight = training.train(_config(), _images(), str(tmp_path / "lib"), num_steps=6)
  items = training._resume_items(straight)
  manager = checkpoints.open_manager(str(tmp_path / "run" / "checkpoints"))
  ema, rest = checkpoints.restore_checkpoint(manager, 6, ema_params=straight.ema_params,
                                             train_state=items)
  for a, b in zip(jax.tree.leaves((straight.ema_params, items)), jax.tree.leaves((ema, rest)),
                  strict=True):
    np.testing.assert_array_equal(a, b)

  bad = _train_cli(tmp_path / "other", 0)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
