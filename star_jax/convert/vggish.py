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

import jax
import numpy as np

from star_jax.errors import UserError
from star_jax.metrics.vggish import VggishConfig


def convert_state_dict(sd: dict[str, np.ndarray], final_relu: bool = False) -> tuple[VggishConfig, dict]:
  """A torchvggish `VGG` state dict -> (config, params as a nested dict of float32 arrays)."""
  cfg = VggishConfig(final_relu=final_relu)
  conv_idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"features\.(\d+)\.weight", k)))
  fc_idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"embeddings\.(\d+)\.weight", k)))
  widths = [sd[f"features.{i}.weight"].shape[0] for i in conv_idx]
  fc_sizes = [sd[f"embeddings.{i}.weight"].shape[0] for i in fc_idx]
  if widths != [w for w in cfg.layers if w != "M"] or fc_sizes != list(cfg.fc_sizes):
    raise UserError(f"not a VGGish state dict: conv widths {widths}, fc sizes {fc_sizes}")
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

  if os.path.isdir(path):
    params, meta = load_params(path)
    if meta.get("kind") != "vggish":
      raise UserError(f"'{path}' holds a '{meta.get('kind')}' checkpoint, not vggish")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    return dataclasses.replace(VggishConfig(**cfg), final_relu=final_relu), params
  return convert_state_dict(load_state_dict(path), final_relu)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
  del parser  # VGGish has one architecture; FAD decides on the final ReLU at evaluation time


def convert_cli(args: argparse.Namespace) -> tuple[VggishConfig, dict]:
  return load(args.source)
