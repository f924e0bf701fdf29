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
  fig.suptitle("samples (top) and their nearest training images (bottom)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


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
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)
