"""The figures of pspc_jax.plots: what they draw (figures captured before they are written)."""

import matplotlib
import numpy as np
import pytest

from pspc_jax import plots

SIGMAS = (80.0, 1.0, 0.002)


@pytest.fixture
def drawn(monkeypatch, tmp_path):
  """Calls a plots function and returns its figure (still open) instead of only a PNG."""
  figures = []

  def keep(fig, path, title="", title_size=9, dpi=150):
    figures.append(fig)

  monkeypatch.setattr(plots, "_save", keep)

  def draw(function, *args, **kwargs):
    function(tmp_path / "figure.png", *args, **kwargs)
    return figures[-1]

  yield draw
  for fig in figures:
    plots.plt.close(fig)


def mse_rows(pairs, set_name="forward"):
  """Table rows of `pairs` {(a, b): (mse per σ of SIGMAS)}."""
  return [{"sigma": s, "set": set_name, "denoiser_a": a, "denoiser_b": b, "mse": m, "count": 4}
          for (a, b), values in pairs.items() for s, m in zip(SIGMAS, values)]


def curves(ax):
  """{legend label: line} of the labelled curves of a panel."""
  return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_mse_plot_draws_every_pair_of_a_table_without_a_network(drawn):
  # The CIFAR-10 table: no network, so gaussian vs pspc_square has no reference among its two; it
  # used to be left out of the figure.
  rows = mse_rows({("empirical", "gaussian"): (1e-5, 0.04, 3e-6),
                   ("empirical", "pspc_square"): (0.0, 0.03, 3e-16),
                   ("gaussian", "pspc_square"): (1e-5, 0.01, 3e-6)})
  fig = drawn(plots.save_mse_plot, rows)
  panels = {ax.get_title(): ax for ax in fig.axes}
  assert set(panels) == {"forward set: vs empirical", "forward set: other pairs"}
  assert "gaussian vs pspc_square" in curves(panels["forward set: other pairs"])
  assert {"gaussian vs empirical", "pspc_square vs empirical"} <= set(
      curves(panels["forward set: vs empirical"]))


def test_mse_plot_shows_exact_zeros_at_a_floor_and_says_so(drawn):
  rows = mse_rows({("empirical", "pspc_square"): (0.0, 0.03, 3e-16),
                   ("empirical", "pspc_flex"): (0.0, 0.02, 1e-13)})
  ax = drawn(plots.save_mse_plot, rows).axes[0]
  floor = 1e-17  # the decade below the smallest positive MSE, 3e-16
  triangles = [line for line in ax.get_lines() if line.get_marker() == "v" and len(line.get_xdata())]
  assert len(triangles) == 2  # one per curve with a zero, at σ = 80, staggered so both show
  heights = sorted(float(line.get_ydata()[0]) for line in triangles)
  assert heights[-1] == pytest.approx(floor) and heights[0] < floor
  assert all(list(line.get_xdata()) == [80.0] for line in triangles)
  legend = ax.get_legend()
  assert any("MSE exactly 0" in text.get_text() and "1e-17" in text.get_text()
             for text in legend.get_texts())
  assert legend.handlelength >= 3  # long enough to show a dash pattern
  # The curve itself skips the zero (a log axis cannot show it).
  line = curves(ax)["pspc_square vs empirical"]
  np.testing.assert_allclose(line.get_xdata(), [0.002, 1.0, 80.0])
  np.testing.assert_allclose(line.get_ydata(), [3e-16, 0.03, np.nan])


def test_mse_plot_panels_by_reference_share_one_colour_per_denoiser(drawn):
  values = (1e-3, 1e-2, 1e-4)
  rows = mse_rows({(a, b): values for a, b in [
      ("network", "empirical"), ("network", "pspc_square"), ("network", "gaussian"),
      ("empirical", "pspc_square"), ("empirical", "gaussian"), ("gaussian", "pspc_square")]})
  rows += mse_rows({("network", "pspc_square"): values}, set_name="reverse")
  fig = drawn(plots.save_mse_plot, rows)
  panels = {ax.get_title(): curves(ax) for ax in fig.axes}
  assert set(panels["forward set: vs network"]) == {"empirical vs network", "pspc_square vs network",
                                                    "gaussian vs network"}
  # network vs empirical is drawn once, in the network panel.
  assert set(panels["forward set: vs empirical"]) == {"pspc_square vs empirical",
                                                      "gaussian vs empirical"}
  assert set(panels["forward set: other pairs"]) == {"gaussian vs pspc_square"}
  assert set(panels["reverse set: vs network"]) == {"pspc_square vs network"}
  colour = lambda panel, label: matplotlib.colors.to_hex(panels[panel][label].get_color())
  assert colour("forward set: vs network", "pspc_square vs network") == \
      colour("forward set: vs empirical", "pspc_square vs empirical") == \
      colour("reverse set: vs network", "pspc_square vs network")
  for panel in panels.values():  # within a panel every curve has its own colour
    assert len({matplotlib.colors.to_hex(line.get_color()) for line in panel.values()}) == len(panel)


def test_sensitivity_heatmaps_are_a_grid_with_a_colour_bar(drawn):
  sigmas = np.geomspace(80, 0.002, 18)
  maps = np.random.default_rng(0).random((18, 4, 4, 4, 4))
  fig = drawn(plots.save_sensitivity_heatmaps, sigmas, maps, [(1, 1), (0, 0)])
  images = [ax for ax in fig.axes if ax.get_images() and ax.get_title().startswith("σ=")]
  assert len(images) == 36
  # 18 σ wrapped 6 to a row: 3 rows per pixel, 6 rows × 6 columns in all.
  grid = images[0].get_subplotspec().get_gridspec()
  assert (grid.nrows, grid.ncols) == (6, 6)
  assert [ax.get_title() for ax in images[:2]] == ["σ=80", f"σ={sigmas[1]:.3g}"]
  assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
  with pytest.raises(ValueError, match="columns=0"):
    plots.save_sensitivity_heatmaps("unused.png", sigmas, maps, [(0, 0)], columns=0)
  with pytest.raises(ValueError, match="0 pixels"):
    plots.save_sensitivity_heatmaps("unused.png", sigmas, maps, [])


def test_min_max_scaled_spreads_each_noisy_image_over_the_display_range():
  rng = np.random.default_rng(0)
  z = np.stack([80 * rng.standard_normal((4, 4, 1)), 0.3 + 0.01 * rng.standard_normal((4, 4, 1)),
                np.full((4, 4, 1), 5.0)])
  scaled = plots.min_max_scaled(z)
  np.testing.assert_allclose(scaled[:2].min(axis=(1, 2, 3)), -1)
  np.testing.assert_allclose(scaled[:2].max(axis=(1, 2, 3)), 1)
  np.testing.assert_array_equal(scaled[2], 0)  # a constant image
  # Linear per image: the order of the pixels is kept.
  np.testing.assert_array_equal(np.argsort(scaled[0].ravel()), np.argsort(z[0].ravel()))


def test_rows_figure_titles_its_columns(drawn):
  images = np.zeros((3, 4, 4, 1))
  fig = drawn(plots.save_rows_figure, {"a": images, "b": images},
              column_titles=["#0", "#1", "held-out #9"])
  titles = [ax.get_title() for ax in fig.axes]
  assert titles[:3] == ["#0", "#1", "held-out #9"] and titles[3:] == ["", "", ""]
