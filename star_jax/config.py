"""Loading experiment configs: `path/to/file.py:variant` plus `key.sub=value` overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections

from star_jax.errors import UserError


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """'configs/star.py:tiny' -> the file's get_config('tiny'), locked, with overrides applied.

  An override names an existing key (`dit.depth=8`); an unknown key is an error listing the valid ones.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file '{path}' does not exist (expected e.g. configs/star.py:tiny)")
  module_spec = importlib.util.spec_from_file_location(f"star_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file '{path}' has no get_config(arg) function")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # e.g. an unknown variant
    raise UserError(f"{path}: {e}") from e
  cfg.lock()
  for item in overrides:
    apply_override(cfg, item)
  _check_consistent(cfg, spec)
  return cfg


def _check_consistent(cfg: ml_collections.ConfigDict, spec: str) -> None:
  """Values that must agree across sections (an override of one alone would fail deep inside a stage)."""
  if not {"dit", "vae", "hubert", "bridge", "qformer", "mlp_bridge", "data"} <= set(cfg.keys()):
    return  # not a STAR pipeline config
  if cfg.dit.latent_channels != cfg.vae.latent_channels:
    raise UserError(f"{spec}: dit.latent_channels={cfg.dit.latent_channels} but vae.latent_channels="
                    f"{cfg.vae.latent_channels}: the DiT generates the VAE's latents; set both")
  kind = cfg.bridge.kind
  if kind not in ("qformer", "mlp"):
    raise UserError(f"{spec}: bridge.kind '{kind}': choose 'qformer' or 'mlp'")
  section = cfg.qformer if kind == "qformer" else cfg.mlp_bridge
  width_in = section.encoder_hidden_size if kind == "qformer" else section.input_size
  if width_in != cfg.hubert.hidden_size:
    name = "qformer.encoder_hidden_size" if kind == "qformer" else "mlp_bridge.input_size"
    raise UserError(f"{spec}: {name}={width_in} but hubert.hidden_size={cfg.hubert.hidden_size}: the bridge "
                    f"reads HuBERT's frames; set both")
  tokens = cfg.qformer.num_queries if kind == "qformer" else 1
  width = (cfg.qformer.output_size or cfg.qformer.hidden_size) if kind == "qformer" else cfg.mlp_bridge.hidden_size
  if cfg.dit.context_dim != width:
    raise UserError(f"{spec}: dit.context_dim={cfg.dit.context_dim} but the {kind} bridge's tokens are {width} "
                    f"wide: stage 2's DiT cross-attends to them; set both")
  slots = cfg.dit.get("context_slots", 0)
  if slots and slots != tokens:
    raise UserError(f"{spec}: dit.context_slots={slots} but the {kind} bridge feeds stage 2 {tokens} tokens; "
                    f"set dit.context_slots={tokens} or 0")
  if slots and slots != cfg.data.text_max_tokens:
    raise UserError(f"{spec}: dit.context_slots={slots} but data.text_max_tokens={cfg.data.text_max_tokens} "
                    f"text tokens feed the tta stage; set data.text_max_tokens={slots}")


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as a path


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
  """Set `a.b.c=value` in place; the key must exist."""
  key, sep, raw = item.partition("=")
  if not sep:
    raise UserError(f"override '{item}' must look like key.sub=value")
  *parents, leaf = key.strip().split(".")
  node = cfg
  walked = []
  for name in parents + [leaf]:
    container = node
    keys = list(container.keys()) if isinstance(container, (ml_collections.ConfigDict, dict)) else []
    if name not in keys:
      where = ".".join(walked) or "<root>"
      raise UserError(f"config has no key '{'.'.join(walked + [name])}'; keys under {where}: "
                     f"{', '.join(sorted(keys))}")
    walked.append(name)
    if name != leaf:
      node = container[name]
  value = _parse_value(raw)
  old = container[leaf]
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  with cfg.unlocked():
    container[leaf] = value
