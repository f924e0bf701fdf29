"""What the PyTorch state-dict converters (`edm_pickle` for SongUNet, `dit_convert` for DiT) share.

A converter is a table of leaf rules, (key pattern, Flax leaf name, PyTorch → Flax transform, Flax →
PyTorch transform), the first row whose pattern matches the whole key applying, plus the module paths,
which each architecture maps by its own rule.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

Array = np.ndarray
Transform = Callable[[Array], Array]
LeafRule = tuple[re.Pattern, str, Transform, Transform]


def identity(w: Array) -> Array:
  """The transform of arrays whose layout PyTorch and Flax share (biases, norm scales, embeddings)."""
  return w


def match_rule(rules: tuple[LeafRule, ...], key: str) -> tuple[str, Transform, Transform] | None:
  """(Flax leaf, to_flax, to_torch) of the first rule whose pattern matches all of `key`, or None."""
  for pattern, leaf, to_flax, to_torch in rules:
    if pattern.fullmatch(key):
      return leaf, to_flax, to_torch
  return None


def module_from_config(config: Mapping | nn.Module, module_type: type, arch: str,
                       build: Callable[..., nn.Module]) -> nn.Module:
  """`config` itself if it is a `module_type`, else `build(**config)` once its "arch" (optional) is
  checked to be `arch`."""
  if isinstance(config, module_type):
    return config
  config = dict(config)
  found = config.pop("arch", arch)
  if found != arch:
    raise ValueError(f"config is for arch {found!r}, not {arch!r}")
  return build(**config)


def param_shapes(net: nn.Module, class_labels=None) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the params of an image network with `img_resolution` and `in_channels`
  attributes, traced with `jax.eval_shape` (nothing allocated). `class_labels`: the example labels the
  network's init needs, if any."""
  x = jnp.zeros((1, net.img_resolution, net.img_resolution, net.in_channels))
  variables = jax.eval_shape(lambda key: net.init(key, x, jnp.zeros((1,)), class_labels),
                             jax.random.key(0))
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(variables["params"]).items()}
