"""`pspc_jax.convert` and `bin/convert`: public weights in, loadable checkpoints out."""

import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pspc_jax import checkpoints, convert
from pspc_jax.edm import EDMPrecond, VEPrecond, VPPrecond, preconditioning_record
from pspc_jax.nets.dit_convert import flax_to_dit_state
from pspc_jax.nets.precond import edm_denoiser
from test_dit import TINY, _unconditional_state, _write_safetensors, tiny
from test_edm_pickle import _edm_pickle, persistence  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same_params(a, b):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]))


def _bin_convert(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", "convert"), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def test_edm_pickle_converts_to_a_network_that_denoises_like_the_original(tmp_path, persistence):
  data, params = _edm_pickle(tmp_path, "numpy", 4)
  source = tmp_path / "edm-tiny.pkl"
  source.write_bytes(data)
  meta = convert.convert(source, tmp_path / "ckpt")
  assert meta["image_shape"] == [8, 8, 1] and meta["sigma_data"] == 0.5
  assert meta["extra"]["source"] == "edm-tiny.pkl" and len(meta["extra"]["sha256"]) == 64
  assert meta["extra"]["num_params"] == sum(np.size(p) for p in traverse_util.flatten_dict(params).values())
  module, loaded, _ = checkpoints.load_network(tmp_path / "ckpt")
  _assert_same_params(loaded, params)
  z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
  sigma = jnp.array([0.1, 3.0])
  np.testing.assert_array_equal(edm_denoiser(module, loaded)(z, sigma),
                                edm_denoiser(module, params)(z, sigma))
  with pytest.raises(ValueError, match="already exists"):
    convert.convert(source, tmp_path / "ckpt")
  with pytest.raises(ValueError, match="records its own network"):
    convert.convert(source, tmp_path / "other", network=TINY)


@pytest.mark.parametrize("class_name, precond", [("VPPrecond", VPPrecond()), ("VEPrecond", VEPrecond())])
def test_vp_and_ve_baselines_convert_with_their_preconditioning(tmp_path, persistence, class_name,
                                                                precond):
  data, params = _edm_pickle(tmp_path, "numpy", 4, precond=class_name)
  source = tmp_path / "baseline.pkl"
  source.write_bytes(data)
  meta = convert.convert(source, tmp_path / "ckpt")
  assert "sigma_data" not in meta and meta["preconditioning"] == preconditioning_record(precond)
  assert meta["extra"]["precond"]["class_name"] == class_name
  module, loaded, meta = checkpoints.load_network(tmp_path / "ckpt")
  assert checkpoints.preconditioning(meta) == precond
  z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
  sigma = jnp.array([0.1, 3.0])
  np.testing.assert_array_equal(edm_denoiser(module, loaded, precond=precond)(z, sigma),
                                edm_denoiser(module, params, precond=precond)(z, sigma))
  # A training-run export keeps the preconditioning of the checkpoint it reads.
  exported = convert.export_training_run(tmp_path / "ckpt", tmp_path / "again")
  assert checkpoints.preconditioning(exported) == precond


def test_network_denoiser_of_a_converted_baseline_uses_its_preconditioning(tmp_path, persistence):
  from pspc_jax import NetworkDenoiser, build_denoiser
  data, params = _edm_pickle(tmp_path, "numpy", 4, precond="VPPrecond")
  source = tmp_path / "baseline-vp.pkl"
  source.write_bytes(data)
  convert.convert(source, tmp_path / "ckpt")
  images = np.zeros((2, 8, 8, 1), np.uint8)
  denoiser = build_denoiser("network", images, checkpoint=str(tmp_path / "ckpt"))
  assert isinstance(denoiser, NetworkDenoiser) and denoiser.precond == VPPrecond()
  module, _, _ = checkpoints.load_network(tmp_path / "ckpt")
  z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
  sigma = jnp.array([0.1, 3.0])
  got = np.asarray(jax.jit(lambda d, z, s: d(z, s))(denoiser, z, sigma))
  want = np.asarray(edm_denoiser(module, params, precond=VPPrecond())(z, sigma))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(got - np.asarray(edm_denoiser(module, params)(z, sigma))).max() > 0.1  # not EDM's


def test_sidecar_preconditioning_is_checked(tmp_path):
  assert checkpoints.preconditioning({"sigma_data": 0.3}) == EDMPrecond(0.3)
  with pytest.raises(ValueError, match="ckpt: the sidecar records no preconditioning"):
    checkpoints.preconditioning({}, "ckpt")
  with pytest.raises(ValueError, match="ckpt: invalid preconditioning in the sidecar: unknown fields"):
    checkpoints.preconditioning({"preconditioning": {"name": "vp", "beta": 1}}, "ckpt")


def test_dit_safetensors_convert_and_need_a_network(tmp_path):
  _, params, *_ = tiny()
  state = {key: ("F32", np.asarray(value, "<f4")) for key, value in flax_to_dit_state(params, TINY).items()}
  source = tmp_path / "dit.safetensors"
  _write_safetensors(source, state)
  with pytest.raises(ValueError, match="does not record its architecture"):
    convert.convert(source, tmp_path / "ckpt")
  meta = convert.convert(source, tmp_path / "ckpt", network=TINY, sigma_data=0.6)
  assert meta["image_shape"] == [8, 8, 3] and meta["sigma_data"] == 0.6
  assert meta["extra"]["converter"] == "dit_state_dict"
  _, loaded, _ = checkpoints.load_network(tmp_path / "ckpt", image_shape=(8, 8, 3))
  _assert_same_params(loaded, params)


def test_unconditional_dit_with_a_null_class_row_converts_when_folded(tmp_path):
  state, params, table, config = _unconditional_state(1)
  source = tmp_path / "dit.safetensors"
  _write_safetensors(source, {key: ("F32", np.asarray(value, "<f4")) for key, value in state.items()})
  with pytest.raises(ValueError, match="--fold_null_class"):
    convert.convert(source, tmp_path / "refused", network=config)
  assert not (tmp_path / "refused").exists()
  meta = convert.convert(source, tmp_path / "ckpt", network=config, fold_null_class=True)
  assert meta["extra"]["fold_null_class"] is True
  _, loaded, _ = checkpoints.load_network(tmp_path / "ckpt")
  np.testing.assert_allclose(loaded["t_embedder"]["mlp_2"]["bias"],
                             params["t_embedder"]["mlp_2"]["bias"] + table[0], rtol=1e-6)


def test_empty_and_foreign_pickles_are_refused(tmp_path):
  empty = tmp_path / "empty.pkl"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty.pkl: cannot read it as an EDM pickle: the file is empty"):
    convert.convert(empty, tmp_path / "ckpt")
  foreign = tmp_path / "foreign.pkl"
  foreign.write_bytes(pickle.dumps({"ema": {"weights": np.zeros(2)}}))
  with pytest.raises(ValueError, match="the entry 'ema' holds a dict with keys 'weights'$"):
    convert.convert(foreign, tmp_path / "ckpt")
  assert not (tmp_path / "ckpt").exists()


def test_bad_sources_are_refused(tmp_path):
  weights = tmp_path / "weights.bin"
  weights.write_bytes(b"0")
  with pytest.raises(ValueError, match="unknown weights format"):
    convert.convert(weights, tmp_path / "ckpt")
  with pytest.raises(ValueError, match="no such file"):
    convert.convert(tmp_path / "missing.pkl", tmp_path / "ckpt")
  hostile = tmp_path / "hostile.pkl"
  hostile.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
  with pytest.raises(ValueError, match="refusing"):
    convert.convert(hostile, tmp_path / "ckpt")
  assert not (tmp_path / "ckpt").exists()


def test_bin_convert_end_to_end(tmp_path, persistence):
  data, _ = _edm_pickle(tmp_path, "numpy", 4)
  source = tmp_path / "edm-tiny.pkl"
  source.write_bytes(data)
  result = _bin_convert(f"--source={source}", f"--outdir={tmp_path / 'ckpt'}")
  assert result.returncode == 0, result.stderr
  assert "converted edm-tiny.pkl" in result.stdout and "--denoiser=network" in result.stdout
  again = _bin_convert(f"--source={source}", f"--outdir={tmp_path / 'ckpt'}")
  assert again.returncode == 2 and "already exists" in again.stderr
  assert "Traceback" not in again.stderr


def test_bin_convert_reports_a_baseline_preconditioning(tmp_path, persistence):
  data, _ = _edm_pickle(tmp_path, "numpy", 4, precond="VEPrecond")
  source = tmp_path / "baseline-ve.pkl"
  source.write_bytes(data)
  result = _bin_convert(f"--source={source}", f"--outdir={tmp_path / 'ckpt'}")
  assert result.returncode == 0, result.stderr
  assert "converted baseline-ve.pkl" in result.stdout
  assert "VEPrecond(sigma_min=0.02, sigma_max=100.0)" in result.stdout


def test_training_run_exports_its_ema_weights_only(tmp_path, monkeypatch):
  import test_training as tt
  from pspc_jax import nets, training
  monkeypatch.setitem(nets._ARCH_MODULES, "tiny", tt.__name__)
  state = training.train(tt._config(), tt._images(), str(tmp_path / "run"), num_steps=3,
                         checkpoint_every=1, sample_every=None)
  meta = convert.convert(tmp_path / "run", tmp_path / "export")
  assert not (tmp_path / "export" / "train_state").exists()
  assert meta["extra"]["step"] == 3 and meta["extra"]["train"] == tt._config().to_json()
  _, params, _ = checkpoints.load_network(tmp_path / "export")
  _assert_same_params(params, state.ema_params)
  with pytest.raises(ValueError, match="records its own network"):
    convert.convert(tmp_path / "run", tmp_path / "other", network=TINY)
