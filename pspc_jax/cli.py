"""Helpers shared by the `bin/` scripts: flag definitions, seed parsing, error reporting, progress."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from absl import app, flags

from pspc_jax import data as data_lib


def define_dataset_flags() -> None:
  flags.DEFINE_string("dataset", "digits",
                      "'digits' (embedded, offline), 'cifar10' (cached archive), or a path to an EDM "
                      "zip/folder, image folder, cifar-10-python.tar.gz, .npz or .npy")
  flags.DEFINE_integer("max_images", None, "use only the first N training images (before flips)")
  flags.DEFINE_bool("flip", False, "add horizontal mirrors of every training image")


def load_dataset_from_flags() -> data_lib.Dataset:
  f = flags.FLAGS
  dataset = data_lib.load_dataset(f.dataset, flip=f.flip, max_images=f.max_images)
  if dataset.image_shape[-1] not in (1, 3):
    raise ValueError(f"{f.dataset}: images have {dataset.image_shape[-1]} channels; "
                     "only 1 (grayscale) or 3 (RGB) are supported")
  print(f"dataset {dataset.name}: {dataset.num_images} images of {dataset.image_shape}", flush=True)
  return dataset


def parse_seeds(spec: str | None, count: int) -> list[int]:
  """'0-7,12,20-23' → [0, …, 7, 12, 20, …, 23]; None or '' → range(count)."""
  if not spec:
    if count < 1:
      raise ValueError(f"--num_samples must be at least 1, got {count}")
    return list(range(count))
  seeds = []
  try:
    for part in spec.split(","):
      low, _, high = part.strip().partition("-")
      seeds.extend(range(int(low), int(high or low) + 1))
  except ValueError:
    raise ValueError(f"cannot parse --seeds={spec!r}; use e.g. '0-15' or '1,5,9'") from None
  if not seeds or min(seeds) < 0:
    raise ValueError(f"--seeds={spec!r} gives no valid (non-negative) seed")
  return seeds


def run(main: Callable[[list[str]], None]) -> None:
  """absl `app.run` that reports bad input as one line on stderr (exit status 2), not a traceback."""
  def guarded(argv):
    # JAX reports at INFO level each accelerator plugin it did not find; users need not see that.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
      main(argv)
    except (ValueError, OSError) as err:
      print(f"error: {err}", file=sys.stderr)
      sys.exit(2)
  app.run(guarded)


class Progress:
  """Prints 'label k/n …, elapsed, eta' lines for a known number of steps."""

  def __init__(self, total: int, label: str):
    self.total, self.label = total, label
    self.start = time.perf_counter()
    self.done = 0

  def step(self, detail: str = "") -> None:
    self.done += 1
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * (self.total - self.done)
    print(f"{self.label} {self.done}/{self.total} {detail} elapsed {elapsed:.1f}s eta {eta:.1f}s",
          flush=True)
