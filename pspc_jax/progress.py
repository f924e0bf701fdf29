"""Progress of long jobs: one interface, injected, silent by default.

Library functions take a `progress: Progress = SILENT` argument; command-line jobs pass
`TerminalProgress()`. Compilation is its own phase: `compile_jitted` lowers and compiles a jitted
function once, reporting "compiling <label>…" and its duration, so that the bar that follows counts
only run time and its ETA (tqdm's) excludes compilation.

    progress = TerminalProgress()
    step = compile_jitted(progress, "sampler", jax.jit(run), denoiser, latents)
    with progress.bar(total=num_batches, desc="sampling", unit="batch") as bar:
      for latents in batches:
        step(denoiser, latents)
        bar.update()
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator, Protocol

import tqdm


class Progress(Protocol):
  """Where a job reports what it is doing."""

  def bar(self, total: int, desc: str, unit: str = "it", initial: int = 0) -> tqdm.tqdm:
    """A tqdm bar over `total` units (`initial` already done, e.g. when resuming)."""

  def note(self, message: str) -> None:
    """One line of information (above any open bar)."""

  def phase(self, label: str) -> contextlib.AbstractContextManager:
    """A timed block: reports '<label>…' on entry and '<label>: T s' on exit."""


class SilentProgress:
  """Reports nothing: the default of every library function."""

  def bar(self, total: int, desc: str, unit: str = "it", initial: int = 0) -> tqdm.tqdm:
    return tqdm.tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=True)

  def note(self, message: str) -> None:
    del message

  @contextlib.contextmanager
  def phase(self, label: str) -> Iterator[None]:
    del label
    yield


class TerminalProgress:
  """tqdm bars and notes on a stream (standard error by default)."""

  def __init__(self, file=None):
    self.file = file

  def _stream(self):
    return self.file if self.file is not None else sys.stderr

  def bar(self, total: int, desc: str, unit: str = "it", initial: int = 0) -> tqdm.tqdm:
    return tqdm.tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self._stream(),
                     dynamic_ncols=True, mininterval=1.0)

  def note(self, message: str) -> None:
    tqdm.tqdm.write(message, file=self._stream())
    self._stream().flush()

  @contextlib.contextmanager
  def phase(self, label: str) -> Iterator[None]:
    self.note(f"{label}…")
    start = time.perf_counter()
    yield
    self.note(f"{label}: {time.perf_counter() - start:.1f} s")


SILENT = SilentProgress()


def compile_jitted(progress: Progress, label: str, jitted: Callable, *args: Any) -> Callable:
  """`jitted` (a `jax.jit` function) compiled for `args`, the compilation reported as a phase.

  Returns the compiled executable: call it with arguments of the same shapes, dtypes and pytree
  structure as `args` (static arguments are already bound).
  """
  with progress.phase(f"compiling {label}"):
    return jitted.lower(*args).compile()
