"""Stage 2: flow matching on VAE latents conditioned on the bridge's tokens (DESIGN.md §1-2).

Trains the DiT and the bridge's last projection; HuBERT, the Q-Former body and the VAE are frozen.
The DiT starts from `stage2.init_dit` (a tta workdir or a converted EzAudio checkpoint), HuBERT and the
bridge from `stage2.init_bridge` (a stage1 workdir), the VAE from `stage2.init_vae` (a vae workdir).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from star_jax import flow, trained
from star_jax.models import build as build_lib
from star_jax.train import state as state_lib
from star_jax.train.stage import Stage

log = logging.getLogger("star_jax.train")

TRAINABLE_BRIDGE = ("projection",)  # the Q-Former's output Linear (DESIGN.md §1: "the bridge's last projection")


def split_bridge(bridge_params: dict, trainable_names: tuple[str, ...] = TRAINABLE_BRIDGE) -> tuple[dict, dict]:
  """Bridge component -> (trainable last projection, frozen body); `trainable_names=()` freezes it all (the MLP
  bridge has no `projection`: it stays frozen whole)."""
  trainable = {k: v for k, v in bridge_params.items() if k in trainable_names}
  return trainable, {k: v for k, v in bridge_params.items() if k not in trainable_names}


def build(cfg, data=None) -> Stage:
  hp = cfg.stage2
  hubert, bridge = build_lib.hubert(cfg), build_lib.bridge(cfg)
  dit = build_lib.dit(cfg)
  trainable_bridge = TRAINABLE_BRIDGE if hp.get("train_projection", True) else ()

  def init(rng):
    r_hub, r_bridge, r_dit, r_vae = jax.random.split(rng, 4)
    q, width = build_lib.bridge_tokens(cfg)
    proj, body = split_bridge(build_lib.init_bridge(cfg, bridge, r_bridge), trainable_bridge)
    latents = jnp.zeros((1, 4, cfg.vae.latent_channels))
    return {
        "params": {"dit": dit.init(r_dit, latents, jnp.zeros((1,)), jnp.zeros((1, q, width)))["params"],
                   "bridge": proj},
        "frozen": {"hubert": hubert.init(r_hub, jnp.zeros((1, 4000)))["params"], "bridge": body,
                   **build_lib.init_vae(cfg, r_vae)},
    }

  token_noise = float(hp.get("token_noise", 0.0))

  def loss(params, frozen, batch, rng):
    r_latents, r_flow, r_noise = jax.random.split(rng, 3)
    parts = {"hubert": frozen["hubert"], "bridge": {**frozen["bridge"], **params["bridge"]}}
    tokens = build_lib.speech_tokens(cfg, parts, batch, modules=(hubert, bridge))
    if token_noise:  # Gaussian noise on the condition, relative to the tokens' spread: voices the DiT never heard
      spread = jax.lax.stop_gradient(jnp.std(tokens, axis=0, keepdims=True).mean())
      tokens = tokens + token_noise * spread * jax.random.normal(r_noise, tokens.shape)
    x0, x_mask = build_lib.audio_latents(cfg, frozen.get("vae"), batch, r_latents)
    if not hp.get("mask_padding", True):  # short clips padded with silence: generate the silence too
      x_mask = None
    value = flow.flow_matching_loss(dit.apply, {"params": params["dit"]}, x0, tokens, r_flow,
                                    x_mask_bl=x_mask, **build_lib.flow_loss_options(cfg))
    return value, {"flow": value}

  def load_pretrained(state):
    params, frozen = dict(state.params), dict(state.frozen)
    if hp.init_dit:
      params["dit"] = trained.put_like(trained.component(hp.init_dit, "dit"), params["dit"],
                                          "stage2.init_dit")
    else:
      log.warning("stage2: no init_dit; the DiT starts from random weights")
    if hp.init_bridge:
      parts, _ = trained.load_trained(hp.init_bridge)
      proj, body = split_bridge(parts.get("bridge", {}), trainable_bridge)
      params["bridge"] = trained.put_like(proj, params["bridge"], "stage2.init_bridge (projection)")
      frozen["bridge"] = trained.put_like(body, frozen["bridge"], "stage2.init_bridge (Q-Former)")
      frozen["hubert"] = trained.put_like(parts.get("hubert"), frozen["hubert"], "stage2.init_bridge (HuBERT)")
    else:
      log.warning("stage2: no init_bridge; HuBERT and the Q-Former are random and frozen")
    if hp.init_vae and build_lib.vae_trained(cfg):  # the fixed mel codec has nothing to load
      frozen["vae"] = trained.put_like(trained.component(hp.init_vae, "vae"), frozen["vae"],
                                          "stage2.init_vae")
    elif build_lib.vae_trained(cfg):
      log.warning("stage2: no init_vae; the VAE is random and frozen")
    return state_lib.with_pretrained(state, params, frozen)

  return Stage(name="stage2", hparams=hp, init=init, loss=loss, load_pretrained=load_pretrained,
               batch_keys=("speech", "speech_mask", "audio", "audio_mask", "hubert", "hubert_mask",
                           "latents", "latents_mask"))
