"""Jitted entry points take the denoiser (and so the training set) as an argument: nothing of
dataset size is compiled into the program as a constant."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax.denoisers.values import apply_denoiser
from pspc_jax.data import load_dataset

LIMIT_BYTES = 1 << 20
_BYTES = {"ui8": 1, "i8": 1, "i1": 1, "f16": 2, "bf16": 2, "i16": 2, "f32": 4, "i32": 4, "ui32": 4,
          "f64": 8, "i64": 8, "ui64": 8}


def largest_constant_bytes(lowered) -> int:
  """Bytes of the largest `stablehlo.constant` of a lowered program."""
  largest = 0
  for line in lowered.as_text().splitlines():
    if "stablehlo.constant" not in line:
      continue
    match = re.search(r"tensor<([0-9x]*)x?([a-z]+[0-9]+)>\s*$", line.strip())
    if not match:
      continue
    dims = [int(d) for d in match.group(1).split("x") if d]
    largest = max(largest, int(np.prod(dims, dtype=np.int64)) * _BYTES.get(match.group(2), 4))
  return largest


@pytest.fixture(scope="module")
def data():
  digits = load_dataset("digits").images
  reps = -(-20_000 // len(digits))
  return jnp.asarray(np.concatenate([digits] * reps)[:20_000])  # 1.28 MB of uint8


def test_the_check_sees_a_closed_over_dataset(data):
  closed = jax.jit(lambda z: pj.empirical_denoise(z, 0.5, data)).lower(jnp.zeros((2, 8, 8, 1)))
  assert largest_constant_bytes(closed) >= data.size


@pytest.mark.parametrize("name", ["empirical", "pspc_square", "gaussian", "els", "cfdm"])
def test_jitted_sampler_compiles_no_dataset_constant(data, name):
  denoiser = pj.make_denoiser(name, data[:2000] if name == "gaussian" else data)
  run = jax.jit(lambda d, latents: pj.sample(d, latents, pj.edm_sigmas(4)))
  lowered = run.lower(denoiser, jnp.zeros((2, 8, 8, 1)))
  assert largest_constant_bytes(lowered) < LIMIT_BYTES


def test_evaluation_step_compiles_no_dataset_constant(data):
  denoiser = pj.make_denoiser("pspc_square", data)
  lowered = apply_denoiser.lower(denoiser, jnp.zeros((4, 8, 8, 1)), jnp.ones((4,)))
  assert largest_constant_bytes(lowered) < LIMIT_BYTES
