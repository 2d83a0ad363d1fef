"""EzAudio / STAR UDiT checkpoints -> (DiTConfig, params) for `star_jax.models.dit.DiT`.

EzAudio's MaskDiT stores the UDiT under `model.` and a `mask_embed` (C,) beside it; STAR stores it under
`backbone.` (optionally `backbone.model.`). The released models take 257 input channels: the noisy
latents, then `mask_embed` broadcast over every frame, then an all-ones mask channel (MaskDiT's input
for plain generation). Those 129 channels are constant, so they fold exactly into the input bias:
  b' = b + W[:, C:2C] @ mask_embed + W[:, 2C].
Config is inferred from shapes; only lora_alpha cannot be (EzAudio uses alpha = rank). The rotary embedding's
persistent `inv_freq` buffers, in every EzAudio checkpoint, are checked against 1/10000^(2i/head_dim) and dropped.
"""

from __future__ import annotations

import argparse
import re
from typing import Mapping

import numpy as np

from star_jax.errors import UserError
from star_jax.models.dit import DiTConfig

_BLOCK_NORMS = ("norm1", "norm2", "norm3", "norm_context", "skip_norm")


def _find_prefix(names: list[str]) -> str:
  """The module prefix of the UDiT: whatever precedes the top-level `time_ada_final.weight`."""
  found = sorted({m.group(1) for n in names if (m := re.fullmatch(r"(.*?)time_ada_final\.weight", n))})
  if len(found) != 1:
    raise UserError(f"expected one UDiT in the checkpoint (a '*time_ada_final.weight' entry), found "
                    f"prefixes {found or 'none'}; pass prefix= to pick one")
  return found[0]


def infer_config(sd: Mapping[str, np.ndarray], prefix: str, lora_alpha: float | None = None,
                 **overrides) -> DiTConfig:
  """DiTConfig from the shapes of a UDiT state dict under `prefix`."""
  g = lambda n: np.shape(sd[prefix + n])
  d = g("time_ada.weight")[1]
  n_in = len({n[len(prefix):].split(".")[1] for n in sd if n.startswith(prefix + "in_blocks.")})
  head_dim = g("in_blocks.0.attn.norm_q.weight")[0] if n_in else g("mid_block.attn.norm_q.weight")[0]
  rank = g("mid_block.adaln.lora_a.weight")[0] // 6
  fields = dict(
      latent_channels=g("final_block.linear.weight")[0], hidden_size=d, depth=2 * n_in,
      num_heads=d // head_dim, mlp_ratio=g("mid_block.mlp.net.2.weight")[1] // d,
      context_dim=g("context_embed.0.weight")[1], lora_rank=rank,
      lora_alpha=float(rank if lora_alpha is None else lora_alpha),
      time_freq_dim=g("time_embed.mlp.0.weight")[1],
      # EzAudio's optional cls_embed; star-jax feeds it the masked mean of the context tokens.
      pooled_context=prefix + "cls_embed.0.weight" in sd)
  fields.update(overrides)
  return DiTConfig(**fields)


def from_ezaudio_state_dict(state_dict: Mapping[str, np.ndarray], prefix: str | None = None,
                            lora_alpha: float | None = None, **config_overrides
                            ) -> tuple[DiTConfig, dict]:
  """An EzAudio (`model.*` + `mask_embed`) or STAR (`backbone.*`) state dict -> (config, params).

  `config_overrides` set runtime fields such as dtype="bfloat16" or remat="dots".
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  prefix = _find_prefix(list(sd)) if prefix is None else prefix
  cfg = infer_config(sd, prefix, lora_alpha, **config_overrides)
  used: set[str] = set()

  def take(name: str) -> np.ndarray:
    key = prefix + name
    if key not in sd:
      raise UserError(f"checkpoint lacks '{key}' needed for a UDiT of {cfg}")
    used.add(key)
    return sd[key]

  def linear(name: str, bias: bool = True) -> dict:
    out = {"kernel": take(name + ".weight").T}
    if bias:
      out["bias"] = take(name + ".bias")
    return out

  def norm(name: str) -> dict:
    return {"scale": take(name + ".weight"), "bias": take(name + ".bias")}

  def attention(name: str) -> dict:
    p = {k: linear(f"{name}.{k}", bias=False) for k in ("to_q", "to_k", "to_v")}
    p["proj"] = linear(name + ".proj")
    p["norm_q"], p["norm_k"] = norm(name + ".norm_q"), norm(name + ".norm_k")
    return p

  def block(name: str, has_skip: bool) -> dict:
    p = {n: norm(f"{name}.{n}") for n in _BLOCK_NORMS if has_skip or n != "skip_norm"}
    p["attn"], p["cross_attn"] = attention(name + ".attn"), attention(name + ".cross_attn")
    # GEGLU's fused Linear(D, 2H): first half value, second half gate.
    w, b = take(name + ".mlp.net.0.proj.weight"), take(name + ".mlp.net.0.proj.bias")
    h = w.shape[0] // 2
    p["mlp"] = {"proj_value": {"kernel": w[:h].T, "bias": b[:h]},
                "proj_gate": {"kernel": w[h:].T, "bias": b[h:]},
                "proj_out": linear(name + ".mlp.net.2")}
    p["adaln"] = {"lora_a": linear(name + ".adaln.lora_a", bias=False),
                  "lora_b": linear(name + ".adaln.lora_b", bias=False),
                  "scale_shift_table": take(name + ".adaln.scale_shift_table")}
    if has_skip:
      p["skip_linear"] = linear(name + ".skip_linear")
    return p

  params = {
      "patch_embed": _patch_embed(take("patch_embed.proj.weight"), take("patch_embed.proj.bias"),
                                  cfg.latent_channels, _mask_embed(sd, prefix, used)),
      "time_embed_1": linear("time_embed.mlp.0"), "time_embed_2": linear("time_embed.mlp.2"),
      "time_ada": linear("time_ada"), "time_ada_final": linear("time_ada_final"),
      "context_embed_1": linear("context_embed.0"), "context_embed_2": linear("context_embed.2"),
      **({"cls_embed_1": linear("cls_embed.0"), "cls_embed_2": linear("cls_embed.2")} if cfg.pooled_context
         else {}),
      "mid_block": block("mid_block", False),
      "final_norm": norm("final_block.norm"), "final_linear": linear("final_block.linear"),
      # torch Conv1d (out, in, k) -> (k, in, out)
      "final_conv": {"kernel": take("final_block.final_layer.weight").transpose(2, 1, 0),
                     "bias": take("final_block.final_layer.bias")},
  }
  for i in range(cfg.depth // 2):
    params[f"in_blocks_{i}"] = block(f"in_blocks.{i}", False)
    params[f"out_blocks_{i}"] = block(f"out_blocks.{i}", True)
  _check_buffers(sd, prefix, used, cfg.hidden_size // cfg.num_heads)
  left = sorted(k for k in sd if k.startswith(prefix) and k not in used)
  if left:
    raise UserError(f"unrecognised UDiT entries (a variant star-jax does not build?): {left[:8]}"
                    f"{' ...' if len(left) > 8 else ''}")
  return cfg, params


def _check_buffers(sd: Mapping[str, np.ndarray], prefix: str, used: set[str], head_dim: int) -> None:
  """Persistent buffers a real EzAudio checkpoint carries hold no learned state: each must equal what the model
  computes itself (the rotary embedding's `inv_freq` = 1/10000^(2i/head_dim)), then it is dropped."""
  inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  pattern = re.escape(prefix) + r"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.attn\.rotary\.inv_freq"
  for key in (k for k in sd if re.fullmatch(pattern, k)):
    if sd[key].shape != inv_freq.shape or not np.allclose(sd[key], inv_freq, rtol=1e-5, atol=0):
      raise UserError(f"checkpoint buffer '{key}' is not the {inv_freq.size} RoPE inverse frequencies "
                      f"1/10000^(2i/{head_dim}) of this DiT's heads; a rotary variant star-jax does not build")
    used.add(key)


def _mask_embed(sd: Mapping[str, np.ndarray], prefix: str, used: set[str]) -> np.ndarray | None:
  """MaskDiT's `mask_embed`, stored beside its `model.` (or inside a STAR `backbone.`), if any."""
  parent = prefix[:-len("model.")] if prefix.endswith("model.") else prefix
  key = next((k for k in (parent + "mask_embed", prefix + "mask_embed") if k in sd), None)
  if key is not None:
    used.add(key)
  return None if key is None else sd[key]


def _patch_embed(w: np.ndarray, b: np.ndarray, channels: int, mask_embed: np.ndarray | None) -> dict:
  """Conv1d(k=1) input projection -> Dense; folds MaskDiT's 2C+1 channel input down to C."""
  if w.shape[2] != 1:
    raise UserError(f"patch_embed is a Conv1d with kernel {w.shape[2]} (patch_size > 1); the converter maps "
                    f"patch_size 1, the size of every released EzAudio and STAR DiT")
  w = w[:, :, 0]
  if w.shape[1] == channels:
    return {"kernel": w.T, "bias": b}
  if w.shape[1] != 2 * channels + 1:
    raise UserError(f"patch_embed takes {w.shape[1]} channels; expected {channels} or "
                    f"{2 * channels + 1} (latents + inpainting latents + mask)")
  if mask_embed is None:
    raise UserError(f"a {w.shape[1]}-channel patch_embed needs MaskDiT's mask_embed, which the "
                    f"checkpoint lacks")
  folded = b + w[:, channels:2 * channels] @ mask_embed + w[:, 2 * channels]
  return {"kernel": w[:, :channels].T, "bias": folded}


def to_ezaudio_state_dict(params, prefix="model.") -> dict[str, np.ndarray]:
  """A DiT param tree -> EzAudio's UDiT names and torch layouts (numpy), the inverse of `from_ezaudio_state_dict`
  (without buffers or `mask_embed`: the input projection takes the C latent channels)."""
  p = _numpy_tree(params)
  sd = {}

  def lin(n, q):
    sd[f"{prefix}{n}.weight"] = q["kernel"].T
    if "bias" in q:
      sd[f"{prefix}{n}.bias"] = q["bias"]

  def nrm(n, q):
    sd[f"{prefix}{n}.weight"], sd[f"{prefix}{n}.bias"] = q["scale"], q["bias"]

  sd[prefix + "patch_embed.proj.weight"] = p["patch_embed"]["kernel"].T[:, :, None]
  sd[prefix + "patch_embed.proj.bias"] = p["patch_embed"]["bias"]
  lin("time_embed.mlp.0", p["time_embed_1"])
  lin("time_embed.mlp.2", p["time_embed_2"])
  lin("time_ada", p["time_ada"])
  lin("time_ada_final", p["time_ada_final"])
  lin("context_embed.0", p["context_embed_1"])
  lin("context_embed.2", p["context_embed_2"])
  nrm("final_block.norm", p["final_norm"])
  lin("final_block.linear", p["final_linear"])
  sd[prefix + "final_block.final_layer.weight"] = p["final_conv"]["kernel"].transpose(2, 1, 0)
  sd[prefix + "final_block.final_layer.bias"] = p["final_conv"]["bias"]
  for ours, theirs in [(k, k.replace("_blocks_", "_blocks.")) for k in p if "block" in k]:
    q = p[ours]
    for n in ("norm1", "norm2", "norm3", "norm_context", "skip_norm"):
      if n in q:
        nrm(f"{theirs}.{n}", q[n])
    for a in ("attn", "cross_attn"):
      for n in ("to_q", "to_k", "to_v", "proj"):
        lin(f"{theirs}.{a}.{n}", q[a][n])
      nrm(f"{theirs}.{a}.norm_q", q[a]["norm_q"])
      nrm(f"{theirs}.{a}.norm_k", q[a]["norm_k"])
    m = q["mlp"]
    sd[f"{prefix}{theirs}.mlp.net.0.proj.weight"] = np.concatenate([m["proj_value"]["kernel"].T,
                                                                    m["proj_gate"]["kernel"].T])
    sd[f"{prefix}{theirs}.mlp.net.0.proj.bias"] = np.concatenate([m["proj_value"]["bias"], m["proj_gate"]["bias"]])
    lin(f"{theirs}.mlp.net.2", m["proj_out"])
    lin(f"{theirs}.adaln.lora_a", q["adaln"]["lora_a"])
    lin(f"{theirs}.adaln.lora_b", q["adaln"]["lora_b"])
    sd[f"{prefix}{theirs}.adaln.scale_shift_table"] = q["adaln"]["scale_shift_table"]
    if "skip_linear" in q:
      lin(f"{theirs}.skip_linear", q["skip_linear"])
  return sd


def _numpy_tree(tree):
  return {k: _numpy_tree(v) if isinstance(v, dict) else np.asarray(v, np.float32) for k, v in tree.items()}


# EzAudio UDiT settings that change the math without changing any weight name; star-jax builds these values.
_EZAUDIO_FIXED = dict(rope_mode="shared", pe_method="none", context_pe_method="none", time_fusion="ada_sola_bias",
                      context_fusion="cross", qk_norm="layernorm", act_layer="geglu", skip=True, use_conv=True,
                      patch_size=1)
# EzAudio `model:` key -> DiTConfig field, for the sizes the yml states and the weights must have.
_EZAUDIO_SIZES = dict(embed_dim="hidden_size", depth="depth", num_heads="num_heads", mlp_ratio="mlp_ratio",
                      context_dim="context_dim", ada_sola_rank="lora_rank", out_chans="latent_channels")


def read_ezaudio_yaml(path: str) -> tuple[dict, float]:
  """EzAudio's `ckpts/ezaudio-*.yml` -> (the UDiT's `model:` settings, the latent `scale` of `autoencoder:`).

  EzAudio's DiT sees (z + shift) · scale; star-jax's x0 is z · `flow.latent_scale`, so a nonzero shift is an error.
  """
  import yaml
  try:
    with open(path) as f:
      doc = yaml.safe_load(f)
    model, autoencoder = dict(doc["model"]), dict(doc.get("autoencoder") or {})
  except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
    raise UserError(f"{path}: not an EzAudio model yml with a `model:` block ({type(e).__name__}: {e})") from e
  wrong = {k: (model[k], v) for k, v in _EZAUDIO_FIXED.items() if k in model and model[k] != v}
  if wrong:
    raise UserError(f"{path}: " + ", ".join(f"{k}: {a!r}" for k, (a, _) in wrong.items())
                    + f" is not the UDiT star-jax builds ({', '.join(f'{k}: {v!r}' for k, (_, v) in wrong.items())})")
  if float(autoencoder.get("shift", 0.0)) != 0.0:
    raise UserError(f"{path}: autoencoder.shift {autoencoder['shift']} is not supported (flow.latent_scale "
                    f"scales the latents, it does not shift them)")
  return model, float(autoencoder.get("scale", 1.0))


def from_ezaudio_checkpoint(path: str, yaml_path: str | None = None, **config_overrides
                            ) -> tuple[DiTConfig, dict, float]:
  """An EzAudio / STAR DiT checkpoint [+ EzAudio's yml] -> (config, params, latent scale). The yml gives
  `ada_sola_alpha` and the latent scale (default: alpha = rank, scale 1, EzAudio's) and its sizes are checked
  against the weights'."""
  from star_jax.convert.torch_io import load_state_dict

  settings, scale = read_ezaudio_yaml(yaml_path) if yaml_path else ({}, 1.0)
  alpha = settings.get("ada_sola_alpha")
  cfg, params = from_ezaudio_state_dict(load_state_dict(path), lora_alpha=None if alpha is None else float(alpha),
                                        **config_overrides)
  differ = {k: (getattr(cfg, f), settings[k]) for k, f in _EZAUDIO_SIZES.items()
            if k in settings and getattr(cfg, f) != settings[k]}
  if differ:
    raise UserError(f"{path}: the weights do not have the sizes {yaml_path} gives: "
                    + ", ".join(f"{k} {a} in the weights, {b} in the yml" for k, (a, b) in differ.items()))
  return cfg, params, scale


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--prefix", default=None,
                 help="module prefix of the UDiT in the checkpoint (default: detected, e.g. 'model.')")
  p.add_argument("--lora-alpha", type=float, default=None, help="AdaLN-SOLA alpha (default: the rank)")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                 help="compute dtype stored in the config (params stay float32)")
  p.add_argument("--remat", default="dots", help="remat policy stored in the config")


def convert_cli(args: argparse.Namespace) -> tuple[DiTConfig, dict]:
  from star_jax.convert.torch_io import load_state_dict

  return from_ezaudio_state_dict(load_state_dict(args.source), prefix=args.prefix,
                                 lora_alpha=args.lora_alpha, dtype=args.dtype, remat=args.remat)
