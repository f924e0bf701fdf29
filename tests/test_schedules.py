"""Patch-size schedules: the paper's CIFAR-10 values, nearest-σ rules, parsing and dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pspc_jax as pj
from pspc_jax import schedules


def test_cifar10_schedule_reproduces_paper_values_on_the_edm_grid():
  schedule = pj.cifar10_patch_schedule()
  grid = np.asarray(pj.edm_sigmas(18))[:-1]
  assert [schedule(s) for s in grid] == list(schedules.CIFAR10_PATCH_SIZES)
  assert schedule(80.0) == 32 and schedule(0.002) == 3 and schedule(0.0) == 3


def test_log_and_linear_metrics_differ_between_grid_points():
  grid = pj.SigmaSchedule((1.0, 10.0), (3, 7))
  linear = pj.SigmaSchedule((1.0, 10.0), (3, 7), metric="linear")
  # 4 is nearer 1 linearly but nearer 10 in log σ (log-midpoint is √10 ≈ 3.16).
  assert grid(4.0) == 7 and linear(4.0) == 3
  assert grid(3.0) == 3 and linear(6.0) == 7


def test_index_is_traceable_and_vectorised():
  schedule = pj.cifar10_patch_schedule()
  sigma = jnp.array([80.0, 0.5, 0.002])
  idx = jax.jit(schedule.index)(sigma)
  assert [schedule.values[i] for i in idx.tolist()] == [schedule(80.0), schedule(0.5), schedule(0.002)]


def test_rescaled_schedule_keeps_full_image_and_3x3_ends():
  assert pj.patch_schedule_for(32).values == schedules.CIFAR10_PATCH_SIZES
  small = pj.patch_schedule_for(8).values
  assert small[0] == 8 and small[-1] == 3 and max(small) == 8
  assert list(small) == sorted(small, reverse=True)


@pytest.mark.parametrize("spec,expected", [
    ("7", {80.0: 7, 0.002: 7}),
    ("80:32,1:7,0.01:3", {50.0: 32, 1.2: 7, 0.002: 3}),
    ("cifar10:linear", {80.0: 32, 0.002: 3}),
])
def test_parse_patch_schedule(spec, expected):
  schedule = pj.parse_patch_schedule(spec, 32)
  for sigma, size in expected.items():
    assert schedule(sigma) == size


def test_parse_list_on_edm_grid_and_json_roundtrip(tmp_path):
  values = ",".join(str(v) for v in schedules.CIFAR10_PATCH_SIZES)
  schedule = pj.parse_patch_schedule(values, 32)
  assert schedule == pj.cifar10_patch_schedule()
  path = tmp_path / "s.json"
  path.write_text(schedule.to_json())
  assert pj.parse_patch_schedule(str(path), 32) == schedule


@pytest.mark.parametrize("spec,message", [("40", "does not fit"), ("3,x", "cannot parse"),
                                          ("cifar10", "does not fit")])
def test_parse_rejects_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    pj.parse_patch_schedule(spec, 16)


def test_dispatch_routes_each_sample_to_its_branch():
  schedule = pj.SigmaSchedule((10.0, 1.0, 0.1), (1, 2, 3))
  denoise = schedules.dispatch(schedule, lambda v: (lambda z, s: z * v))
  z = jnp.ones((4, 2, 2, 1))
  out = jax.jit(denoise)(z, jnp.array([12.0, 0.9, 0.09, 10.0]))
  assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, 1.0]


def test_flex_threshold_schedules_parse_like_patch_schedules(tmp_path):
  cifar = pj.parse_threshold_schedule("cifar10")
  grid = np.asarray(pj.edm_sigmas(18))[:-1]
  assert [cifar(s) for s in grid] == [float(v) for v in schedules.CIFAR10_FLEX_THRESHOLDS]
  assert cifar == pj.cifar10_flex_schedule() and pj.parse_threshold_schedule("auto") == cifar
  assert pj.parse_threshold_schedule("cifar10:linear").metric == "linear"
  assert pj.parse_threshold_schedule("0.5")(80.0) == 0.5
  pairs = pj.parse_threshold_schedule("80:1,1:0.5,0.01:0.3")
  assert (pairs(50.0), pairs(1.2), pairs(0.002)) == (1.0, 0.5, 0.3)
  assert pj.parse_threshold_schedule(",".join(map(str, schedules.CIFAR10_FLEX_THRESHOLDS))) == cifar
  path = tmp_path / "lambda.json"
  path.write_text(cifar.to_json())
  assert pj.parse_threshold_schedule(str(path)) == cifar
  assert schedules.threshold_schedule(0.7) == pj.SigmaSchedule((1.0,), (0.7,))
  assert schedules.threshold_schedule(None) == cifar


@pytest.mark.parametrize("spec,message", [("1.5", r"threshold 1.5 is outside \(0, 1\]"),
                                          ("80:1,1:0", "threshold 0.0 is outside"),
                                          ("0.5,x", "cannot parse threshold schedule")])
def test_parse_threshold_schedule_rejects_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    pj.parse_threshold_schedule(spec)


def test_boundaries_are_geometric_or_arithmetic_midpoints():
  np.testing.assert_allclose(pj.SigmaSchedule((10.0, 0.1, 1.0), (1, 2, 3)).boundaries(),
                             [np.sqrt(0.1), np.sqrt(10.0)])
  np.testing.assert_allclose(pj.SigmaSchedule((10.0, 2.0), (1, 2), metric="linear").boundaries(), [6.0])
