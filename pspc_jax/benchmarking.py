"""Timing and memory benchmarks of the denoisers (library behind `bin/benchmark`; not a test).

What is measured, per case (denoiser, patch size s, σ):

* time per call: the function is jitted and compiled first (compile time reported separately), called
  once more as a warm-up, then `repeats` times with `block_until_ready`; the minimum is reported (the
  machine may be shared, and the minimum is the least disturbed run).
* ratio to empirical: time / time of `empirical_denoise` on the same data and batch.
* PSPC-Flex cases (`pspc_flex`): one case per threshold λ and mask path ("gather": padded index lists,
  the default; "matmul": the dense 0/1 mask matrix), on synthetic sensitivity maps: a Gaussian bump of
  width `flex_radius` pixels centred on each output pixel (`gaussian_bump_maps`), so that masks have a
  realistic size (about 17 pixels at λ = 0.5 and radius 2, more at the borders). The note gives the
  largest and mean mask size and, for the matmul path, max |matmul − gather|.
* speed-up vs loop: time of the plain per-window reference / time of the case (`loop_reference`).
  The reference is the official code's algorithm: a Python loop over the window positions that crops
  the whole dataset for that window and runs the exact softmax on the crops (`empirical_denoise` on the
  cropped images), jitted once for all positions (offsets are traced) and accumulated per pixel. When
  the whole loop would take longer than `loop_budget_s`, an evenly spread subset of positions is timed
  and the total is extrapolated (said in the table's note).
* peak memory: each case runs in a fresh Python subprocess, which loads the dataset, resets its peak
  resident set size (Linux /proc/self/clear_refs) and reports VmHWM after compiling and calling the
  case once: the peak of the call, including the resident dataset. Where the reset is not permitted the
  peak since process start (`resource.getrusage`) is reported instead, and the note says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
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

from pspc_jax import schedules
from pspc_jax.denoisers.empirical import empirical_denoise
from pspc_jax.denoisers.flex import flex_masks, pspc_flex_denoise
from pspc_jax.denoisers.masks import SquareWindows
from pspc_jax.denoisers.pspc import pspc_square_denoise

DENOISERS = ("empirical", "pspc_square", "pspc_flex")
DEFAULT_DENOISERS = ("empirical", "pspc_square")
DEFAULT_PATCH_SIZES = (3, 7, 15, 23)
DEFAULT_FLEX_THRESHOLDS = (0.3, 0.5, 0.7)
FLEX_METHODS = ("gather", "matmul")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """What to benchmark.

  Attributes:
    dataset: a `pspc_jax.data.load_dataset` source, or "synthetic" (uniform random uint8 images of
      shape `synthetic_shape`, seeded).
    num_images: images taken from the source (before flips); None keeps all.
    flip: add horizontal mirrors (doubles N).
    batch: queries per call (B).
    patch_sizes: PSPC-Square patch sizes s.
    sigma: one σ for every case, or None for the CIFAR-10 schedule's σ of each s (`schedule_sigma`).
    repeats: timed calls per case (the minimum is reported).
    denoisers: subset of DENOISERS to time (default DEFAULT_DENOISERS).
    loop_reference: also time the per-window loop reference of pspc_square for every s.
    loop_budget_s: time the whole loop only when its estimate is under this; else a subset.
    loop_subset: number of positions timed when the loop is extrapolated.
    memory: measure each case's peak RSS in a fresh subprocess.
    timing: time the cases in this process (False: memory only).
    seed: seed of the queries (z = x + σ·ε around training images) and of synthetic data.
    synthetic_shape: (H, W, C) of synthetic images.
    cache_dir: passed to `load_dataset`.
    flex_thresholds: PSPC-Flex thresholds λ, one case per λ and method.
    flex_methods: PSPC-Flex mask paths timed, from FLEX_METHODS.
    flex_radius: width (pixels) of the synthetic Gaussian-bump sensitivity maps.
  """
  dataset: str = "synthetic"
  num_images: int | None = None
  flip: bool = False
  batch: int = 16
  patch_sizes: tuple[int, ...] = DEFAULT_PATCH_SIZES
  sigma: float | None = None
  repeats: int = 3
  denoisers: tuple[str, ...] = DEFAULT_DENOISERS
  loop_reference: bool = False
  loop_budget_s: float = 180.0
  loop_subset: int = 24
  memory: bool = False
  timing: bool = True
  seed: int = 0
  synthetic_shape: tuple[int, int, int] = (32, 32, 3)
  cache_dir: str | None = None
  flex_thresholds: tuple[float, ...] = DEFAULT_FLEX_THRESHOLDS
  flex_methods: tuple[str, ...] = FLEX_METHODS
  flex_radius: float = 2.0


@dataclasses.dataclass
class CaseResult:
  """One row of the table. Times in seconds, memory in MB (10^6 bytes); None when not measured."""
  denoiser: str
  patch_size: int | None
  sigma: float
  seconds: float | None = None
  compile_seconds: float | None = None
  all_seconds: list[float] = dataclasses.field(default_factory=list)
  ratio_to_empirical: float | None = None
  speedup_vs_loop: float | None = None
  loop_seconds: float | None = None
  loop_compile_seconds: float | None = None
  loop_max_abs_diff: float | None = None
  peak_rss_mb: float | None = None
  note: str = ""
  threshold: float | None = None
  method: str | None = None


@dataclasses.dataclass
class BenchmarkResult:
  config: dict
  machine: dict
  dataset: dict
  cases: list[CaseResult]

  def to_dict(self) -> dict:
    return {"config": self.config, "machine": self.machine, "dataset": self.dataset,
            "cases": [dataclasses.asdict(c) for c in self.cases]}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)


def machine_info() -> dict:
  """CPU model, core counts, memory, Python/JAX versions and the JAX device."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  memory_mb = None
  try:
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6
  except (ValueError, OSError, AttributeError):
    pass
  device = jax.devices()[0]
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable, "memory_mb": memory_mb,
          "python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
          "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
          "load_average": load}


def _jaxlib_version():
  try:
    import jaxlib
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


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


def flex_mask_sizes(height: int, width: int, radius: float, threshold: float) -> tuple[int, float]:
  """(largest, mean) PSPC-Flex mask size in pixels for `gaussian_bump_maps`."""
  sizes = np.asarray(flex_masks(gaussian_bump_maps(height, width, radius), threshold)).sum(axis=(1, 2))
  return int(sizes.max()), float(sizes.mean())


def load_images(config: BenchmarkConfig) -> tuple[np.ndarray, str]:
  """uint8 (N, H, W, C) images and a name, as the config asks."""
  if config.dataset == "synthetic":
    num = config.num_images or 1024
    rng = np.random.default_rng(config.seed)
    images = rng.integers(0, 256, (num,) + tuple(config.synthetic_shape), dtype=np.uint8)
    if config.flip:
      images = np.concatenate([images, images[:, :, ::-1]])
    return images, "synthetic" + ("+flip" if config.flip else "")
  from pspc_jax import data as data_lib  # pure I/O; imported only when needed
  dataset = data_lib.load_dataset(config.dataset, flip=config.flip, max_images=config.num_images,
                                  cache_dir=config.cache_dir)
  return dataset.images, dataset.name


def make_queries(images: np.ndarray, batch: int, sigma: float, seed: int) -> jax.Array:
  """z = x + σ·ε around `batch` training images drawn with `seed` (float32, model range)."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, images.shape[0], batch)
  x = images[idx].astype(np.float64) / 127.5 - 1.0
  return jnp.asarray((x + sigma * rng.standard_normal(x.shape)).astype(np.float32))


def case_function(denoiser: str, patch_size: int | None, *, threshold: float | None = None,
                  method: str | None = None, radius: float = 2.0) -> Callable:
  """jitted `f(z, sigma, data)` for a case.

  The dataset is an argument, not a closed-over constant: a captured array is embedded in the program
  as a literal, and XLA then spends seconds per 100 MB folding it at compile time. (PSPC-Flex masks are
  computed once at trace time from `gaussian_bump_maps`; only their small index lists or the 0/1 matrix
  become constants.)
  """
  if denoiser == "empirical":
    return jax.jit(lambda z, sigma, data: empirical_denoise(z, sigma, data))
  if denoiser == "pspc_square":
    return jax.jit(lambda z, sigma, data: pspc_square_denoise(z, sigma, data, int(patch_size)))
  if denoiser == "pspc_flex":
    def flex(z, sigma, data):
      maps = gaussian_bump_maps(z.shape[1], z.shape[2], radius)
      return pspc_flex_denoise(z, sigma, data, maps, float(threshold), method=method or "gather")
    return jax.jit(flex)
  raise ValueError(f"unknown benchmark denoiser {denoiser!r}; choose from {', '.join(DENOISERS)}")


def time_function(fn: Callable, *args, repeats: int = 3) -> tuple[float, float, list[float]]:
  """(minimum seconds per call, compile seconds, all timed calls) of a jitted `fn(*args)`.

  Compiles ahead of time (`lower(...).compile()`), makes one untimed warm-up call, then times
  `repeats` calls, each until `block_until_ready`.
  """
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return min(times), compile_seconds, times


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


def time_loop_reference(z, sigma, data, patch_size: int, *, budget_s: float, subset: int
                        ) -> tuple[float, float, str, jax.Array | None]:
  """(estimated seconds for the whole loop, compile seconds, note, output if the whole loop ran)."""
  height, width = z.shape[1:3]
  every = [(i, j) for i in range(height - patch_size + 1) for j in range(width - patch_size + 1)]
  window_mean = _window_mean_fn(int(patch_size))
  start = time.perf_counter()
  window_mean.lower(z, sigma, data, jnp.int32(0), jnp.int32(0)).compile()
  compile_seconds = time.perf_counter() - start
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


def _case_list(config: BenchmarkConfig, side: int) -> list[CaseResult]:
  cases = []
  for denoiser in config.denoisers:
    if denoiser not in DENOISERS:
      raise ValueError(f"unknown benchmark denoiser {denoiser!r}; choose from {', '.join(DENOISERS)}")
  if "empirical" in config.denoisers:
    sigma = config.sigma if config.sigma is not None else schedule_sigma(side, side)
    cases.append(CaseResult("empirical", None, float(sigma)))
  if "pspc_square" in config.denoisers:
    for size in config.patch_sizes:
      if not 1 <= size <= side:
        raise ValueError(f"patch size {size} must be between 1 and the image side {side}")
      sigma = config.sigma if config.sigma is not None else schedule_sigma(size, side)
      cases.append(CaseResult("pspc_square", int(size), float(sigma)))
  if "pspc_flex" in config.denoisers:
    for method in config.flex_methods:
      if method not in FLEX_METHODS:
        raise ValueError(f"unknown PSPC-Flex method {method!r}; choose from {', '.join(FLEX_METHODS)}")
    for threshold in config.flex_thresholds:
      if not 0 < threshold <= 1:
        raise ValueError(f"threshold {threshold} is outside (0, 1]")
      sigma = config.sigma if config.sigma is not None else flex_schedule_sigma(threshold)
      for method in config.flex_methods:
        cases.append(CaseResult("pspc_flex", None, float(sigma), threshold=float(threshold),
                                method=method))
  return cases


def run_benchmark(config: BenchmarkConfig, *, log: Callable[[str], None] | None = None
                  ) -> BenchmarkResult:
  """Runs every case of `config`; see the module docstring for what is measured."""
  log = log or (lambda message: None)
  images, name = load_images(config)
  side = min(images.shape[1], images.shape[2])
  cases = _case_list(config, side)
  dataset_info = {"name": name, "num_images": int(images.shape[0]),
                  "image_shape": [int(v) for v in images.shape[1:]], "bytes": int(images.nbytes)}
  log(f"dataset {name}: {images.shape[0]} images of {tuple(images.shape[1:])}")

  if config.timing:
    data = jnp.asarray(images)
    flex_outputs = {}
    for case in cases:
      z = make_queries(images, config.batch, case.sigma, config.seed)
      fn = case_function(case.denoiser, case.patch_size, threshold=case.threshold,
                         method=case.method, radius=config.flex_radius)
      case.seconds, case.compile_seconds, case.all_seconds = time_function(
          fn, z, jnp.float32(case.sigma), data, repeats=config.repeats)
      log(f"{_label(case)} σ={case.sigma:.4g}: {case.seconds:.4f} s per call "
          f"(compile {case.compile_seconds:.2f} s)")
      if case.denoiser == "pspc_flex":
        largest, mean = flex_mask_sizes(images.shape[1], images.shape[2], config.flex_radius,
                                        case.threshold)
        case.note = f"masks ≤ {largest} px (mean {mean:.1f}), bump radius {config.flex_radius:g}"
        outputs = flex_outputs.setdefault(case.threshold, {})
        outputs[case.method] = fn(z, jnp.float32(case.sigma), data)
        if len(outputs) == 2:
          diff = float(jnp.max(jnp.abs(outputs["matmul"] - outputs["gather"])))
          case.note += f", max |matmul − gather| = {diff:.1e}"
        log(f"  {case.note}")
      if config.loop_reference and case.denoiser == "pspc_square":
        loop_s, loop_compile, note, loop_out = time_loop_reference(
            z, jnp.float32(case.sigma), data, case.patch_size, budget_s=config.loop_budget_s,
            subset=config.loop_subset)
        case.loop_seconds, case.loop_compile_seconds = loop_s, loop_compile
        case.speedup_vs_loop = loop_s / case.seconds
        case.note = f"{note}: {loop_s:.2f} s"
        if loop_out is not None:
          fast = fn(z, jnp.float32(case.sigma), data)
          case.loop_max_abs_diff = float(jnp.max(jnp.abs(fast - loop_out)))
          case.note += f", max |fast − loop| = {case.loop_max_abs_diff:.1e}"
        log(f"  {case.note} (compile {loop_compile:.2f} s)")
    empirical = [c.seconds for c in cases if c.denoiser == "empirical"]
    if empirical:
      for case in cases:
        case.ratio_to_empirical = case.seconds / empirical[0]
    del data

  if config.memory:
    for case in cases:
      peak, note = measure_peak_rss(config, case.denoiser, case.patch_size, case.sigma,
                                    threshold=case.threshold, method=case.method)
      case.peak_rss_mb = peak
      if note:
        case.note = f"{case.note}; {note}" if case.note else note
      log(f"{_label(case)}: peak RSS {peak:.0f} MB {note}")

  return BenchmarkResult(config=dataclasses.asdict(config), machine=machine_info(),
                         dataset=dataset_info, cases=cases)


def _label(case: CaseResult) -> str:
  if case.denoiser == "pspc_flex":
    return f"pspc_flex λ={case.threshold:g} {case.method}"
  return f"{case.denoiser} s={case.patch_size}"


def measure_peak_rss(config: BenchmarkConfig, denoiser: str, patch_size: int | None, sigma: float, *,
                     threshold: float | None = None, method: str | None = None
                     ) -> tuple[float, str]:
  """Peak RSS (MB) of one compiled call in a fresh subprocess (see the module docstring)."""
  spec = {"config": dataclasses.asdict(config), "denoiser": denoiser, "patch_size": patch_size,
          "sigma": sigma, "threshold": threshold, "method": method}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  proc = subprocess.run([sys.executable, "-m", "pspc_jax.benchmarking", json.dumps(spec)],
                        capture_output=True, text=True, env=env, cwd=repo)
  if proc.returncode != 0:
    raise RuntimeError(f"memory worker failed for {denoiser} s={patch_size}: "
                       f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  return report["peak_mb"], report["note"]


def _status_kb(field: str) -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return float(line.split()[1])
  except OSError:
    pass
  return None


def _memory_worker(spec: dict) -> dict:
  config = BenchmarkConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in spec["config"].items()})
  images, _ = load_images(config)
  data = jnp.asarray(images)
  del images
  z = make_queries(np.asarray(data[: max(1, min(4096, data.shape[0]))]), config.batch, spec["sigma"],
                   config.seed)
  fn = case_function(spec["denoiser"], spec["patch_size"], threshold=spec.get("threshold"),
                     method=spec.get("method"), radius=config.flex_radius)
  resident_mb = (_status_kb("VmRSS") or 0) / 1e3
  note = ""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS
  except OSError:
    note = "peak since process start (could not reset VmHWM)"
  jax.block_until_ready(fn(z, jnp.float32(spec["sigma"]), data))
  peak_kb = _status_kb("VmHWM")
  if peak_kb is None:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    note = note or "ru_maxrss (peak since process start)"
  return {"peak_mb": peak_kb / 1e3, "resident_before_mb": resident_mb, "note": note}


def format_table(result: BenchmarkResult) -> str:
  """The human-readable table (machine, dataset, then one row per case)."""
  m, d = result.machine, result.dataset
  lines = [f"machine: {m['cpu']}, {m['usable_cores']}/{m['cores']} cores, "
           f"{(m['memory_mb'] or 0) / 1e3:.0f} GB, jax {m['jax']} (jaxlib {m['jaxlib']}), "
           f"device {m['device']}, load average {_fmt_load(m['load_average'])}",
           f"dataset: {d['name']}, N = {d['num_images']}, images {tuple(d['image_shape'])}, "
           f"{d['bytes'] / 1e6:.0f} MB; batch B = {result.config['batch']}, "
           f"repeats = {result.config['repeats']} (minimum reported)"]
  header = ("denoiser", "s", "sigma", "lambda", "path", "time/call (s)", "compile (s)", "x empirical",
            "speed-up vs loop", "peak RSS (MB)", "note")
  rows = []
  for c in result.cases:
    rows.append((c.denoiser, "-" if c.patch_size is None else str(c.patch_size), f"{c.sigma:.4g}",
                 _fmt(c.threshold, "g"), c.method or "-", _fmt(c.seconds, ".4f"),
                 _fmt(c.compile_seconds, ".2f"), _fmt(c.ratio_to_empirical, ".2f"),
                 _fmt(c.speedup_vs_loop, ".1f"), _fmt(c.peak_rss_mb, ".0f"), c.note))
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
  fmt = "  ".join("{:<%d}" % w for w in widths)
  lines.append(fmt.format(*header).rstrip())
  lines.append("  ".join("-" * w for w in widths))
  lines.extend(fmt.format(*r).rstrip() for r in rows)
  return "\n".join(lines)


def _fmt(value, spec: str) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fmt_load(load) -> str:
  return "-" if not load else "/".join(f"{v:.2f}" for v in load)


if __name__ == "__main__":
  print(json.dumps(_memory_worker(json.loads(sys.argv[1]))), flush=True)
