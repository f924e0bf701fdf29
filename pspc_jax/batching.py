"""Fixed-shape batches: one compiled shape for any number of inputs.

A jitted function compiles once per input shape. The jobs therefore cut their inputs into batches of
one size and pad the last batch by repeating its last row (a real input: same σ, so no extra schedule
branch, and no NaN from zeros); the padded rows' outputs are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np


def batch_slices(count: int, batch_size: int) -> Iterator[tuple[int, int]]:
  """(start, size) of consecutive batches covering range(count); the last may be short.

  Raises:
    ValueError: batch_size < 1 or count < 0.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  if count < 0:
    raise ValueError(f"count must be non-negative, got {count}")
  for start in range(0, count, batch_size):
    yield start, min(batch_size, count - start)


def pad_rows(array, size: int):
  """`array` (n, ...) with its last row repeated up to `size` rows (n ≥ 1; n = size: unchanged)."""
  array = np.asarray(array)
  missing = size - array.shape[0]
  if missing <= 0:
    return array
  return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])


def padded_batches(inputs: Any, batch_size: int) -> Iterator[tuple[int, int, Any]]:
  """Yields (start, size, padded) over a pytree of arrays (or lists) with a common leading length.

  `padded` is the pytree of rows [start, start + size), each leaf padded to `batch_size` rows with
  copies of its last row (`pad_rows`); keep the first `size` rows of whatever it gives.
  """
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("padded_batches needs at least one array")
  count = len(leaves[0])
  if any(len(leaf) != count for leaf in leaves):
    raise ValueError(f"inputs differ in length: {[len(leaf) for leaf in leaves]}")
  for start, size in batch_slices(count, batch_size):
    batch = jax.tree.map(lambda leaf: pad_rows(np.asarray(leaf[start:start + size]), batch_size),
                         inputs)
    yield start, size, batch


def map_batched(fn: Callable[..., Any], inputs: Sequence[Any], batch_size: int, *,
                on_batch: Callable[[int], None] | None = None) -> Any:
  """`fn(*inputs)` computed batch by batch with one compiled shape, outputs as NumPy arrays.

  Args:
    fn: a function of arrays with a common leading (batch) axis, returning a pytree of arrays with
      the same leading axis (e.g. a jitted denoiser call).
    inputs: its positional arguments, each (K, ...).
    batch_size: rows per call; the last call is padded (`padded_batches`).
    on_batch: called with each batch's real size after it is done (e.g. a progress bar's update).

  Returns:
    The pytree of outputs concatenated over the K rows (padding dropped).
  """
  parts = []
  for _, size, batch in padded_batches(tuple(inputs), batch_size):
    out = jax.tree.map(lambda leaf: np.asarray(leaf)[:size], fn(*batch))
    parts.append(out)
    if on_batch is not None:
      on_batch(size)
  if not parts:
    raise ValueError("map_batched needs at least one input row")
  return jax.tree.map(lambda *leaves: np.concatenate(leaves), *parts)
