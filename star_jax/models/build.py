"""Config sections -> the pipeline's modules, and the forward passes every stage and `generate` share.

    hubert, bridge = build.hubert(cfg), build.bridge(cfg)
    tokens_bqd = build.speech_tokens(cfg, hubert, bridge, {"hubert": ..., "bridge": ...}, batch)

The speech path (HuBERT -> bridge) is written once here: stage 1 and stage 2 train through it and `generate`
samples from it, so all three read the same frames the same way and honour `bridge.kind`.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from star_jax.errors import UserError

BRIDGE_KINDS = ("qformer", "mlp")


def hubert_config(cfg):
  from star_jax.models.hubert import HubertConfig
  return HubertConfig(**cfg.hubert.to_dict())


def hubert(cfg):
  from star_jax.models.hubert import Hubert
  return Hubert(hubert_config(cfg))


def bridge(cfg):
  """The bridge `bridge.kind` names: the Q-Former (`qformer` section) or the MLP (`mlp_bridge`; DESIGN.md §2)."""
  from star_jax.models.bridge import MLPBridge, MLPBridgeConfig, QFormer, QFormerConfig
  kind = cfg.bridge.kind
  if kind == "qformer":
    return QFormer(QFormerConfig(**cfg.qformer.to_dict()))
  if kind == "mlp":
    return MLPBridge(MLPBridgeConfig(**cfg.mlp_bridge.to_dict()))
  raise UserError(f"bridge.kind '{kind}': choose one of {BRIDGE_KINDS}")


def bridge_tokens(cfg) -> tuple[int, int]:
  """(tokens, width) of the bridge's output: what the DiT cross-attends to in stage 2."""
  if cfg.bridge.kind == "mlp":
    return 1, int(cfg.mlp_bridge.hidden_size)
  return int(cfg.qformer.num_queries), int(cfg.qformer.output_size or cfg.qformer.hidden_size)


def init_bridge(cfg, bridge_module, rng: jax.Array) -> Any:
  """The bridge component's initial tree: Q-Former params, or the MLP's variables (params and batch_stats)."""
  import jax.numpy as jnp
  variables = bridge_module.init(rng, jnp.zeros((1, 4, int(cfg.hubert.hidden_size))))
  return dict(variables) if cfg.bridge.kind == "mlp" else variables["params"]


def classifier(cfg, num_classes: int):
  """Stage 1's head; `classifier.prior_prob` and `cosine_scale` are the beyond-paper knobs (0: STAR's Linear)."""
  from star_jax.models.bridge import Classifier
  return Classifier(num_classes, dtype=cfg.qformer.dtype, prior_prob=float(cfg.classifier.get("prior_prob", 0.0)),
                    cosine_scale=float(cfg.classifier.get("cosine_scale", 0.0)))


def dit_config(cfg, context_dim: int | None = None):
  from star_jax.models.dit import DiTConfig
  fields = cfg.dit.to_dict()
  if context_dim is not None:
    fields["context_dim"] = int(context_dim)
  return DiTConfig(**fields)


def dit(cfg, context_dim: int | None = None):
  from star_jax.models.dit import DiT
  return DiT(dit_config(cfg, context_dim))


VAE_KINDS = ("oobleck", "mel")


def vae_kind(cfg) -> str:
  """`vae.kind`: "oobleck" (the trained VAE) or "mel" (the fixed log-mel codec, `mel_codec` section)."""
  kind = cfg.vae.get("kind", "oobleck")
  if kind not in VAE_KINDS:
    raise UserError(f"vae.kind '{kind}': choose one of {VAE_KINDS}")
  return kind


def vae_config(cfg):
  """The codec's model config: `VAEConfig` (Oobleck) or `MelConfig` (the mel codec's sample rate and band count
  are `vae.sample_rate_hz` and `vae.latent_channels`)."""
  if vae_kind(cfg) == "mel":
    from star_jax.models.mel_codec import MelConfig
    return MelConfig(sample_rate_hz=int(cfg.vae.sample_rate_hz), latent_channels=int(cfg.vae.latent_channels),
                     **cfg.mel_codec.to_dict())
  from star_jax.models.vae import VAEConfig
  return VAEConfig(**{k: v for k, v in cfg.vae.to_dict().items() if k != "kind"})


def vae(cfg):
  """The codec in the VAE slot, Oobleck or the fixed mel codec: the same `encode`/`decode` calls."""
  if vae_kind(cfg) == "mel":
    from star_jax.models.mel_codec import MelCodec
    return MelCodec(vae_config(cfg))
  from star_jax.models.vae import OobleckVAE
  return OobleckVAE(vae_config(cfg))


def vae_trained(cfg) -> bool:
  """Whether the codec has parameters (a `vae` component to train, freeze, load and export)."""
  return vae_kind(cfg) != "mel"


def init_vae(cfg, rng: jax.Array) -> dict:
  """{'vae': params} for a trained codec, {} for the fixed one (frozen trees hold no empty component)."""
  if not vae_trained(cfg):
    return {}
  return {"vae": vae(cfg).init(rng, jax.numpy.zeros((1, 4 * vae_hop(cfg))))["params"]}


def vae_hop(cfg) -> int:
  """Audio samples per latent frame (the product of the VAE's strides, or the mel codec's hop)."""
  if vae_kind(cfg) == "mel":
    return int(cfg.mel_codec.hop_length)
  return int(math.prod(cfg.vae.downsampling_ratios))


def num_classes(cfg, data=None) -> int:
  """`classifier.num_classes`, or the data's label count when the config leaves it 0."""
  n = int(cfg.classifier.num_classes)
  if n:
    return n
  if data is None or not hasattr(data, "label_names"):
    raise UserError("classifier.num_classes is 0 (ask the data) but no dataset with label names was given")
  return len(data.label_names)


def latent_scale(cfg) -> float:
  """`flow.latent_scale`: the flow stages' x0 is the VAE latent times this; `generate` divides it back out."""
  return float(cfg.flow.get("latent_scale", 1.0))


def flow_loss_options(cfg) -> dict:
  """The `flow` section's training options of `flow.flow_matching_loss` (tta and stage 2)."""
  return dict(cond_drop_prob=float(cfg.flow.cond_drop_prob), sigma_mean=float(cfg.flow.get("sigma_mean", 0.0)))


def latent_mask(cfg, audio_mask_bt: jax.Array, num_frames: int) -> jax.Array:
  """Audio sample mask (B, Ta) -> latent frame mask (B, L): a frame is valid when its first sample is."""
  hop = vae_hop(cfg)
  return audio_mask_bt[:, ::hop][:, :num_frames].astype(bool)


def speech_features(cfg, hubert_params, batch: dict, use_cache: bool = True) -> tuple[jax.Array, jax.Array]:
  """Cached HuBERT frames when the batch has them (and `use_cache`), else HuBERT on `speech` -> (B, T, D), (B, T).

  A stage that trains HuBERT passes use_cache=False: cached frames come from some other HuBERT, and reading
  them would train the bridge on them while HuBERT itself never learns.
  """
  return _frames(cfg, None, {"hubert": hubert_params}, batch, use_cache)


def apply_bridge(cfg, bridge_module, bridge_params: Any, feats_btd: jax.Array, mask_bt: jax.Array,
                 rng: jax.Array | None = None) -> jax.Array:
  """Bridge params on HuBERT frames -> tokens (B, Q, D); dropout with `rng`, deterministic without.

  The MLP bridge's component tree is its variables, {'params', 'batch_stats'} (running statistics, read only).
  """
  rngs = None if rng is None else {"dropout": rng}
  variables = dict(bridge_params) if cfg.bridge.kind == "mlp" else {"params": bridge_params}
  return bridge_module.apply(variables, feats_btd, mask_bt, deterministic=rng is None, rngs=rngs)


def _frames(cfg, hubert_module, params: dict, batch: dict, use_cache: bool) -> tuple[jax.Array, jax.Array]:
  if use_cache and "hubert" in batch:
    return batch["hubert"], batch["hubert_mask"]
  hubert_module = hubert_module or hubert(cfg)
  return hubert_module.apply({"params": params["hubert"]}, batch["speech"], batch["speech_mask"])


def speech_tokens(cfg, params: dict, batch: dict, *, use_cache: bool = True, rng: jax.Array | None = None,
                  modules: tuple | None = None) -> jax.Array:
  """Speech (`speech`, `speech_mask`) or cached HuBERT frames (`hubert`, `hubert_mask`) -> bridge tokens (B, Q, D).

  `params` holds the `hubert` and `bridge` components; `modules` = (hubert, bridge) reuses built modules.
  """
  hubert_module, bridge_module = modules or (None, bridge(cfg))
  feats, mask = _frames(cfg, hubert_module, params, batch, use_cache)
  return apply_bridge(cfg, bridge_module, params["bridge"], feats, mask, rng)


def speech_tokens_training(cfg, params: dict, batch: dict, rng: jax.Array, *, use_cache: bool = True,
                           modules: tuple | None = None) -> tuple[jax.Array, dict]:
  """`speech_tokens` for a step that trains the bridge: dropout from `rng`, and the MLP's BatchNorm on the batch's
  statistics -> (tokens, the bridge's updated variables: {'batch_stats': ...} for the MLP, {} for the Q-Former)."""
  hubert_module, bridge_module = modules or (None, bridge(cfg))
  feats, mask = _frames(cfg, hubert_module, params, batch, use_cache)
  if cfg.bridge.kind != "mlp":
    return apply_bridge(cfg, bridge_module, params["bridge"], feats, mask, rng), {}
  tokens, updated = bridge_module.apply(dict(params["bridge"]), feats, mask, deterministic=False,
                                        rngs={"dropout": rng}, mutable=["batch_stats"])
  return tokens, {"batch_stats": updated["batch_stats"]}


def audio_latents(cfg, vae_params, batch: dict, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flow-matching targets x0: cached latents when the batch has them, else a posterior sample of the VAE
  encoder (DESIGN.md §2: encoding samples the posterior; no shift), times `latent_scale(cfg)` -> (B, L, C),
  (B, L). The mel codec has no params (`vae_params` None) and a zero std."""
  if "latents" in batch:
    z, mask = batch["latents"], batch["latents_mask"]
  else:
    mean, std = vae(cfg).apply({"params": vae_params or {}}, batch["audio"], method="encode")
    z = jax.lax.stop_gradient(mean + std * jax.random.normal(rng, mean.shape))
    mask = latent_mask(cfg, batch["audio_mask"], z.shape[1])
  return z * latent_scale(cfg), mask
