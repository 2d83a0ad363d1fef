"""PANNs CNN14 PyTorch checkpoint (`Cnn14_16k_mAP=0.438.pth` and friends) -> `metrics.cnn14` params.

  star-jax convert cnn14 --from Cnn14_16k_mAP=0.438.pth --out ckpts/cnn14_16k
The torchlibrosa front end's stored DFT and mel matrices are not parameters here: the port recomputes
them, and conversion checks the checkpoint's mel matrix against its own to catch a wrong sample rate.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

import numpy as np

from star_jax.errors import UserError

if TYPE_CHECKING:  # the model module imports jax/flax; `star-jax --help` lists converters without them
  from star_jax.metrics.cnn14 import Cnn14Config

_RATE_BY_NFFT = {512: 16000, 1024: 32000}


def _bn(sd: dict, prefix: str) -> dict:
  return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"],
          "mean": sd[f"{prefix}.running_mean"], "var": sd[f"{prefix}.running_var"]}


def _linear(sd: dict, prefix: str) -> dict:
  return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}


def config_from_state_dict(sd: dict[str, np.ndarray]) -> Cnn14Config:
  """Infer the front end (from the mel matrix's n_fft), widths and class count from the tensors."""
  from star_jax.metrics.cnn14 import cnn14_config, mel_filters

  if "logmel_extractor.melW" not in sd or "fc_audioset.weight" not in sd:
    raise UserError("not a PANNs CNN14 state dict: no 'logmel_extractor.melW' / 'fc_audioset.weight'")
  n_fft = (sd["logmel_extractor.melW"].shape[0] - 1) * 2
  if n_fft not in _RATE_BY_NFFT:
    raise UserError(f"CNN14 checkpoint with n_fft {n_fft}: only the 16 kHz (512) and 32 kHz (1024) front ends exist")
  widths = tuple(sd[f"conv_block{i}.conv1.weight"].shape[0] for i in range(1, 7))
  cfg = cnn14_config(_RATE_BY_NFFT[n_fft], mel_bins=sd["logmel_extractor.melW"].shape[1], widths=widths,
                     classes_num=sd["fc_audioset.weight"].shape[0])
  ours = mel_filters(cfg.sample_rate_hz, cfg.window_size, cfg.mel_bins, cfg.fmin_hz, cfg.fmax_hz)
  if not np.allclose(ours, sd["logmel_extractor.melW"], atol=1e-6):
    raise UserError("the checkpoint's mel filter bank differs from the "
                    f"{cfg.sample_rate_hz} Hz PANNs front end (fmin {cfg.fmin_hz}, fmax {cfg.fmax_hz})")
  return cfg


def convert_state_dict(sd: dict[str, np.ndarray]) -> tuple[Cnn14Config, dict]:
  """A `Cnn14` state dict (torch names) -> (config, params as a nested dict of float32 arrays)."""
  import jax

  cfg = config_from_state_dict(sd)
  try:
    params = {"bn0": _bn(sd, "bn0"), "fc1": _linear(sd, "fc1"), "fc_audioset": _linear(sd, "fc_audioset")}
    for i in range(1, len(cfg.widths) + 1):
      p = f"conv_block{i}"
      params[p] = {"conv1": {"kernel": sd[f"{p}.conv1.weight"].transpose(2, 3, 1, 0)}, "bn1": _bn(sd, f"{p}.bn1"),
                   "conv2": {"kernel": sd[f"{p}.conv2.weight"].transpose(2, 3, 1, 0)}, "bn2": _bn(sd, f"{p}.bn2")}
  except KeyError as e:
    raise UserError(f"CNN14 state dict is missing {e}") from e
  return cfg, jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def load(path: str) -> tuple[Cnn14Config, dict]:
  """A PyTorch checkpoint file or a `star-jax convert cnn14` directory -> (config, params)."""
  from star_jax.checkpoint import load_params
  from star_jax.convert.torch_io import load_state_dict
  from star_jax.metrics.cnn14 import Cnn14Config

  if os.path.isdir(path):
    params, meta = load_params(path)
    if meta.get("kind") != "cnn14":
      raise UserError(f"'{path}' holds a '{meta.get('kind')}' checkpoint, not cnn14")
    cfg = dict(meta["config"])
    cfg["widths"] = tuple(cfg["widths"])
    return Cnn14Config(**cfg), params
  return convert_state_dict(load_state_dict(path))


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
  del parser  # the front end and sizes are read from the checkpoint


def convert_cli(args: argparse.Namespace) -> tuple[Cnn14Config, dict]:
  return load(args.source)
