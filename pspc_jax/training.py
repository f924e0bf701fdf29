"""Training the network baselines with the EDM loss (Karras et al. 2022): data-parallel and resumable.

The maths is pure and jit-able: :func:`edm_loss`, :func:`batch_loss`, :func:`train_step` (one Adam
update and one EMA update of a :class:`TrainState`), :func:`learning_rate`, :func:`ema_beta`. The
update is compiled once with `NamedSharding`s over a 1-D mesh of the devices (axis "data"): the
batch is split across devices, parameters and optimiser state are replicated, and XLA inserts the
gradient all-reduce, so 1 and N devices run the same code.

Several processes (multi-host). After `pspc_jax.distributed.initialize` the mesh spans the devices of
every process. Each process derives the same global batch indices and gathers only the rows of its own
devices; the update, the initial state and the orbax checkpoint saves and restores are collective
(every process makes them), and the result equals one process with as many devices. Only process 0
prints, writes metrics.jsonl and loss.png, and draws the sample grids (from its local copy of the
replicated EMA weights). The processes must share the workdir's filesystem (orbax writes one
checkpoint from all of them).

Resume determinism. A run is a pure function of its :class:`TrainConfig`, the dataset and the number of
updates:
  * update k (0-based) trains on stream positions k·B … k·B + B − 1 of the concatenated per-epoch
    permutations of the dataset, permutation e drawn by NumPy from the seed sequence (seed, e)
    (:func:`batch_indices`);
  * every random number of update k (σ, ε, dropout, flips) comes from `fold_in(key, k)`;
  * a checkpoint after k updates holds all the rest (params, EMA, Adam moments and count, k, key).
Restoring step k and running on is therefore bit-identical to never stopping (same device count; with
another device count only the order of the gradient all-reduce differs).

:func:`train` is the loop behind `bin/train`; it writes into its workdir
  checkpoints/<step>/   orbax checkpoints with a JSON sidecar (see `pspc_jax.checkpoints`)
  metrics.jsonl         one line per logging window: step, loss, lr, steps/s, elapsed seconds
  loss.png              the loss curve
  samples/<step>.png    Heun samples of the EMA network from fixed seeds (if sample_every is set)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pspc_jax import checkpoints, multihost, nets, plots
from pspc_jax.edm import edm_sigmas
from pspc_jax.files import atomic_write
from pspc_jax.conventions import to_model_range
from pspc_jax.nets.precond import edm_denoiser, precond_apply
from pspc_jax.sampling import latents_from_seeds, sample


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that determines a training run's weights (stored with every checkpoint).

  Attributes:
    network: network config {"arch": …, **constructor arguments} for `pspc_jax.nets.make_network`.
    batch_size: global batch B (images per update, split evenly over the devices).
    lr: peak Adam learning rate.
    warmup_steps: linear warm-up, lr_k = lr · min((k + 1) / warmup_steps, 1) for update k; 0 = none.
    adam_b1, adam_b2, adam_eps: Adam's β1, β2 and ε.
    grad_clip: clip the gradient to this global L2 norm; None = no clipping.
    ema_halflife_kimg: EMA half-life in thousands of training images (EDM's convention, so it does not
      depend on B): β = 0.5^(B / (1000 · ema_halflife_kimg)).
    ema_rampup_ratio: caps the half-life at this fraction of the images seen so far (EDM: 0.05), so the
      EMA of a young run is not dominated by its random initialisation; None = no cap.
    ema_decay: a fixed EMA decay β per update instead of the half-life; None = use the half-life.
    p_mean, p_std: training noise levels ln σ ~ N(p_mean, p_std²).
    sigma_data: σ_d of the preconditioning and of the loss weight.
    xflip: mirror each image left-right with probability 1/2 in every batch (the same distribution as
      training on the images and their mirrors).
    seed: seeds the initial weights, the data order and the training noise.
  """
  network: dict
  batch_size: int = 128
  lr: float = 1e-3
  warmup_steps: int = 0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  grad_clip: float | None = None
  ema_halflife_kimg: float = 500.0
  ema_rampup_ratio: float | None = 0.05
  ema_decay: float | None = None
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_data: float = 0.5
  xflip: bool = False
  seed: int = 0

  def __post_init__(self):
    checks = [(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
              (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
              (self.warmup_steps >= 0, f"warm-up must be >= 0 steps, got {self.warmup_steps}"),
              (self.grad_clip is None or self.grad_clip > 0,
               f"gradient clipping norm must be positive, got {self.grad_clip}"),
              (self.ema_halflife_kimg > 0, f"EMA half-life must be positive, got {self.ema_halflife_kimg}"),
              (self.ema_decay is None or 0 <= self.ema_decay < 1,
               f"EMA decay must lie in [0, 1), got {self.ema_decay}"),
              (self.p_std > 0 and self.sigma_data > 0, "p_std and sigma_data must be positive")]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  def __hash__(self):  # `network` is a dict; hash the canonical JSON so compiled steps can be cached
    return hash(json.dumps(self.to_json(), sort_keys=True))

  def to_json(self) -> dict:
    """A JSON-ready dict (tuples become lists), equal to what a checkpoint's sidecar holds."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


@struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; all leaves are arrays).

  Attributes:
    params: the network parameters being optimised.
    ema_params: their exponential moving average, used for sampling and evaluation.
    opt_state: the optax optimiser state (Adam moments and update count).
    step: int32 scalar, the number of updates done.
    rng: uint32 key data of the run's training key; update k uses `fold_in(key, k)`.
  """
  params: Any
  ema_params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


def resolve_network_config(spec: str | dict) -> dict:
  """A network config from a preset name, a JSON object, or the path of a .json file holding one.

  Raises:
    ValueError: unknown preset, unreadable JSON, no "arch" key, or arguments the architecture rejects.
  """
  if isinstance(spec, str):
    named = nets.presets()
    if spec in named:
      spec = named[spec]
    elif spec.lstrip().startswith("{") or os.path.isfile(spec):
      spec = _parse_json(spec)
    else:
      raise ValueError(f"unknown network {spec!r}: give a preset ({', '.join(sorted(named))}), a JSON "
                       "config or a .json file")
  if not isinstance(spec, dict) or "arch" not in spec:
    raise ValueError(f"a network config is a JSON object with an 'arch' key, got {spec!r}")
  try:
    nets.make_network(spec)  # builds the module only: no parameters
  except TypeError as err:
    raise ValueError(f"bad network config: {err}") from None
  return json.loads(json.dumps(spec))


def _parse_json(spec: str):
  """Parses a JSON text, or the JSON file at path `spec`."""
  try:
    if spec.lstrip().startswith("{"):
      return json.loads(spec)
    with open(spec) as f:
      return json.load(f)
  except json.JSONDecodeError as err:
    raise ValueError(f"network config {spec!r} is not valid JSON: {err}") from None


# --------------------------------------------------------------------------------------------------
# The loss.


def edm_loss(params, module, x, sigma, noise, *, sigma_data: float = 0.5, train: bool = False,
             rngs: dict | None = None) -> jax.Array:
  """Per-image EDM loss λ(σ) · mean_pixels (D(x + σ ε, σ) − x)² (Karras et al. 2022, Eq. 2, Table 1).

  The weight λ(σ) = (σ² + σ_d²) / (σ σ_d)² = 1 / c_out² makes the effective regression target of the raw
  network F unit-variance at every σ.

  Args:
    params, module: the network.
    x: (B, H, W, C) clean images in [-1, 1].
    sigma: (B,) noise levels > 0.
    noise: (B, H, W, C) standard normal ε.
    sigma_data: σ_d.
    train, rngs: passed to the network (dropout).

  Returns:
    (B,) float32 losses.
  """
  z = x + sigma[:, None, None, None] * noise
  denoised = precond_apply(module, params, z, sigma, sigma_data=sigma_data, train=train, rngs=rngs)
  weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
  return weight * jnp.mean((denoised - x) ** 2, axis=(1, 2, 3))


def sample_sigmas(key, batch_size: int, p_mean: float, p_std: float) -> jax.Array:
  """(B,) training noise levels σ = exp(p_mean + p_std · n), n ~ N(0, 1)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch_size,)))


def random_xflip(key, x: jax.Array) -> jax.Array:
  """Mirrors each image of (B, H, W, C) left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)


def batch_loss(params, module, images, key, config: TrainConfig) -> jax.Array:
  """The mean EDM loss of a batch, with σ, ε, flips and dropout drawn from `key`.

  Args:
    images: (B, H, W, C) uint8 or [-1, 1] float training images.
    key: the update's PRNG key.

  Returns:
    float32 scalar.
  """
  key_sigma, key_noise, key_flip, key_dropout = jax.random.split(key, 4)
  x = to_model_range(images)
  if config.xflip:
    x = random_xflip(key_flip, x)
  sigma = sample_sigmas(key_sigma, x.shape[0], config.p_mean, config.p_std)
  noise = jax.random.normal(key_noise, x.shape)
  losses = edm_loss(params, module, x, sigma, noise, sigma_data=config.sigma_data, train=True,
                    rngs={"dropout": key_dropout})
  return jnp.mean(losses)


# --------------------------------------------------------------------------------------------------
# Optimiser, EMA and the update.


def learning_rate(config: TrainConfig, count) -> jax.Array:
  """lr_k = lr · min((k + 1) / warmup_steps, 1) for update k = `count` (0-based); lr without warm-up."""
  if config.warmup_steps == 0:
    return jnp.float32(config.lr)
  return config.lr * jnp.minimum((count + 1) / config.warmup_steps, 1.0).astype(jnp.float32)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Adam(b1, b2, eps) with the warm-up schedule, after optional global-norm gradient clipping."""
  adam = optax.adam(functools.partial(learning_rate, config), b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps)
  if config.grad_clip is None:
    return adam
  return optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)


def ema_beta(config: TrainConfig, step) -> jax.Array:
  """EMA decay β of update `step` (0-based): the fixed `ema_decay`, or from the half-life.

  β = 0.5^(B / h) with h = 1000 · ema_halflife_kimg images, capped (EDM's ramp-up) at
  h ≤ step · B · ema_rampup_ratio, the images seen before this update; β = 0 at step 0.
  """
  if config.ema_decay is not None:
    return jnp.float32(config.ema_decay)
  halflife = jnp.float32(config.ema_halflife_kimg * 1000.0)
  if config.ema_rampup_ratio is not None:
    seen = jnp.asarray(step, jnp.float32) * config.batch_size
    halflife = jnp.minimum(halflife, seen * config.ema_rampup_ratio)
  return 0.5 ** (config.batch_size / jnp.maximum(halflife, 1e-8))


def ema_update(ema_params, params, beta) -> Any:
  """ema ← params + β (ema − params), leaf by leaf."""
  return jax.tree.map(lambda e, p: p + beta * (e - p), ema_params, params)


def init_params(module, image_shape, key) -> Any:
  """The network's initial `params` collection for images of shape (H, W, C)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return module.init({"params": key}, x, jnp.zeros((1,), jnp.float32), train=False)["params"]


def init_state(module, optimizer: optax.GradientTransformation, config: TrainConfig,
               image_shape) -> TrainState:
  """Step-0 state: initial params (from `key(seed)`'s first half), EMA = params, fresh Adam."""
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  params = init_params(module, tuple(image_shape), init_key)
  return TrainState(params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                    rng=jax.random.key_data(train_key))


def train_step(state: TrainState, images, *, module, optimizer: optax.GradientTransformation,
               config: TrainConfig) -> tuple[TrainState, jax.Array]:
  """One Adam update on `images` (B, H, W, C) and one EMA update; returns (new state, batch loss)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  loss, grads = jax.value_and_grad(
      lambda params: batch_loss(params, module, images, key, config))(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = ema_update(state.ema_params, params, ema_beta(config, state.step))
  return state.replace(params=params, ema_params=ema, opt_state=opt_state, step=state.step + 1), loss


# --------------------------------------------------------------------------------------------------
# Data order and devices.


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
  """The read-only order of epoch `epoch`: a permutation of range(num_images) from seeds (seed, epoch)."""
  order = np.random.default_rng([seed, epoch]).permutation(num_images)
  order.flags.writeable = False
  return order


def batch_indices(seed: int, step: int, batch_size: int, num_images: int) -> np.ndarray:
  """Dataset indices of update `step`: positions step·B … step·B + B − 1 of the epoch stream.

  The stream is epoch_permutation(seed, 0) followed by epoch_permutation(seed, 1), …; a batch may
  straddle two epochs, and every image is seen once per epoch.

  Returns:
    (batch_size,) int64 indices.
  """
  positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_images)
  return np.concatenate([epoch_permutation(seed, int(epoch), num_images)[offsets[epochs == epoch]]
                         for epoch in np.unique(epochs)])


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: every device of every process).

  Raises:
    ValueError: in a multi-process run, devices that leave out some process (it would have no share
      of the batch and the processes would wait for each other forever).
  """
  mesh = Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))
  processes = sorted({device.process_index for device in mesh.devices.flat})
  if len(processes) != jax.process_count():
    raise ValueError(f"devices must include devices of all {jax.process_count()} processes, got "
                     f"{mesh.size} device(s) of process(es) {processes}; use every device "
                     "(--devices=all)")
  return mesh


def global_batch(images: np.ndarray, indices: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The global batch images[indices] split by `sharding`, gathering only this process's rows.

  Args:
    images: (N, H, W, C) host array, the same in every process.
    indices: (B,) dataset indices of the batch, the same in every process.
    sharding: a sharding of (B, H, W, C), e.g. split on "data" over a mesh of every process's devices.

  Returns:
    (B, H, W, C) global jax.Array; each device holds its rows.
  """
  def rows(index):
    return images[indices[index[0]]][(slice(None),) + tuple(index[1:])]
  return jax.make_array_from_callback((len(indices),) + images.shape[1:], sharding, rows)


@functools.lru_cache(maxsize=4)
def compile_train_step(module, config: TrainConfig, mesh: Mesh) -> Callable:
  """`train_step` with `make_optimizer(config)`, jitted for `mesh`: the state replicated (and donated),
  the batch split on "data". Cached, so repeated runs in one process compile once."""
  if config.batch_size % mesh.size:
    raise ValueError(f"the batch of {config.batch_size} images cannot be split evenly over "
                     f"{mesh.size} devices; use a multiple of {mesh.size}")
  replicated = NamedSharding(mesh, P())
  step = functools.partial(train_step, module=module, optimizer=make_optimizer(config), config=config)
  return jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P("data"))),
                 out_shardings=(replicated, replicated), donate_argnums=0)


@functools.lru_cache(maxsize=4)
def compile_init_state(module, config: TrainConfig, image_shape: tuple, mesh: Mesh) -> Callable:
  """`init_state` jitted with a replicated result on `mesh` (a function of no arguments; cached)."""
  init = functools.partial(init_state, module, make_optimizer(config), config, image_shape)
  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))


# --------------------------------------------------------------------------------------------------
# The training loop.


def _dataset_fingerprint(images: np.ndarray) -> dict:
  return {"num_images": int(images.shape[0]), "image_shape": list(images.shape[1:]),
          "dtype": str(images.dtype), "sha256": hashlib.sha256(images.tobytes()).hexdigest()}


def _check_same_run(saved: dict, meta: dict, workdir: str) -> None:
  for key in ("train", "dataset"):
    if saved.get(key) != meta[key]:
      if key == "dataset":
        raise ValueError(f"{workdir} holds a run on a different dataset; use another --workdir")
      changed = sorted(k for k in set(saved[key]) | set(meta[key])
                       if saved[key].get(k) != meta[key].get(k))
      raise ValueError(f"{workdir} holds a run with a different configuration ({', '.join(changed)}); "
                       "use another --workdir or the same settings")


def _check_network(module, image_shape) -> None:
  """Raises ValueError unless the network maps (1, H, W, C) images to the same shape (no compiling)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  out = jax.eval_shape(
      lambda: module.apply({"params": init_params(module, image_shape, jax.random.key(0))}, x,
                           jnp.zeros((1,), jnp.float32)))
  if out.shape != x.shape:
    raise ValueError(f"the network maps images of shape {tuple(image_shape)} to {out.shape[1:]}; "
                     "its config does not fit this dataset")


@functools.lru_cache(maxsize=4)
def make_sampler(module, image_shape: tuple, *, num_images: int = 64, steps: int = 18,
                 sigma_data: float = 0.5) -> Callable[[Any], jax.Array]:
  """A jitted `params -> samples` (num_images, H, W, C): Heun on the EDM grid from seeds 0 … n − 1
  (cached)."""
  latents = latents_from_seeds(jnp.arange(num_images), image_shape)
  sigmas = edm_sigmas(steps)

  def run(params):
    return sample(edm_denoiser(module, params, sigma_data=sigma_data), latents, sigmas, solver="heun")
  return jax.jit(run)


def read_metrics(path: str) -> list[dict]:
  """The records of a `metrics.jsonl` ([] if absent)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class _MetricsLog:
  """`metrics.jsonl` and the progress lines: one record per window of updates.

  On resume the records after the restored step (logged before a crash, then lost) are dropped, so the
  log continues exactly as an uninterrupted run's would. A disabled log (the processes other than 0 of
  a multi-process run) reads, writes and prints nothing.
  """

  def __init__(self, path: str, start: int, num_steps: int, *, enabled: bool = True):
    self.path, self.num_steps, self.enabled = path, num_steps, enabled
    self.records = [r for r in read_metrics(path) if r["step"] <= start] if enabled else []
    if enabled:
      with atomic_write(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.records)
    self.elapsed_before = self.records[-1]["elapsed_s"] if self.records else 0.0
    self.run_start = self.window_start = time.perf_counter()
    self.losses = []

  def write(self, done: int, lr: float) -> None:
    """Logs the mean loss of the window that ends after update `done` and prints a progress line."""
    if not self.enabled:
      self.losses = []
      return
    # The float64 mean of this process's copies of the replicated losses (waits for the window).
    mean_loss = float(np.mean([np.asarray(loss, np.float64) for loss in self.losses]))
    now = time.perf_counter()
    rate = len(self.losses) / (now - self.window_start)
    record = {"step": done, "loss": mean_loss, "lr": lr, "steps_per_s": rate,
              "elapsed_s": self.elapsed_before + now - self.run_start}
    self.records.append(record)
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    print(f"step {done}/{self.num_steps} loss {mean_loss:.4f} lr {lr:.2e} {rate:.2f} steps/s "
          f"eta {_format_seconds((self.num_steps - done) / rate)}", flush=True)
    self.losses, self.window_start = [], now


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _restore_or_init(manager, module, config, image_shape, meta, mesh, workdir):
  """The newest checkpoint's state (checked to belong to this run), or a fresh one."""
  replicated = NamedSharding(mesh, P())
  init = compile_init_state(module, config, image_shape, mesh)
  step = manager.latest_step()
  if step is None:
    return init()
  _check_same_run(checkpoints.read_meta(os.path.join(manager.directory, str(step))), meta, workdir)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        jax.eval_shape(init))
  ema, rest = checkpoints.restore_checkpoint(manager, step, ema_params=target.ema_params,
                                             train_state=_resume_items(target))
  return TrainState(ema_params=ema, **rest)


def _resume_items(state: TrainState) -> dict:
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def train(config: TrainConfig, images, workdir: str, *, num_steps: int, checkpoint_every: int = 1000,
          sample_every: int | None = None, log_every: int = 100, keep_checkpoints: int = 3,
          num_samples: int = 64, sample_steps: int = 18, devices=None,
          dataset_name: str = "") -> TrainState:
  """Trains (or resumes training) until `num_steps` updates are done, writing into `workdir`.

  If `workdir/checkpoints` holds a checkpoint of the same config and dataset, training continues from
  the newest one and reproduces the uninterrupted run exactly (see the module docstring).

  Args:
    config: the run's hyper-parameters.
    images: (N, H, W, C) training images, uint8 or float in [-1, 1] (held on the host).
    workdir: output folder (created).
    num_steps: total number of updates to reach (may exceed an earlier run's, to train longer).
    checkpoint_every: save every this many updates (and after the last one).
    sample_every: write a sample grid every this many updates (and after the last); None = never.
    log_every: print and log the mean loss every this many updates.
    keep_checkpoints: how many of the newest checkpoints to keep.
    num_samples, sample_steps: images per sample grid and Heun steps (EDM grid).
    devices: the devices to split each batch over (default: every device of every process).
    dataset_name: recorded in the checkpoint sidecar.

  Returns:
    The final TrainState (replicated over the devices).

  Raises:
    ValueError: bad arguments, a batch that does not split over the devices, a network that does not
      fit the images, or a workdir that holds a different run.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"training images must be a non-empty (N, H, W, C) array, got {images.shape}")
  if min(num_steps, checkpoint_every, log_every, sample_every or 1) < 1:
    raise ValueError("num_steps, checkpoint_every, log_every and sample_every must be >= 1")
  image_shape = images.shape[1:]
  mesh = data_mesh(devices)
  module = nets.make_network(config.network)
  _check_network(module, image_shape)
  step_fn = compile_train_step(module, config, mesh)
  meta = {"network": config.network, "image_shape": list(image_shape),
          "sigma_data": config.sigma_data, "train": config.to_json(),
          "dataset": _dataset_fingerprint(images), "dataset_name": dataset_name}
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoints.open_manager(os.path.join(workdir, "checkpoints"), keep_checkpoints)
  state = _restore_or_init(manager, module, config, image_shape, meta, mesh, workdir)
  start = int(state.step)
  main = multihost.is_main_process()
  log = _MetricsLog(os.path.join(workdir, "metrics.jsonl"), start, num_steps, enabled=main)
  if start:
    multihost.main_print(f"resuming from the checkpoint at step {start}")
  if start >= num_steps:
    multihost.main_print(f"already trained for {start} >= {num_steps} steps")
    manager.close()
    return state

  sampler = main and sample_every and make_sampler(
      module, image_shape, num_images=num_samples, steps=sample_steps, sigma_data=config.sigma_data)
  batch_sharding = NamedSharding(mesh, P("data"))
  multihost.main_print(
      f"training {num_steps - start} steps on {mesh.size} device(s) of {jax.process_count()} "
      f"process(es), batch {config.batch_size}, "
      f"{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters")
  for step in range(start, num_steps):
    indices = batch_indices(config.seed, step, config.batch_size, images.shape[0])
    state, loss = step_fn(state, global_batch(images, indices, batch_sharding))
    log.losses.append(loss)
    done, last = step + 1, step + 1 == num_steps
    if done % log_every == 0 or last:
      log.write(done, float(learning_rate(config, step)))
    if sampler and (done % sample_every == 0 or last):
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      grid = np.asarray(sampler(multihost.local_copy(state.ema_params)))
      plots.save_grid(os.path.join(workdir, "samples", f"{done:08d}.png"), grid,
                      upscale=max(1, 128 // image_shape[0]))
    if done % checkpoint_every == 0 or last:
      checkpoints.save_checkpoint(manager, done, ema_params=state.ema_params,
                                  train_state=_resume_items(state), meta=meta)  # collective
      if main:
        plots.save_loss_plot(os.path.join(workdir, "loss.png"), log.records)
  manager.close()
  return state
