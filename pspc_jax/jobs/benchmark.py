"""The job behind `bin/benchmark`: how fast is each denoiser, per call and in the sampler (a table and
JSON). The measuring instruments are in `pspc_jax.benchmarking`.

One run measures, for each training-set dtype of `data_dtypes` ("uint8": the images; "float32": the
same images in [-1, 1]):

* per-call cases: `empirical` (the optimal denoiser), `pspc_square` at each patch size s, `pspc_flex`
  at each threshold λ (and mask path, on synthetic Gaussian-bump sensitivity maps of width
  `flex_radius`: masks of realistic size, about 17 pixels at λ = 0.5 and radius 2) and `gaussian`. Each
  is a registry denoiser value (`make_denoiser`) passed as an argument to the jitted
  `values.apply_denoiser`, called on `batch` queries z = x + σ·ε at the σ the CIFAR-10 schedule assigns
  to it (`benchmarking.schedule_sigma`, `flex_schedule_sigma`; the optimal and Gaussian denoisers at
  the σ of the full-image patch size) or at one `sigma`. Reported: time per call, compile time, setup
  time (building the denoiser: Flex masks, the Gaussian fit), ratio to `empirical` of the same dtype,
  XLA's compiled scratch, and optionally the per-window loop reference (`loop_reference`) and the
  peak memory of a fresh process (`memory`). The Gaussian statistics are fitted once and shared by
  every dtype (its calls never read the training set).
* samplers (first dtype of `data_dtypes`): the `steps`-step Heun sampler (`sampling.sample`, EDM grid)
  of each of `samplers` on the same `sample_batch` latents (`latents_from_seeds(0 … B − 1)`), jitted
  with the denoiser value as an argument, compiled first (reported separately) and timed once per
  `sample_repeats` (no warm-up call): `empirical` (the reference of the ratio), `pspc_square` with the
  auto patch schedule, `pspc_flex` with the paper's CIFAR-10 λ schedule on the bump maps.

`chunk_size` ("auto" or rows) is passed to every denoiser that streams the training set;
`benchmarking.auto_chunk_size` resolves "auto" per batch size. Peak memory runs first, in one fresh
process per case (`python -m pspc_jax.jobs.benchmark SPEC`), before this process holds any large
device buffer. With `json_path` the result is rewritten after every finished case, so that a run
stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import benchmarking as bm
from pspc_jax import files, validation
from pspc_jax.denoisers.registry import make_denoiser
from pspc_jax.denoisers.values import apply_denoiser
from pspc_jax.edm import edm_sigmas
from pspc_jax.progress import SILENT, Progress
from pspc_jax.sampling import latents_from_seeds, sample

DENOISERS = ("empirical", "pspc_square", "pspc_flex", "gaussian")
SAMPLERS = ("empirical", "pspc_square", "pspc_flex")
DEFAULT_PATCH_SIZES = (3, 5, 7, 11, 15, 23)
DEFAULT_THRESHOLDS = (0.3, 0.5, 0.7)
FLEX_METHODS = ("gather", "matmul")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """What to benchmark (field names are the flags of bin/benchmark).

  Attributes:
    dataset: a `pspc_jax.data.load_dataset` source, or "synthetic" (uniform random uint8 images of
      shape `synthetic_shape`, seeded; 1024 unless `max_images`).
    max_images: images taken from the source (before flips); None keeps all.
    flip: add horizontal mirrors (doubles N).
    batch: queries per per-call case (B).
    data_dtypes: training-set dtypes, from `benchmarking.DATA_DTYPES`; the samplers use the first.
    denoisers: per-call cases, a subset of DENOISERS (may be empty when `samplers` is not).
    patch_sizes: PSPC-Square patch sizes s.
    thresholds: PSPC-Flex thresholds λ in (0, 1], one case per λ and entry of `flex_methods`.
    flex_methods: PSPC-Flex mask paths, from FLEX_METHODS.
    flex_radius: width (pixels) of the synthetic Gaussian-bump sensitivity maps.
    sigma: one σ for every per-call case, or None for the CIFAR-10 schedule's σ of each case.
    repeats: timed calls per case after a warm-up (the minimum is reported).
    samplers: sampler cases, a subset of SAMPLERS (empty: none).
    sample_batch: samples per sampler run.
    steps: EDM grid steps of the Heun sampler (2·steps − 1 denoiser calls).
    sample_repeats: timed sampler runs (the minimum is reported).
    chunk_size: "auto" (`benchmarking.auto_chunk_size`) or training-set rows per streamed chunk.
    loop_reference: also time the per-window loop reference of every pspc_square case.
    loop_budget: seconds; time the whole loop only when its estimate is under this, else a subset.
    loop_subset: number of positions timed when the loop is extrapolated.
    memory: measure each per-call case's peak memory in a fresh subprocess.
    timing: time the cases in this process (False: memory only).
    seed: seed of the queries z = x + σ·ε and of synthetic data.
    synthetic_shape: (H, W, C) of synthetic images.
    cache_dir: passed to `load_dataset`.
  """
  dataset: str = "synthetic"
  max_images: int | None = None
  flip: bool = False
  batch: int = 16
  data_dtypes: tuple[str, ...] = bm.DATA_DTYPES
  denoisers: tuple[str, ...] = DENOISERS
  patch_sizes: tuple[int, ...] = DEFAULT_PATCH_SIZES
  thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
  flex_methods: tuple[str, ...] = ("gather",)
  flex_radius: float = 2.0
  sigma: float | None = None
  repeats: int = 3
  samplers: tuple[str, ...] = SAMPLERS
  sample_batch: int = 16
  steps: int = 18
  sample_repeats: int = 1
  chunk_size: int | str = "auto"
  loop_reference: bool = False
  loop_budget: float = 180.0
  loop_subset: int = 24
  memory: bool = False
  timing: bool = True
  seed: int = 0
  synthetic_shape: tuple[int, int, int] = (32, 32, 3)
  cache_dir: str | None = None


@dataclasses.dataclass
class CaseResult:
  """One per-call row. Times in seconds, memory in MB (10^6 bytes); None when not measured."""
  denoiser: str
  data_dtype: str
  sigma: float
  patch_size: int | None = None
  threshold: float | None = None
  method: str | None = None
  chunk_size: int | None = None
  seconds: float | None = None
  compile_seconds: float | None = None
  setup_seconds: float | None = None
  all_seconds: list[float] = dataclasses.field(default_factory=list)
  ratio_to_empirical: float | None = None
  scratch_mb: float | None = None
  speedup_vs_loop: float | None = None
  loop_seconds: float | None = None
  loop_compile_seconds: float | None = None
  loop_max_abs_diff: float | None = None
  peak_rss_mb: float | None = None
  device_peak_mb: float | None = None
  note: str = ""


@dataclasses.dataclass
class SamplerResult:
  """One sampler row: a whole `steps`-step Heun run of `batch` samples. Times in seconds."""
  denoiser: str
  data_dtype: str
  batch: int
  steps: int
  calls: int
  chunk_size: int | None = None
  seconds: float | None = None
  compile_seconds: float | None = None
  all_seconds: list[float] = dataclasses.field(default_factory=list)
  ratio_to_empirical: float | None = None
  seconds_per_call: float | None = None
  note: str = ""


@dataclasses.dataclass
class BenchmarkResult:
  config: dict
  machine: dict
  dataset: dict
  cases: list[CaseResult]
  samplers: list[SamplerResult]

  def to_dict(self) -> dict:
    return {"config": self.config, "machine": self.machine, "dataset": self.dataset,
            "cases": [dataclasses.asdict(c) for c in self.cases],
            "samplers": [dataclasses.asdict(s) for s in self.samplers]}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)


def check_config(config: BenchmarkConfig) -> None:
  """Raises ValueError naming the field of `config` that is out of range (checks that need the
  images, such as patch sizes against the image side, are made by `case_list`)."""
  for name in ("batch", "repeats", "sample_batch", "steps", "sample_repeats", "loop_subset"):
    validation.positive_int(getattr(config, name), name)
  validation.positive_int(config.max_images, "max_images", optional=True)
  if config.chunk_size != "auto":
    validation.positive_int(config.chunk_size, "chunk_size")
  _check_names(config.denoisers, DENOISERS, "denoisers")
  _check_names(config.samplers, SAMPLERS, "samplers")
  _check_names(config.data_dtypes, bm.DATA_DTYPES, "data_dtypes")
  _check_names(config.flex_methods, FLEX_METHODS, "flex_methods")
  if not config.data_dtypes:
    raise ValueError("data_dtypes must name at least one of " + ", ".join(bm.DATA_DTYPES))
  if not config.denoisers and not (config.samplers and config.timing):
    raise ValueError("denoisers and samplers are both empty (or samplers without timing): nothing "
                     "to measure")
  if "pspc_flex" in config.denoisers and not (config.thresholds and config.flex_methods):
    raise ValueError("pspc_flex needs at least one of thresholds and of flex_methods")
  for threshold in config.thresholds:
    if not 0 < threshold <= 1:
      raise ValueError(f"thresholds: {threshold} is outside (0, 1]")
  for size in config.patch_sizes:
    validation.positive_int(size, "patch_sizes")
  if config.sigma is not None:
    validation.check_non_negative(config.sigma, "sigma")


def _check_names(names, known, field: str) -> None:
  for name in names:
    if name not in known:
      raise ValueError(f"{field}: unknown {name!r}; choose from {', '.join(known)}")


def load_images(config: BenchmarkConfig) -> tuple[np.ndarray, str]:
  """uint8 (N, H, W, C) images and a name, as the config asks."""
  if config.dataset == "synthetic":
    num = config.max_images or 1024
    rng = np.random.default_rng(config.seed)
    images = rng.integers(0, 256, (num,) + tuple(config.synthetic_shape), dtype=np.uint8)
    if config.flip:
      images = np.concatenate([images, images[:, :, ::-1]])
    return images, "synthetic" + ("+flip" if config.flip else "")
  from pspc_jax import data as data_lib  # pure I/O; imported only when needed
  dataset = data_lib.load_dataset(config.dataset, flip=config.flip, max_images=config.max_images,
                                  cache_dir=config.cache_dir)
  return dataset.images, dataset.name


def chunk_rows(config: BenchmarkConfig, batch: int, images: np.ndarray) -> int | None:
  """The chunk size passed to the denoisers for `batch` queries (None: each denoiser's default)."""
  if config.chunk_size == "auto":
    return bm.auto_chunk_size(batch, images.shape[1:], images.shape[0])
  return int(config.chunk_size)


def case_list(config: BenchmarkConfig, images: np.ndarray) -> list[CaseResult]:
  """The per-call rows of `config`, dtype by dtype: empirical, pspc_square by s, pspc_flex by λ and
  path, gaussian. ValueError naming `patch_sizes` for a size outside [1, image side]."""
  side = min(images.shape[1], images.shape[2])
  chunk = chunk_rows(config, config.batch, images)

  def sigma_of(default):
    return float(config.sigma if config.sigma is not None else default)

  cases = []
  for dtype in config.data_dtypes:
    if "empirical" in config.denoisers:
      cases.append(CaseResult("empirical", dtype, sigma_of(bm.schedule_sigma(side, side)),
                              chunk_size=chunk))
    if "pspc_square" in config.denoisers:
      for size in config.patch_sizes:
        if not 1 <= size <= side:
          raise ValueError(f"patch_sizes: {size} must be between 1 and the image side {side}")
        cases.append(CaseResult("pspc_square", dtype, sigma_of(bm.schedule_sigma(size, side)),
                                patch_size=int(size), chunk_size=chunk))
    if "pspc_flex" in config.denoisers:
      for threshold in config.thresholds:
        for method in config.flex_methods:
          cases.append(CaseResult("pspc_flex", dtype, sigma_of(bm.flex_schedule_sigma(threshold)),
                                  threshold=float(threshold), method=method, chunk_size=chunk))
    if "gaussian" in config.denoisers:
      cases.append(CaseResult("gaussian", dtype, sigma_of(bm.schedule_sigma(side, side))))
  return cases


def case_denoiser(config: BenchmarkConfig, case: CaseResult, data, shared: dict):
  """The registry denoiser value of a per-call case over `data` (its dtype's training set). The
  Gaussian statistics are fitted once and kept in `shared`."""
  if case.denoiser == "empirical":
    return make_denoiser("empirical", data, chunk_size=case.chunk_size)
  if case.denoiser == "pspc_square":
    return make_denoiser("pspc_square", data, patch_schedule=case.patch_size,
                         chunk_size=case.chunk_size)
  if case.denoiser == "pspc_flex":
    maps = bm.bump_sensitivity_maps(data.shape[1], data.shape[2], config.flex_radius)
    return make_denoiser("pspc_flex", data, maps=maps, thresholds=case.threshold,
                         chunk_size=case.chunk_size, method=case.method)
  if "gaussian" not in shared:
    shared["gaussian"] = make_denoiser("gaussian", np.asarray(data))
  return shared["gaussian"]


def run_benchmark(config: BenchmarkConfig, *, progress: Progress = SILENT,
                  json_path: str | None = None) -> BenchmarkResult:
  """Runs every case of `config` (see the module docstring for what is measured).

  Args:
    config: what to measure; checked first (`check_config`).
    progress: where to report (compile phases, one line per case, a bar over the cases).
    json_path: if given, `BenchmarkResult.to_dict()` is written there (atomically) after every
      finished case and at the end.

  Raises:
    ValueError: a bad config field (named), or a dataset that cannot be loaded.
  """
  check_config(config)
  images, name = load_images(config)
  cases = case_list(config, images)
  dtype = config.data_dtypes[0]
  sample_chunk = chunk_rows(config, config.sample_batch, images)
  # In SAMPLERS order: the empirical sampler, the reference of the ratios, first.
  samplers = [SamplerResult(d, dtype, config.sample_batch, config.steps, 2 * config.steps - 1,
                            chunk_size=sample_chunk)
              for d in SAMPLERS if d in config.samplers and config.timing]
  result = BenchmarkResult(config=dataclasses.asdict(config), machine=bm.machine_info(),
                           dataset={"name": name, "num_images": int(images.shape[0]),
                                    "image_shape": [int(v) for v in images.shape[1:]],
                                    "bytes": int(images.nbytes)},
                           cases=cases, samplers=samplers)
  progress.note(f"dataset {name}: {images.shape[0]} images of {tuple(images.shape[1:])}")

  def save():
    if json_path:
      files.save_json(json_path, result.to_dict())

  total = len(cases) * (int(config.memory) + int(config.timing)) + len(samplers)
  with progress.bar(total=total, desc="benchmark", unit="case") as bar:
    if config.memory:
      _measure_memory(config, cases, progress, save, bar)
    if config.timing:
      shared = {}
      for data_dtype in config.data_dtypes:
        _time_cases(config, images, data_dtype, cases, shared, progress, save, bar)
      _time_samplers(config, images, samplers, progress, save, bar)
  save()
  return result


def _time_cases(config, images, data_dtype, cases, shared, progress, save, bar) -> None:
  """Times the per-call cases of one dtype and their ratios to its `empirical` case."""
  mine = [case for case in cases if case.data_dtype == data_dtype]
  if not mine:
    return
  data = jnp.asarray(bm.as_data_dtype(images, data_dtype))
  reference = mine[0] if mine[0].denoiser == "empirical" else None  # `case_list` puts it first
  flex_outputs = {}
  for case in mine:
    _time_case(config, images, data, case, shared, flex_outputs, progress)
    if reference is not None:
      case.ratio_to_empirical = case.seconds / reference.seconds
    save()
    bar.update()


def _time_case(config, images, data, case, shared, flex_outputs, progress) -> None:
  z = bm.make_queries(images, config.batch, case.sigma, config.seed)
  sigma = jnp.float32(case.sigma)
  if case.denoiser == "gaussian" and "gaussian" in shared:
    case.note = "the Gaussian fit of the first row, shared"
  start = time.perf_counter()
  denoiser = case_denoiser(config, case, data, shared)
  case.setup_seconds = time.perf_counter() - start
  compiled, case.compile_seconds = bm.compile_timed(progress, _label(case), apply_denoiser, denoiser,
                                                    z, sigma)
  case.scratch_mb = bm.compiled_scratch_mb(compiled)
  case.seconds, case.all_seconds = bm.time_compiled(compiled, denoiser, z, sigma,
                                                    repeats=config.repeats)
  progress.note(f"{_label(case)} σ={case.sigma:.4g}: {case.seconds:.4f} s per call "
                f"(compile {case.compile_seconds:.2f} s, setup {case.setup_seconds:.2f} s)")
  if case.denoiser == "pspc_flex":
    _flex_note(config, images, case, compiled(denoiser, z, sigma), flex_outputs)
    progress.note(f"  {case.note}")
  if config.loop_reference and case.denoiser == "pspc_square":
    _time_loop(config, z, sigma, data, case, compiled(denoiser, z, sigma), progress)


def _flex_note(config, images, case, output, flex_outputs) -> None:
  """Notes the mask sizes and, once both paths of a λ ran, max |matmul − gather|."""
  largest, mean = bm.flex_mask_sizes(images.shape[1], images.shape[2], config.flex_radius,
                                     case.threshold)
  case.note = f"masks ≤ {largest} px (mean {mean:.1f}), bump radius {config.flex_radius:g}"
  outputs = flex_outputs.setdefault(case.threshold, {})
  outputs[case.method] = output
  if len(outputs) == 2:
    diff = float(jnp.max(jnp.abs(outputs["matmul"] - outputs["gather"])))
    case.note += f", max |matmul − gather| = {diff:.1e}"


def _time_loop(config, z, sigma, data, case, fast, progress) -> None:
  loop_s, loop_compile, note, loop_out = bm.time_loop_reference(
      z, sigma, data, case.patch_size, budget_s=config.loop_budget, subset=config.loop_subset,
      progress=progress)
  case.loop_seconds, case.loop_compile_seconds = loop_s, loop_compile
  case.speedup_vs_loop = loop_s / case.seconds
  case.note = f"{note}: {loop_s:.2f} s"
  if loop_out is not None:
    case.loop_max_abs_diff = float(jnp.max(jnp.abs(fast - loop_out)))
    case.note += f", max |fast − loop| = {case.loop_max_abs_diff:.1e}"
  progress.note(f"  {case.note} (compile {loop_compile:.2f} s)")


def sampler_denoiser(config: BenchmarkConfig, name: str, data, chunk_size: int | None):
  """The denoiser value of a sampler case: empirical, pspc_square (auto patch schedule) or pspc_flex
  (the paper's CIFAR-10 λ schedule on the synthetic bump maps)."""
  if name == "empirical":
    return make_denoiser("empirical", data, chunk_size=chunk_size)
  if name == "pspc_square":
    return make_denoiser("pspc_square", data, patch_schedule="auto", chunk_size=chunk_size)
  maps = bm.bump_sensitivity_maps(data.shape[1], data.shape[2], config.flex_radius)
  return make_denoiser("pspc_flex", data, maps=maps, thresholds="cifar10", chunk_size=chunk_size)


_SAMPLER_NOTES = {"empirical": "", "pspc_square": "patch schedule auto",
                  "pspc_flex": "λ schedule cifar10, bump radius {radius:g}"}


def _time_samplers(config, images, samplers, progress, save, bar) -> None:
  """Times each sampler on the same latents; ratios to the `empirical` sampler."""
  if not samplers:
    return
  data = jnp.asarray(bm.as_data_dtype(images, samplers[0].data_dtype))
  latents = latents_from_seeds(jnp.arange(config.sample_batch), images.shape[1:])
  sigmas = edm_sigmas(config.steps)
  run = jax.jit(lambda denoiser, latents: sample(denoiser, latents, sigmas, solver="heun"))
  reference = samplers[0] if samplers[0].denoiser == "empirical" else None
  for result in samplers:
    denoiser = sampler_denoiser(config, result.denoiser, data, result.chunk_size)
    label = f"{result.denoiser} sampler ({config.steps}-step Heun, B={config.sample_batch})"
    compiled, result.compile_seconds = bm.compile_timed(progress, label, run, denoiser, latents)
    result.all_seconds = [_seconds(compiled, denoiser, latents)
                          for _ in range(config.sample_repeats)]
    result.seconds = min(result.all_seconds)
    result.seconds_per_call = result.seconds / result.calls
    result.note = _SAMPLER_NOTES[result.denoiser].format(radius=config.flex_radius)
    if reference is not None:
      result.ratio_to_empirical = result.seconds / reference.seconds
    progress.note(f"{label}: {result.seconds:.2f} s ({result.seconds_per_call:.4f} s per call, "
                  f"compile {result.compile_seconds:.2f} s)")
    save()
    bar.update()


def _seconds(compiled, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start


def _measure_memory(config, cases, progress, save, bar) -> None:
  for case in cases:
    report = bm.run_worker("pspc_jax.jobs.benchmark", {"config": dataclasses.asdict(config),
                                                       "case": dataclasses.asdict(case)})
    case.peak_rss_mb, case.device_peak_mb = report["peak_mb"], report["device_peak_mb"]
    if report["note"]:
      case.note = f"{case.note}; {report['note']}" if case.note else report["note"]
    device = "" if case.device_peak_mb is None else f", device peak {case.device_peak_mb:.0f} MB"
    progress.note(f"{_label(case)}: peak RSS {case.peak_rss_mb:.0f} MB{device} {report['note']}")
    save()
    bar.update()


def memory_worker(spec: dict) -> dict:
  """Run in a fresh process by `_measure_memory`: loads the dataset, builds and compiles one case, then
  measures one call (`benchmarking.reset_peak_rss` / `peak_rss_mb` / `device_peak_mb`).

  Returns:
    {"peak_mb", "resident_before_mb", "device_peak_mb", "note"}.
  """
  config = BenchmarkConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in spec["config"].items()})
  case = CaseResult(**spec["case"])
  images, _ = load_images(config)
  data = jnp.asarray(bm.as_data_dtype(images, case.data_dtype))
  z = bm.make_queries(images, config.batch, case.sigma, config.seed)
  del images
  sigma = jnp.float32(case.sigma)
  denoiser = case_denoiser(config, case, data, {})
  compiled = apply_denoiser.lower(denoiser, z, sigma).compile()
  resident = bm.resident_mb()
  note = bm.reset_peak_rss()
  jax.block_until_ready(compiled(denoiser, z, sigma))
  peak, peak_note = bm.peak_rss_mb()
  return {"peak_mb": peak, "resident_before_mb": resident, "device_peak_mb": bm.device_peak_mb(),
          "note": note or peak_note}


def _label(case: CaseResult) -> str:
  if case.denoiser == "pspc_flex":
    return f"{case.data_dtype} pspc_flex λ={case.threshold:g} {case.method}"
  if case.denoiser == "pspc_square":
    return f"{case.data_dtype} pspc_square s={case.patch_size}"
  return f"{case.data_dtype} {case.denoiser}"


# Columns of the per-call table; those marked optional are left out when no row has a value.
_CASE_COLUMNS = (("data", False), ("denoiser", False), ("s", False), ("sigma", False),
                 ("lambda", True), ("path", True), ("time/call (s)", False), ("compile (s)", False),
                 ("setup (s)", True), ("x empirical", False), ("scratch (MB)", True), ("speed-up vs loop", True),
                 ("peak RSS (MB)", True), ("device peak (MB)", True), ("note", True))
_SAMPLER_COLUMNS = (("sampler", False), ("data", False), ("B", False), ("steps", False),
                    ("calls", False), ("time (s)", False), ("compile (s)", False),
                    ("x empirical", False), ("s/call", False), ("chunk", False), ("note", True))


def format_table(result: BenchmarkResult) -> str:
  """The human-readable report: machine, dataset, the per-call table, then the sampler table."""
  m, d, c = result.machine, result.dataset, result.config
  gpu = f", {m['device_count']} × {m['gpu']}" if m.get("gpu") else ""
  lines = [f"machine: {m['cpu']}, {m['usable_cores']}/{m['cores']} cores, "
           f"{(m['memory_mb'] or 0) / 1e3:.0f} GB{gpu}, jax {m['jax']} (jaxlib {m['jaxlib']}), "
           f"device {m['device']}, load average {_fmt_load(m['load_average'])}",
           f"dataset: {d['name']}, N = {d['num_images']}, images {tuple(d['image_shape'])}, "
           f"{d['bytes'] / 1e6:.0f} MB; batch B = {c['batch']}, repeats = {c['repeats']} (minimum "
           f"reported), chunk rows {_fmt_chunk(result.cases)}"]
  rows = [(x.data_dtype, x.denoiser, "-" if x.patch_size is None else str(x.patch_size),
           f"{x.sigma:.4g}", _fmt(x.threshold, "g"), x.method or "-", _fmt(x.seconds, ".4f"),
           _fmt(x.compile_seconds, ".2f"), _fmt(x.setup_seconds, ".2f"),
           _fmt(x.ratio_to_empirical, ".2f"),
           _fmt(x.scratch_mb, ".1f"), _fmt(x.speedup_vs_loop, ".1f"), _fmt(x.peak_rss_mb, ".0f"),
           _fmt(x.device_peak_mb, ".0f"), x.note or "-") for x in result.cases]
  if rows:
    lines += _text_table(_CASE_COLUMNS, rows)
  sampler_rows = [(s.denoiser, s.data_dtype, str(s.batch), str(s.steps), str(s.calls),
                   _fmt(s.seconds, ".2f"), _fmt(s.compile_seconds, ".2f"),
                   _fmt(s.ratio_to_empirical, ".2f"), _fmt(s.seconds_per_call, ".4f"),
                   "default" if s.chunk_size is None else str(s.chunk_size), s.note or "-")
                  for s in result.samplers]
  if sampler_rows:
    lines += ["", f"samplers: {c['steps']}-step Heun, the same {c['sample_batch']} latents "
              "(seeds 0 … B − 1), time of a whole run after compilation"]
    lines += _text_table(_SAMPLER_COLUMNS, sampler_rows)
  return "\n".join(lines)


def _text_table(columns, rows) -> list[str]:
  keep = [i for i, (_, optional) in enumerate(columns)
          if not optional or any(row[i] != "-" for row in rows)]
  header = [columns[i][0] for i in keep]
  rows = [[row[i] for i in keep] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  fmt = "  ".join("{:<%d}" % w for w in widths)
  return ([fmt.format(*header).rstrip(), "  ".join("-" * w for w in widths)]
          + [fmt.format(*r).rstrip() for r in rows])


def _fmt(value, spec: str) -> str:
  missing = value is None or (isinstance(value, float) and math.isnan(value))
  return "-" if missing else format(value, spec)


def _fmt_load(load) -> str:
  return "-" if not load else "/".join(f"{v:.2f}" for v in load)


def _fmt_chunk(cases) -> str:
  sizes = sorted({c.chunk_size for c in cases if c.denoiser != "gaussian"}, key=str)
  return ", ".join("each denoiser's default" if s is None else str(s) for s in sizes) or "-"


if __name__ == "__main__":
  print(json.dumps(memory_worker(json.loads(sys.argv[1]))), flush=True)
