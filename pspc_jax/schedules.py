"""Noise-level schedules: piecewise-constant maps σ → patch size (or Flex threshold) (docs/design.md §4).

A schedule is a grid of σ with one value per grid point; any other σ takes the value of the nearest grid
σ. The official PSPC release measures "nearest" linearly in σ; we default to nearest in log σ, which
splits the difference between neighbouring EDM grid points geometrically (the grid is nearly geometric),
and keep the linear rule available as `metric="linear"`.

Patch sizes apply to H×W images as min(s, H) × min(s, W) windows (`masks.SquareWindows`), so
s ≥ max(H, W) is the whole image; `patch_schedule_for` rescales the CIFAR-10 sizes to any H×W.

Schedules are hashable, static objects; `index(sigma)` works on traced σ inside `jax.jit`, and
`dispatch` turns one static-parameter denoiser per schedule value into a single `denoise(z, sigma)` that
accepts batches mixing noise levels (`dispatch_indexed` with any per-sample branch choice, e.g. the pair
(maps σ, λ) of PSPC-Flex, whose reachable pairs `reachable_pairs` lists). Command-line specs share one
grammar (`parse_schedule`): `parse_patch_schedule` for sizes, `parse_threshold_schedule` for λ.
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

from pspc_jax import conventions, validation
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

  def boundaries(self) -> np.ndarray:
    """The σ between adjacent grid points where the nearest grid σ changes (ascending, float64):
    geometric midpoints √(σ_a σ_b) for the log metric, arithmetic ones for the linear metric."""
    grid = np.unique(np.asarray(self.sigmas, np.float64))
    if self.metric == "log":
      return np.sqrt(grid[:-1] * grid[1:])
    return 0.5 * (grid[:-1] + grid[1:])

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
  with jax.ensure_compile_time_eval():  # concrete even when a schedule is built inside a trace
    grid = np.asarray(edm_sigmas(len(values)))[:-1]
  return SigmaSchedule(tuple(float(s) for s in grid), tuple(values), metric)


def cifar10_patch_schedule(metric: str = "log") -> SigmaSchedule:
  """The paper's CIFAR-10 PSPC-Square patch sizes."""
  return on_edm_grid(CIFAR10_PATCH_SIZES, metric)


def cifar10_flex_schedule(metric: str = "log") -> SigmaSchedule:
  """The paper's CIFAR-10 PSPC-Flex mass thresholds λ(σ) (floats)."""
  return on_edm_grid(tuple(float(v) for v in CIFAR10_FLEX_THRESHOLDS), metric)


def image_sides(shape) -> tuple[int, int]:
  """(H, W) from one side (square images) or an (H, W) pair; ValueError unless both are integers ≥ 1."""
  sides = (shape, shape) if np.ndim(shape) == 0 else tuple(shape)
  if len(sides) != 2:
    raise ValueError(f"image shape must be one side or (H, W), got {shape!r}")
  return (validation.positive_int(sides[0], "image height"),
          validation.positive_int(sides[1], "image width"))


def patch_schedule_for(shape, metric: str = "log") -> SigmaSchedule:
  """The CIFAR-10 patch schedule rescaled to H×W images (our heuristic, not the paper's).

  A patch size s applies to an H×W image as min(s, H) × min(s, W) windows (`masks.SquareWindows`), so
  s ≥ max(H, W) is the whole image. With side = min(H, W), a CIFAR-10 size s < 32 becomes the square
  clip(round(s · side / 32), min(3, side), side) (the smallest patches stay 3×3), and a full-image entry
  (s = 32) becomes max(H, W): the whole image, also on rectangles. On 32×32 images this is exactly the
  CIFAR-10 schedule.

  Args:
    shape: the image side (square images) or (H, W).
    metric: "log" or "linear" (see `SigmaSchedule`).
  """
  height, width = image_sides(shape)
  side = min(height, width)
  base = cifar10_patch_schedule(metric)
  full = max(CIFAR10_PATCH_SIZES)
  sizes = tuple(max(height, width) if s >= full
                else int(np.clip(round(s * side / full), min(3, side), side)) for s in base.values)
  return dataclasses.replace(base, values=sizes)


def parse_schedule(spec: str, *, value_type: Callable[[str], Any] = int,
                   named: dict[str, Callable[[str], SigmaSchedule]] | None = None,
                   what: str = "schedule") -> SigmaSchedule:
  """Builds a schedule from a command-line string (the shared grammar of the schedule flags).

  Accepted forms: a name in `named` ("cifar10", optionally with a ":log" or ":linear" suffix that picks
  the nearest-σ metric: `named[name](metric)`); a path to a JSON file written by
  `SigmaSchedule.to_json` (a spec ending in ".json" always names a file: "no such file" if absent);
  one value ("7", the same value at every σ); a comma-separated list of values, one per σ of the EDM
  grid of that many steps ("32,32,…,3"); "σ:value" pairs ("80:32,1:7,0.1:3").

  Args:
    spec: the string.
    value_type: converts one value (int for patch sizes, float for thresholds); raises ValueError.
    named: named schedules by name, each a function of the metric.
    what: what the schedule is, for error messages ("patch schedule").

  Raises:
    ValueError: with a one-line reason, for malformed specs.
  """
  spec = spec.strip()
  named = named or {}
  head, _, metric = spec.partition(":")
  if head in named:
    return named[head](metric or "log")
  if os.path.isfile(spec) or spec.lower().endswith(".json"):
    return _read_schedule_file(spec, value_type, what)
  try:
    if ":" in spec:
      pairs = [item.split(":") for item in spec.split(",")]
      return SigmaSchedule(tuple(float(s) for s, _ in pairs), tuple(value_type(v) for _, v in pairs))
    values = tuple(value_type(v) for v in spec.split(","))
    return SigmaSchedule((1.0,), values) if len(values) == 1 else on_edm_grid(values)
  except ValueError as err:
    names = "".join(f"'{name}', " for name in named)
    kind = "an integer" if value_type is int else "a number"
    raise ValueError(f"cannot parse {what} {spec!r} ({err}); expected {names}{kind}, a "
                     "comma-separated list, 'sigma:value' pairs or a JSON file") from None


def _read_schedule_file(path: str, value_type: Callable[[str], Any], what: str) -> SigmaSchedule:
  """The schedule of a JSON file written by `SigmaSchedule.to_json`, its values made `value_type`.

  Raises:
    ValueError: one line: no such file, unreadable, not JSON, or not {"sigmas": [...], "values": [...]}.
  """
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    raise ValueError(f"{what} file {path}: no such file") from None
  except (OSError, UnicodeDecodeError) as err:
    raise ValueError(f"{what} file {path}: cannot read it ({err})") from None
  try:
    schedule = SigmaSchedule.from_json(text)
    return dataclasses.replace(schedule, values=tuple(value_type(v) for v in schedule.values))
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"{what} file {path}: not a schedule, expected JSON {{\"sigmas\": [...], "
                     f"\"values\": [...]}} as bin/tune_schedule writes ({type(err).__name__}: "
                     f"{err})") from None


def parse_patch_schedule(spec: str, shape) -> SigmaSchedule:
  """Builds a patch-size schedule from a command-line string (`parse_schedule` grammar).

  Named forms: "auto" (CIFAR-10 schedule rescaled to the image, see `patch_schedule_for`) and "cifar10"
  (the paper's values, unscaled); otherwise integers ("7", a list on the EDM grid, "σ:s" pairs) or a
  JSON file. A size s means min(s, H) × min(s, W) windows, so max(H, W) is the whole image.

  Args:
    spec: the string.
    shape: the image side (square images) or (H, W).

  Raises:
    ValueError: with a one-line reason, for malformed specs and patch sizes outside [1, max(H, W)].
  """
  height, width = image_sides(shape)
  schedule = parse_schedule(spec, value_type=int, what="patch schedule",
                            named={"auto": lambda metric: patch_schedule_for((height, width), metric),
                                   "cifar10": cifar10_patch_schedule})
  largest = max(height, width)
  bad = [s for s in schedule.values if not 1 <= int(s) <= largest]
  if bad:
    raise ValueError(f"patch size {bad[0]} does not fit {height}×{width} images (patch sizes must be "
                     f"between 1 and {largest}, the whole image)")
  return schedule


def parse_threshold_schedule(spec: str) -> SigmaSchedule:
  """Builds a PSPC-Flex mass-threshold schedule λ(σ) from a command-line string.

  Named forms: "cifar10" (the paper's CIFAR-10 thresholds on the 18-step EDM grid) and "auto" (the
  same: λ is a fraction of sensitivity mass, so it does not depend on the image size); otherwise
  numbers ("0.5", "1,1,…,0.3" on the EDM grid, "80:1,1:0.5,0.01:0.3") or a JSON file.

  Raises:
    ValueError: with a one-line reason, for malformed specs and thresholds outside (0, 1].
  """
  schedule = parse_schedule(spec, value_type=float, what="threshold schedule",
                            named={"auto": cifar10_flex_schedule, "cifar10": cifar10_flex_schedule})
  check_thresholds(schedule)
  return schedule


def check_thresholds(schedule: SigmaSchedule) -> None:
  """Raises ValueError unless every λ of `schedule` is a number in (0, 1]."""
  bad = [v for v in schedule.values if not 0 < float(v) <= 1]
  if bad:
    raise ValueError(f"threshold {bad[0]} is outside (0, 1] (λ is a fraction of the sensitivity mass)")


def threshold_schedule(thresholds: "SigmaSchedule | float | str | None") -> SigmaSchedule:
  """A λ schedule from a SigmaSchedule, one number (every σ), a `parse_threshold_schedule` spec, or
  None (the CIFAR-10 schedule, log metric)."""
  if thresholds is None:
    return cifar10_flex_schedule()
  if isinstance(thresholds, str):
    return parse_threshold_schedule(thresholds)
  if not isinstance(thresholds, SigmaSchedule):
    thresholds = SigmaSchedule((1.0,), (float(thresholds),))
  check_thresholds(thresholds)
  return thresholds


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
  branch_of_entry = np.asarray([values.index(v) for v in schedule.values])
  return dispatch_indexed(lambda sigma: jnp.asarray(branch_of_entry)[schedule.index(sigma)],
                          [make_branch(v) for v in values])


def dispatch_indexed(branch_index: Callable[[jax.Array], jax.Array], branches: Sequence[Callable]
                     ) -> Callable:
  """`dispatch` with any per-sample branch choice: `branch_index(sigma (B,)) -> int (B,)` in
  [0, len(branches)); each branch `denoise(z, sigma)` runs under `lax.cond` when a sample selects it."""
  branches = list(branches)

  def denoise(z, sigma):
    sigma = conventions.sigma_per_sample(sigma, z.shape[0])
    if len(branches) == 1:
      return branches[0](z, sigma)
    which = branch_index(sigma)
    out = jnp.zeros(z.shape, jnp.float32)
    for j, branch in enumerate(branches):
      selected = (which == j)[:, None, None, None]
      out = lax.cond(jnp.any(selected),
                     lambda o, branch=branch, selected=selected: jnp.where(selected, branch(z, sigma), o),
                     lambda o: o, out)
    return out

  return denoise


def reachable_pairs(first: SigmaSchedule, second: SigmaSchedule) -> list[tuple[int, int]]:
  """The pairs (first.index(σ), second.index(σ)) that some σ ≥ 0 selects, sorted.

  Both schedules are piecewise constant between their boundaries, so every pair is seen at the grid
  points, the boundaries, and just either side of each boundary. The indices are computed by the same
  float32 `index` code as at run time, at each boundary and its 8 nearest float32 neighbours on either
  side (where float32 rounding moves a switch), so a σ where both switch at once is covered too.
  """
  points = [np.asarray(first.sigmas), np.asarray(second.sigmas), [0.0]]
  for bound in np.concatenate([first.boundaries(), second.boundaries()]):
    near = [np.float32(bound)]
    for direction in (np.float32(0), np.float32(np.inf)):
      value = np.float32(bound)
      for _ in range(8):
        value = np.nextafter(value, direction)
        near.append(value)
    points.append(np.asarray(near, np.float64))
  grid_max = max(max(first.sigmas), max(second.sigmas))
  points.append([2.0 * grid_max])
  sigma = np.concatenate([np.asarray(p, np.float64).ravel() for p in points]).astype(np.float32)
  with jax.ensure_compile_time_eval():
    a = np.asarray(first.index(sigma))
    b = np.asarray(second.index(sigma))
  return sorted(set(zip(a.tolist(), b.tolist())))
