"""Stage 2: flow matching on VAE latents conditioned on the bridge's tokens (DESIGN.md §1-2).

Trains the DiT and the bridge's last projection; HuBERT, the Q-Former body and the VAE are frozen.
The DiT starts from `stage2.init_dit` (a tta workdir or a converted EzAudio checkpoint), HuBERT and the
bridge from `stage2.init_bridge` (a stage1 workdir), the VAE from `stage2.init_vae` (a vae workdir).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from star_jax import flow
from star_jax.train import components
from star_jax.train.stage import Stage

log = logging.getLogger("star_jax.train")

TRAINABLE_BRIDGE = ("projection",)  # the Q-Former's output Linear (DESIGN.md §1: "the bridge's last projection")


def split_bridge(bridge_params: dict, trainable_names: tuple[str, ...] = TRAINABLE_BRIDGE) -> tuple[dict, dict]:
  """Q-Former params -> (trainable last projection, frozen body); `trainable_names=()` freezes it all."""
  trainable = {k: v for k, v in bridge_params.items() if k in trainable_names}
  return trainable, {k: v for k, v in bridge_params.items() if k not in trainable_names}


def build(cfg, data=None) -> Stage:
  from star_jax.models.dit import DiT
  from star_jax.models.hubert import Hubert
  from star_jax.models.vae import OobleckVAE

  hp = cfg.stage2
  hubert = Hubert(components.hubert_config(cfg))
  bridge = components.bridge_module(cfg)
  dit = DiT(components.dit_config(cfg))
  vae = OobleckVAE(components.vae_config(cfg))
  trainable_bridge = TRAINABLE_BRIDGE if hp.get("train_projection", True) else ()

  def init(rng):
    r_hub, r_bridge, r_dit, r_vae = jax.random.split(rng, 4)
    q, width = cfg.qformer.num_queries, cfg.qformer.output_size or cfg.qformer.hidden_size
    proj, body = split_bridge(bridge.init(r_bridge, jnp.zeros((1, 4, cfg.hubert.hidden_size)))["params"],
                              trainable_bridge)
    latents = jnp.zeros((1, 4, cfg.vae.latent_channels))
    return {
        "params": {"dit": dit.init(r_dit, latents, jnp.zeros((1,)), jnp.zeros((1, q, width)))["params"],
                   "bridge": proj},
        "frozen": {"hubert": hubert.init(r_hub, jnp.zeros((1, 4000)))["params"], "bridge": body,
                   "vae": vae.init(r_vae, jnp.zeros((1, 4 * components.vae_hop(cfg))))["params"]},
    }

  def loss(params, frozen, batch, rng):
    r_latents, r_flow = jax.random.split(rng)
    feats, mask = components.speech_features(cfg, frozen["hubert"], batch)
    tokens = bridge.apply({"params": {**frozen["bridge"], **params["bridge"]}}, feats, mask)
    x0, x_mask = components.audio_latents(cfg, frozen["vae"], batch, r_latents)
    if not hp.get("mask_padding", True):  # short clips padded with silence: generate the silence too
      x_mask = None
    value = flow.flow_matching_loss(dit.apply, {"params": params["dit"]}, x0, tokens, r_flow,
                                    x_mask_bl=x_mask, **components.flow_loss_options(cfg))
    return value, {"flow": value}

  def load_pretrained(state):
    params, frozen = dict(state.params), dict(state.frozen)
    if hp.init_dit:
      params["dit"] = components.put_like(components.component(hp.init_dit, "dit"), params["dit"],
                                          "stage2.init_dit")
    else:
      log.warning("stage2: no init_dit; the DiT starts from random weights")
    if hp.init_bridge:
      parts, _ = components.load_trained(hp.init_bridge)
      proj, body = split_bridge(parts.get("bridge", {}), trainable_bridge)
      params["bridge"] = components.put_like(proj, params["bridge"], "stage2.init_bridge (projection)")
      frozen["bridge"] = components.put_like(body, frozen["bridge"], "stage2.init_bridge (Q-Former)")
      frozen["hubert"] = components.put_like(parts.get("hubert"), frozen["hubert"], "stage2.init_bridge (HuBERT)")
    else:
      log.warning("stage2: no init_bridge; HuBERT and the Q-Former are random and frozen")
    if hp.init_vae:
      frozen["vae"] = components.put_like(components.component(hp.init_vae, "vae"), frozen["vae"],
                                          "stage2.init_vae")
    else:
      log.warning("stage2: no init_vae; the VAE is random and frozen")
    state = state.replace(params=params, frozen=frozen)
    if state.ema is not None:
      state = state.replace(ema=jax.tree.map(lambda p, e: jax.device_put(p, e.sharding), params, state.ema))
    return state

  return Stage(name="stage2", hparams=hp, init=init, loss=loss, load_pretrained=load_pretrained,
               batch_keys=("speech", "speech_mask", "audio", "audio_mask", "hubert", "hubert_mask",
                           "latents", "latents_mask"))
