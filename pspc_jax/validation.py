"""Argument checks of the Python API: each raises ValueError naming the argument and what was expected.

One helper per concern, shared by the denoisers, the registry and the sampler. Only *concrete* values
can be inspected: Python numbers, NumPy arrays and jax Arrays outside a trace. Under `jax.jit`,
`jax.grad`, `jax.vmap` or `jax.shard_map` values are tracers, and only their dtypes and shapes (which
are static) are checked; what a traced bad value then does is documented where it matters (σ:
`conventions.sigma_per_sample` makes the output NaN).
"""

from __future__ import annotations

import operator
import weakref

import jax
import jax.numpy as jnp
import numpy as np

# Slack on the [-1, 1] range of float training images, for values rounded by other conversions.
DATA_RANGE_TOLERANCE = 1e-3

DATA_EXPECTED = "uint8 in [0, 255] or float in [-1, 1]"

# jax Arrays (immutable) whose value range `check_data` has already accepted: id → weak reference.
_ACCEPTED_DATA: dict[int, weakref.ref] = {}


def is_concrete(value) -> bool:
  """Whether the entries of `value` can be read now (False for jax tracers and jax.ShapeDtypeStruct)."""
  return not isinstance(value, (jax.core.Tracer, jax.ShapeDtypeStruct))


def positive_int(value, name: str, *, minimum: int = 1, optional: bool = False) -> int | None:
  """`value` as a Python int, checked to be an integer ≥ `minimum` (1 unless given).

  Accepts a Python int, a NumPy integer or a concrete integer 0-d array; None when `optional`.

  Raises:
    ValueError naming `name`: a float (2.5 and 3.0 alike), a bool, a traced value, or a value below
    `minimum`.
  """
  if value is None and optional:
    return None
  number = None
  if not isinstance(value, (bool, np.bool_)):
    try:
      number = operator.index(value)
    except TypeError:  # floats, tracers, non-numbers
      pass
  if number is None or number < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return number


def check_non_negative(value, name: str) -> None:
  """Raises ValueError unless a concrete `value` is a real scalar (Python or NumPy number, 0-d array),
  finite and ≥ 0; a traced value passes unchecked."""
  if not is_concrete(value):
    return
  array = np.asarray(value)
  if array.ndim != 0 or array.dtype.kind not in "iuf" or not (np.isfinite(array) and array >= 0):
    raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")


def check_sigma(sigma, name: str = "sigma") -> None:
  """Raises ValueError unless every entry of a concrete noise level σ is finite and ≥ 0 (σ = 0 is the
  nearest-neighbour limit); a traced σ passes unchecked."""
  if not is_concrete(sigma):
    return
  values = np.asarray(sigma, np.float64)
  bad = ~(np.isfinite(values) & (values >= 0))
  if bad.any():
    where = "" if values.ndim == 0 else f" at index {tuple(int(i) for i in np.argwhere(bad)[0])}"
    raise ValueError(f"{name} must be finite and >= 0, got {float(values[bad][0])}{where}")


def check_sigma_grid(sigmas, name: str = "sigmas") -> None:
  """Raises ValueError unless `sigmas` is a sampler grid: 1-D with at least 2 entries (shape checked
  always) and, when concrete, finite, non-increasing, and positive except for the last entry (which may
  be 0: the final step to σ = 0 of the EDM grid)."""
  shape = np.shape(sigmas)
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(f"{name} must be a 1-D grid of at least 2 noise levels, got shape {shape}")
  if not is_concrete(sigmas):
    return
  values = np.asarray(sigmas, np.float64)
  if not (np.all(np.isfinite(values)) and np.all(values[:-1] > 0) and values[-1] >= 0):
    raise ValueError(f"{name} must be finite and > 0 (the last entry may be 0), got {values.tolist()}")
  rises = np.flatnonzero(np.diff(values) > 0)
  if rises.size:
    i = int(rises[0])
    raise ValueError(f"{name} must be non-increasing (from σ_max down to σ_min or 0), but entry {i + 1} "
                     f"({values[i + 1]:g}) exceeds entry {i} ({values[i]:g})")


def check_image_dtype(dtype, name: str = "data") -> None:
  """Raises ValueError unless `dtype` is uint8 or floating point (the two image conventions)."""
  if np.dtype(dtype) != np.uint8 and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be {DATA_EXPECTED}; got {np.dtype(dtype)}")


def check_data(data, name: str = "data") -> None:
  """Raises ValueError unless training images are uint8, or floating point within [-1, 1] and finite.

  The dtype is checked always (it is static). The value range of floating data is checked when the
  data is concrete, with a tolerance of `DATA_RANGE_TOLERANCE`. Cost of the scan (min and max) for
  50,000×32×32×3 float32 on 2 shared CPU cores: 0.15-0.4 s. A jax Array (immutable) is scanned once
  and remembered, so later calls with the same array cost nothing; a NumPy array (mutable) is scanned
  at every call, about a sixth of the 1 s that each eager denoiser call spends copying it to the
  device anyway (pass a jax Array, or jit with the data closed over, to pay it once). Traced data
  (a jit argument, a shard inside shard_map) is not scanned: check it where it is built
  (`registry.make_denoiser` does).
  """
  check_image_dtype(data.dtype, name)
  if np.dtype(data.dtype) == np.uint8 or not is_concrete(data) or _already_accepted(data):
    return
  if isinstance(data, jax.Array) and not data.is_fully_addressable:
    return  # a multi-host global array: its values are not all readable here
  if np.size(data) == 0:
    return
  if isinstance(data, jax.Array):
    with jax.ensure_compile_time_eval():  # eager even when called while tracing (data closed over)
      low, high = float(jnp.min(data)), float(jnp.max(data))
  else:
    low, high = float(np.min(data)), float(np.max(data))
  if not (np.isfinite(low) and np.isfinite(high)):
    raise ValueError(f"{name} must be {DATA_EXPECTED}; got {np.dtype(data.dtype)} with NaN or "
                     f"infinite values")
  if low < -1 - DATA_RANGE_TOLERANCE or high > 1 + DATA_RANGE_TOLERANCE:
    raise ValueError(f"{name} must be {DATA_EXPECTED}; got {np.dtype(data.dtype)} in "
                     f"[{low:g}, {high:g}]")
  if isinstance(data, jax.Array):
    key = id(data)
    _ACCEPTED_DATA[key] = weakref.ref(data, lambda _, key=key: _ACCEPTED_DATA.pop(key, None))


def _already_accepted(data) -> bool:
  ref = _ACCEPTED_DATA.get(id(data))
  return ref is not None and ref() is data


def check_finite(array, name: str) -> None:
  """Raises ValueError if a concrete floating-point `array` holds NaN or ±inf (e.g. the queries z)."""
  if not is_concrete(array) or not jnp.issubdtype(array.dtype, jnp.inexact):
    return
  values = np.asarray(array)
  if not np.all(np.isfinite(values)):
    first = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
    raise ValueError(f"{name} must be finite, got {float(values[first])} at index {first}")


def mask_array(masks, name: str = "masks"):
  """Cropping masks as an (M, H, W) array with M ≥ 1: bool, or 0/1 values of another dtype.

  Args:
    masks: any array-like (a nested list too). A non-bool dtype is accepted when concrete and every
      value is exactly 0 or 1 (it is converted to bool); weights such as 0.5 are refused, since a mask
      keeps a pixel or not.

  Returns:
    `masks` as a bool jax/NumPy array (a jax Array stays one; a traced bool array is returned as is).

  Raises:
    ValueError naming `name`: wrong rank, no masks, values other than 0/1, or a traced non-bool array.
  """
  if not isinstance(masks, jax.Array):
    masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f"{name} must have shape (M, H, W), got {masks.shape}")
  if masks.shape[0] == 0:
    raise ValueError(f"{name} must hold at least one mask, got shape {masks.shape}")
  if masks.dtype == bool:
    return masks
  if not is_concrete(masks):
    raise ValueError(f"{name} must be bool when traced, got {masks.dtype}")
  values = np.asarray(masks)
  if not np.all((values == 0) | (values == 1)):
    raise ValueError(f"{name} must be bool or hold only 0 and 1, got {values.dtype} values such as "
                     f"{values[(values != 0) & (values != 1)][0].item()!r}")
  return values.astype(bool)


def check_threshold(threshold, name: str = "threshold") -> None:
  """Raises ValueError unless a concrete PSPC-Flex mass threshold λ is a real number in (0, 1]."""
  if not is_concrete(threshold):
    return
  array = np.asarray(threshold)
  if array.ndim != 0 or array.dtype.kind not in "iuf" or not 0 < float(array) <= 1:
    raise ValueError(f"{name} must be in (0, 1] (a fraction of the sensitivity mass), got {threshold!r}")
