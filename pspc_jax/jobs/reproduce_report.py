"""report.md of `bin/reproduce` (`pspc_jax.jobs.reproduce`): one section per paper figure, written from
the files the stages left in their folders, with the paper's reported values (`pspc_jax.paper_values`)
beside ours where the paper prints them, and "the paper shows this only as a figure" where it does not.

Every figure is linked by a path relative to the report, and only when the file exists; a stage that
has not finished gets a one-line section saying so.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from pspc_jax import paper_values as pv
from pspc_jax import schedules
from pspc_jax.files import atomic_write

REPORT_FILE = "report.md"
ONLY_FIGURE = "the paper shows this only as a figure"


# ----------------------------------------------------------------------------------------------------
# Small formatting helpers.


def _number(value) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "—"
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  return f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(c if isinstance(c, str) else _number(c) for c in row) + " |"
            for row in rows]
  return "\n".join(lines)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


class _Folder:
  """A stage folder as the report sees it: its files, linked relative to the report."""

  def __init__(self, outdir: str, stage: str):
    self.outdir, self.stage = outdir, stage
    self.path = os.path.join(outdir, stage)

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def has(self, name: str) -> bool:
    return os.path.exists(self.file(name))

  def json(self, name: str):
    return _read_json(self.file(name))

  def figure(self, name: str, caption: str) -> str:
    """A Markdown image of the file, or "" when it does not exist."""
    if not self.has(name):
      return ""
    return f"![{caption}]({self.stage}/{name})\n"


def _nearest(sigmas: Sequence[float], target: float) -> int:
  return int(np.argmin(np.abs(np.log(np.asarray(sigmas, np.float64)) - math.log(target))))


def _pair_mse(rows, set_name: str, a: str, b: str) -> dict[float, float]:
  return {row["sigma"]: row["mse"] for row in rows if row["set"] == set_name
          and {row["denoiser_a"], row["denoiser_b"]} == {a, b}}


def _thin(values: Sequence, at_most: int) -> list:
  """At most `at_most` entries of `values`, evenly spaced, the first and last included."""
  if len(values) <= at_most:
    return list(values)
  picks = np.unique(np.round(np.linspace(0, len(values) - 1, at_most)).astype(int))
  return [values[i] for i in picks]


# ----------------------------------------------------------------------------------------------------
# Sections.


def _header(settings: Mapping, record: Mapping) -> str:
  counts = settings["counts"]
  shape = tuple(settings["image_shape"])
  paper_counts = {"sensitivity_z": pv.SENSITIVITY_Z_PER_SIGMA, "gap_sigmas": pv.FIG2_NUM_SIGMAS,
                  "gap_z": pv.FIG2_Z_PER_SIGMA, "patch_z": pv.PATCH_Z_PER_SIGMA,
                  "num_samples": pv.SAMPLES_COUNT}
  rows = []
  for name, value in counts.items():
    paper = paper_counts.get(name)
    if name == "eval_z":
      paper = pv.Reported(pv.EVAL_Z_PER_SIGMA.value["CIFAR-10"], pv.EVAL_Z_PER_SIGMA.source)
    if name == "steps":
      paper = pv.Reported(pv.EVAL_STEPS.value["CIFAR-10"], pv.EVAL_STEPS.source)
    rows.append((name, value, "not given" if paper is None else paper.value,
                 "" if paper is None else paper.source))
  caveat = ("" if shape == (32, 32, 3) else
            f"\nThe paper's numbers are for CIFAR-10 (32×32×3) and the EDM DDPM++ network; this run's "
            f"images are {shape}, so they are shown for orientation only.\n")
  return (f"# Reproduction of Niedoba et al., *Towards a Mechanistic Explanation of Diffusion Model "
          f"Generalization* (ICML 2025)\n\n"
          f"Network `{settings['checkpoint']}` on dataset `{settings['dataset']}` "
          f"({settings['num_train_images']} images of {shape}); denoisers "
          f"{', '.join(settings['denoisers'])}; seed {settings['seed']}. Figure numbers are those of "
          f"the ICML text (`pspc_jax/paper_values.py`). The paper's network is the EDM DDPM++ "
          f"checkpoint (FID {pv.NETWORK_FID.value['DDPM++']}, App. A Table 3); no FID is computed "
          f"here.\n{caveat}\n## Settings\n\n"
          + _table(("count", "this run", "paper", "where the paper says so"), rows)
          + f"\n\nStage timings and memory: `stages.json` ({record['measures']}).\n")


def _stages_section(record: Mapping) -> str:
  rows = []
  for name, stage in record["stages"].items():
    mib = {k: "—" if stage.get(k) is None else f"{stage[k] / 2**20:.0f}"
           for k in ("rss_start_bytes", "peak_rss_bytes", "device_peak_bytes")}
    scope = f" ({stage['peak_rss_scope']})" if stage.get("peak_rss_bytes") is not None else ""
    rows.append((name, stage["figure"], stage["status"] if stage["finished"] else "not finished",
                 stage.get("seconds"), stage.get("cpu_seconds"), mib["rss_start_bytes"],
                 mib["peak_rss_bytes"] + scope, mib["device_peak_bytes"]))
  return ("## Stages\n\n" + _table(("stage", "figure", "this invocation", "wall s", "CPU s",
                                    "RSS at start MiB", "peak RSS MiB (scope)", "device peak MiB"),
                                   rows)
          + f"\n\nDevices: {', '.join(record['devices'])}.\n")


def _not_finished(title: str, stage: str) -> str:
  return (f"## {title}\n\nStage `{stage}` has not finished (rerun the same `bin/reproduce` command, "
          f"or add `--stages={stage}` to it).\n")


def _optimal_gap(folder: _Folder) -> str:
  rows = folder.json("mse.json")
  mse = _pair_mse(rows, "forward", "network", "empirical")
  sigmas = sorted(mse, reverse=True)
  values = np.asarray([mse[s] for s in sigmas])
  peak = sigmas[int(np.argmax(values))]
  large = [s for s in sigmas if mse[s] >= 0.1 * values.max()]
  low, high = pv.FIG2_LARGE_ERROR_RANGE.value
  summary = _table(("quantity", "ours", "paper", "where"), [
      ("σ of the largest MSE", peak, f"around {pv.FIG2_PEAK_SIGMA.value:g}", pv.FIG2_PEAK_SIGMA.source),
      ("σ range with MSE ≥ 10 % of its maximum", f"[{min(large):.3g}, {max(large):.3g}]",
       f"[{low:g}, {high:g}] (\"substantial error\"; no threshold given)",
       pv.FIG2_LARGE_ERROR_RANGE.source),
      ("largest MSE", float(values.max()), ONLY_FIGURE, "Fig. 2")])
  table = _table(("σ", "MSE network vs optimal", "paper"),
                 [(s, mse[s], ONLY_FIGURE) for s in _thin(sigmas, 12)])
  return ("## Fig. 2: network vs optimal denoiser (forward process)\n\n"
          + folder.figure("mse.png", "MSE between the network and the optimal denoiser by σ")
          + f"\n{summary}\n\nMSE per pixel in [-1, 1] units at {len(sigmas)} σ log-spaced in "
          f"[0.01, 100] (every σ: `optimal_gap/mse.csv`); a selection:\n\n{table}\n")


def _sensitivity(folder: _Folder, settings: Mapping) -> str:
  capture = folder.json("maps_capture.json")
  sigmas, sides = capture["sigmas"], np.asarray(capture["sides"], np.float64)
  paper = {_nearest(sigmas, t): (t, side) for t, side in pv.CAPTURE_50_SIDES.value.items()}
  rows = []
  for k, sigma in enumerate(sigmas):
    note = f"{paper[k][1]} at t = {paper[k][0]:g} (50 %)" if k in paper else "—"
    rows.append((sigma, *sides[k], note))
  header = ("σ", *[f"side {f:.0%}" for f in capture["fractions"]], "paper (§3.1)")
  largest = np.nanmax(sides[:, 0]) if sides.size else float("nan")
  pixel = tuple(settings["heatmap_pixels"][0])
  imported = (f"Maps imported from `{settings['maps']}`, not computed in this run.\n\n"
              if settings.get("maps") else "")
  return ("## Fig. 3: gradient sensitivity of the network\n\n" + imported
          + folder.figure("maps_heatmaps.png", f"sensitivity heat maps of output pixels "
                          f"{pixel} and (0, 0) by σ")
          + folder.figure("maps_capture.png", "sides of the centred squares capturing 50/75/95 %")
          + "\nSide of the centred square capturing each share of the sensitivity, averaged over the "
          f"output pixels (the paper's \"average side length\"); the paper's values are at its t, "
          f"shown at the nearest σ of this grid. Heat maps: output pixel {pixel} (paper: "
          f"{pv.SENSITIVITY_PIXEL.value}, {pv.SENSITIVITY_PIXEL.source}).\n\n"
          + _table(header, rows)
          + f"\n\nLargest 50 % side over σ: ours {_number(largest)}; paper: within "
          f"{pv.CAPTURE_MAJORITY_SIDE.value}×{pv.CAPTURE_MAJORITY_SIDE.value} for all t "
          f"({pv.CAPTURE_MAJORITY_SIDE.source}). Other values: {ONLY_FIGURE}.\n")


def _tuned(folder: _Folder, settings: Mapping) -> str:
  errors = folder.json("errors.json")
  sigmas = errors["sigmas"]
  side = min(settings["image_shape"][:2])
  paper_size = schedules.cifar10_patch_schedule()
  rescaled = schedules.patch_schedule_for(side)
  paper_lambda = schedules.cifar10_flex_schedule()
  has_flex = "flex" in errors
  rows = []
  for k, sigma in enumerate(sigmas):
    row = [sigma, errors["square"]["best"][k], paper_size(sigma)]
    if side != 32:
      row.append(rescaled(sigma))
    if has_flex:
      row += [errors["flex"]["best"][k], paper_lambda(sigma)]
    rows.append(row)
  header = ["σ", "tuned s", "paper s (CIFAR-10)"] + (["paper s rescaled to this side"]
                                                      if side != 32 else [])
  header += ["tuned λ", "paper λ (CIFAR-10)"] if has_flex else []
  agree = sum(r[1] == (r[3] if side != 32 else r[2]) for r in rows)
  return ("## App. B: tuned schedules vs the paper's CIFAR-10 schedules\n\n"
          + folder.figure("tune_schedule.png", "tuning error surfaces with the chosen values")
          + f"\nPatch size s(σ) and Flex threshold λ(σ) of least MSE to the network on "
          f"{errors['config']['z_source']}-process z ({errors['num_z'][0]} per σ; files "
          f"`tune/patch_schedule.json`, `tune/thresholds.json`). The paper's values "
          f"({pv.CIFAR10_PATCH_SCHEDULE.source}; {pv.CIFAR10_FLEX_THRESHOLDS.source}) are taken at "
          f"the nearest 18-step grid σ. The paper tuned on: {pv.TUNING_PROCESS.source}.\n\n"
          + _table(header, rows)
          + f"\n\nTuned patch size equal to the paper's{' rescaled' if side != 32 else ''} value at "
          f"{agree} of {len(rows)} σ.\n")


# Two MSEs within this relative difference are reported as equal ("closest" lists every such name):
# differences of float32 rounding, far below what the sampled z can resolve.
TIE_RTOL = 1e-3


def _tied(a: float, b: float) -> bool:
  return abs(a - b) <= TIE_RTOL * max(abs(a), abs(b))


def _wins(ours: Mapping[float, float], theirs: Mapping[float, float],
          keep: Callable[[float], bool] = lambda s: True) -> str:
  """'lower at a, equal at b, higher at c of n σ' for `ours` against `theirs` on the σ kept (equal:
  within `TIE_RTOL`)."""
  common = [s for s in ours if s in theirs and keep(s)]
  equal = sum(_tied(ours[s], theirs[s]) for s in common)
  lower = sum(ours[s] < theirs[s] and not _tied(ours[s], theirs[s]) for s in common)
  higher = len(common) - lower - equal
  return f"lower at {lower}, equal at {equal}, higher at {higher} of {len(common)} σ"


def _claims(rows, set_name: str, names: Sequence[str]) -> list[tuple]:
  """(claim, ours, where) of §6.1 for the denoisers present."""
  vs = {n: _pair_mse(rows, set_name, "network", n) for n in names if n != "network"}
  low, high = pv.PSPC_BEATS_GAUSSIAN_RANGE.value
  claims = []
  for pspc in ("pspc_square", "pspc_flex"):
    for other in ("empirical", "cfdm"):
      if pspc in vs and other in vs:
        claims.append((f"{pspc} closer to the network than {other}", _wins(vs[pspc], vs[other]),
                       "§6.1"))
    if pspc in vs and "gaussian" in vs:
      claims.append((f"{pspc} closer than gaussian for σ in [{low:g}, {high:g}]",
                     _wins(vs[pspc], vs["gaussian"], lambda s: low <= s <= high),
                     pv.PSPC_BEATS_GAUSSIAN_RANGE.source))
  if "pspc_flex" in vs and "pspc_square" in vs:
    claims.append(("pspc_flex closer than pspc_square", _wins(vs["pspc_flex"], vs["pspc_square"]),
                   "§6.1"))
  return claims


def _closest(per: Mapping[str, Mapping[float, float]], names: Sequence[str], sigma: float) -> str:
  """The name of least MSE at σ, or every name tied with it (`TIE_RTOL`) joined by " = "."""
  best = min(per[n].get(sigma, math.inf) for n in names)
  if not math.isfinite(best):
    return "—"
  return " = ".join(n for n in names if math.isfinite(per[n].get(sigma, math.inf))
                    and _tied(per[n][sigma], best))


def _denoisers(folder: _Folder, settings: Mapping) -> str:
  rows = folder.json("mse.json")
  names = [n for n in settings["denoisers"] if n != "network"]
  text = ("## Fig. 7: denoisers vs the network (forward and reverse processes)\n\n"
          + folder.figure("mse.png", "MSE of every denoiser against the network by σ"))
  for set_name in ("forward", "reverse"):
    per = {n: _pair_mse(rows, set_name, "network", n) for n in names}
    sigmas = sorted({s for v in per.values() for s in v}, reverse=True)
    table = [(s, *[per[n].get(s) for n in names], _closest(per, names, s)) for s in sigmas]
    text += (f"\n### {set_name} set: MSE to the network\n\nPaper: {ONLY_FIGURE} (Fig. 7).\n\n"
             + _table(("σ", *names, "closest"), table) + "\n\n"
             + _table(("claim (paper)", "ours", "where"), _claims(rows, set_name, settings["denoisers"]))
             + "\n")
  return text


def _patch_table(rows, set_name: str) -> tuple[list[int], list[float], dict]:
  sizes = sorted({row["patch_size"] for row in rows if row["set"] == set_name})
  sigmas = sorted({row["sigma"] for row in rows if row["set"] == set_name}, reverse=True)
  mse = {(row["sigma"], row["patch_size"]): row["mse"] for row in rows if row["set"] == set_name}
  return sizes, sigmas, mse


def _patches(folder: _Folder) -> str:
  rows = folder.json("patch_mse.json")
  text = ("## Fig. 4: patch posterior means\n\n"
          + folder.figure("patch_mse.png", "patch posterior mean MSE by σ and patch size")
          + f"\nPaper: {ONLY_FIGURE} (Fig. 4); its statements are listed below each table. MSE of every "
          "s×s window's posterior mean against the same window of the target's output.\n")
  for set_name, target, label in (("forward", "the optimal denoiser", "forward set"),
                                  ("given", "the network", "reverse set (the `denoisers` stage's)")):
    sizes, sigmas, mse = _patch_table(rows, set_name)
    if not sizes:
      continue
    full = max(sizes)
    table = []
    for s in sigmas:
      best = min(sizes, key=lambda p: mse[(s, p)])
      table.append((s, *[mse[(s, p)] for p in sizes], best,
                    "yes" if min(mse[(s, p)] for p in sizes if p < full) < mse[(s, full)] else "no"))
    text += (f"\n### {label}: against {target}\n\n"
             + _table(("σ", *[f"{p}×{p}" for p in sizes], "best s",
                       f"a smaller patch beats {full}×{full}"), table) + "\n")
    sources = ((pv.PATCH_FORWARD_EXACT_BELOW,) if set_name == "forward" else
               (pv.PATCH_REVERSE_GOOD_BELOW, pv.PATCH_REVERSE_3X3_BELOW, pv.PATCH_BEATS_OPTIMAL_BELOW))
    text += "\nPaper: " + "; ".join(r.source for r in sources) + ".\n"
  return text


def _outputs(folder: _Folder) -> str:
  figures = sorted(n for n in os.listdir(folder.path) if n.startswith("outputs_") and n.endswith(".png"))
  links = "".join(folder.figure(n, f"denoiser outputs, trajectory {n[8:-4]}") for n in figures)
  return ("## Fig. 1: denoiser outputs on shared reverse-process z\n\n"
          f"Every denoiser on the same states of the network's own Heun trajectories, at the grid σ "
          f"nearest to the paper's rows t = {', '.join(f'{t:g}' for t in pv.FIG1_SIGMAS.value)} "
          f"(outputs in `outputs/outputs.npz`). Paper: {ONLY_FIGURE} (Fig. 1).\n\n{links}")


def _samples(folder: _Folder, settings: Mapping) -> str:
  similarity = folder.json("similarity.json")
  memorisation = folder.json("memorisation.json")
  value = {(r["descriptor"], frozenset((r["denoiser_a"], r["denoiser_b"]))): r["similarity"]
           for r in similarity}
  sscd = pv.SSCD_MEAN_VS_NETWORKS.value
  descriptors = sorted({r["descriptor"] for r in similarity})
  rows = [(n, *[value.get((d, frozenset((n, "network")))) for d in descriptors],
           sscd.get(n, "not reported"))
          for n in settings["denoisers"] if n != "network"]
  memo = [(r["denoiser"], r["mean_nn_distance"], r["median_nn_ratio"], r["fraction_memorised"],
           r["count"]) for r in memorisation]
  listed = sorted(os.listdir(folder.path))
  trajectories = [n for n in listed if n.startswith("trajectory_") and n.endswith(".png")]
  sheets = [n for n in listed if n.startswith("sheet_") and n.endswith(".png")]
  figures = (folder.figure("samples.png", "samples of every denoiser from shared latents")
             + "".join(folder.figure(n, f"samples of {n[6:-4]}") for n in sheets)
             + "".join(folder.figure(n, f"trajectories, {n[:-4]}") for n in trajectories[:2])
             + "".join(folder.figure(f"similarity_{d}.png", f"{d} similarity") for d in descriptors))
  return ("## Fig. 8, 9: samples from shared latents\n\n" + figures
          + f"\n{settings['counts']['num_samples']} samples per denoiser, {settings['solver']} "
          f"sampler on the {settings['counts']['steps']}-step EDM grid ({pv.SAMPLES_SOLVER.source}).\n\n"
          "### Similarity to the network's samples (same latent)\n\n"
          + _table(("denoiser", *[f"ours: {d}" for d in descriptors],
                    "paper: SSCD cosine, mean over 4 networks"), rows)
          + f"\n\nThe paper's column is {pv.SSCD_MEAN_VS_NETWORKS.source}; its descriptor (SSCD) is "
          "not the ones computed here (pixel cosine; 1 when both samples have the same nearest "
          "training image), so compare orderings, not values. Copy threshold in SSCD: "
          f"{pv.SSCD_COPY_THRESHOLD.value} ({pv.SSCD_COPY_THRESHOLD.source}).\n\n"
          "### Memorisation\n\n"
          + _table(("denoiser", "mean NN distance", "median NN / 2nd-NN ratio",
                    "fraction with ratio < 1/3", "samples"), memo)
          + "\n\nPaper: no memorisation statistic is reported (Fig. 8 and Fig. 24/25 show samples).\n")


_SECTIONS = (
    ("optimal_gap", "Fig. 2: network vs optimal denoiser", lambda f, s: _optimal_gap(f)),
    ("sensitivity", "Fig. 3: gradient sensitivity", _sensitivity),
    ("tune", "App. B: tuned schedules", _tuned),
    ("denoisers", "Fig. 7: denoisers vs the network", _denoisers),
    ("patches", "Fig. 4: patch posterior means", lambda f, s: _patches(f)),
    ("outputs", "Fig. 1: denoiser outputs", lambda f, s: _outputs(f)),
    ("samples", "Fig. 8, 9: samples", _samples),
)


def write_report(outdir: str, record: Mapping, *, settings: Mapping) -> str:
  """Writes `<outdir>/report.md` and returns its path.

  Args:
    outdir: the reproduction's output folder (stage folders inside).
    record: the stages.json dict of `jobs.reproduce` (stage status and measurements).
    settings: the run's identity, counts, denoisers, patch sizes, tuning source, solver, seed, grid
      and heat-map pixels.
  """
  parts = [_header(settings, record), _stages_section(record)]
  for stage, title, section in _SECTIONS:
    folder, state = _Folder(outdir, stage), record["stages"][stage]
    if not state["finished"]:
      parts.append(_not_finished(title, stage))
      continue
    text = section(folder, settings)
    if not state["current_settings"]:
      heading, _, rest = text.partition("\n\n")
      text = (f"{heading}\n\n**Stage `{stage}` finished with other settings than this invocation's "
              f"(see `{stage}/stage.json`); the header's settings do not apply to it.**\n\n{rest}")
    parts.append(text)
  path = os.path.join(outdir, REPORT_FILE)
  with atomic_write(path, "w") as f:
    f.write("\n".join(parts))
  return path
