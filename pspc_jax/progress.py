"""Progress of long jobs: one injected interface, silent by default, tqdm at the command line.

A job takes a `ProgressMeter` (default `SilentProgress()`) and opens one bar per loop:

    with progress.bar("sampling", total=len(seeds), unit="img") as bar:
      with bar.compiling():                    # "compiling…" is shown; the ETA clock starts after it
        run = jax.jit(step).lower(*args).compile()
      for batch in batches:
        ...
        bar.update(len(batch))

Compilation is shown as its own phase and excluded from the rate, so the ETA is an honest estimate of
the remaining run time from the first compiled step on (`compile_ahead` does the usual
lower-and-compile in that phase).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax


class ProgressBar(Protocol):
  """One loop's progress."""

  def update(self, count: int = 1) -> None:
    """`count` more units are done."""

  def note(self, text: str) -> None:
    """Shows `text` beside the bar (e.g. the current σ)."""

  def compiling(self) -> contextlib.AbstractContextManager:
    """A phase shown as "compiling"; the ETA's clock restarts when it ends."""

  def close(self) -> None:
    ...


class ProgressMeter(Protocol):
  """Makes progress bars; jobs take one as an argument (`SilentProgress` or `TqdmProgress`)."""

  def bar(self, description: str, total: int, *, unit: str = "it", initial: int = 0) -> ProgressBar:
    ...


class _SilentBar:
  def update(self, count: int = 1) -> None:
    del count

  def note(self, text: str) -> None:
    del text

  @contextlib.contextmanager
  def compiling(self) -> Iterator[None]:
    yield

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class SilentProgress:
  """Reports nothing (the default of every job)."""

  def bar(self, description: str, total: int, *, unit: str = "it", initial: int = 0) -> _SilentBar:
    del description, total, unit, initial
    return _SilentBar()


class _TqdmBar:
  def __init__(self, bar):
    self._bar = bar
    self.compile_seconds = 0.0

  def update(self, count: int = 1) -> None:
    self._bar.update(count)

  def note(self, text: str) -> None:
    self._bar.set_postfix_str(text, refresh=True)

  @contextlib.contextmanager
  def compiling(self) -> Iterator[None]:
    self.note("compiling…")
    start = time.perf_counter()
    try:
      yield
    finally:
      self.compile_seconds += time.perf_counter() - start
      # The rate is (n − initial) / (now − start_t): restart the clock and count from here.
      self._bar.start_t = self._bar._time()  # pylint: disable=protected-access
      self._bar.initial = self._bar.n
      self.note(f"compiled in {self.compile_seconds:.1f}s")

  def close(self) -> None:
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class TqdmProgress:
  """tqdm bars on stderr; in a multi-process run only process 0 shows them."""

  def __init__(self, stream=None, *, mininterval: float = 0.5):
    self._stream = stream
    self._mininterval = mininterval

  def bar(self, description: str, total: int, *, unit: str = "it", initial: int = 0) -> _TqdmBar:
    from tqdm.auto import tqdm  # imported on use: the library layer never needs it

    return _TqdmBar(tqdm(total=total, initial=initial, desc=description, unit=unit,
                         file=self._stream or sys.stderr, mininterval=self._mininterval,
                         disable=jax.process_index() != 0, dynamic_ncols=True))


def compile_ahead(fn: Callable, *args: Any, bar: ProgressBar | None = None, **kwargs: Any):
  """`jax.jit(fn)` lowered and compiled for `args` now, inside `bar.compiling()` when given.

  Returns the compiled executable; call it with the same (non-static) arguments as `fn`.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  phase = bar.compiling() if bar is not None else contextlib.nullcontext()
  with phase:
    return jitted.lower(*args, **kwargs).compile()
