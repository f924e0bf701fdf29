"""Helpers shared by the `bin/` scripts: flag definitions, seed parsing, error reporting, progress."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from absl import app, flags

from pspc_jax import data as data_lib
from pspc_jax import distributed, multihost
from pspc_jax.denoisers import cfdm
from pspc_jax.denoisers.registry import available_denoisers
from pspc_jax.progress import SILENT, Progress, TerminalProgress
from pspc_jax.sampling import MAX_SEED, SOLVERS

# Flags defined by the define_* helpers below belong to the calling script, so they show in its --help.
flags.disclaim_key_flags()

# The options each registry denoiser takes from `define_denoiser_flags` (flag name = option name); a
# denoiser not listed takes none.
_FLAG_OPTIONS = {
    "pspc_square": ("patch_schedule",),
    "els": ("patch_schedule",),
    "pspc_flex": ("maps", "thresholds"),
    "pspc_flex_gaussian": ("rank", "thresholds"),
    "cfdm": ("smoothing",),
    "gaussian": ("rank",),
    "network": ("checkpoint",),
}

# The schedule flags' default: the schedule tuned for the --dataset where one ships, else `_GENERIC`.
DATASET_SCHEDULE = "dataset"
_GENERIC = {"patch_schedule": "auto", "thresholds": "cifar10"}
_GENERIC_HELP = {"auto": "the CIFAR-10 schedule rescaled to the image size",
                 "cifar10": "the paper's CIFAR-10 thresholds"}
# Tuned schedule files (bin/tune_schedule against the committed network, checkpoints/README.md) by
# --dataset value: patch sizes for pspc_square (ELS needs odd sizes: it keeps 'auto'), thresholds
# for pspc_flex with the maps they were tuned with (λ is a share of those maps' mass).
_CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
_TUNED_FILES = {"digits": {"patch_schedule": os.path.join(_CHECKPOINTS, "digits_schedules",
                                                          "patch_schedule.json"),
                           "thresholds": os.path.join(_CHECKPOINTS, "digits_schedules",
                                                      "thresholds.json"),
                           "maps": os.path.join(_CHECKPOINTS, "digits_ddpmpp_small_maps.npz")}}
_TUNED_FOR = {"patch_schedule": "pspc_square", "thresholds": "pspc_flex"}


def define_dataset_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --dataset, --max_images and --flip (in `flag_values`; tests pass their own)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("dataset", "digits",
                      "'digits' (embedded, offline), 'cifar10' (cached archive), or a path to an EDM "
                      "zip/folder, image folder, cifar-10-python.tar.gz, .npz or .npy", **fv)
  flags.DEFINE_integer("max_images", None, "use only the first N training images (before flips)", **fv)
  flags.DEFINE_bool("flip", False, "add horizontal mirrors of every training image", **fv)


def define_denoiser_flags(denoiser: str | None = None, help_prefix: str = "one of: ", *,
                          flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines, once per script, the option flags of every registry denoiser (see `denoiser_options`).

  Args:
    denoiser: when given, also defines `--denoiser` with this default; its help lists the registry.
    help_prefix: what `--denoiser` is for, put before that list.
    flag_values: where to define them (tests pass their own `flags.FlagValues()`).
  """
  fv = {"flag_values": flag_values}
  if denoiser is not None:
    flags.DEFINE_string("denoiser", denoiser, f"{help_prefix}{', '.join(available_denoisers())}", **fv)
  flags.DEFINE_string("patch_schedule", DATASET_SCHEDULE,
                      "pspc_square and els: patch sizes by σ: 'dataset' (pspc_square: the schedule "
                      "tuned for --dataset=digits, checkpoints/digits_schedules/patch_schedule.json; "
                      "other datasets and els: 'auto'), 'auto' (the CIFAR-10 schedule rescaled "
                      "to the image side; els: made odd, full image → 2·side−1), 'cifar10', an "
                      "integer, a comma list on the EDM grid, 'sigma:size' pairs or a JSON file "
                      "(bin/attribute: also the PSPC-Square patch sizes of the attribution)", **fv)
  flags.DEFINE_string("maps", None,
                      "pspc_flex: a sensitivity-maps file, an .npz of bin/sensitivity or the official "
                      "release's .npy (L, H, W, H, W) on the L-step EDM grid; each σ uses the nearest "
                      "map σ (--heatmaps, the official release's flag name, is an alias)", **fv)
  flags.DEFINE_alias("heatmaps", "maps", flag_values=flag_values)
  flags.DEFINE_string("thresholds", DATASET_SCHEDULE,
                      "pspc_flex, pspc_flex_gaussian: mass thresholds λ(σ) in (0, 1]: 'dataset' "
                      "(pspc_flex with --dataset=digits and "
                      "--maps=checkpoints/digits_ddpmpp_small_maps.npz: the thresholds tuned for "
                      "them, checkpoints/digits_schedules/thresholds.json; else 'cifar10'), "
                      "'cifar10' (the paper's), a number, a comma list on the EDM grid, "
                      "'sigma:value' pairs or a JSON file", **fv)
  flags.DEFINE_float("smoothing", None,
                     f"cfdm: the paper's smoothing parameter σ (default {cfdm.DEFAULT_SMOOTHING:g}; "
                     "0 = the empirical denoiser)", **fv)
  flags.DEFINE_integer("rank", None, "gaussian, pspc_flex_gaussian: keep the top-rank eigenpairs of the "
                       "covariance", **fv)
  flags.DEFINE_string("checkpoint", None, "network: a bin/train workdir or a checkpoint folder", **fv)


def define_device_flags(flag_values: flags.FlagValues = flags.FLAGS, *,
                        devices_help: str | None = None) -> None:
  """Defines `--devices` (the device mesh of the sharded denoisers; `devices_help` replaces its help),
  `--multihost` and the coordinator flags of a multi-host run."""
  flags.DEFINE_string("devices", None, devices_help or
                      "shard the training set over devices (empirical, pspc_square, pspc_flex): "
                      "unset = one device, 'all', a device count, or DATAxBATCH such as '4x2' (data "
                      "shards × query-batch shards)", flag_values=flag_values)
  flags.DEFINE_bool("multihost", False,
                    "join a multi-host run first (jax.distributed.initialize; --coordinator, "
                    "--num_processes, --process_id, else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                    "JAX_PROCESS_ID or the cluster's own variables)", flag_values=flag_values)
  flags.DEFINE_string("coordinator", None, "--multihost: host:port of process 0",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "--multihost: number of processes", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "--multihost: this process's index, 0 … num_processes − 1",
                       lower_bound=0, flag_values=flag_values)


def mesh_from_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Joins the multi-host run if `--multihost`, then the mesh of `--devices` (None: one device)."""
  if flag_values.multihost:
    distributed.initialize(flag_values.coordinator, flag_values.num_processes,
                           flag_values.process_id)
  return distributed.mesh_from_spec(flag_values.devices)


def terminal_progress() -> Progress:
  """A script's progress: `TerminalProgress()` (standard error) on process 0, silent on the other
  processes of a multi-host run. Call it after `mesh_from_flags` has joined the run."""
  return TerminalProgress() if multihost.is_main_process() else SILENT


def dataset_schedule(name: str, option: str, dataset: str | None,
                     maps: str | None = None) -> tuple[str, str]:
  """What the schedule flag `option` ("patch_schedule" or "thresholds") set to 'dataset' means for
  registry denoiser `name` on `dataset` (the --dataset value; None: no dataset flag).

  Args:
    name, option, dataset: as above.
    maps: pspc_flex's --maps; tuned thresholds apply only with the maps they were tuned with.

  Returns:
    (spec, description): the absolute path of the schedule file tuned for `dataset` when one ships
    for this denoiser (`checkpoints/digits_schedules/` for 'digits': patch sizes for pspc_square,
    thresholds for pspc_flex with `checkpoints/digits_ddpmpp_small_maps.npz`), else the generic spec
    ('auto' patch sizes, 'cifar10' thresholds); the description says which, for the user.
  """
  generic = _GENERIC[option]
  tuned = _TUNED_FILES.get(dataset, {})
  if option not in tuned or _TUNED_FOR[option] != name:
    return generic, f"{generic} ({_GENERIC_HELP[generic]})"
  path = tuned[option]
  shown = os.path.relpath(path) if path.startswith(os.getcwd() + os.sep) else path
  if not os.path.isfile(path):  # an install without the checkpoints folder
    return generic, f"{generic} ({_GENERIC_HELP[generic]}; the tuned {shown} is missing)"
  if option == "thresholds" and not _same_file(maps, tuned["maps"]):
    return generic, (f"{generic} ({_GENERIC_HELP[generic]}; {shown} is tuned for the maps "
                     f"{os.path.basename(tuned['maps'])})")
  return path, f"{shown} (tuned for {dataset}; --{option}={generic} for the generic one)"


def _same_file(path: str | None, other: str) -> bool:
  """Whether `path` names the existing file `other`."""
  try:
    return bool(path) and os.path.samefile(path, other)
  except OSError:
    return False


def denoiser_options(name: str, flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """The builder options of registry denoiser `name` (`make_denoiser(name, data, **options)`) from the
  flags of `define_denoiser_flags`: e.g. {"patch_schedule": "auto"} for pspc_square, {} for empirical.

  A schedule flag left at 'dataset' becomes the schedule tuned for --dataset (`dataset_schedule`),
  and the choice is printed (process 0).

  Raises:
    ValueError: `name` is not a registered denoiser.
  """
  if name not in available_denoisers():
    raise ValueError(f"unknown --denoiser={name!r}; choose one of {', '.join(available_denoisers())}")
  options = {option: flag_values[option].value for option in _FLAG_OPTIONS.get(name, ())}
  dataset = flag_values["dataset"].value if "dataset" in flag_values else None
  for option in _GENERIC:
    if options.get(option) == DATASET_SCHEDULE:
      options[option], description = dataset_schedule(name, option, dataset, options.get("maps"))
      multihost.main_print(f"{name} --{option}: {description}")
  return options


def define_sampler_flags(num_samples: int) -> None:
  """Defines the PF-ODE sampler flags --num_samples (default `num_samples`), --seeds, --steps and
  --solver; with `define_denoiser_flags(denoiser=...)` they make `sampler_from_flags`."""
  flags.DEFINE_integer("num_samples", num_samples,
                       "number of samples (seeds 0 … n−1) when --seeds is not set")
  flags.DEFINE_string("seeds", None,
                      "seeds, e.g. '0-15' or '3,7,11'; image k depends only on its seed")
  flags.DEFINE_integer("steps", 18, "EDM grid steps (σ 80 → 0.002, then 0)")
  flags.DEFINE_enum("solver", "heun", list(SOLVERS), "PF-ODE solver")


def sampler_from_flags() -> dict:
  """{"denoiser", "options", "seeds", "steps", "solver"} from the flags of `define_sampler_flags` and
  `define_denoiser_flags`: the keyword arguments of `jobs.sample.sample_run` /
  `jobs.attribute.attribute_run`."""
  f = flags.FLAGS
  return {"denoiser": f.denoiser, "options": denoiser_options(f.denoiser),
          "seeds": parse_seeds(f.seeds, f.num_samples), "steps": f.steps, "solver": f.solver}


def load_dataset_from_flags() -> data_lib.Dataset:
  f = flags.FLAGS
  dataset = data_lib.load_dataset(f.dataset, flip=f.flip, max_images=f.max_images)
  if dataset.image_shape[-1] not in (1, 3):
    raise ValueError(f"{f.dataset}: images have {dataset.image_shape[-1]} channels; "
                     "only 1 (grayscale) or 3 (RGB) are supported")
  multihost.main_print(f"dataset {dataset.name}: {dataset.num_images} images of {dataset.image_shape}")
  return dataset


def parse_seeds(spec: str | None, count: int, *, flag: str = "seeds",
                count_flag: str = "num_samples") -> list[int]:
  """'0-7,12,20-23' → [0, …, 7, 12, 20, …, 23]; None or '' → range(count). `flag` and `count_flag`
  name the two flags in errors (bin/denoise: --indices and --num_images)."""
  if not spec:
    if count < 1:
      raise ValueError(f"--{count_flag} must be at least 1, got {count}")
    return list(range(count))
  seeds = []
  try:
    for part in spec.split(","):
      low, _, high = part.strip().partition("-")
      seeds.extend(range(int(low), int(high or low) + 1))
  except ValueError:
    raise ValueError(f"cannot parse --{flag}={spec!r}; use e.g. '0-15' or '1,5,9'") from None
  if not seeds or min(seeds) < 0 or max(seeds) >= MAX_SEED:
    raise ValueError(f"--{flag}={spec!r} must give values in [0, {MAX_SEED})")
  return seeds


def one_line(message: str) -> str:
  """`message` on one line: a line is joined to the one before by a space when that one ends in ':', '.'
  or ';', else by '; ' (a problem list 'cannot convert:\n  a\n  b' becomes 'cannot convert: a; b')."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  text = lines[0] if lines else ""
  for line in lines[1:]:
    text += (" " if text.endswith((":", ".", ";")) else "; ") + line
  return text


def fail(message: str) -> None:
  """Reports bad input the command-line way: 'error: <message>' on one stderr line, exit status 2."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` (program name first) into `flag_values`, as absl's `app.run` does, except that an
  unknown flag, a bad flag value, a missing required flag or a positional argument is reported by
  `fail` (one line, exit status 2) instead of absl's two lines and exit status 1.

  Returns:
    [program name] (the tools take no positional arguments).
  """
  try:
    rest = flag_values(argv)
  except flags.Error as err:
    fail(f"{err} (see --helpshort)")
  if len(rest) > 1:
    fail(f"unexpected arguments: {' '.join(rest[1:])} (flags take the form --name=value)")
  return rest


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with bad input (ValueError, OSError) reported by `fail` instead of a traceback, and an
  interruption (Ctrl-C) by one line and exit status 130 (the resumable tools pick up where they were:
  their files are written atomically and in finished units)."""
  def run_main(argv):
    try:
      main(argv)
    except (ValueError, OSError) as err:
      fail(str(err) or type(err).__name__)
    except KeyboardInterrupt:
      print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
      sys.exit(130)
  return run_main


def run(main: Callable[[list[str]], None]) -> None:
  """absl `app.run` whose bad flags and bad input are one line on stderr with exit status 2."""
  # JAX reports at INFO level each accelerator plugin it did not find; users need not see that.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  app.run(guarded(main), flags_parser=parse_flags)

