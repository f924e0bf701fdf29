"""Small helpers for programs that run as several JAX processes (multi-controller, one per host).

Every process runs the same program on the same inputs. Computations on global arrays are
collective (every process must make the same calls in the same order, checkpoint saves included);
what one process does on its own (printing, writing a file, a preview drawn from a replicated value)
is done by process 0 only (`is_main_process`), from its local copy of replicated arrays
(`local_copy`). What only process 0 can know (the contents of its output folder, when resuming) it
hands to the others with `broadcast_from_main`, so that all of them make the same calls.
Joining a run is `pspc_jax.distributed.initialize` (or `--multihost` at the command line).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_main_process() -> bool:
  """Whether this is process 0, the one that prints and writes the outputs of a run."""
  return jax.process_index() == 0


def main_print(*args: Any) -> None:
  """`print(*args, flush=True)` on process 0; nothing on the others."""
  if is_main_process():
    print(*args, flush=True)


def local_copy(tree: Any) -> Any:
  """A replicated pytree of global arrays as arrays on one of this process's own devices.

  The result takes part in no collective, so one process may compute with it alone.

  Raises:
    ValueError: a leaf that is not replicated (this process may not hold all of it).
  """
  def local(array):
    if not array.is_fully_replicated:
      raise ValueError(f"local_copy needs replicated arrays, got one sharded as {array.sharding}")
    return array.addressable_data(0)
  return jax.tree.map(local, tree)


def broadcast_from_main(tree: Any) -> Any:
  """Process 0's value of `tree` on every process (a collective: every process must call it).

  Args:
    tree: a pytree of NumPy arrays of the same shapes and dtypes on every process (bool arrays are not
      supported: use integers).

  Returns:
    The pytree as process 0 passed it, as NumPy arrays; with one process, `tree` itself.
  """
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))
