"""Noise-level schedules: piecewise-constant maps σ → patch size (or Flex threshold) (DESIGN §4).

A schedule is a grid of σ with one value per grid point; any other σ takes the value of the nearest grid
σ. The official PSPC release measures "nearest" linearly in σ; we default to nearest in log σ, which
splits the difference between neighbouring EDM grid points geometrically (the grid is nearly geometric),
and keep the linear rule available as `metric="linear"`.

Schedules are hashable, static objects; `index(sigma)` works on traced σ inside `jax.jit`, and
`dispatch` turns one static-parameter denoiser per schedule value into a single `denoise(z, sigma)` that
accepts batches mixing noise levels.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pspc_jax import images
from pspc_jax.edm import edm_sigmas

# CIFAR-10 (32×32) patch size per σ of the 18-step EDM grid (σ = 80 … 0.002), from the official release.
CIFAR10_PATCH_SIZES = (32, 32, 32, 32, 32, 32, 32, 23, 15, 11, 7, 5, 3, 3, 3, 3, 3, 3)
# CIFAR-10 PSPC-Flex mass threshold λ per σ of the same grid.
CIFAR10_FLEX_THRESHOLDS = (1, 1, 1, 1, 1, 1, 1, 0.7, 0.7, 0.5, 0.4, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3)
# Square patch sizes swept in the paper.
PAPER_PATCH_SIZES = (3, 5, 7, 9, 11, 15, 19, 23, 27, 32)

METRICS = ("log", "linear")


@dataclasses.dataclass(frozen=True)
class SigmaSchedule:
  """σ → value, piecewise constant around a grid.

  Attributes:
    sigmas: grid noise levels (> 0), any order.
    values: one value per grid σ (ints for patch sizes, floats for thresholds).
    metric: "log" (nearest grid σ in log σ, default) or "linear" (nearest in σ, as the official code).
  """
  sigmas: tuple[float, ...]
  values: tuple[Any, ...]
  metric: str = "log"

  def __post_init__(self):
    if len(self.sigmas) != len(self.values) or not self.sigmas:
      raise ValueError(f"a schedule needs one value per grid σ, got {len(self.sigmas)} σ and "
                       f"{len(self.values)} values")
    if min(self.sigmas) <= 0:
      raise ValueError("schedule grid σ must be positive")
    if self.metric not in METRICS:
      raise ValueError(f"unknown schedule metric {self.metric!r}; use one of {METRICS}")

  def index(self, sigma) -> jax.Array:
    """Index of the nearest grid σ for each entry of `sigma` (any shape, traceable)."""
    grid = jnp.asarray(self.sigmas, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)[..., None]
    if self.metric == "log":
      gap = jnp.abs(jnp.log(jnp.maximum(sigma, 1e-30)) - jnp.log(grid))
    else:
      gap = jnp.abs(sigma - grid)
    return jnp.argmin(gap, axis=-1)

  def __call__(self, sigma: float):
    """The value for one concrete σ."""
    return self.values[int(self.index(float(sigma)))]

  @property
  def distinct_values(self) -> tuple:
    return tuple(sorted(set(self.values)))

  def to_json(self) -> str:
    return json.dumps({"sigmas": list(self.sigmas), "values": list(self.values),
                       "metric": self.metric}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> "SigmaSchedule":
    spec = json.loads(text)
    return cls(tuple(float(s) for s in spec["sigmas"]), tuple(spec["values"]),
               spec.get("metric", "log"))


def on_edm_grid(values: Sequence, metric: str = "log") -> SigmaSchedule:
  """A schedule with one value per σ of the len(values)-step EDM grid (σ_max 80 … σ_min 0.002)."""
  grid = np.asarray(edm_sigmas(len(values)))[:-1]
  return SigmaSchedule(tuple(float(s) for s in grid), tuple(values), metric)


def cifar10_patch_schedule(metric: str = "log") -> SigmaSchedule:
  """The paper's CIFAR-10 PSPC-Square patch sizes."""
  return on_edm_grid(CIFAR10_PATCH_SIZES, metric)


def patch_schedule_for(side: int, metric: str = "log") -> SigmaSchedule:
  """The CIFAR-10 patch schedule rescaled to images of side `side` (our heuristic, not the paper's).

  s ↦ clip(round(s · side / 32), min(3, side), side): full-image entries stay full-image and the
  smallest patches stay 3×3. On 32×32 images this is exactly the CIFAR-10 schedule.
  """
  base = cifar10_patch_schedule(metric)
  low = min(3, side)
  sizes = tuple(int(np.clip(round(s * side / 32), low, side)) for s in base.values)
  return dataclasses.replace(base, values=sizes)


def parse_patch_schedule(spec: str, side: int) -> SigmaSchedule:
  """Builds a patch-size schedule from a command-line string.

  Accepted forms: "auto" (CIFAR-10 schedule rescaled to `side`, see `patch_schedule_for`); "cifar10"
  (the paper's values, unscaled); one integer ("7", the same size at every σ); a comma-separated list
  of integers, one per σ of the EDM grid of that many steps ("32,32,…,3"); "σ:s" pairs
  ("80:32,1:7,0.1:3"); a path to a JSON file written by `SigmaSchedule.to_json`. A ":log" or ":linear"
  suffix on "auto"/"cifar10" picks the nearest-σ metric.

  Raises:
    ValueError: with a one-line reason, for malformed specs and patch sizes outside [1, side].
  """
  spec = spec.strip()
  head, _, metric = spec.partition(":")
  if head == "auto":
    schedule = patch_schedule_for(side, metric or "log")
  elif head == "cifar10":
    schedule = cifar10_patch_schedule(metric or "log")
  elif os.path.isfile(spec):
    with open(spec) as f:
      schedule = SigmaSchedule.from_json(f.read())
  else:
    try:
      if ":" in spec:
        pairs = [item.split(":") for item in spec.split(",")]
        schedule = SigmaSchedule(tuple(float(s) for s, _ in pairs), tuple(int(v) for _, v in pairs))
      else:
        sizes = tuple(int(v) for v in spec.split(","))
        schedule = (SigmaSchedule((1.0,), sizes) if len(sizes) == 1 else on_edm_grid(sizes))
    except ValueError as err:
      raise ValueError(f"cannot parse patch schedule {spec!r} ({err}); expected 'auto', 'cifar10', "
                       "an integer, a comma-separated list, 'sigma:size' pairs or a JSON file") from None
  bad = [s for s in schedule.values if not 1 <= int(s) <= side]
  if bad:
    raise ValueError(f"patch size {bad[0]} does not fit {side}×{side} images "
                     f"(patch sizes must be between 1 and {side})")
  return schedule


def dispatch(schedule: SigmaSchedule, make_branch: Callable[[Any], Callable]) -> Callable:
  """One `denoise(z, sigma)` from one denoiser per distinct schedule value.

  Each sample uses the branch of its own σ. A branch runs (under `lax.cond`, so only at run time when
  needed) on the whole batch if any sample needs it; a batch at a single σ costs one branch.

  Args:
    schedule: σ → value.
    make_branch: value → `denoise(z, sigma)` specialised to that (static) value.

  Returns:
    `denoise(z, sigma)` with z (B, H, W, C) and sigma a scalar or (B,).
  """
  values = schedule.distinct_values
  branches = [make_branch(v) for v in values]
  branch_of_entry = np.asarray([values.index(v) for v in schedule.values])

  def denoise(z, sigma):
    sigma = images.sigma_per_sample(sigma, z.shape[0])
    which = jnp.asarray(branch_of_entry)[schedule.index(sigma)]
    if len(branches) == 1:
      return branches[0](z, sigma)
    out = jnp.zeros(z.shape, jnp.float32)
    for j, branch in enumerate(branches):
      selected = (which == j)[:, None, None, None]
      out = lax.cond(jnp.any(selected),
                     lambda o, branch=branch, selected=selected: jnp.where(selected, branch(z, sigma), o),
                     lambda o: o, out)
    return out

  return denoise
