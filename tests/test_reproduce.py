"""bin/reproduce (`pspc_jax.jobs.reproduce`): the paper's experiments as resumable stages and one report.

One end-to-end run on digits with the committed network at tiny counts (2-step grid, 2 z, 3
denoisers) covers every stage, its outputs, the report's links, an interrupted stage, resumption and a
refused change of settings; the other cases need no compilation.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from pspc_jax import paper_values
from pspc_jax.data import load_dataset
from pspc_jax.edm import edm_sigmas
from pspc_jax.jobs import reproduce
from pspc_jax.jobs.reproduce_report import ONLY_FIGURE
from pspc_jax.maps_files import load_maps
from test_cli_errors import run_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(REPO, "checkpoints", "digits_ddpmpp_small")
TINY = reproduce.Counts(sensitivity_z=1, tune_z=2, gap_sigmas=2, gap_z=2, eval_z=2, patch_z=2,
                        outputs_z=1, num_samples=2, steps=2)
OPTIONS = dict(checkpoint=CHECKPOINT, dataset_name="digits", counts=TINY, batch_size=2,
               denoisers=["network", "pspc_square", "pspc_flex"], patch_sizes=[3, 8], patch_positions=2,
               thresholds=[0.5, 1.0])
# What each stage must leave in its folder.
OUTPUTS = {"sensitivity": ["maps.npz", "maps_heatmaps.png", "maps_capture.png", "maps_capture.json"],
           "tune": ["patch_schedule.json", "thresholds.json", "errors.json", "tune_schedule.png"],
           "optimal_gap": ["mse.json", "mse.png"],
           "denoisers": ["mse.json", "mse.png", "reverse_set.npz"],
           "patches": ["patch_mse.json", "patch_mse.png"],
           "outputs": ["outputs.npz", "outputs_0.png"],
           "samples": ["samples.png", "similarity.json", "memorisation.json",
                       "samples_pspc_flex.npz"]}


def _json(path):
  with open(path) as f:
    return json.load(f)


def _text(path):
  with open(path) as f:
    return f.read()


@pytest.fixture(scope="module")
def digits():
  return load_dataset("digits").images


def _failing(name):
  """STAGES with stage `name`'s work replaced by an interruption."""
  def interrupted(run):
    raise KeyboardInterrupt(f"{name} interrupted")
  return tuple(s._replace(run=interrupted) if s.name == name else s for s in reproduce.STAGES)


def test_end_to_end_on_digits_resumes_and_reports(digits, tmp_path, monkeypatch):
  out = str(tmp_path / "run")
  # An interruption in the last stage leaves the finished stages marked and it unmarked.
  with monkeypatch.context() as patch:
    patch.setattr(reproduce, "STAGES", _failing("samples"))
    with pytest.raises(KeyboardInterrupt):
      reproduce.reproduce_run(digits, outdir=out, **OPTIONS)
  marked = {s for s in reproduce.STAGE_NAMES if os.path.exists(os.path.join(out, s, "stage.json"))}
  assert marked == set(reproduce.STAGE_NAMES) - {"samples"}

  again = reproduce.reproduce_run(digits, outdir=out, **OPTIONS)
  assert again["ran"] == ["samples"] and len(again["skipped"]) == len(reproduce.STAGES) - 1
  for stage, names in OUTPUTS.items():
    for name in names:
      assert os.path.exists(os.path.join(out, stage, name)), (stage, name)

  # The tuned schedules and the maps are what the later stages used.
  options = _json(os.path.join(out, "denoisers", "config.json"))["options"]
  assert options["pspc_square"]["patch_schedule"] == os.path.join(out, "tune", "patch_schedule.json")
  assert options["pspc_flex"]["maps"] == os.path.join(out, "sensitivity", "maps.npz")

  stages = _json(os.path.join(out, "stages.json"))["stages"]
  assert all(s["finished"] and s["current_settings"] and s["seconds"] > 0 and s["peak_rss_bytes"] > 0
             for s in stages.values())
  assert stages["samples"]["status"] == "ran" and stages["tune"]["status"] == "skipped"

  report = _text(again["report"])
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
  assert {link.split("/")[0] for link in links} == set(reproduce.STAGE_NAMES)
  assert all(os.path.exists(os.path.join(out, link)) for link in links)
  assert "has not finished" not in report
  assert report.count(ONLY_FIGURE) >= 3

  # Resuming skips everything; a stage whose marker is gone reruns alone.
  assert reproduce.reproduce_run(digits, outdir=out, **OPTIONS)["ran"] == []
  os.remove(os.path.join(out, "outputs", "stage.json"))
  assert reproduce.reproduce_run(digits, outdir=out, **OPTIONS)["ran"] == ["outputs"]

  # Other settings are refused, not silently skipped; a stage left out is reported as such.
  with pytest.raises(ValueError, match="sensitivity run with other settings"):
    reproduce.reproduce_run(digits, outdir=out, **{**OPTIONS, "counts": TINY.scaled(2)})
  other = reproduce.reproduce_run(digits, outdir=out, stages=["outputs"],
                                  **{**OPTIONS, "counts": dataclasses.replace(TINY, num_samples=3)})
  assert other["ran"] == [] and not other["stages"]["stages"]["samples"]["current_settings"]
  assert "`samples` finished with other settings" in _text(other["report"])


def test_given_maps_are_imported_not_computed(digits, tmp_path):
  given = os.path.join(REPO, "checkpoints", "digits_ddpmpp_small_maps.npz")
  out = str(tmp_path / "run")
  summary = reproduce.reproduce_run(digits, outdir=out, **OPTIONS, stages=["sensitivity"], maps=given)
  assert summary["ran"] == ["sensitivity"]
  imported, original = (load_maps(p) for p in (os.path.join(out, "sensitivity", "maps.npz"), given))
  np.testing.assert_array_equal(imported.maps, original.maps)
  np.testing.assert_array_equal(imported.sigmas, original.sigmas)
  marker = _json(os.path.join(out, "sensitivity", "stage.json"))
  assert marker["summary"] == {"computed": 0, "reused": len(original.sigmas)}
  report = _text(summary["report"])
  assert f"Maps imported from `{given}`" in report and "Stage `tune` has not finished" in report


def test_bad_plans_are_refused_before_any_work(digits, tmp_path):
  out = str(tmp_path / "run")
  with pytest.raises(ValueError, match="needs the output of stage"):
    reproduce.reproduce_run(digits, outdir=out, **OPTIONS, stages=["patches"])
  with pytest.raises(ValueError, match="unknown stage"):
    reproduce.reproduce_run(digits, outdir=out, **OPTIONS, stages=["fig2"])
  with pytest.raises(ValueError, match="must not exceed eval_z"):
    reproduce.reproduce_run(digits, outdir=out, **{**OPTIONS, "counts": reproduce.Counts(eval_z=1)})
  with pytest.raises(ValueError, match="include 'network'"):
    reproduce.reproduce_run(digits, outdir=out, **{**OPTIONS, "denoisers": ["empirical"]})
  with pytest.raises(ValueError, match="shape"):
    reproduce.reproduce_run(np.zeros((4, 4, 4, 1), np.uint8), outdir=out, **OPTIONS)
  assert not os.path.exists(out)
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="is not a folder"):
    reproduce.reproduce_run(digits, outdir=str(tmp_path / "file"), **OPTIONS)


def test_counts_scale_the_work_not_the_grids():
  small = reproduce.Counts().scaled(0.001)
  assert (small.sensitivity_z, small.gap_z, small.num_samples) == (1, 10, 1)
  assert (small.gap_sigmas, small.steps) == (150, 18)
  with pytest.raises(ValueError):
    reproduce.Counts().scaled(0)


def test_paper_sigmas():
  sigmas = reproduce.gap_sigmas(paper_values.FIG2_NUM_SIGMAS.value)
  assert len(sigmas) == 150 and np.isclose(sigmas[0], 100) and np.isclose(sigmas[-1], 0.01)
  assert np.allclose(np.diff(np.log(sigmas)), np.log(sigmas[1] / sigmas[0]))
  grid = np.asarray(edm_sigmas(18))[:-1]
  # Fig. 1's rows t = 8.4 … 0.3 are the EDM grid points 6 … 12.
  assert reproduce.fig1_indices(grid) == list(range(6, 13))
  assert reproduce.heatmap_pixels((32, 32, 3))[0] == paper_values.SENSITIVITY_PIXEL.value


def test_every_paper_value_says_where_it_is_stated():
  reported = [v for v in vars(paper_values).values() if isinstance(v, paper_values.Reported)]
  assert len(reported) > 20
  assert all(re.search(r"(§|Fig\.|Table|App\.)", v.source) for v in reported)


@pytest.mark.parametrize("args, message", [
    ([], "checkpoint"),
    ([f"--checkpoint={CHECKPOINT}", "--stages=sensitivity,fig9"], "unknown stage fig9"),
    (["--checkpoint=/nonexistent"], "not a folder"),
    ([f"--checkpoint={CHECKPOINT}", "--patch_sizes=3,x"], "--patch_sizes"),
])
def test_bad_command_lines_are_one_line_and_status_2(args, message, tmp_path):
  status, lines = run_in_process("reproduce", f"--outdir={tmp_path}/out", *args)
  assert status == 2 and len(lines) == 1 and lines[0].startswith("error:")
  assert message in lines[0]
  assert not os.path.exists(tmp_path / "out")


def test_ties_within_float32_noise_are_reported_as_ties():
  from pspc_jax.jobs import reproduce_report as report
  per = {"a": {1.0: 0.008716}, "b": {1.0: 0.008716 * (1 + 1e-5)}, "c": {1.0: 0.0095}}
  assert report._closest(per, ["a", "b", "c"], 1.0) == "a = b"
  assert report._wins({1.0: 1.0, 2.0: 1.0}, {1.0: 1.0 + 1e-6, 2.0: 2.0}) == \
      "lower at 1, equal at 1, higher at 0 of 2 σ"
