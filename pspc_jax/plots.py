"""Figures written by the command-line tools (matplotlib, Agg backend; I/O only, no maths)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pspc_jax.conventions import to_uint8  # noqa: E402


def tile(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles (B, H, W, C) [-1, 1] images into one uint8 (rows·(H+pad), cols·(W+pad), C) array."""
  images = to_uint8(images)
  count, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  canvas = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255,
                   np.uint8)
  for k, image in enumerate(images):
    r, c = divmod(k, columns)
    top, left = pad + r * (height + pad), pad + c * (width + pad)
    canvas[top:top + height, left:left + width] = image
  return canvas


def save_grid(path, images: np.ndarray, columns: int | None = None, upscale: int = 1) -> None:
  """Writes a PNG grid of (B, H, W, C) [-1, 1] images, each pixel repeated `upscale` times."""
  canvas = tile(images, columns).repeat(upscale, 0).repeat(upscale, 1)
  Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas).save(path)


def _save(fig, path, title: str = "", title_size: int = 9, dpi: int = 150) -> None:
  """Adds `title` above all panels (if any), lays the figure out, writes it to `path` and closes it."""
  if title:
    fig.suptitle(title, fontsize=title_size)
  if fig.get_layout_engine() is None:  # figures made with layout="constrained" lay themselves out
    fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def _log_log_mse_axes(ax, ylabel: str, title: str, title_size: int) -> None:
  """Log-log axes of an error-vs-σ panel."""
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("σ")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=title_size)
  ax.grid(alpha=0.3, which="both", linewidth=0.4)


def _show(ax, image: np.ndarray, title: str = "") -> None:
  image = to_uint8(image)
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255,
            interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=7)


def save_nearest_neighbour_figure(path, samples: np.ndarray, neighbours: np.ndarray,
                                  distances: Sequence[float], labels: Sequence[str] = ()) -> None:
  """Pairs every sample with its nearest training image and their L2 distance (memorisation view).

  Args:
    path: output PNG.
    samples, neighbours: (B, H, W, C) [-1, 1] images.
    distances: (B,) ‖sample − neighbour‖ in model units.
    labels: optional per-sample titles (e.g. seeds).
  """
  count = len(samples)
  columns = min(count, 8)
  rows = math.ceil(count / columns)
  fig, axes = plt.subplots(2 * rows, columns, figsize=(1.2 * columns, 2.6 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for k in range(count):
    r, c = divmod(k, columns)
    title = labels[k] if k < len(labels) else f"#{k}"
    _show(axes[2 * r, c], samples[k], f"{title}")
    _show(axes[2 * r + 1, c], neighbours[k], f"NN d={distances[k]:.2f}")
    axes[2 * r, c].axis("on")
    axes[2 * r + 1, c].axis("on")
  _save(fig, path, "samples (top) and their nearest training images (bottom)")


def save_pair_sheet(path, samples: np.ndarray, neighbours: np.ndarray,
                    captions: Sequence[tuple[str, str]], highlight: Sequence[bool] = (),
                    title: str = "", columns: int = 8) -> None:
  """A sheet of pairs, each sample beside its nearest training image, `columns` pairs per row.

  Args:
    path: output PNG.
    samples, neighbours: (B, H, W, C) [-1, 1] images; pair k: samples[k] (left), neighbours[k].
    captions: B (above, below) texts per pair (e.g. the seed, and the distance).
    highlight: B flags; a flagged pair's captions are red (e.g. memorised samples).
    title: figure title.
    columns: pairs per row.
  """
  count = len(samples)
  columns = min(columns, count)
  rows = math.ceil(count / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(max(1.5 * columns, 7.5), 1.1 * rows + 0.7),
                           squeeze=False)
  gap = np.ones(samples.shape[1:2] + (max(1, samples.shape[2] // 16),) + samples.shape[3:])
  for k, ax in enumerate(axes.flat):
    if k >= count:
      ax.axis("off")
      continue
    colour = "red" if k < len(highlight) and highlight[k] else "black"
    _show(ax, np.concatenate([samples[k], gap, neighbours[k]], axis=1))
    ax.set_title(captions[k][0], fontsize=6, color=colour, pad=2)
    ax.set_xlabel(captions[k][1], fontsize=6, color=colour, labelpad=1)
  _save(fig, path, title, title_size=8)


def save_rows_figure(path, rows: Mapping[str, np.ndarray], title: str = "",
                     column_titles: Sequence[str] = ()) -> None:
  """One row of images per entry of `rows` ({name: (B, H, W, C) [-1, 1]}), names on the left, and
  optional titles above the B columns."""
  names = list(rows)
  count = len(next(iter(rows.values())))
  fig, axes = plt.subplots(len(names), count, figsize=(1.1 * count + 1, 1.15 * len(names)),
                           squeeze=False)
  for r, name in enumerate(names):
    for c in range(count):
      _show(axes[r, c], rows[name][c], column_titles[c] if r == 0 and c < len(column_titles) else "")
    axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
  _save(fig, path, title)


def save_sensitivity_heatmaps(path, sigmas: Sequence[float], maps: np.ndarray,
                              pixels: Sequence[tuple[int, int]], max_columns: int | None = None,
                              columns: int = 6) -> None:
  """Sensitivity maps of chosen output pixels at every σ, paper Fig. 3 (right), as a grid: one block
  of rows per output pixel, its σ (largest first) wrapped `columns` to a row.

  Each panel is normalised to its own maximum (one colour bar, "map / panel maximum", for all); a red
  square marks the output pixel.

  Args:
    path: output PNG.
    sigmas: (S,) noise levels of `maps`.
    maps: (S, H, W, H, W) maps; maps[k, h, w] is the map of output pixel (h, w) at sigmas[k].
    pixels: output pixels (h, w), one block of rows each.
    max_columns: show at most this many σ, evenly spaced over the sorted grid (None: all).
    columns: panels per row, at least 1.

  Raises:
    ValueError: no pixels, or `columns` < 1.
  """
  if columns < 1 or not pixels:
    raise ValueError(f"need at least one pixel and columns ≥ 1, got {len(pixels)} pixels and "
                     f"columns={columns}")
  sigmas = np.asarray(sigmas, np.float64)
  order = np.argsort(-sigmas)  # largest σ first, as in sampling.
  if max_columns is not None and len(order) > max_columns:
    order = order[np.round(np.linspace(0, len(order) - 1, max_columns)).astype(int)]
  columns = min(columns, len(order))
  block = math.ceil(len(order) / columns)  # rows per output pixel
  fig, axes = plt.subplots(block * len(pixels), columns, squeeze=False, layout="constrained",
                           figsize=(1.15 * columns + 1.3, 1.2 * block * len(pixels) + 0.5))
  for ax in axes.flat:
    ax.axis("off")
  for p, (h, w) in enumerate(pixels):
    for j, k in enumerate(order):
      ax = axes[p * block + j // columns, j % columns]
      panel = np.asarray(maps[k, h, w], np.float64)
      image = ax.imshow(panel / max(panel.max(), 1e-30), cmap="magma", vmin=0, vmax=1,
                        interpolation="nearest")
      ax.add_patch(matplotlib.patches.Rectangle((w - 0.5, h - 0.5), 1, 1, fill=False,
                                                edgecolor="red", linewidth=0.8))
      ax.axis("on")
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f"σ={sigmas[k]:.3g}", fontsize=7)
      if j % columns == 0:
        ax.set_ylabel(f"pixel ({h},{w})", fontsize=8)
  fig.colorbar(image, ax=axes, shrink=0.6, label="map / panel maximum")
  _save(fig, path, "sensitivity maps of output pixels (row blocks) by noise level", title_size=9)


def save_capture_plot(path, sigmas: Sequence[float], sides: np.ndarray, fractions: Sequence[float],
                      image_side: int | None = None, title: str = "") -> None:
  """Side of the centred square capturing each mass fraction vs σ (log axis), paper Fig. 3 (left).

  Args:
    path: output PNG.
    sigmas: (S,) noise levels.
    sides: (S, F) square sides, one column per fraction.
    fractions: the F fractions (legend).
    image_side: draws a dotted line at the image side when given.
    title: figure title.
  """
  sigmas = np.asarray(sigmas, np.float64)
  sides = np.asarray(sides, np.float64)
  order = np.argsort(sigmas)
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for j, fraction in enumerate(fractions):
    ax.plot(sigmas[order], sides[order, j], marker="o", markersize=3, label=f"{100 * fraction:g}%")
  if image_side:
    ax.axhline(image_side, color="gray", linestyle=":", linewidth=0.8, label="image side")
  ax.set_xscale("log")
  ax.set_xlabel("σ")
  ax.set_ylabel("centred square side (pixels)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title, fontsize=8)
  _save(fig, path)


def _framed(ax, image: np.ndarray, title: str, colour) -> None:
  _show(ax, image, title)
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(2.0)


def save_attribution_figure(path, samples: np.ndarray, which: np.ndarray, strength: np.ndarray,
                            sources: np.ndarray, source_labels: Sequence[Sequence[str]],
                            row_labels: Sequence[str] = (), title: str = "",
                            others: np.ndarray | None = None) -> None:
  """Per sample (one row): the sample, a map of which training image dominates each pixel, and those
  training images, each framed in its map colour.

  Args:
    path: output PNG.
    samples: (B, H, W, C) [-1, 1] samples.
    which: (B, H, W) int: position in that row's `sources` of the pixel's dominating image, −1 for an
      image not shown (drawn grey).
    strength: (B, H, W) the dominating weight in [0, 1]; weaker pixels are drawn paler.
    sources: (B, M, H, W, C) [-1, 1] the training images shown.
    source_labels: (B, M) titles of the training images (e.g. index and share).
    row_labels: optional per-sample titles.
    title: figure title.
    others: optional (B, H, W) int top-1 training index of every pixel; pixels dominated by an image
      not shown then get a grey level that depends on that index, so the mosaic of other images shows.
  """
  count, shown = sources.shape[:2]
  palette = np.asarray(plt.get_cmap("tab10").colors[:max(shown, 1)] + ((0.6, 0.6, 0.6),))
  fig, axes = plt.subplots(count, shown + 2, figsize=(1.15 * (shown + 2), 1.25 * count + 0.4),
                           squeeze=False)
  for b in range(count):
    _show(axes[b, 0], samples[b], row_labels[b] if b < len(row_labels) else f"sample {b}")
    colours = palette[np.where(which[b] >= 0, which[b], shown)]
    if others is not None:
      grey = 0.45 + 0.4 * ((np.asarray(others[b], np.int64) * 2654435761) % 1000 / 1000.0)
      colours = np.where((which[b] >= 0)[..., None], colours, grey[..., None])
    alpha = (0.25 + 0.75 * np.clip(np.asarray(strength[b], np.float64), 0, 1))[..., None]
    axes[b, 1].imshow(alpha * colours + (1 - alpha), interpolation="nearest")
    axes[b, 1].set_xticks([])
    axes[b, 1].set_yticks([])
    axes[b, 1].set_title("dominant image", fontsize=7)
    for j in range(shown):
      _framed(axes[b, j + 2], sources[b, j], source_labels[b][j], palette[j])
  _save(fig, path, title, title_size=8)


def save_tuning_figure(path, sigmas: Sequence[float],
                       surfaces: Mapping[str, tuple[Sequence, np.ndarray]],
                       compare: Mapping[str, tuple[str, Sequence]] | None = None,
                       title: str = "") -> None:
  """Error surfaces of schedule tuning (`pspc_jax.tuning`): one heatmap per surface, log σ × value.

  Each heatmap cell is log10(MSE / least MSE at that σ), so every column has its argmin at 0 (marked
  with a white dot) whatever the overall scale (colours saturate at 3 decades); unavailable
  (infinite) cells are blank. A bottom
  panel shows the least MSE per σ of every surface (log-log). Candidate values sit on evenly spaced
  rows (a categorical axis); comparison schedules are drawn as lines, interpolated between rows.

  Args:
    path: output PNG.
    sigmas: (S,) grid noise levels > 0.
    surfaces: {label: (values (M,), mse (S, M))}, e.g. {"PSPC-Square patch size": (sizes, mse)}.
    compare: {label of a surface: (name, (S,) schedule values at the grid σ)} drawn over it.
    title: figure title.
  """
  sigmas = np.asarray(sigmas, np.float64)
  order = np.argsort(sigmas)
  grid = sigmas[order]
  log_grid = np.log(grid)
  if len(grid) > 1:
    mids = 0.5 * (log_grid[:-1] + log_grid[1:])
    edges = np.exp(np.concatenate([[2 * log_grid[0] - mids[0]], mids, [2 * log_grid[-1] - mids[-1]]]))
  else:
    edges = grid[0] * np.array([0.8, 1.25])
  compare = compare or {}
  names = list(surfaces)
  fig, axes = plt.subplots(len(names) + 1, 1, figsize=(7.0, 2.6 * len(names) + 2.2), squeeze=False,
                           gridspec_kw={"height_ratios": [1.0] * len(names) + [0.8]})
  axes = axes[:, 0]
  bottom = axes[-1]
  for ax, name in zip(axes, names):
    values, mse = surfaces[name]
    values = list(values)
    mse = np.asarray(mse, np.float64)[order]
    finite = np.isfinite(mse)
    best = np.min(np.where(finite, mse, np.inf), axis=1)
    floor = np.maximum(best, 1e-30)[:, None]
    ratio = np.where(finite, np.log10(np.maximum(mse, 1e-30) / floor), np.nan)
    top = float(np.nanmax(ratio)) if np.isfinite(ratio).any() else 1.0
    mesh = ax.pcolormesh(edges, np.arange(len(values) + 1) - 0.5, ratio.T, cmap="viridis_r",
                         vmin=0.0, vmax=float(np.clip(top, 0.5, 3.0)), shading="flat")
    fig.colorbar(mesh, ax=ax, pad=0.01, label="log10(MSE / best)", extend="max" if top > 3 else
                 "neither")
    argmin = np.argmin(np.where(finite, mse, np.inf), axis=1)
    ax.plot(grid, argmin, "o", color="white", markeredgecolor="black", markersize=5,
            label="argmin (tuned)")
    if name in compare:
      label, other = compare[name]
      other = np.asarray(other, np.float64)[order]
      numeric = np.asarray(values, np.float64)
      rank = np.argsort(numeric)
      ax.plot(grid, np.interp(other, numeric[rank], np.arange(len(values))[rank]), "s--",
              color="tab:red", markersize=3, linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels([f"{v:g}" for v in values], fontsize=7)
    ax.set_ylabel(name, fontsize=8)
    if not finite.all():
      ax.set_title("blank: candidate unavailable (a pixel in no mask)", fontsize=7)
    ax.legend(fontsize=6, loc="upper left", framealpha=0.7)
    bottom.plot(grid, np.where(np.isfinite(best), best, np.nan), marker="o", markersize=3,
                label=f"best {name}")
  bottom.set_xscale("log")
  bottom.set_yscale("log")
  bottom.set_xlim(edges[0], edges[-1])
  bottom.set_xlabel("σ")
  bottom.set_ylabel("least MSE", fontsize=8)
  bottom.grid(alpha=0.3)
  bottom.legend(fontsize=6)
  for ax in axes[:-1]:
    ax.set_xlabel("σ", fontsize=8)
  _save(fig, path, title)


def _sets_in(rows) -> list[str]:
  order = ("forward", "reverse")
  present = {row["set"] for row in rows}
  return [s for s in order if s in present] + sorted(present - set(order))


def _mse_panels(rows: Sequence[Mapping], references: Sequence[str]
                ) -> list[tuple[str, list[tuple[str, str]]]]:
  """Groups every denoiser pair of `rows` into panels: [(title, [(curve, other), …]), …].

  One panel per reference present ("vs network": every other denoiser against it; a pair of two
  references goes to the panel of the first), then "other pairs" for pairs with no reference
  (e.g. gaussian vs pspc_square on a table without a network). Empty panels are left out.
  """
  names = list(dict.fromkeys(n for row in rows for n in (row["denoiser_a"], row["denoiser_b"])))
  pairs = {frozenset((row["denoiser_a"], row["denoiser_b"])) for row in rows}
  present = [r for r in references if r in names]
  panels, placed = [], set()
  for ref in present:
    curves = [(name, ref) for name in names
              if frozenset((name, ref)) in pairs and frozenset((name, ref)) not in placed]
    placed.update(frozenset(c) for c in curves)
    panels.append((f"vs {ref}", curves))
  seen = list(dict.fromkeys((row["denoiser_a"], row["denoiser_b"]) for row in rows))
  panels.append(("other pairs", [pair for pair in seen if frozenset(pair) not in placed]))
  return [(title, curves) for title, curves in panels if curves]


def _zero_floor(rows: Sequence[Mapping]) -> float:
  """Where exact-zero MSEs of `rows` are drawn on a log axis: the decade below the smallest positive
  MSE (1e-16 when none is positive)."""
  positive = [row["mse"] for row in rows if np.isfinite(row["mse"]) and row["mse"] > 0]
  return 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-16


def save_mse_plot(path, rows: Sequence[Mapping], references: Sequence[str] = ("network", "empirical"),
                  title: str = "") -> None:
  """MSE between denoisers vs σ (log-log), paper Fig. 2/6: one row of panels per evaluation set, one
  column per reference ("vs network", "vs empirical", then "other pairs": every pair of the table is
  drawn once).

  A denoiser has one colour in every panel (its curve against each reference); in "other pairs" each
  pair has its own colour. An MSE of exactly 0 (e.g. PSPC-Square with a full-image patch against the
  empirical denoiser) has no place on a log axis: it is drawn as an open triangle on or just below a
  floor (dotted line) a decade under the set's smallest positive MSE, one staggered row of triangles
  per curve so that none hides another; the legend says so.

  Args:
    path: output PNG.
    rows: table rows with keys sigma, set, denoiser_a, denoiser_b, mse
      (`pspc_jax.jobs.evaluate.evaluate_run`).
    references: the denoisers the others are compared with, in order of preference.
    title: figure title.
  """
  rows = [row for row in rows if np.isfinite(row["mse"])]
  sets = _sets_in(rows) or ["forward"]
  panels = _mse_panels(rows, references) or [("", [])]
  names = list(dict.fromkeys(n for row in rows for n in (row["denoiser_a"], row["denoiser_b"])))
  palette = plt.get_cmap("tab10")
  colours = {name: palette(k % 10) for k, name in enumerate(names)}
  fig, axes = plt.subplots(len(sets), len(panels), figsize=(4.4 * len(panels), 3.4 * len(sets)),
                           squeeze=False, sharey="row")
  for r, set_name in enumerate(sets):
    floor = _zero_floor([row for row in rows if row["set"] == set_name])
    for c, (panel, curves) in enumerate(panels):
      ax = axes[r, c]
      zeros = 0
      for k, (name, other) in enumerate(curves):
        colour = colours[name] if panel != "other pairs" else palette((len(names) + k) % 10)
        zeros += _mse_curve(ax, rows, set_name, (name, other), colour, f"{name} vs {other}",
                            floor * 10.0 ** (-0.3 * zeros))
      if zeros:
        _zero_legend(ax, floor)
      _log_log_mse_axes(ax, "MSE (per pixel, [-1, 1] units)" if c == 0 else "",
                        f"{set_name} set: {panel}", 9)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, handlelength=3.5)
      else:
        ax.text(0.5, 0.5, "no such pairs on this set", transform=ax.transAxes, ha="center",
                fontsize=8, color="grey")
  _save(fig, path, title)


def _mse_curve(ax, rows: Sequence[Mapping], set_name: str, pair: tuple[str, str], colour, label: str,
               floor: float) -> bool:
  """Draws the MSE of `pair` on `set_name` by σ (`_curve_with_zeros`). Returns whether there were
  zeros."""
  points = sorted((row["sigma"], row["mse"]) for row in rows if row["set"] == set_name
                  and {row["denoiser_a"], row["denoiser_b"]} == set(pair))
  return _curve_with_zeros(ax, points, colour, label, floor)


def _curve_with_zeros(ax, points: Sequence[tuple[float, float]], colour, label: str,
                      floor: float) -> bool:
  """Draws (σ, MSE) points: positive values as a line, exact zeros as open triangles at `floor`.
  Returns whether there were zeros."""
  if not points:
    return False
  sigma, mse = (np.asarray(v, np.float64) for v in zip(*points))
  ax.plot(sigma, np.where(mse > 0, mse, np.nan), "-", color=colour, marker="o", markersize=2.5,
          linewidth=1.2, label=label)
  zero = mse == 0
  if zero.any():
    ax.plot(sigma[zero], np.full(zero.sum(), floor), "v", color=colour, markerfacecolor="none",
            markersize=4)
  return bool(zero.any())


def _zero_legend(ax, floor: float) -> None:
  """The floor line and legend entry of exact-zero MSEs."""
  ax.axhline(floor, color="grey", linestyle=":", linewidth=0.8)
  ax.plot([], [], "v", color="grey", markerfacecolor="none", markersize=4,
          label=f"MSE exactly 0 (drawn at ≤ {floor:.0e})")


def save_patch_mse_plot(path, rows: Sequence[Mapping], title: str = "",
                        tolerance: float | None = None) -> None:
  """Patch posterior mean MSE vs σ (log-log), one curve per patch size, one panel per set (Fig. 4).

  Exact zeros are drawn as open triangles on a floor a decade under the smallest positive MSE, one
  staggered row per patch size (as `save_mse_plot`); the panel title says over how many windows per z
  the MSE averages.

  Args:
    path: output PNG.
    rows: rows with keys sigma, set, patch_size, target, mse and optionally windows (`evaluate_run`'s
      patch_mse table).
    title: figure title.
    tolerance: if set, a dashed line at this MSE (the agreement threshold of
      `evaluation.agreement_sigmas`).
  """
  rows = [row for row in rows if np.isfinite(row["mse"])]
  sets = _sets_in(rows) or ["forward"]
  sizes = sorted({row["patch_size"] for row in rows})
  cmap = plt.get_cmap("viridis")
  fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 3.8), squeeze=False)
  for ax, set_name in zip(axes[0], sets):
    in_set = [row for row in rows if row["set"] == set_name]
    floor, zeros = _zero_floor(in_set), 0
    for k, size in enumerate(sizes):
      points = sorted((row["sigma"], row["mse"]) for row in in_set if row["patch_size"] == size)
      zeros += _curve_with_zeros(ax, points, cmap(k / max(1, len(sizes) - 1)), f"{size}×{size}",
                                 floor * 10.0 ** (-0.3 * zeros))
    if zeros:
      _zero_legend(ax, floor)
    if tolerance is not None:
      ax.axhline(tolerance, color="black", linestyle="--", linewidth=0.8)
      ax.plot([], [], "--", color="black", linewidth=0.8, label=f"agreement: MSE ≤ {tolerance:g}")
    targets = sorted({row["target"] for row in in_set})
    windows = sorted({row["windows"] for row in in_set if "windows" in row})
    per_z = (f"\n{windows[0]} windows per z" if len(windows) == 1 else "")
    _log_log_mse_axes(ax, "patch MSE (per value, [-1, 1] units)",
                      f"{set_name} set: patch posterior means vs {', '.join(targets)}{per_z}", 8)
    ax.legend(fontsize=6, title="patch", title_fontsize=6, handlelength=3)
  _save(fig, path, title)


def min_max_scaled(images: np.ndarray) -> np.ndarray:
  """(B, H, W, C) images, each mapped linearly from its own [min, max] onto [-1, 1] (for figures of
  noisy z, whose range ±3σ would otherwise clip to black and white); a constant image becomes 0."""
  images = np.asarray(images, np.float64)
  axes = tuple(range(1, images.ndim))
  low, high = images.min(axis=axes, keepdims=True), images.max(axis=axes, keepdims=True)
  span = high - low
  return np.where(span > 0, 2 * (images - low) / np.where(span > 0, span, 1) - 1, 0.0)


def save_trajectory_figure(path, rows: Mapping[str, np.ndarray], column_titles: Sequence[str],
                           title: str = "") -> None:
  """Images along sampler trajectories (paper Fig. 8): one row per entry, columns = steps.

  Args:
    path: output PNG.
    rows: {label: (T, H, W, C) [-1, 1] images}, e.g. "pspc_square: z" and "pspc_square: D(z)".
    column_titles: T titles (e.g. the σ of each step).
    title: figure title.
  """
  names = list(rows)
  count = len(column_titles)
  fig, axes = plt.subplots(len(names), count, figsize=(0.95 * count + 1.4, 1.0 * len(names) + 0.5),
                           squeeze=False)
  for r, name in enumerate(names):
    for c in range(count):
      _show(axes[r, c], np.clip(rows[name][c], -1, 1), column_titles[c] if r == 0 else "")
    axes[r, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
  _save(fig, path, title, title_size=8)


def save_similarity_matrix(path, names: Sequence[str], matrix: np.ndarray, title: str = "") -> None:
  """A similarity matrix between denoisers as an annotated heat map.

  Args:
    path: output PNG.
    names: K row/column labels.
    matrix: (K, K) similarities.
    title: figure title.
  """
  matrix = np.asarray(matrix, np.float64)
  size = 1.0 + 0.75 * len(names)
  fig, ax = plt.subplots(figsize=(size + 1.2, size))
  image = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1.0)
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
  ax.set_yticks(range(len(names)))
  ax.set_yticklabels(names, fontsize=7)
  for i in range(len(names)):
    for j in range(len(names)):
      ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
              color="white" if matrix[i, j] < 0.6 else "black")
  fig.colorbar(image, ax=ax, fraction=0.046)
  if title:
    ax.set_title(title, fontsize=8)
  _save(fig, path)


def save_loss_plot(path, records: Sequence[Mapping]) -> None:
  """The training loss of every logging window against the step (log scale), as a PNG.

  Args:
    path: output PNG.
    records: `metrics.jsonl` rows with keys step and loss.
  """
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
  ax.set_yscale("log")
  ax.set_xlabel("training step")
  ax.set_ylabel("EDM loss (window mean)")
  ax.grid(alpha=0.3)
  _save(fig, path, dpi=120)
