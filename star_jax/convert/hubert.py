"""transformers HubertModel (a model, a state dict, or a local HF directory) -> (HubertConfig, params).

    star-jax convert hubert --from /path/to/hubert-large-ll60k --out ckpt/hubert
The positional conv's weight norm is folded (`weight_g`/`weight_v` or the
`parametrizations.weight.original0/1` spelling); SpecAugment's `masked_spec_embed` and any CTC head
are dropped. A `hubert.` prefix (HubertForCTC and friends) is stripped.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping

import numpy as np

from star_jax.errors import UserError
from star_jax.models.hubert import HubertConfig


def config_from_hf(hf: Any, **overrides) -> HubertConfig:
  """A transformers HubertConfig (object or its dict) -> HubertConfig."""
  get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, Mapping) else (lambda k, d=None: getattr(hf, k, d))
  if get("conv_pos_batch_norm", False):
    raise UserError("hubert: conv_pos_batch_norm=True checkpoints are not supported (HuBERT uses weight norm)")
  fields = dict(
      hidden_size=get("hidden_size", 768), num_layers=get("num_hidden_layers", 12),
      num_heads=get("num_attention_heads", 12), intermediate_size=get("intermediate_size", 3072),
      conv_dim=tuple(get("conv_dim", (512,) * 7)), conv_kernel=tuple(get("conv_kernel", (10, 3, 3, 3, 3, 2, 2))),
      conv_stride=tuple(get("conv_stride", (5, 2, 2, 2, 2, 2, 2))), conv_bias=bool(get("conv_bias", False)),
      feat_extract_norm=get("feat_extract_norm", "group"),
      feat_extract_activation=get("feat_extract_activation", "gelu"),
      feat_proj_layer_norm=bool(get("feat_proj_layer_norm", True)),
      do_stable_layer_norm=bool(get("do_stable_layer_norm", False)),
      num_conv_pos_embeddings=get("num_conv_pos_embeddings", 128),
      num_conv_pos_embedding_groups=get("num_conv_pos_embedding_groups", 16),
      layer_norm_eps=float(get("layer_norm_eps", 1e-5)), hidden_act=get("hidden_act", "gelu"))
  fields.update(overrides)
  return HubertConfig(**fields)


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
  """w = g * v / ||v||, the norm over every axis where g has size 1 (torch weight_norm)."""
  axes = tuple(i for i, n in enumerate(g.shape) if n == 1 and v.shape[i] != 1)
  return g * v / np.sqrt(np.square(v).sum(axis=axes, keepdims=True))


def _linear(sd, name):
  return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _norm(sd, name):
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def _pos_conv_weight(sd: Mapping[str, np.ndarray]) -> np.ndarray:
  p = "encoder.pos_conv_embed.conv."
  for g, v in (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")):
    if p + g in sd:
      return fold_weight_norm(sd[p + g], sd[p + v])
  if p + "weight" in sd:
    return sd[p + "weight"]
  raise UserError(f"hubert: no positional conv weight ({p}weight_g/weight_v) in the state dict")


def from_state_dict(state_dict: Mapping[str, Any], config: HubertConfig) -> dict:
  """HF HubertModel state dict (torch tensors or numpy) + our config -> params (nested dict of f32 numpy)."""
  sd = {k.removeprefix("hubert."): np.asarray(_to_numpy(v), np.float32) for k, v in state_dict.items()}
  try:
    fe = {}
    for i in range(len(config.conv_dim)):
      p = f"feature_extractor.conv_layers.{i}."
      layer = {"kernel": sd[p + "conv.weight"].transpose(2, 1, 0)}
      if config.conv_bias:
        layer["bias"] = sd[p + "conv.bias"]
      if config.feat_extract_norm == "layer" or i == 0:
        layer["norm"] = _norm(sd, p + "layer_norm")
      fe[f"conv_{i}"] = layer
    params = {"feature_extractor": fe,
              "feature_projection": _linear(sd, "feature_projection.projection"),
              "pos_conv": {"kernel": _pos_conv_weight(sd).transpose(2, 1, 0),
                           "bias": sd["encoder.pos_conv_embed.conv.bias"]},
              "encoder_norm": _norm(sd, "encoder.layer_norm")}
    if config.feat_proj_layer_norm:
      params["feature_projection_norm"] = _norm(sd, "feature_projection.layer_norm")
    for i in range(config.num_layers):
      p = f"encoder.layers.{i}."
      params[f"layer_{i}"] = {
          "attention": {n: _linear(sd, p + f"attention.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
          "layer_norm": _norm(sd, p + "layer_norm"),
          "final_layer_norm": _norm(sd, p + "final_layer_norm"),
          "feed_forward": {n: _linear(sd, p + f"feed_forward.{n}") for n in ("intermediate_dense", "output_dense")},
      }
  except KeyError as e:
    raise UserError(f"hubert: the state dict lacks {e.args[0]!r}; is it a transformers HubertModel with "
                    f"{config.num_layers} layers?") from e
  return params


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):
    return v.detach().float().cpu().numpy()
  return np.asarray(v)


def from_torch(model: Any, **config_overrides) -> tuple[HubertConfig, dict]:
  """A transformers HubertModel (or HubertFor*, via its `.hubert`) -> (HubertConfig, params)."""
  model = getattr(model, "hubert", model)
  config = config_from_hf(model.config, **config_overrides)
  return config, from_state_dict(model.state_dict(), config)


def from_hf_dir(directory: str, **config_overrides) -> tuple[HubertConfig, dict]:
  """A local HF directory (config.json + model.safetensors or pytorch_model.bin), read without unpickling."""
  from star_jax.convert.torch_io import load_state_dict

  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"hubert: '{directory}' has no config.json; pass a transformers HubertModel directory")
  with open(cfg_path) as f:
    config = config_from_hf(json.load(f), **config_overrides)
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return config, from_state_dict(load_state_dict(path), config)
  raise UserError(f"hubert: '{directory}' has neither model.safetensors nor pytorch_model.bin")


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--normalize-waveform", action="store_true",
                 help="normalise each utterance to zero mean / unit variance first (hubert pretraining); "
                      "default off, as STAR feeds the raw waveform")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")


def convert_cli(args: argparse.Namespace) -> tuple[HubertConfig, dict]:
  if not os.path.isdir(args.source):
    raise UserError(f"hubert: --from must be a transformers HubertModel directory, got '{args.source}'")
  return from_hf_dir(args.source, normalize_waveform=args.normalize_waveform, dtype=args.dtype)
