"""The pipeline's components as the stages use them: model configs from the config sections, the speech
path (HuBERT -> bridge), VAE latents with their frame mask, and loading trained or converted parts.

Every stage names its sub-trees by component — `hubert`, `bridge`, `classifier`, `dit`, `vae` — in
`state.params` (trainable) or `state.frozen`, so a later stage or `export` can pick them up by name.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

from star_jax import checkpoint
from star_jax.errors import UserError


def hubert_config(cfg):
  from star_jax.models.hubert import HubertConfig
  return HubertConfig(**cfg.hubert.to_dict())


def bridge_module(cfg):
  """The Q-Former (the only bridge the flow stages train; DESIGN.md §1)."""
  from star_jax.models.bridge import QFormer, QFormerConfig
  if cfg.bridge.kind != "qformer":
    raise UserError(f"bridge.kind '{cfg.bridge.kind}': the trainer supports the Q-Former bridge only")
  return QFormer(QFormerConfig(**cfg.qformer.to_dict()))


def dit_config(cfg, context_dim: int | None = None):
  from star_jax.models.dit import DiTConfig
  fields = cfg.dit.to_dict()
  if context_dim is not None:
    fields["context_dim"] = int(context_dim)
  return DiTConfig(**fields)


def vae_config(cfg):
  from star_jax.models.vae import VAEConfig
  return VAEConfig(**cfg.vae.to_dict())


def vae_hop(cfg) -> int:
  """Audio samples per latent frame (the product of the VAE's strides)."""
  return int(math.prod(cfg.vae.downsampling_ratios))


def num_classes(cfg, data=None) -> int:
  """`classifier.num_classes`, or the data's label count when the config leaves it 0."""
  n = int(cfg.classifier.num_classes)
  if n:
    return n
  if data is None or not hasattr(data, "label_names"):
    raise UserError("classifier.num_classes is 0 (ask the data) but no dataset with label names was given")
  return len(data.label_names)


def speech_features(cfg, hubert_params, batch: dict, use_cache: bool = True) -> tuple[jax.Array, jax.Array]:
  """Cached HuBERT frames when the batch has them (and `use_cache`), else HuBERT on the waveform.

  -> (B, T, D), (B, T). A stage that trains HuBERT passes use_cache=False: cached frames come from some
  other HuBERT, and reading them would train the bridge on them while HuBERT itself never learns.
  """
  from star_jax.models.hubert import Hubert
  if use_cache and "hubert" in batch:
    return batch["hubert"], batch["hubert_mask"]
  return Hubert(hubert_config(cfg)).apply({"params": hubert_params}, batch["speech"], batch["speech_mask"])


def latent_mask(cfg, audio_mask_bt: jax.Array, num_frames: int) -> jax.Array:
  """Audio sample mask (B, Ta) -> latent frame mask (B, L): a frame is valid when its first sample is."""
  hop = vae_hop(cfg)
  return audio_mask_bt[:, ::hop][:, :num_frames].astype(bool)


def latent_scale(cfg) -> float:
  """`flow.latent_scale`: the flow stages' x0 is the VAE latent times this; `generate` divides it back out."""
  return float(cfg.flow.get("latent_scale", 1.0))


def flow_loss_options(cfg) -> dict:
  """The `flow` section's training options of `flow.flow_matching_loss` (tta and stage 2)."""
  return dict(cond_drop_prob=float(cfg.flow.cond_drop_prob), sigma_mean=float(cfg.flow.get("sigma_mean", 0.0)))


def audio_latents(cfg, vae_params, batch: dict, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flow-matching targets x0: cached latents when the batch has them, else a posterior sample of the VAE
  encoder (DESIGN.md §2: encoding samples the posterior; no shift), times `latent_scale(cfg)` -> (B, L, C),
  (B, L)."""
  from star_jax.models.vae import OobleckVAE
  if "latents" in batch:
    z, mask = batch["latents"], batch["latents_mask"]
  else:
    mean, std = OobleckVAE(vae_config(cfg)).apply({"params": vae_params}, batch["audio"], method="encode")
    z = jax.lax.stop_gradient(mean + std * jax.random.normal(rng, mean.shape))
    mask = latent_mask(cfg, batch["audio_mask"], z.shape[1])
  return z * latent_scale(cfg), mask


# --- Loading trained or converted parts.

def load_trained(path: str) -> tuple[dict, str]:
  """A train workdir (its `best/` if any, else its latest checkpoint), a stage's `best/` folder, or a
  converted params checkpoint -> ({component: numpy tree}, kind).

  Train states merge `params` and `frozen`; an EMA of the params, when kept, replaces them.
  """
  path = _resolve(path)
  if os.path.isdir(os.path.join(path, "params")):
    tree, meta = checkpoint.load_params(path)
    kind = meta.get("kind", "")
    if set(tree) <= {"params", "frozen", "ema"} and "params" in tree:
      return _merge(tree), kind
    return {kind: tree}, kind  # a converted component (star-jax convert KIND)
  ckpt_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpt_dir):
    state, meta = checkpoint.TrainCheckpointer(ckpt_dir).restore_numpy()
    return _merge(state), meta.get("stage", "")
  raise UserError(f"'{path}' is neither a star-jax train workdir (no checkpoints/ or best/) nor a params "
                  f"checkpoint; give the workdir of the stage that trained it")


def trained_config(path: str) -> dict | None:
  """The config saved with what `load_trained(path)` reads (a params checkpoint's `config`, or the config.json
  a train workdir holds), as a dict; None when there is none."""
  path = _resolve(path)
  meta_path = os.path.join(path, "config.json")
  if not os.path.isfile(meta_path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  return meta.get("config") if os.path.isdir(os.path.join(path, "params")) else meta


def _resolve(path: str) -> str:
  """A workdir with a `best/` -> that `best/`; anything else as given (absolute)."""
  path = os.path.abspath(path)
  best = os.path.join(path, "best")
  return best if os.path.isdir(os.path.join(best, "params")) else path


def _merge(state: dict) -> dict:
  """frozen, then params, then the EMA, merged key by key (stage 2 splits the bridge across trees)."""
  merged: dict = {}
  for part in ("frozen", "params", "ema"):
    merged = _deep_merge(merged, state.get(part) or {})
  return merged


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def component(path: str, name: str) -> Any:
  """One named component (e.g. 'dit') out of `load_trained(path)`."""
  parts, kind = load_trained(path)
  if name not in parts:
    raise UserError(f"'{path}' ({kind or 'unknown kind'}) has no '{name}' parameters; it has {sorted(parts)}")
  return parts[name]


def put_like(tree: Any, target: Any, what: str) -> Any:
  """Place a loaded numpy tree with the shapes and shardings of `target` (a tree of jax Arrays)."""
  got = jax.tree_util.tree_structure(tree)
  want = jax.tree_util.tree_structure(target)
  if got != want:
    raise UserError(f"{what}: the loaded parameters do not match this config's model structure; "
                    f"check that the config sizes match the checkpoint")
  def put(x, t):
    if np.shape(x) != t.shape:
      raise UserError(f"{what}: a loaded parameter has shape {np.shape(x)}, the model expects {t.shape}")
    return jax.device_put(np.asarray(x, dtype=t.dtype), t.sharding)
  return jax.tree.map(put, tree, target)
