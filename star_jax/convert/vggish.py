"""torchvggish checkpoint (`vggish-10086976.pth`) -> `metrics.vggish` params.

  star-jax convert vggish --from vggish-10086976.pth --out ckpts/vggish
Names: `features.{i}.{weight,bias}` (the convs of the VGG Sequential, in order) and
`embeddings.{0,2,4}.{weight,bias}` (the three fc layers). The PCA post-processor is not used by FAD.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import TYPE_CHECKING

import numpy as np

from star_jax.errors import UserError

if TYPE_CHECKING:  # the model module imports jax/flax; `star-jax --help` lists converters without them
  from star_jax.metrics.vggish import VggishConfig


def _layers(sd: dict[str, np.ndarray], conv_idx: list[int], input_hw: tuple[int, int]) -> tuple:
  """Recover the conv/max-pool sequence from the Sequential indices (conv, ReLU[, pool]) and fc0's width."""
  layers = []
  for j, i in enumerate(conv_idx):
    layers.append(int(sd[f"features.{i}.weight"].shape[0]))
    if j + 1 < len(conv_idx) and conv_idx[j + 1] - i == 3:  # conv, ReLU, MaxPool, next conv
      layers.append("M")
  pools = layers.count("M")
  flat = sd["embeddings.0.weight"].shape[1]
  for final_pool in (1, 0):  # the last pool has no parameters: fc0's input size tells whether it exists
    p = pools + final_pool
    if (input_hw[0] >> p) * (input_hw[1] >> p) * layers[-1] == flat:
      return tuple(layers + ["M"] * final_pool)
  raise UserError(f"VGGish state dict: fc input {flat} matches no pooling of the {input_hw} input")


def convert_state_dict(sd: dict[str, np.ndarray], final_relu: bool = False) -> tuple[VggishConfig, dict]:
  """A torchvggish `VGG` state dict -> (config, params as a nested dict of float32 arrays)."""
  import jax
  from star_jax.metrics.vggish import VggishConfig

  conv_idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"features\.(\d+)\.weight", k)))
  fc_idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"embeddings\.(\d+)\.weight", k)))
  if not conv_idx or not fc_idx:
    raise UserError("not a VGGish state dict: no 'features.{i}.weight' / 'embeddings.{i}.weight' tensors")
  base = VggishConfig()
  cfg = dataclasses.replace(base, final_relu=final_relu,
                            layers=_layers(sd, conv_idx, (base.example_frames, base.mel_bins)),
                            fc_sizes=tuple(int(sd[f"embeddings.{i}.weight"].shape[0]) for i in fc_idx))
  params = {}
  for n, i in enumerate(conv_idx):
    params[f"conv{n}"] = {"kernel": sd[f"features.{i}.weight"].transpose(2, 3, 1, 0), "bias": sd[f"features.{i}.bias"]}
  for n, i in enumerate(fc_idx):
    params[f"fc{n}"] = {"kernel": sd[f"embeddings.{i}.weight"].T, "bias": sd[f"embeddings.{i}.bias"]}
  return cfg, jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def load(path: str, final_relu: bool = False) -> tuple[VggishConfig, dict]:
  """A PyTorch checkpoint file or a `star-jax convert vggish` directory -> (config, params)."""
  from star_jax.checkpoint import load_params
  from star_jax.convert.torch_io import load_state_dict
  from star_jax.metrics.vggish import VggishConfig

  if os.path.isdir(path):
    params, meta = load_params(path)
    if meta.get("kind") != "vggish":
      raise UserError(f"'{path}' holds a '{meta.get('kind')}' checkpoint, not vggish")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    return dataclasses.replace(VggishConfig(**cfg), final_relu=final_relu), params
  return convert_state_dict(load_state_dict(path), final_relu)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
  del parser  # sizes are read from the checkpoint; FAD decides on the final ReLU at evaluation time


def convert_cli(args: argparse.Namespace) -> tuple[VggishConfig, dict]:
  return load(args.source)
