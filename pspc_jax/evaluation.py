"""Denoiser-vs-denoiser evaluation, the pure part (paper §4-5, Fig. 2, 4, 6, 8; docs/design.md §7).

Evaluation sets of noisy images z, metrics, patch posterior means, and the descriptors, similarity and
memorisation statistics of sample comparisons. The resumable jobs built on them, which write output
folders, are `pspc_jax.jobs.evaluate.evaluate_run` (bin/evaluate) and
`pspc_jax.jobs.compare.compare_run` (bin/compare_samples).

* forward set (`forward_set`): z = x + σ ε with x drawn from the training set; the same x and ε at
  every σ (common random numbers: curves over σ are not blurred by redrawing). Drawn through
  `pspc_jax.forward_process.forward_indices_and_noise`, so z of seed s equals
  `forward_process.forward_samples(data, σ, arange(count), s)` of bin/tune_schedule and bin/sensitivity.
* reverse set (`reverse_set`): the states z(σ) of a reference denoiser's own sampler trajectories
  (Heun on the EDM grid, from seeded latents), i.e. the inputs that denoiser sees while sampling.
* given set (`GivenSet`, set name "given"): z read from a file rather than drawn, e.g. the official
  release's forward- and reverse-process z (`pspc_jax.release_files.load_z_set`).

MSE is per pixel and channel, in model units ([-1, 1] images), averaged over the z of a set:
mse(a, b) = mean over z, pixels, channels of (D_a(z) − D_b(z))², computed in float64.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspc_jax import validation
from pspc_jax.batching import map_batched, pad_rows
from pspc_jax.denoisers.pspc import patch_posterior_means, window_posterior_means
from pspc_jax.denoisers.values import as_argument
from pspc_jax.edm import edm_sigmas
from pspc_jax.forward_process import forward_indices_and_noise
from pspc_jax.conventions import to_model_range
from pspc_jax.neighbours import nearest_neighbours
from pspc_jax.progress import SILENT, Progress, compile_jitted
from pspc_jax.sampling import latents_from_seeds, sample

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

SETS = ("forward", "reverse")
# The set of z given from a file (`GivenSet`), beside the drawn SETS.
GIVEN = "given"
# The denoiser whose output the patch posterior means are compared with on the forward set (Fig. 4):
# the optimal empirical denoiser. On the reverse set it is the reference that made the trajectories
# (the network in the paper).
FORWARD_PATCH_TARGET = "empirical"
# Memorisation threshold on the nearest / second-nearest training distance ratio (see
# `memorisation_stats`).
MEMORISATION_RATIO = 1.0 / 3.0


def patch_target(set_name: str, reference: str) -> str:
  """The denoiser the patch analysis compares with on `set_name`."""
  return FORWARD_PATCH_TARGET if set_name == "forward" else reference


# ----------------------------------------------------------------------------------------------------
# Noise levels and evaluation sets.

def default_sigmas(steps: int = 18) -> np.ndarray:
  """The `steps`-step EDM grid without its final 0 (σ = 80 … 0.002, descending), float32."""
  return np.asarray(edm_sigmas(steps))[:-1]


def parse_sigmas(spec: str, steps: int = 18) -> np.ndarray:
  """'edm' → `default_sigmas(steps)`; 'edm:K' → the K-step EDM grid; '1,0.1' → those σ (descending).

  A σ spec may also select grid points by index: 'edm[0,5,10]' → those entries of the grid of `steps`.

  Raises:
    ValueError: malformed spec or a σ ≤ 0.
  """
  spec = spec.strip()
  try:
    if spec == "edm":
      sigmas = default_sigmas(steps)
    elif spec.startswith("edm:"):
      sigmas = default_sigmas(int(spec[4:]))
    elif spec.startswith("edm[") and spec.endswith("]"):
      grid = default_sigmas(steps)
      sigmas = grid[[int(i) for i in spec[4:-1].split(",")]]
    else:
      sigmas = np.asarray([float(s) for s in spec.split(",")], np.float32)
  except (ValueError, IndexError) as err:
    raise ValueError(f"cannot parse --sigmas={spec!r} ({err}); use 'edm', 'edm:K', 'edm[i,j,...]' "
                     "(indices into the --steps grid) or a comma list of positive σ") from None
  if sigmas.size == 0 or not np.all(np.isfinite(sigmas) & (sigmas > 0)):
    raise ValueError(f"--sigmas={spec!r}: need at least one σ, all positive and finite")
  return np.sort(np.unique(sigmas.astype(np.float32)))[::-1]


class ForwardSet(NamedTuple):
  """Forward-process evaluation set: z(σ) = x + σ ε, the same x and ε at every σ.

  Attributes:
    indices: (B,) int training image of each z (drawn uniformly with replacement).
    x: (B, H, W, C) float32 clean images in [-1, 1].
    noise: (B, H, W, C) float32 standard normal ε.
  """
  indices: np.ndarray
  x: np.ndarray
  noise: np.ndarray

  def z(self, sigma: float) -> np.ndarray:
    """(B, H, W, C) float32 x + σ ε."""
    return self.x + np.float32(sigma) * self.noise


def forward_set(images: np.ndarray, count: int, seed: int = 0) -> ForwardSet:
  """Draws the forward set: z_k(σ) = x_{i_k} + σ ε_k for k = 0 … count − 1.

  The indices i_k and noise ε_k are `forward_process.forward_indices_and_noise(N, (H, W, C),
  arange(count), seed)`: entry k depends only on (seed, k), not on `count`, and `z(σ)` equals
  `forward_process.forward_samples(images, σ, arange(count), seed)` up to float32 rounding.

  Args:
    images: (N, H, W, C) uint8 or float training set.
    count: number of z per σ, at least 1.
    seed: base seed.

  Raises:
    ValueError: count < 1.
  """
  if count < 1:
    raise ValueError(f"count must be at least 1 (z per σ), got {count}")
  indices, noise = forward_indices_and_noise(images.shape[0], images.shape[1:], jnp.arange(count),
                                             seed)
  indices = np.asarray(indices)
  x = np.asarray(to_model_range(jnp.asarray(images[indices])))
  return ForwardSet(indices, x, np.asarray(noise))


class GivenSet(NamedTuple):
  """Evaluation z given rather than drawn (the set "given"): K noisy images at each of S noise levels.

  Attributes:
    sigmas: (S,) float32 distinct noise levels > 0.
    z: (S, K, H, W, C) float32; z[j] are the images at sigmas[j] (in [-1, 1] units plus noise).
    source: where they come from (a file name), for reports.
  """
  sigmas: np.ndarray
  z: np.ndarray
  source: str = ""

  def select(self, sigmas: Sequence[float] | None, count: int) -> "GivenSet":
    """The set restricted to the first `count` z and, unless `sigmas` is None, to its σ that equal one
    of `sigmas` (within a relative 1e-6), in descending order of σ.

    Raises:
      ValueError: fewer than `count` z, or no σ of the set among `sigmas`.
    """
    if self.z.shape[1] < count:
      raise ValueError(f"{self.source or 'the given set'} holds {self.z.shape[1]} z per σ; fewer than "
                       f"the {count} asked for (--count)")
    keep = np.ones(len(self.sigmas), bool)
    if sigmas is not None:
      wanted = np.asarray(sigmas, np.float64)
      keep = np.array([np.isclose(wanted, s, rtol=1e-6, atol=0).any() for s in self.sigmas], bool)
      if not keep.any():
        raise ValueError(f"none of the σ of {self.source or 'the given set'} "
                         f"({', '.join(f'{s:.4g}' for s in self.sigmas)}) is among --sigmas "
                         f"({', '.join(f'{s:.4g}' for s in wanted)})")
    order = np.flatnonzero(keep)[np.argsort(-self.sigmas[keep], kind="stable")]
    return GivenSet(self.sigmas[order], self.z[order, :count], self.source)

  def at(self, sigma: float) -> np.ndarray:
    """(K, H, W, C) float32 z at the set's σ equal to `sigma` (within a relative 1e-6).

    Raises:
      ValueError: no such σ in the set.
    """
    match = np.flatnonzero(np.isclose(self.sigmas, sigma, rtol=1e-6, atol=0))
    if match.size == 0:
      raise ValueError(f"σ = {sigma:g} is not a noise level of {self.source or 'the given set'}")
    return np.asarray(self.z[match[0]], np.float32)

  def fingerprint(self) -> str:
    """SHA-256 (hex) of the σ and z (float32, C order): what an evaluation on the set depends on."""
    digest = hashlib.sha256(np.ascontiguousarray(self.sigmas, np.float32).tobytes())
    for block in self.z:
      digest.update(np.ascontiguousarray(block, np.float32).tobytes())
    return digest.hexdigest()


def reverse_grid(sigmas: Sequence[float], steps: int = 18) -> np.ndarray:
  """The sampler grid of the reverse set: the EDM grid of `steps` united with `sigmas`, descending,
  then 0 (float32). With `sigmas` on the EDM grid (the default) it is exactly the EDM grid, so the
  trajectories are the reference's ordinary samples and the states at the grid σ are Heun's states."""
  grid = np.concatenate([default_sigmas(steps), np.asarray(sigmas, np.float32)]).astype(np.float32)
  return np.append(np.unique(grid)[::-1], np.float32(0.0))


def reverse_set(denoise: Denoiser, image_shape, sigmas: Sequence[float], seeds: Sequence[int], *,
                steps: int = 18, solver: str = "heun", batch_size: int = 16,
                progress: Progress = SILENT) -> np.ndarray:
  """States z(σ) of `denoise`'s own PF-ODE trajectories, one per seed (the paper's reverse set).

  Sample k starts from `latents_from_seeds([seeds[k]])` (so its final state is what bin/sample draws
  for that seed) and is integrated on `reverse_grid(sigmas, steps)`; the state at each requested σ is
  kept (Trajectory.z at that grid index).

  Args:
    denoise: the reference denoiser (e.g. the network).
    image_shape: (H, W, C).
    sigmas: (S,) noise levels, each kept from the trajectory.
    seeds: (B,) latent seeds.
    steps, solver: the sampler (`pspc_jax.sample`).
    batch_size: trajectories per compiled batch (the last batch is padded).
    progress: the sampler's compilation as a phase, then a bar over the trajectories.

  Returns:
    (S, B, H, W, C) float32: [j, k] is seed k's state at sigmas[j].
  """
  grid = reverse_grid(sigmas, steps)
  where = np.asarray([int(np.flatnonzero(grid == np.float32(s))[0]) for s in sigmas])
  run = jax.jit(lambda den, seeds: jnp.swapaxes(sample(
      den, latents_from_seeds(seeds, tuple(image_shape)), jnp.asarray(grid), solver=solver,
      return_trajectory=True)[1].z[where], 0, 1))
  seeds = np.asarray([int(s) for s in seeds], np.int32)
  denoise = as_argument(denoise)
  step = compile_jitted(progress, f"reverse-set sampler ({len(grid) - 1} {solver} steps)", run,
                        denoise, pad_rows(seeds[:batch_size], batch_size))
  with progress.bar(total=len(seeds), desc="reverse set", unit="trajectory") as bar:
    states = map_batched(lambda batch: step(denoise, batch), [seeds], batch_size,
                         on_batch=bar.update)
  return np.swapaxes(states, 0, 1)


# ----------------------------------------------------------------------------------------------------
# Metrics and patch posterior means.

def mse(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over every z, pixel and channel of (a − b)², in float64."""
  return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def pairwise_mse(outputs: Mapping[str, np.ndarray]) -> list[tuple[str, str, float]]:
  """(a, b, mse(outputs[a], outputs[b])) for every unordered pair, in the order of `outputs`."""
  names = list(outputs)
  return [(a, b, mse(outputs[a], outputs[b])) for i, a in enumerate(names) for b in names[i + 1:]]


def window_grid(height: int, width: int, patch_size: int, per_side: int | None
                ) -> tuple[tuple[int, int], ...] | None:
  """Corners (row, column) of an even grid of s×s windows: `per_side` rows and columns of corners
  spread from the first to the last window (`np.linspace`, rounded; fewer where fewer windows fit).
  None (or 0): None, meaning every window.

  Raises:
    ValueError naming patch_positions: per_side not an integer ≥ 0.
  """
  per_side = validation.positive_int(per_side, "patch_positions", minimum=0, optional=True)
  if not per_side:
    return None
  last_row, last_col = height - min(patch_size, height), width - min(patch_size, width)
  rows = np.unique(np.round(np.linspace(0, last_row, min(per_side, last_row + 1))).astype(int))
  cols = np.unique(np.round(np.linspace(0, last_col, min(per_side, last_col + 1))).astype(int))
  return tuple((int(r), int(c)) for r in rows for c in cols)


def extract_patches(images: np.ndarray, patch_size: int, positions=None) -> np.ndarray:
  """The s×s windows of (B, H, W, C) images: every window → (B, H−s+1, W−s+1, s, s, C) (the layout of
  `patch_posterior_means`), or those at `positions` (corners (row, column)) → (B, K, s, s, C) (the
  layout of `window_posterior_means`)."""
  images = np.asarray(images)
  _, height, width, _ = images.shape
  size_h, size_w = min(patch_size, height), min(patch_size, width)
  if positions is not None:
    return np.stack([images[:, i:i + size_h, j:j + size_w] for i, j in positions], axis=1)
  rows = np.arange(height - size_h + 1)[:, None] + np.arange(size_h)[None, :]
  cols = np.arange(width - size_w + 1)[:, None] + np.arange(size_w)[None, :]
  return images[:, rows[:, None, :, None], cols[None, :, None, :], :]


class PatchMeans:
  """The window posterior means of one patch size, compiled once for a fixed batch (last batch padded):
  every window (`patch_posterior_means`) or those at `positions` (`window_posterior_means`, exact per
  window and far cheaper on large images: the patch MSE is then the mean over those windows only).

  Compiled on construction (a "compiling patch means s=…" phase of `progress`); calls take any number
  of z of the training images' shape.
  """

  def __init__(self, data, patch_size: int, batch_size: int, progress: Progress = SILENT,
               positions=None):
    """data: (N, H, W, C) training set; patch_size: s in [1, min(H, W)]; batch_size: z per call;
    positions: None (every window) or window corners (`window_grid`)."""
    self.data, self.batch_size = jnp.asarray(data), int(batch_size)
    self.patch_size, self.positions = int(patch_size), positions
    if positions is None:
      fn = jax.jit(lambda z, sigma, data: patch_posterior_means(z, sigma, data, self.patch_size))
    else:
      fn = jax.jit(lambda z, sigma, data: window_posterior_means(z, sigma, data, self.patch_size,
                                                                 positions))
    z = jax.ShapeDtypeStruct((self.batch_size,) + tuple(self.data.shape[1:]), jnp.float32)
    sigma = jax.ShapeDtypeStruct((self.batch_size,), jnp.float32)
    self._fn = compile_jitted(progress, f"patch means s={patch_size}", fn, z, sigma, self.data)

  def __call__(self, z: np.ndarray, sigma: float) -> np.ndarray:
    """(B, H, W, C) z at one σ → float32 NumPy window means, in the layout of `extract_patches`."""
    z = np.asarray(z, np.float32)
    sigmas = np.full((len(z),), sigma, np.float32)
    return map_batched(lambda zb, sb: self._fn(zb, sb, self.data), [z, sigmas], self.batch_size)

  @property
  def windows(self) -> int:
    """Windows per z: len(positions), or every window, (H − s_h + 1)·(W − s_w + 1)."""
    if self.positions is not None:
      return len(self.positions)
    height, width = self.data.shape[1:3]
    return (height - min(self.patch_size, height) + 1) * (width - min(self.patch_size, width) + 1)

  def patches(self, images: np.ndarray) -> np.ndarray:
    """The same windows of (B, H, W, C) images (e.g. the target denoiser's output)."""
    return extract_patches(images, self.patch_size, self.positions)


# Patch agreement (Fig. 4): a window's posterior mean "equals" the target's window when their MSE per
# value is at most this ([-1, 1] units: an RMS difference of 0.032, about 4 of 255 grey levels).
AGREEMENT_MSE = 1e-3


def agreement_sigmas(patch_rows: Sequence[Mapping], tolerance: float = AGREEMENT_MSE
                     ) -> dict[tuple[str, int], float | None]:
  """{(set, patch size): the largest σ of the table at and below which every patch MSE is ≤
  `tolerance`}, None where even the smallest σ exceeds it: how far up in σ the s×s windows' posterior
  means agree with the target denoiser's windows (the paper's Fig. 4 claim)."""
  out: dict[tuple[str, int], float | None] = {}
  for key in dict.fromkeys((row["set"], row["patch_size"]) for row in patch_rows):
    points = sorted((row["sigma"], row["mse"]) for row in patch_rows
                    if (row["set"], row["patch_size"]) == key)
    largest = None
    for sigma, value in points:
      if not value <= tolerance:
        break
      largest = sigma
    out[key] = largest
  return out


def mse_lookup(rows: Sequence[Mapping], set_name: str, a: str, b: str) -> dict[float, float]:
  """{σ: mse} of the pair (a, b) (either order) on `set_name`, from table rows."""
  return {row["sigma"]: row["mse"] for row in rows if row["set"] == set_name
          and {row["denoiser_a"], row["denoiser_b"]} == {a, b}}


# ----------------------------------------------------------------------------------------------------
# Sample comparisons from shared latents: descriptors, similarity, memorisation.

class Descriptor(NamedTuple):
  """An image descriptor: `embed(samples, data) -> (B, D)` and how two embeddings compare.

  Attributes:
    embed: maps (B, H, W, C) float32 samples in [-1, 1] and the (N, H, W, C) training set (uint8 or
      float) to (B, D) array-likes.
    similarity: "cosine" (cosine similarity of the two embeddings, in [-1, 1]) or "equal" (1 when the
      embeddings are identical, else 0).
  """
  embed: Callable[[np.ndarray, np.ndarray], np.ndarray]
  similarity: str = "cosine"


_DESCRIPTORS: dict[str, Descriptor] = {}


def register_descriptor(name: str, embed: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        similarity: str = "cosine") -> None:
  """Adds (or replaces) a descriptor for `similarity_matrix` / bin/compare_samples --descriptors.

  The hook for learned copy-detection embeddings such as SSCD (Pizzi et al. 2022; the paper's choice,
  whose weights are not shipped here):

    def sscd(samples, data):          # samples (B, H, W, C) float32 in [-1, 1]
      x = preprocess(samples)         # e.g. resize to 288, ImageNet normalisation, NCHW
      return np.asarray(model(x))     # (B, 512) embeddings
    register_descriptor("sscd", sscd) # cosine similarity, as in the paper

  Args:
    name: descriptor name.
    embed: `embed(samples, data) -> (B, D)`; `data` is the training set, for descriptors that need it.
    similarity: "cosine" or "equal" (see `Descriptor`).
  """
  if similarity not in ("cosine", "equal"):
    raise ValueError(f"unknown similarity {similarity!r}; use 'cosine' or 'equal'")
  _DESCRIPTORS[name] = Descriptor(embed, similarity)


def available_descriptors() -> tuple[str, ...]:
  return tuple(sorted(_DESCRIPTORS))


def _pixel_embedding(samples, data):
  del data
  return np.asarray(samples, np.float64).reshape(len(samples), -1)


def _nearest_training_embedding(samples, data):
  _, idx = nearest_neighbours(jnp.asarray(samples, jnp.float32), jnp.asarray(data), k=1)
  return np.asarray(idx)


register_descriptor("pixel", _pixel_embedding, "cosine")
register_descriptor("nearest_training", _nearest_training_embedding, "equal")


def pairwise_similarity(first: np.ndarray, second: np.ndarray, similarity: str) -> np.ndarray:
  """Per-row similarity of two (B, D) embeddings: cosine, or 1.0/0.0 for equal/unequal rows."""
  first = np.asarray(first, np.float64).reshape(len(first), -1)
  second = np.asarray(second, np.float64).reshape(len(second), -1)
  if similarity == "equal":
    return np.all(first == second, axis=1).astype(np.float64)
  norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
  return np.sum(first * second, axis=1) / np.maximum(norms, 1e-30)


def similarity_matrix(samples: Mapping[str, np.ndarray], data, descriptor: str | Descriptor
                      ) -> tuple[list[str], np.ndarray]:
  """Mean similarity between denoisers' samples drawn from the same latents.

  Entry (a, b) averages, over the seeds, the similarity of a's and b's samples of the same seed under
  the descriptor (each denoiser's samples are embedded once). The diagonal is 1 for the built-ins.

  Args:
    samples: {denoiser: (B, H, W, C) samples}, all of the same seeds in the same order.
    data: (N, H, W, C) training set (for descriptors that use it).
    descriptor: a registered name or a `Descriptor`.

  Returns:
    (names, (K, K) float64 symmetric matrix).
  """
  if isinstance(descriptor, str):
    if descriptor not in _DESCRIPTORS:
      raise ValueError(f"unknown descriptor {descriptor!r}; choose one of "
                       f"{', '.join(available_descriptors())}")
    descriptor = _DESCRIPTORS[descriptor]
  names = list(samples)
  embeddings = {name: np.asarray(descriptor.embed(np.asarray(samples[name], np.float32), data))
                for name in names}
  matrix = np.ones((len(names), len(names)))
  for i, a in enumerate(names):
    for j, b in enumerate(names):
      matrix[i, j] = float(np.mean(pairwise_similarity(embeddings[a], embeddings[b],
                                                       descriptor.similarity)))
  return names, matrix


def memorisation_stats(samples: np.ndarray, data, threshold: float = MEMORISATION_RATIO) -> dict:
  """Distances of samples to their nearest training images (the memorisation view of a sampler).

  For each sample, d1 and d2 are the Euclidean distances (model units) to its nearest and second
  nearest training images and ratio = d1 / d2 (0 when d1 = 0, even if d2 = 0 too). A sample counts as
  memorised when ratio < `threshold`, by default 1/3: the criterion of Yoon et al. (2023, "Diffusion
  probabilistic models generalize when they fail to memorize") and Gu et al. (2023, "On memorization in
  diffusion models"): the sample is much closer to one training image than to any other. With
  horizontal flips in the training set, a near-symmetric image and its mirror are two close training
  images, which lowers the ratio's power to detect copies of them.

  Args:
    samples: (B, H, W, C) float32 in [-1, 1].
    data: (N, H, W, C) training set, N ≥ 2.
    threshold: the memorisation ratio threshold.

  Returns:
    dict of per-sample arrays "nn_distance", "nn_ratio", "nn_index" and summary floats
    "mean_nn_distance", "median_nn_distance", "min_nn_distance", "median_nn_ratio",
    "fraction_memorised", "count".
  """
  dists, idx = nearest_neighbours(jnp.asarray(samples, jnp.float32), jnp.asarray(data), k=2)
  dists = np.asarray(dists, np.float64)
  d1, d2 = dists[:, 0], dists[:, 1]
  ratio = np.where(d1 == 0, 0.0, d1 / np.maximum(d2, 1e-30))
  return {"nn_distance": d1, "nn_ratio": ratio, "nn_index": np.asarray(idx)[:, 0],
          "mean_nn_distance": float(d1.mean()), "median_nn_distance": float(np.median(d1)),
          "min_nn_distance": float(d1.min()), "median_nn_ratio": float(np.median(ratio)),
          "fraction_memorised": float(np.mean(ratio < threshold)), "count": int(len(d1))}


def sample_with_trajectory(denoise: Denoiser, seeds: Sequence[int], image_shape, sigmas, *,
                           solver: str = "heun", batch_size: int = 16, progress: Progress = SILENT,
                           label: str = "sampler"
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Samples one image per seed and records its trajectory (batched, last batch padded).

  Args:
    denoise: the denoiser.
    seeds: (B,) latent seeds (`latents_from_seeds`).
    image_shape: (H, W, C).
    sigmas: (N+1,) the sampler grid, descending, ending at 0.
    solver: "heun" or "euler".
    batch_size: trajectories per compiled batch.
    progress: compilation as a phase "compiling <label>", then a bar over the seeds.
    label: names the sampler in `progress`.

  Returns:
    (samples (B, H, W, C), z (N+1, B, H, W, C), denoised (N, B, H, W, C)) NumPy float32, as
    `pspc_jax.sample(..., return_trajectory=True)`.
  """
  grid = jnp.asarray(sigmas, jnp.float32)

  def run(den, seeds):
    out, path = sample(den, latents_from_seeds(seeds, tuple(image_shape)), grid, solver=solver,
                       return_trajectory=True)
    return out, jnp.swapaxes(path.z, 0, 1), jnp.swapaxes(path.denoised, 0, 1)

  seeds = np.asarray([int(s) for s in seeds], np.int32)
  denoise = as_argument(denoise)
  example = pad_rows(seeds[:batch_size], batch_size)
  step = compile_jitted(progress, label, jax.jit(run), denoise, example)
  with progress.bar(total=len(seeds), desc=label, unit="sample") as bar:
    samples, z, denoised = map_batched(lambda batch: step(denoise, batch), [seeds], batch_size,
                                       on_batch=bar.update)
  return samples, np.swapaxes(z, 0, 1), np.swapaxes(denoised, 0, 1)
