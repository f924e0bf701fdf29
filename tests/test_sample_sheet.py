"""The sample sheet of the compare job (bin/compare_samples): nearest.csv against a brute-force float64
nearest-neighbour search, and sheet_<denoiser>.png drawing each sample beside that neighbour."""

import csv

import numpy as np

from pspc_jax import plots
from pspc_jax.jobs.compare import NEAREST_COLUMNS, compare_run

DENOISERS = ("empirical", "gaussian")
SEEDS = (0, 3, 7, 9, 11)


def _brute_force_nearest(samples, images):
  """(index, d1, d1 / d2) per sample from float64 Euclidean distances to every training image."""
  train = images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1
  flat = samples.reshape(len(samples), -1).astype(np.float64)
  dist = np.sqrt(((flat[:, None, :] - train[None]) ** 2).sum(-1))
  order = np.argsort(dist, axis=1)
  d1 = np.take_along_axis(dist, order[:, :1], 1)[:, 0]
  d2 = np.take_along_axis(dist, order[:, 1:2], 1)[:, 0]
  return order[:, 0], d1, d1 / d2


def test_nearest_csv_and_sheets(tmp_path, monkeypatch):
  images = np.random.default_rng(4).integers(0, 256, (15, 6, 5, 3), dtype=np.uint8)
  drawn = {}
  save = plots._save

  def keep(fig, path, title="", **kwargs):
    axes = [ax for ax in fig.axes if ax.get_images()]
    pairs = [(ax.get_title(), ax.get_xlabel(), ax.title.get_color()) for ax in axes]
    drawn[str(path)] = (title, pairs)
    save(fig, path, title, **kwargs)

  monkeypatch.setattr(plots, "_save", keep)
  summary = compare_run(images, denoisers=list(DENOISERS), seeds=list(SEEDS), steps=3, batch_size=5,
                        outdir=str(tmp_path))
  with open(tmp_path / "nearest.csv") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == NEAREST_COLUMNS and len(rows) == len(DENOISERS) * len(SEEDS)
  for name in DENOISERS:
    with np.load(tmp_path / f"samples_{name}.npz") as saved:
      samples = saved["samples"]
    index, d1, ratio = _brute_force_nearest(samples, images)
    mine = [row for row in rows if row["denoiser"] == name]
    assert [int(row["seed"]) for row in mine] == list(SEEDS)
    np.testing.assert_array_equal([int(row["nn_index"]) for row in mine], index)
    np.testing.assert_allclose([float(row["nn_distance"]) for row in mine], d1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([float(row["nn_ratio"]) for row in mine], ratio, rtol=1e-5, atol=1e-5)
    # The sheet: one pair per seed, seed and neighbour above, distance below, memorised pairs in red.
    path = tmp_path / f"sheet_{name}.png"
    assert path.stat().st_size > 0
    title, pairs = drawn[str(path)]
    stats = summary["memorisation"][name]
    assert title.startswith(f"{name}: mean NN distance {stats['mean_nn_distance']:.3f}, "
                            f"{stats['fraction_memorised']:.0%} memorised")
    assert len(pairs) == len(SEEDS)
    for (above, below, colour), seed, i, d, r in zip(pairs, SEEDS, index, d1, ratio):
      assert above == f"seed {seed} · #{i}" and below.startswith(f"d {d:.2f} · r ")
      assert colour == ("red" if r < 1 / 3 else "black")
  # The optimal empirical denoiser's samples are training images: all memorised.
  assert summary["memorisation"]["empirical"]["fraction_memorised"] == 1.0
  assert drawn[str(tmp_path / "sheet_empirical.png")][1][0][2] == "red"
