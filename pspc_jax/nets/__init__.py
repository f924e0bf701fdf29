"""Flax network baselines (EDM SongUNet DDPM++/NCSN++, DiT), built from JSON-serialisable configs.

A config is a dict {"arch": "songunet" | "dit", **constructor keyword arguments}; `PRESETS` names the
paper's configurations and small ones for 8×8/16×16 data. Every network is a `flax.linen.Module` called
as `net.apply({"params": p}, x, noise_labels, class_labels=None, augment_labels=None, train=False)`
with x (B, H, W, C) and returns the raw output F (B, H, W, C); `pspc_jax.nets.precond` wraps it with
EDM preconditioning into a `denoise(z, sigma)`.
"""

from __future__ import annotations

import importlib

_ARCH_MODULES = {"songunet": "pspc_jax.nets.songunet", "dit": "pspc_jax.nets.dit"}


def presets() -> dict[str, dict]:
  """All named configs of all architectures."""
  named = {}
  for module in _ARCH_MODULES.values():
    try:
      named.update(importlib.import_module(module).PRESETS)
    except ModuleNotFoundError as err:
      if err.name != module:
        raise
  return named


def make_network(config: dict | str):
  """A Flax module from a config dict or a preset name."""
  if isinstance(config, str):
    all_presets = presets()
    if config not in all_presets:
      raise ValueError(f"unknown network preset {config!r}; choose one of {', '.join(sorted(all_presets))}")
    config = all_presets[config]
  config = dict(config)
  arch = config.pop("arch", None)
  if arch not in _ARCH_MODULES:
    raise ValueError(f"network config needs 'arch' in {sorted(_ARCH_MODULES)}, got {arch!r}")
  return importlib.import_module(_ARCH_MODULES[arch]).build(**config)
