"""Atomic file writes: an interrupted run never leaves a torn output file behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
  """Opens a temporary file next to `path` and renames it over `path` when the block succeeds.

  The folder is created if needed. On an exception the temporary file is deleted and `path` keeps its
  old content (or stays absent). The new file gets the usual permissions (0666 less the umask), not the
  private ones `tempfile.mkstemp` creates.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def save_npz(path: str | os.PathLike, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  with atomic_write(path) as f:
    np.savez(f, **arrays)


def save_json(path: str | os.PathLike, value) -> None:
  """`json.dump(value, f, indent=1)` into `path`, atomically."""
  with atomic_write(path, "w") as f:
    json.dump(value, f, indent=1)
