"""Measuring instruments of `bin/benchmark` (the job itself is `pspc_jax.jobs.benchmark`).

What each instrument measures:

* time per call (`compile_timed`, `time_compiled`): the function is jitted and compiled first as a
  visible "compiling …" phase (compile time reported separately), called once more as a warm-up, then
  `repeats` times with `block_until_ready`; the minimum is reported (the machine may be shared, and the
  minimum is the least disturbed run).
* compiled scratch (`compiled_scratch_mb`): XLA's planned temporary buffer size of the compiled program
  (`memory_analysis().temp_size_in_bytes`), the working memory a call needs beyond its inputs and
  output; on an accelerator this is device memory.
* peak memory (`run_worker` + `reset_peak_rss` / `peak_rss_mb`): each case runs in a fresh Python
  subprocess, which loads the dataset, resets its peak resident set size (Linux /proc/self/clear_refs)
  and reports VmHWM after compiling and calling the case once: the peak of the call, including the
  resident dataset. Where the reset is not permitted the peak since process start
  (`resource.getrusage`) is reported instead, and the note says so. On an accelerator the worker also
  reports the device's `peak_bytes_in_use` (`device_peak_mb`): the dataset, the queries and the call.
* speed-up vs loop (`time_loop_reference`): the plain per-window reference is the official code's
  algorithm: a Python loop over the window positions that crops the whole dataset for that window and
  runs the exact softmax on the crops (`empirical_denoise` on the cropped images), jitted once for all
  positions (offsets are traced) and accumulated per pixel. When the whole loop would take longer than
  a budget, an evenly spread subset of positions is timed and the total is extrapolated (said in the
  note).
* chunk size (`auto_chunk_size`): rows of the training set streamed per step of the denoisers; `auto`
  keeps each denoiser's own CPU default, and on an accelerator derives the rows from its memory limit.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pspc_jax import conventions
from pspc_jax import progress as progress_lib
from pspc_jax import schedules
from pspc_jax.denoisers.empirical import empirical_denoise
from pspc_jax.denoisers.flex import SensitivityMaps, flex_masks
from pspc_jax.denoisers.masks import SquareWindows

# The training-set dtypes a benchmark can use: the uint8 images, or the same images as float32 in
# [-1, 1] (x / 127.5 − 1).
DATA_DTYPES = ("uint8", "float32")

# `auto_chunk_size` on an accelerator: the share of the device's memory limit (`bytes_limit`) one
# chunk's intermediates may take, and how many float32 (B, n, H, W, C)-sized intermediates of a chunk
# of n rows are assumed live at once. The rows are then rounded down to a power of two.
AUTO_CHUNK_MEMORY_FRACTION = 1 / 8
AUTO_CHUNK_LIVE_COPIES = 4


def machine_info() -> dict:
  """The machine and the JAX runtime a benchmark ran on.

  Returns:
    {"cpu": model name, "cores", "usable_cores", "memory_mb": host memory (10^6 bytes), "python",
    "jax", "jaxlib", "platform": JAX's default backend ("cpu", "gpu", "tpu"), "device": platform and
    kind of device 0, "device_kind", "device_count", "gpu": the device kind on an accelerator (None on
    CPU), "device_memory_mb": device 0's memory limit (None when not reported), "load_average"}.
  """
  device = jax.devices()[0]
  limit = _device_bytes_limit(device)
  return {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": _usable_cores(),
          "memory_mb": _host_memory_mb(), "python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": _jaxlib_version(), "platform": jax.default_backend(),
          "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
          "device_kind": getattr(device, "device_kind", ""), "device_count": jax.device_count(),
          "gpu": None if device.platform == "cpu" else getattr(device, "device_kind", None),
          "device_memory_mb": None if limit is None else limit / 1e6, "load_average": _load_average()}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _usable_cores() -> int | None:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count()


def _host_memory_mb() -> float | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6
  except (ValueError, OSError, AttributeError):
    return None


def _load_average():
  try:
    return os.getloadavg()
  except OSError:
    return None


def _jaxlib_version() -> str | None:
  try:
    import jaxlib
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


def _device_bytes_limit(device) -> int | None:
  """The device's allocator limit in bytes (`memory_stats()['bytes_limit']`), or None (CPU)."""
  try:
    stats = device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def as_data_dtype(images: np.ndarray, dtype: str) -> np.ndarray:
  """The (N, H, W, C) uint8 `images` as a training set of `dtype` ("uint8": as they are; "float32":
  the same images in [-1, 1], x / 127.5 − 1 by `conventions.to_model_range` in NumPy, correctly rounded).
  ValueError naming `data_dtypes` for another dtype."""
  if dtype == "uint8":
    return images
  if dtype == "float32":
    return conventions.to_model_range(np.asarray(images))
  raise ValueError(f"data_dtypes: unknown dtype {dtype!r}; choose from {', '.join(DATA_DTYPES)}")


def auto_chunk_size(batch: int, image_shape: Sequence[int], num_images: int,
                    device=None) -> int | None:
  """Training-set rows per streamed chunk for `chunk_size=auto`.

  On CPU (or a device that reports no memory limit): None, i.e. each denoiser's own default
  (`empirical.default_chunk_size`, `pspc.pixel_major_chunk_size`), tuned for CPU caches. On an
  accelerator: the rows n such that AUTO_CHUNK_LIVE_COPIES float32 intermediates of shape
  (B, n, H, W, C) fill AUTO_CHUNK_MEMORY_FRACTION of `memory_stats()['bytes_limit']`, rounded down to a
  power of two and clipped to [8, num_images] (e.g. an H200 limit of ~105 GB, B = 256 and 32×32×3
  images → 1024 rows).

  Args:
    batch: queries per call B.
    image_shape: (H, W, C).
    num_images: training-set rows N (the upper bound).
    device: the device (default `jax.devices()[0]`).
  """
  device = jax.devices()[0] if device is None else device
  limit = None if device.platform == "cpu" else _device_bytes_limit(device)
  if limit is None:
    return None
  row_bytes = 4 * batch * int(np.prod(image_shape)) * AUTO_CHUNK_LIVE_COPIES
  rows = max(1.0, AUTO_CHUNK_MEMORY_FRACTION * limit / row_bytes)
  return int(max(1, min(num_images, max(8, 2 ** int(np.floor(np.log2(rows)))))))


def schedule_sigma(patch_size: int, side: int) -> float:
  """A σ that the CIFAR-10 schedule (rescaled to `side`, `schedules.patch_schedule_for`) assigns to s.

  Among the grid σ whose patch size is s (or, if none, the nearest patch size) the middle one is
  taken, e.g. s = 3 on CIFAR-10 → the fourth-smallest σ of the six that use 3×3 patches.
  """
  schedule = schedules.patch_schedule_for(side)
  values = np.asarray(schedule.values)
  nearest = values[np.argmin(np.abs(values - patch_size))]
  candidates = sorted(s for s, v in zip(schedule.sigmas, schedule.values) if v == nearest)
  return float(candidates[len(candidates) // 2])


def flex_schedule_sigma(threshold: float) -> float:
  """A σ that the CIFAR-10 Flex schedule assigns to λ (the middle one of those with the nearest λ)."""
  schedule = schedules.cifar10_flex_schedule()
  values = np.asarray(schedule.values, np.float64)
  nearest = values[np.argmin(np.abs(values - threshold))]
  candidates = sorted(s for s, v in zip(schedule.sigmas, schedule.values) if v == nearest)
  return float(candidates[len(candidates) // 2])


def gaussian_bump_maps(height: int, width: int, radius: float) -> np.ndarray:
  """Synthetic sensitivity maps (H, W, H, W) float32: G_p[q] = exp(−‖q − p‖² / (2·radius²)) (pixels)."""
  rows, cols = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
  dh = np.square(rows[:, None, None, None] - rows[None, None, :, None])
  dw = np.square(cols[None, :, None, None] - cols[None, None, None, :])
  return np.exp(-(dh + dw) / (2.0 * radius ** 2)).astype(np.float32)


def bump_sensitivity_maps(height: int, width: int, radius: float) -> SensitivityMaps:
  """`gaussian_bump_maps` as the maps of the `pspc_flex` registry denoiser: one map set (at σ = 1),
  which every σ then uses."""
  return SensitivityMaps(np.asarray([1.0]), gaussian_bump_maps(height, width, radius)[None])


def flex_mask_sizes(height: int, width: int, radius: float, threshold: float) -> tuple[int, float]:
  """(largest, mean) PSPC-Flex mask size in pixels for `gaussian_bump_maps`."""
  sizes = np.asarray(flex_masks(gaussian_bump_maps(height, width, radius), threshold)).sum(axis=(1, 2))
  return int(sizes.max()), float(sizes.mean())


def make_queries(images: np.ndarray, batch: int, sigma: float, seed: int) -> jax.Array:
  """z = x + σ·ε around `batch` uint8 training images drawn with `seed`: (B, H, W, C) float32."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, images.shape[0], batch)
  x = images[idx].astype(np.float64) / 127.5 - 1.0
  return jnp.asarray((x + sigma * rng.standard_normal(x.shape)).astype(np.float32))


def compile_timed(progress: progress_lib.Progress, label: str, jitted: Callable, *args
                  ) -> tuple[Callable, float]:
  """(compiled executable, compile seconds) of a jitted function for `args`, compiled as the visible
  phase "compiling <label>" (`progress.compile_jitted`)."""
  start = time.perf_counter()
  compiled = progress_lib.compile_jitted(progress, label, jitted, *args)
  return compiled, time.perf_counter() - start


def time_compiled(compiled: Callable, *args, repeats: int = 3) -> tuple[float, list[float]]:
  """(minimum seconds per call, all timed calls) of `compiled(*args)`: one untimed warm-up call, then
  `repeats` (at least 1) calls, each until `block_until_ready`."""
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return min(times), times


def compiled_scratch_mb(compiled) -> float | None:
  """XLA's planned temporary buffers of a compiled program in MB (10^6 bytes), or None if the backend
  does not report them."""
  try:
    analysis = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  temp = getattr(analysis, "temp_size_in_bytes", None)
  return None if temp is None else temp / 1e6


@jax.jit
def _accumulate_window(total, window_mean, top, left):
  current = lax.dynamic_slice(total, (0, top, left, 0), window_mean.shape)
  return lax.dynamic_update_slice(total, current + window_mean, (0, top, left, 0))


def _window_mean_fn(size: int):
  @jax.jit
  def window_mean(z, sigma, data, top, left):
    crop = lax.dynamic_slice(data, (0, top, left, 0), (data.shape[0], size, size, data.shape[3]))
    query = lax.dynamic_slice(z, (0, top, left, 0), (z.shape[0], size, size, z.shape[3]))
    return empirical_denoise(query, sigma, crop)
  return window_mean


def loop_reference_denoise(z: jax.Array, sigma, data: jax.Array, patch_size: int,
                           positions: Sequence[tuple[int, int]] | None = None) -> jax.Array:
  """PSPC-Square by a plain loop over window positions (the official algorithm; slow, for reference).

  Args:
    z: (B, H, W, C) noisy images; sigma: scalar or (B,); data: (N, H, W, C) uint8 or float.
    patch_size: s.
    positions: window (top, left) corners to visit; default all (H − s + 1)(W − s + 1). With a
      subset the result is only the partial sum (for timing), not a denoised image.

  Returns:
    (B, H, W, C) float32: Eq. 11 (all positions) or the un-normalised partial sum (a subset).
  """
  height, width = z.shape[1:3]
  window_mean = _window_mean_fn(int(patch_size))
  every = positions is None
  if every:
    positions = [(i, j) for i in range(height - patch_size + 1) for j in range(width - patch_size + 1)]
  total = jnp.zeros(z.shape, jnp.float32)
  for top, left in positions:
    total = _accumulate_window(total, window_mean(z, sigma, data, jnp.int32(top), jnp.int32(left)),
                               jnp.int32(top), jnp.int32(left))
  if not every:
    return total
  coverage = SquareWindows(height, width, patch_size).coverage
  return total / jnp.asarray(coverage)[..., None]


def time_loop_reference(z, sigma, data, patch_size: int, *, budget_s: float, subset: int,
                        progress: progress_lib.Progress = progress_lib.SILENT
                        ) -> tuple[float, float, str, jax.Array | None]:
  """(estimated seconds for the whole loop, compile seconds, note, output if the whole loop ran).

  Compiles the per-window function (a "compiling" phase of `progress`), probes 4 positions, then runs
  every position if the estimate is within `budget_s` seconds, else `subset` evenly spread positions
  and extrapolates.
  """
  height, width = z.shape[1:3]
  every = [(i, j) for i in range(height - patch_size + 1) for j in range(width - patch_size + 1)]
  _, compile_seconds = compile_timed(progress, f"per-window loop s={patch_size}",
                                     _window_mean_fn(int(patch_size)), z, sigma, data, jnp.int32(0),
                                     jnp.int32(0))
  # Warm-up (also compiles the accumulation), then a short probe to decide between whole and subset.
  jax.block_until_ready(loop_reference_denoise(z, sigma, data, patch_size, every[:1]))
  probe = every[:: max(1, len(every) // 4)][:4]
  start = time.perf_counter()
  jax.block_until_ready(loop_reference_denoise(z, sigma, data, patch_size, probe))
  per_position = (time.perf_counter() - start) / len(probe)
  if per_position * len(every) <= budget_s:
    start = time.perf_counter()
    out = jax.block_until_ready(loop_reference_denoise(z, sigma, data, patch_size))
    return time.perf_counter() - start, compile_seconds, f"loop: all {len(every)} positions", out
  step = len(every) / min(subset, len(every))
  chosen = [every[int(k * step)] for k in range(min(subset, len(every)))]
  start = time.perf_counter()
  jax.block_until_ready(loop_reference_denoise(z, sigma, data, patch_size, chosen))
  seconds = (time.perf_counter() - start) / len(chosen) * len(every)
  return seconds, compile_seconds, (f"loop: extrapolated from {len(chosen)} of {len(every)} "
                                    "positions"), None


def run_worker(module: str, spec: dict) -> dict:
  """Runs `python -m <module> '<spec as JSON>'` in a fresh process (this repository first on its path)
  and returns the JSON object printed on its last line of output.

  Raises:
    RuntimeError: the worker failed (its last line of standard error in the message).
  """
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True,
                        text=True, env=env, cwd=repo)
  if proc.returncode != 0:
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
    raise RuntimeError(f"memory worker {module} failed: {last}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def reset_peak_rss() -> str:
  """Resets this process's VmHWM to its current RSS; returns "" or a note saying it could not."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return "peak since process start (could not reset VmHWM)"
  return ""


def peak_rss_mb() -> tuple[float, str]:
  """(peak resident set size in MB, note): VmHWM, else `ru_maxrss` (the note says so)."""
  peak_kb = _status_kb("VmHWM")
  if peak_kb is not None:
    return peak_kb / 1e3, ""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "ru_maxrss (peak since start)"


def resident_mb() -> float:
  """Current resident set size in MB (0 where /proc is unavailable)."""
  return (_status_kb("VmRSS") or 0) / 1e3


def device_peak_mb(device=None) -> float | None:
  """The device's `peak_bytes_in_use` since process start in MB, or None (CPU)."""
  device = jax.devices()[0] if device is None else device
  if device.platform == "cpu":
    return None
  try:
    stats = device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  peak = stats.get("peak_bytes_in_use") if stats else None
  return None if peak is None else peak / 1e6


def _status_kb(field: str) -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return float(line.split()[1])
  except OSError:
    pass
  return None
