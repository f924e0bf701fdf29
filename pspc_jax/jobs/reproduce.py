"""The job behind `bin/reproduce`: the paper's experiments for one network checkpoint and one dataset,
as a plan of stages over the existing jobs, resumable, ending in one report.

Stages, in order; each writes into its own subfolder of the output folder and calls one job:

  sensitivity  Fig. 3   the network's sensitivity maps on the EDM grid (`jobs.sensitivity`)
  tune         App. B   patch size and Flex λ of least MSE to the network per grid σ (`jobs.tune`),
                        with the maps of `sensitivity`
  optimal_gap  Fig. 2   network vs optimal denoiser on the forward process at many σ (`jobs.evaluate`)
  denoisers    Fig. 7   every denoiser vs the network on the forward and reverse processes at the grid σ
                        (`jobs.evaluate`); PSPC-Square and PSPC-Flex use the tuned schedules and maps
  patches      Fig. 4   patch posterior means vs the optimal denoiser (forward set) and vs the network
                        on the reverse set that `denoisers` saved (`jobs.evaluate`, set "given")
  outputs      Fig. 1   every denoiser's output on the same reverse-process z at the paper's Fig. 1 σ
  samples      Fig. 8/9 every denoiser's samples from shared latents, similarity and memorisation
                        statistics (`jobs.compare`)

A stage is skipped when its marker `<stage>/stage.json` exists; the marker is written only after the
stage has finished, and records the stage's settings (a rerun with other settings is refused: delete
the stage's folder to redo it). Inside a stage the jobs resume on their own, so an interrupted stage
loses at most the job's last unit of work. `stages.json` records per stage its wall time, its CPU time
(user + system, all threads) and its peak resident set size (`peak_rss_bytes`): the kernel's
high-water mark VmHWM of this process, reset at the stage's start through /proc/self/clear_refs, so it
is that stage's own peak (scope "stage"); where the reset is refused it is the process's peak so far
(scope "process"). On CPU, XLA's buffers live in that memory; on an accelerator the device's own peak
(`device_peak_bytes`, since the process started, as XLA reports it) is recorded too. Then `report.md`
(`pspc_jax.jobs.reproduce_report`) is written from the stage folders' files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import checkpoints, paper_values, plots, schedules, tuning, validation
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.registry import available_denoisers
from pspc_jax.evaluation import default_sigmas
from pspc_jax.files import save_json, save_npz
from pspc_jax.jobs.compare import compare_run
from pspc_jax.jobs.evaluate import BatchedDenoiser, evaluate_run, registry_maker
from pspc_jax.jobs.reproduce_report import write_report
from pspc_jax.jobs.sensitivity import sensitivity_run
from pspc_jax.jobs.tune import SCHEDULE_FILES, tune_run
from pspc_jax.maps_files import load_maps, save_maps
from pspc_jax.progress import SILENT, Progress
from pspc_jax.release_files import load_z_set
from pspc_jax.sampling import SOLVERS

MARKER = "stage.json"
STAGES_FILE = "stages.json"
MAPS_FILE = "maps.npz"
# The paper's comparison set (§6.1, Fig. 7): the network, the optimal (empirical) denoiser, the
# Gaussian and CFDM baselines and both PSPC variants.
DEFAULT_DENOISERS = ("network", "empirical", "gaussian", "cfdm", "pspc_square", "pspc_flex")
_SENSITIVITY_BATCH = 8  # z per batched VJP of the sensitivity stage (bin/sensitivity's default)


@dataclasses.dataclass(frozen=True)
class Counts:
  """How much work each stage does. The defaults are the paper's CIFAR-10 counts (`paper_values`)
  except `tune_z` (the paper gives none) and `outputs_z` (Fig. 1 shows one image per σ).

  Attributes:
    sensitivity_z: forward-process z per σ of the sensitivity maps (§3.1: 1,000).
    tune_z: z per σ scored by the schedule tuning.
    gap_sigmas: σ of the network-vs-optimal curve, log-spaced in [0.01, 100] (Fig. 2: 150).
    gap_z: forward-process z per σ of that curve (Fig. 2: 10,000).
    eval_z: z per σ and process of the denoiser comparison; also the reverse-set trajectories (§6:
      10,000).
    patch_z: z per σ and set of the patch analysis, ≤ eval_z (Fig. 4: 10,000).
    outputs_z: reverse-process z shown per σ in the Fig. 1 figure, ≤ eval_z.
    num_samples: shared latents sampled by every denoiser (App. C.1: 1,000).
    steps: EDM grid steps (σ 80 … 0.002): the σ of maps, tuning, comparison, patches and the
      samplers (§6: 18 for CIFAR-10).
  """
  sensitivity_z: int = paper_values.SENSITIVITY_Z_PER_SIGMA.value
  tune_z: int = 1_000
  gap_sigmas: int = paper_values.FIG2_NUM_SIGMAS.value
  gap_z: int = paper_values.FIG2_Z_PER_SIGMA.value
  eval_z: int = paper_values.EVAL_Z_PER_SIGMA.value["CIFAR-10"]
  patch_z: int = paper_values.PATCH_Z_PER_SIGMA.value
  outputs_z: int = 2
  num_samples: int = paper_values.SAMPLES_COUNT.value
  steps: int = paper_values.EVAL_STEPS.value["CIFAR-10"]

  def scaled(self, factor: float) -> "Counts":
    """The z and sample counts × `factor` (rounded, at least 1); σ counts and steps unchanged.

    Raises:
      ValueError: factor not positive.
    """
    if not factor > 0:
      raise ValueError(f"the scale must be positive, got {factor}")
    fixed = ("gap_sigmas", "steps")
    return dataclasses.replace(self, **{f.name: max(1, round(getattr(self, f.name) * factor))
                                        for f in dataclasses.fields(self) if f.name not in fixed})


@dataclasses.dataclass(frozen=True)
class _Run:
  """A checked reproduction: data, network, folder, counts and choices shared by every stage."""
  images: np.ndarray
  dataset_name: str
  checkpoint: str
  outdir: str
  counts: Counts
  denoisers: tuple[str, ...]
  patch_sizes: tuple[int, ...]
  patch_positions: int | None
  thresholds: tuple[float, ...]
  tune_z_source: str
  solver: str
  batch_size: int
  seed: int
  sensitivity_chunk: int | None
  maps: str | None
  progress: Progress

  def folder(self, stage: str) -> str:
    return os.path.join(self.outdir, stage)

  @property
  def identity(self) -> dict:
    """What every stage's results depend on: the network and the data."""
    return {"checkpoint": self.checkpoint, "dataset": self.dataset_name,
            "num_train_images": int(self.images.shape[0]), "image_shape": list(self.images.shape[1:])}

  @property
  def grid(self) -> list[float]:
    """The EDM grid of `counts.steps` without its final 0, descending (float32 values)."""
    return [float(s) for s in default_sigmas(self.counts.steps)]

  def options(self) -> dict[str, dict]:
    """Builder options per denoiser: the checkpoint, the tuned schedules and the maps."""
    tune = self.folder("tune")
    return {"network": {"checkpoint": self.checkpoint},
            "pspc_square": {"patch_schedule": os.path.join(tune, SCHEDULE_FILES["square"])},
            "pspc_flex": {"maps": os.path.join(self.folder("sensitivity"), MAPS_FILE),
                          "thresholds": os.path.join(tune, SCHEDULE_FILES["flex"])}}


class Stage(NamedTuple):
  """One step of the plan: its name (= folder), the paper figure it reproduces, the stages whose
  outputs it reads, the settings its results depend on (beyond `_Run.identity`) and its work."""
  name: str
  figure: str
  needs: tuple[str, ...]
  settings: Callable[[_Run], dict]
  run: Callable[[_Run], dict]


# ----------------------------------------------------------------------------------------------------
# The stages: each calls one job in its folder and returns a small JSON-able summary.


def _network(run: _Run):
  return build_denoiser("network", jnp.asarray(run.images), checkpoint=run.checkpoint)


def heatmap_pixels(image_shape) -> list[tuple[int, int]]:
  """Output pixels of the heat-map figure: the paper's (15, 15) on 32×32 (the pixel just above and left
  of the centre, ((H−1)//2, (W−1)//2) on any size) and the corner (0, 0)."""
  return [((image_shape[0] - 1) // 2, (image_shape[1] - 1) // 2), (0, 0)]


def _sensitivity(run: _Run) -> dict:
  out = os.path.join(run.folder("sensitivity"), MAPS_FILE)
  config, sigmas = {**run.identity, "denoiser": "network"}, run.grid
  if run.maps:
    # Given maps are written as the job's own output of this configuration, which the job then
    # reuses instead of computing (its documented resumption), writing only the figures.
    given = load_maps(run.maps)
    config["imported_from"] = run.maps
    sigmas = [float(s) for s in given.sigmas]
    save_maps(out, given, {**config, "num_z": run.counts.sensitivity_z, "seed": run.seed})
  summary = sensitivity_run(
      _network(run), jnp.asarray(run.images), sigmas, out=out, config=config,
      num_z=run.counts.sensitivity_z, seed=run.seed,
      batch_size=min(_SENSITIVITY_BATCH, run.counts.sensitivity_z), chunk_size=run.sensitivity_chunk,
      pixels=heatmap_pixels(run.images.shape[1:]), progress=run.progress)
  return {"computed": summary["computed"], "reused": summary["reused"]}


def _tune(run: _Run) -> dict:
  side = min(run.images.shape[1:3])
  label = "paper's CIFAR-10" if side == 32 else f"paper's CIFAR-10 rescaled to {side}"
  summary = tune_run(
      run.images, _network(run), run.grid, outdir=run.folder("tune"), config=run.identity,
      patch_sizes=run.patch_sizes, maps=load_maps(os.path.join(run.folder("sensitivity"), MAPS_FILE)),
      thresholds=run.thresholds,
      z_source=run.tune_z_source, num_z=run.counts.tune_z, seed=run.seed, batch_size=run.batch_size,
      compare={"square": (label, schedules.patch_schedule_for(side)),
               "flex": ("paper's CIFAR-10 λ", schedules.cifar10_flex_schedule())},
      progress=run.progress)
  return {"computed": summary["computed"], "reused": summary["reused"],
          "schedules": {kind: list(s.values) for kind, s in summary["schedules"].items()}}


def gap_sigmas(count: int) -> np.ndarray:
  """`count` σ log-spaced over the paper's Fig. 2 range [0.01, 100] (the paper gives the range and the
  count, not the spacing), descending."""
  low, high = paper_values.FIG2_SIGMA_RANGE.value
  return np.geomspace(high, low, count) if count > 1 else np.asarray([np.sqrt(low * high)])


def _evaluate(run: _Run, stage: str, **kwargs) -> dict:
  summary = evaluate_run(run.images, outdir=run.folder(stage), options=run.options(),
                         seed=run.seed, batch_size=run.batch_size, reference="network",
                         steps=run.counts.steps, dataset_name=run.dataset_name,
                         progress=run.progress, **kwargs)
  return {"computed": len(summary["computed"]), "rows": len(summary["mse"]),
          "patch_rows": len(summary["patch_mse"])}


def _optimal_gap(run: _Run) -> dict:
  return _evaluate(run, "optimal_gap", denoisers=["network", "empirical"],
                   sigmas=gap_sigmas(run.counts.gap_sigmas), sets=["forward"], count=run.counts.gap_z)


def _denoisers(run: _Run) -> dict:
  return _evaluate(run, "denoisers", denoisers=list(run.denoisers), sets=["forward", "reverse"],
                   count=run.counts.eval_z, solver=paper_values.EVAL_REVERSE_SAMPLER.value)


def _reverse_set_path(run: _Run) -> str:
  return os.path.join(run.folder("denoisers"), "reverse_set.npz")


def _patches(run: _Run) -> dict:
  given = load_z_set(_reverse_set_path(run), run.counts.patch_z)
  return _evaluate(run, "patches", denoisers=["network", "empirical"], sets=["forward", "given"],
                   given=given, count=run.counts.patch_z, patch_sizes=run.patch_sizes,
                   patch_positions=run.patch_positions)


def fig1_indices(sigmas: Sequence[float]) -> list[int]:
  """Indices into `sigmas` of the σ nearest (in log σ) to each of the paper's Fig. 1 rows, distinct,
  in the order of `sigmas`."""
  logs = np.log(np.asarray(sigmas, np.float64))
  picked = {int(np.argmin(np.abs(logs - np.log(t)))) for t in paper_values.FIG1_SIGMAS.value}
  return sorted(picked)


def _outputs(run: _Run) -> dict:
  with np.load(_reverse_set_path(run)) as stored:
    sigmas, states = stored["sigmas"], stored["states"]
  picks = fig1_indices(sigmas)
  z = states[picks, :run.counts.outputs_z]  # (S, K, H, W, C)
  flat_z = z.reshape((-1,) + z.shape[2:])
  flat_sigma = np.repeat(sigmas[picks], z.shape[1])
  make = registry_maker(jnp.asarray(run.images), run.options())
  outputs = {}
  for name in run.denoisers:
    with run.progress.phase(f"building {name}"):
      denoiser = make(name)
    # The `denoisers` stage's batch shape (evaluate_run's min(batch, count)): its programs are reused.
    call = BatchedDenoiser(denoiser, min(run.batch_size, run.counts.eval_z), z.shape[2:],
                           run.progress, label=f"denoiser {name}")
    outputs[name] = call(flat_z, flat_sigma).reshape(z.shape)
  folder = run.folder("outputs")
  save_npz(os.path.join(folder, "outputs.npz"), sigmas=sigmas[picks], z=z,
           **{f"out_{name}": out for name, out in outputs.items()})
  titles = [f"σ={s:.2g}" for s in sigmas[picks]]
  for k in range(z.shape[1]):
    rows = {"z (min–max)": plots.min_max_scaled(z[:, k]), **{n: o[:, k] for n, o in outputs.items()}}
    plots.save_rows_figure(os.path.join(folder, f"outputs_{k}.png"), rows, column_titles=titles,
                           title=f"denoiser outputs on the network's reverse-process z (trajectory {k})")
  return {"sigmas": [float(s) for s in sigmas[picks]], "count": int(z.shape[1])}


def _samples(run: _Run) -> dict:
  seeds = list(range(run.seed, run.seed + run.counts.num_samples))
  summary = compare_run(run.images, denoisers=list(run.denoisers), seeds=seeds,
                        outdir=run.folder("samples"), options=run.options(), steps=run.counts.steps,
                        solver=run.solver, batch_size=run.batch_size,
                        dataset_name=run.dataset_name, progress=run.progress)
  return {"memorisation": summary["memorisation"]}


def _counts(*names: str) -> Callable[[_Run], dict]:
  """A stage's settings: the named counts, the grid steps and the seed."""
  return lambda run: {**{n: getattr(run.counts, n) for n in names}, "steps": run.counts.steps,
                      "seed": run.seed}


STAGES = (
    Stage("sensitivity", "Fig. 3", (), lambda run: {**_counts("sensitivity_z")(run), "maps": run.maps},
          _sensitivity),
    Stage("tune", "App. B (Fig. 10, 12)", ("sensitivity",),
          lambda run: {**_counts("tune_z")(run), "z_source": run.tune_z_source,
                       "patch_sizes": list(run.patch_sizes), "thresholds": list(run.thresholds)},
          _tune),
    Stage("optimal_gap", "Fig. 2", (), _counts("gap_sigmas", "gap_z"), _optimal_gap),
    Stage("denoisers", "Fig. 7", ("sensitivity", "tune"),
          lambda run: {**_counts("eval_z")(run), "denoisers": list(run.denoisers)}, _denoisers),
    Stage("patches", "Fig. 4", ("denoisers",),
          lambda run: {**_counts("patch_z")(run), "patch_sizes": list(run.patch_sizes),
                       "patch_positions": run.patch_positions}, _patches),
    Stage("outputs", "Fig. 1", ("sensitivity", "tune", "denoisers"),
          lambda run: {**_counts("outputs_z")(run), "denoisers": list(run.denoisers)}, _outputs),
    Stage("samples", "Fig. 8, 9", ("sensitivity", "tune"),
          lambda run: {**_counts("num_samples")(run), "denoisers": list(run.denoisers),
                       "solver": run.solver}, _samples),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
_STAGES_BY_NAME = {stage.name: stage for stage in STAGES}


# ----------------------------------------------------------------------------------------------------
# Time and memory of a stage.


def _status_bytes(field: str) -> int | None:
  """A "<field>: N kB" line of /proc/self/status in bytes (None where there is no such file)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets the kernel's resident-set high-water mark VmHWM of this process (Linux ≥ 4.0: writing 5
  to /proc/self/clear_refs); whether it worked."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _device_peak_bytes() -> int | None:
  """The first device's peak allocation since the process started, as XLA reports it (None on CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory statistics
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measured(work: Callable[[], dict]) -> tuple[dict, dict]:
  """(work's result, its measurements): seconds (wall), cpu_seconds (user + system, every thread),
  rss_start_bytes (resident memory when it starts: what earlier work left allocated), peak_rss_bytes
  with peak_rss_scope ("stage" when the high-water mark could be reset at the start, else "process"),
  process_peak_rss_bytes (getrusage's ru_maxrss) and device_peak_bytes (None on CPU)."""
  scope = "stage" if _reset_peak_rss() else "process"
  rss_start = _status_bytes("VmRSS")
  start, cpu = time.perf_counter(), _cpu_seconds()
  result = work()
  peak = _status_bytes("VmHWM")
  return result, {
      "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu,
      "rss_start_bytes": rss_start, "peak_rss_bytes": peak, "peak_rss_scope": scope,
      "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "device_peak_bytes": _device_peak_bytes()}


# ----------------------------------------------------------------------------------------------------
# The plan.


def _checked_run(images: np.ndarray, checkpoint: str, outdir: str, dataset_name: str,
                 counts: Counts, denoisers: Sequence[str], patch_sizes, patch_positions: int | None,
                 thresholds: Sequence[float],
                 tune_z_source: str, solver: str, batch_size: int, seed: int,
                 sensitivity_chunk: int | None, maps: str | None, progress: Progress) -> _Run:
  """The `_Run` of `reproduce_run`'s arguments; ValueError naming the first bad one."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] < 2:
    raise ValueError(f"images must be (N, H, W, C) with N >= 2, got shape {images.shape}")
  shape = tuple(checkpoints.read_meta(checkpoint).get("image_shape", ()))
  if shape != tuple(images.shape[1:]):
    raise ValueError(f"checkpoint {checkpoint} is a network for images of shape {shape}, the dataset's "
                     f"are {tuple(images.shape[1:])}")
  bad = [f.name for f in dataclasses.fields(counts) if int(getattr(counts, f.name)) < 1]
  if bad or counts.steps < 2:
    raise ValueError(f"counts must be at least 1 and steps at least 2: {bad or ['steps']}")
  if max(counts.patch_z, counts.outputs_z) > counts.eval_z:
    raise ValueError("patch_z and outputs_z must not exceed eval_z (they use the reverse set of the "
                     f"denoisers stage), got {counts.patch_z}, {counts.outputs_z} > {counts.eval_z}")
  denoisers = tuple(dict.fromkeys(denoisers))
  unknown = [d for d in denoisers if d not in available_denoisers()]
  if unknown or "network" not in denoisers:
    raise ValueError(f"denoisers must be registry names and include 'network' (the reference), got "
                     f"{list(denoisers)}")
  side = min(images.shape[1:3])
  sizes = tuning.candidate_patch_sizes(side) if patch_sizes is None else tuple(map(int, patch_sizes))
  if not sizes or not all(1 <= s <= side for s in sizes):
    raise ValueError(f"patch sizes must lie in [1, {side}], got {list(sizes)}")
  patch_positions = validation.positive_int(patch_positions, "patch_positions", minimum=0,
                                           optional=True)
  if maps is not None and load_maps(maps).maps.shape[1:] != images.shape[1:3] * 2:
    raise ValueError(f"the maps of {maps} are for images of {load_maps(maps).maps.shape[1:3]}, the "
                     f"dataset's are {images.shape[1:3]}")
  if os.path.exists(outdir) and not os.path.isdir(outdir):
    raise ValueError(f"outdir {outdir} exists and is not a folder")
  thresholds = tuple(sorted({float(v) for v in thresholds}))
  if not thresholds or not all(0 < v <= 1 for v in thresholds):
    raise ValueError(f"thresholds must lie in (0, 1], got {list(thresholds)}")
  if (tune_z_source not in tuning.Z_SOURCES or solver not in SOLVERS or batch_size < 1
      or (sensitivity_chunk is not None and sensitivity_chunk < 1)):
    raise ValueError(f"bad tune_z_source {tune_z_source!r} ({'/'.join(tuning.Z_SOURCES)}), solver "
                     f"{solver!r} ({'/'.join(SOLVERS)}), batch size {batch_size} or sensitivity "
                     f"chunk {sensitivity_chunk}")
  return _Run(images, dataset_name, os.path.abspath(checkpoint), os.path.abspath(outdir), counts,
              denoisers, tuple(sorted(set(sizes))), patch_positions or None, thresholds,
              tune_z_source, solver, int(batch_size), int(seed), sensitivity_chunk, None if maps is None else os.path.abspath(maps), progress)


def select_stages(stages: Sequence[str] | None) -> list[Stage]:
  """The stages named (all by default), in plan order; ValueError for an unknown name."""
  if stages is None:
    return list(STAGES)
  unknown = [s for s in stages if s not in STAGE_NAMES]
  if unknown or not stages:
    raise ValueError(f"unknown stage {unknown[0] if unknown else '(none)'}; choose from "
                     f"{', '.join(STAGE_NAMES)}")
  return [stage for stage in STAGES if stage.name in stages]


def stage_settings(run: _Run, stage: Stage) -> dict:
  """What a stage's results depend on: the network and data, its own settings and, recursively, those
  of the stages whose outputs it reads."""
  return {**run.identity, **stage.settings(run),
          "needs": {need: stage_settings(run, _STAGES_BY_NAME[need]) for need in stage.needs}}


def _load_marker(run: _Run, stage: Stage) -> dict | None:
  """The stage's marker file, or None when the stage has not finished."""
  path = os.path.join(run.folder(stage.name), MARKER)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _has_current_settings(run: _Run, stage: Stage, marker: dict) -> bool:
  """Whether `marker` records this run's settings of `stage` (compared as JSON, as stored)."""
  return marker.get("settings") == json.loads(json.dumps(stage_settings(run, stage)))


def _read_marker(run: _Run, stage: Stage) -> dict | None:
  """The finished stage's marker, or None when the stage has not finished.

  Raises:
    ValueError: the stage finished with other settings.
  """
  marker = _load_marker(run, stage)
  if marker is None:
    return None
  if not _has_current_settings(run, stage, marker):
    raise ValueError(f"{run.folder(stage.name)} holds stage {stage.name} run with other settings "
                     "(network, data, counts or an earlier stage's); delete that folder to redo it, "
                     "or choose another output folder")
  return marker


def _check_needs(run: _Run, selected: list[Stage]) -> None:
  """Every stage to run finds what it reads: a finished stage, or one that runs before it."""
  names = [stage.name for stage in selected]
  for stage in selected:
    for need in stage.needs:
      if need not in names and _read_marker(run, _STAGES_BY_NAME[need]) is None:
        raise ValueError(f"stage {stage.name} needs the output of stage {need}, which has not run in "
                         f"{run.outdir}; run it first (or together)")


def _megabytes(value: int | None) -> str:
  return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _run_stage(run: _Run, stage: Stage, position: str) -> dict:
  """Runs one stage, then writes its marker; returns its measurements."""
  run.progress.note(f"{position} stage {stage.name} ({stage.figure}): started")
  summary, measures = measured(lambda: stage.run(run))
  save_json(os.path.join(run.folder(stage.name), MARKER),
            {"stage": stage.name, "figure": stage.figure, "settings": stage_settings(run, stage),
             "summary": summary, "measured": measures})
  run.progress.note(f"{position} stage {stage.name}: finished in {measures['seconds']:.1f} s, peak "
                    f"RSS {_megabytes(measures['peak_rss_bytes'])} ({measures['peak_rss_scope']})")
  return measures


def _write_stages(run: _Run, status: dict[str, str]) -> dict:
  """stages.json: per stage its figure, this invocation's status (ran / skipped / pending / not
  selected), whether it has finished and with this invocation's settings, and the measurements of the
  run that finished it (from its marker). Returns the written dict."""
  stages = {}
  for stage in STAGES:
    marker = _load_marker(run, stage)
    current = marker is not None and _has_current_settings(run, stage, marker)
    stages[stage.name] = {"figure": stage.figure, "status": status.get(stage.name, "not selected"),
                          "finished": marker is not None, "current_settings": current,
                          **(marker["measured"] if marker else {})}
  record = {"measures": "seconds: wall time; cpu_seconds: user + system time of every thread; "
                        "rss_start_bytes: resident memory at the stage's start (what earlier "
                        "stages left allocated); peak_rss_bytes: the process's VmHWM during the "
                        "stage (reset at its start when peak_rss_scope is 'stage'; it includes "
                        "rss_start_bytes); device_peak_bytes: the accelerator's peak allocation "
                        "since the process started (null on CPU)",
            "counts": dataclasses.asdict(run.counts), "devices": [str(d) for d in jax.devices()],
            "stages": stages}
  save_json(os.path.join(run.outdir, STAGES_FILE), record)
  return record


def reproduce_run(images: np.ndarray, *, checkpoint: str, outdir: str, dataset_name: str = "",
                  counts: Counts = Counts(), stages: Sequence[str] | None = None,
                  denoisers: Sequence[str] = DEFAULT_DENOISERS,
                  patch_sizes: Sequence[int] | None = None, patch_positions: int | None = None,
                  thresholds: Sequence[float] = tuning.DEFAULT_THRESHOLDS,
                  tune_z_source: str = "forward",
                  solver: str = paper_values.SAMPLES_SOLVER.value, batch_size: int = 64,
                  seed: int = 0, sensitivity_chunk: int | None = None, maps: str | None = None,
                  progress: Progress = SILENT) -> dict:
  """Runs the stages of the plan that have not finished, then writes stages.json and report.md.

  Args:
    images: (N, H, W, C) uint8 training set (N ≥ 2), e.g. CIFAR-10 with flips.
    checkpoint: a network checkpoint for images of shape (H, W, C) (a converted EDM pickle or a
      bin/train workdir), the reference of every comparison.
    outdir: output folder; finished stages there are skipped.
    dataset_name: recorded in the stages' configurations and the report.
    counts: work per stage (`Counts`; `Counts().scaled(f)` for small runs).
    stages: names of the stages to run (default all); a stage whose inputs come from a stage that is
      neither finished nor selected is refused.
    denoisers: registry names compared with the network, including "network".
    patch_sizes: square sizes of the tuning and the patch analysis (default: the paper's sweep that
      fits, plus the full image).
    patch_positions: the patch analysis over every window (None or 0) or over an even k×k grid of
      windows per z (`evaluation.window_grid`; each window exact, far cheaper on CIFAR-10: 4).
    thresholds: candidate Flex λ of the tuning.
    tune_z_source: "forward" (App. B) or "reverse": the z the schedules are tuned on.
    solver: sampler of the samples stage (App. C.1: Euler); the reverse set always uses Heun (§6).
    batch_size: z per compiled denoiser call.
    seed: seed of every forward set, reverse set and latent.
    sensitivity_chunk: output pixels per batched VJP of the sensitivity maps (memory ∝ chunk × C
      backward passes; default: `sensitivity.sensitivity_maps`'s, sized for the gradients only, which
      for a CIFAR-10 DDPM++ on a CPU host needs tens of GB: pass e.g. 16 there).
    maps: a sensitivity-maps file to use instead of computing the network's (`maps_files.load_maps`:
      an .npz of bin/sensitivity or the official release's heat maps .npy, which it made from 1,000 z
      per σ of DDPM++); the sensitivity stage then imports it and draws its figures.
    progress: one line per stage start and finish, and the jobs' own bars and phases.

  Returns:
    {"ran": [stage names], "skipped": [...], "stages": stages.json's dict, "report": path}.

  Raises:
    ValueError: bad arguments, a checkpoint for other images, a stage folder holding a run of other
      settings, a stage whose inputs are missing, or a job's own refusal.
  """
  run = _checked_run(images, checkpoint, outdir, dataset_name, counts, denoisers, patch_sizes,
                     patch_positions, thresholds, tune_z_source, solver, batch_size, seed, sensitivity_chunk, maps,
                     progress)
  selected = select_stages(stages)
  _check_needs(run, selected)
  status = {stage.name: "pending" for stage in selected}
  for k, stage in enumerate(selected):
    position = f"[{k + 1}/{len(selected)}]"
    if _read_marker(run, stage) is not None:
      progress.note(f"{position} stage {stage.name} ({stage.figure}): already finished, skipped")
      status[stage.name] = "skipped"
      continue
    _run_stage(run, stage, position)
    status[stage.name] = "ran"
    _write_stages(run, status)  # after every stage: an interrupted run keeps its measurements
  record = _write_stages(run, status)
  report = write_report(run.outdir, record, settings=_report_settings(run))
  progress.note(f"wrote {report} and {os.path.join(run.outdir, STAGES_FILE)}")
  return {"ran": [n for n, s in status.items() if s == "ran"],
          "skipped": [n for n, s in status.items() if s == "skipped"], "stages": record,
          "report": report}


def _report_settings(run: _Run) -> dict:
  return {**run.identity, "counts": dataclasses.asdict(run.counts), "denoisers": list(run.denoisers),
          "patch_sizes": list(run.patch_sizes), "thresholds": list(run.thresholds),
          "tune_z_source": run.tune_z_source,
          "solver": run.solver, "seed": run.seed, "grid": run.grid, "maps": run.maps,
          "heatmap_pixels": heatmap_pixels(run.images.shape[1:])}
