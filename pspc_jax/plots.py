"""Figures written by the command-line tools (matplotlib, Agg backend; I/O only, no maths)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pspc_jax.images import to_uint8  # noqa: E402


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


def save_rows_figure(path, rows: Mapping[str, np.ndarray], title: str = "") -> None:
  """One row of images per entry of `rows` ({name: (B, H, W, C) [-1, 1]}), names on the left."""
  names = list(rows)
  count = len(next(iter(rows.values())))
  fig, axes = plt.subplots(len(names), count, figsize=(1.1 * count + 1, 1.15 * len(names)),
                           squeeze=False)
  for r, name in enumerate(names):
    for c in range(count):
      _show(axes[r, c], rows[name][c])
    axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
  _save(fig, path, title)


def save_sensitivity_heatmaps(path, sigmas: Sequence[float], maps: np.ndarray,
                              pixels: Sequence[tuple[int, int]],
                              max_columns: int | None = None) -> None:
  """Sensitivity maps of chosen output pixels (rows) at every σ (columns), paper Fig. 3 (right).

  Each panel is normalised to its own maximum; a red square marks the output pixel.

  Args:
    path: output PNG.
    sigmas: (S,) noise levels of `maps`.
    maps: (S, H, W, H, W) maps; maps[k, h, w] is the map of output pixel (h, w) at sigmas[k].
    pixels: output pixels (h, w), one row each.
    max_columns: show at most this many σ, evenly spaced over the sorted grid (None: all).
  """
  sigmas = np.asarray(sigmas, np.float64)
  order = np.argsort(-sigmas)  # largest σ first, as in sampling.
  if max_columns is not None and len(order) > max_columns:
    order = order[np.round(np.linspace(0, len(order) - 1, max_columns)).astype(int)]
  rows, columns = len(pixels), len(order)
  fig, axes = plt.subplots(rows, columns, figsize=(max(4.0, 0.9 * columns + 0.8), 0.95 * rows + 0.6),
                           squeeze=False)
  for r, (h, w) in enumerate(pixels):
    for c, k in enumerate(order):
      ax = axes[r, c]
      panel = np.asarray(maps[k, h, w], np.float64)
      ax.imshow(panel / max(panel.max(), 1e-30), cmap="magma", vmin=0, vmax=1,
                interpolation="nearest")
      ax.add_patch(matplotlib.patches.Rectangle((w - 0.5, h - 0.5), 1, 1, fill=False,
                                                edgecolor="red", linewidth=0.8))
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f"σ={sigmas[k]:.3g}", fontsize=6)
    axes[r, 0].set_ylabel(f"({h},{w})", fontsize=7)
  _save(fig, path, "sensitivity maps of output pixels (rows) by noise level", title_size=8)


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


def save_mse_plot(path, rows: Sequence[Mapping], references: Sequence[str] = ("network", "empirical"),
                  title: str = "") -> None:
  """MSE between denoisers vs σ (log-log), one panel per evaluation set (paper Fig. 2/6).

  Each curve is one denoiser against one reference: solid against the first reference present in the
  rows (the network), dashed against the second (the optimal empirical denoiser), dotted against
  further ones; a denoiser has one colour in every panel. A pair of two references is drawn once.

  Args:
    path: output PNG.
    rows: table rows with keys sigma, set, denoiser_a, denoiser_b, mse
      (`pspc_jax.jobs.evaluate.evaluate_run`).
    references: the denoisers the others are compared with, in order of preference.
    title: figure title.
  """
  rows = list(rows)
  sets = _sets_in(rows) or ["forward"]
  names = list(dict.fromkeys(n for row in rows for n in (row["denoiser_a"], row["denoiser_b"])))
  present = [r for r in references if r in names]
  colours = {name: plt.get_cmap("tab10")(k % 10) for k, name in enumerate(names)}
  styles = ["-", "--", ":"]
  fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets), 3.6), squeeze=False)
  for ax, set_name in zip(axes[0], sets):
    for r_index, ref in enumerate(present):
      for name in names:
        if name == ref or (name in present and present.index(name) < r_index):
          continue
        points = sorted((row["sigma"], row["mse"]) for row in rows if row["set"] == set_name
                        and {row["denoiser_a"], row["denoiser_b"]} == {name, ref})
        points = [(s, m) for s, m in points if m > 0]
        if points:
          s, m = zip(*points)
          ax.plot(s, m, styles[min(r_index, 2)], color=colours[name], marker="o", markersize=2.5,
                  linewidth=1.2, label=f"{name} vs {ref}")
    _log_log_mse_axes(ax, "MSE (per pixel, [-1, 1] units)", f"{set_name} set", 9)
    ax.legend(fontsize=6)
  _save(fig, path, title)


def save_patch_mse_plot(path, rows: Sequence[Mapping], title: str = "") -> None:
  """Patch posterior mean MSE vs σ (log-log), one curve per patch size, one panel per set (Fig. 4).

  Args:
    path: output PNG.
    rows: rows with keys sigma, set, patch_size, target, mse (`evaluate_run`'s patch_mse table).
    title: figure title.
  """
  rows = list(rows)
  sets = _sets_in(rows) or ["forward"]
  sizes = sorted({row["patch_size"] for row in rows})
  cmap = plt.get_cmap("viridis")
  fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets), 3.6), squeeze=False)
  for ax, set_name in zip(axes[0], sets):
    targets = sorted({row["target"] for row in rows if row["set"] == set_name})
    for k, size in enumerate(sizes):
      points = sorted((row["sigma"], row["mse"]) for row in rows
                      if row["set"] == set_name and row["patch_size"] == size and row["mse"] > 0)
      if points:
        s, m = zip(*points)
        ax.plot(s, m, color=cmap(k / max(1, len(sizes) - 1)), marker="o", markersize=2.5,
                linewidth=1.2, label=f"{size}×{size}")
    _log_log_mse_axes(ax, "patch MSE",
                      f"{set_name} set: patch posterior means vs {', '.join(targets)}", 8)
    ax.legend(fontsize=6, title="patch", title_fontsize=6)
  _save(fig, path, title)


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
