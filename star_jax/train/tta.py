"""Text-to-audio pre-training of the DiT: flow matching on VAE latents conditioned on the text embeddings
stored in the records (`text_emb`, any width: `tta.text_dim`). Its DiT initialises stage 2.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from star_jax import flow, trained
from star_jax.models import build as build_lib
from star_jax.train.stage import Stage

log = logging.getLogger("star_jax.train")


def build(cfg, data=None) -> Stage:
  hp = cfg.tta
  dit = build_lib.dit(cfg, context_dim=hp.text_dim)
  text_tokens = int(cfg.data.text_max_tokens)  # the pipeline pads or crops every caption's rows to this

  def init(rng):
    r_dit, r_vae = jax.random.split(rng)
    latents = jnp.zeros((1, 4, cfg.vae.latent_channels))
    return {"params": {"dit": dit.init(r_dit, latents, jnp.zeros((1,)), jnp.zeros((1, text_tokens, hp.text_dim)))["params"]},
            "frozen": build_lib.init_vae(cfg, r_vae)}

  def loss(params, frozen, batch, rng):
    r_latents, r_flow = jax.random.split(rng)
    x0, x_mask = build_lib.audio_latents(cfg, frozen.get("vae"), batch, r_latents)
    if not hp.get("mask_padding", True):  # short clips padded with silence: generate the silence too
      x_mask = None
    value = flow.flow_matching_loss(dit.apply, {"params": params["dit"]}, x0, batch["text_emb"], r_flow,
                                    context_mask_bs=batch["text_mask"], x_mask_bl=x_mask,
                                    **build_lib.flow_loss_options(cfg))
    return value, {"flow": value}

  def load_pretrained(state):
    if not build_lib.vae_trained(cfg):
      return state  # the fixed mel codec: nothing to load
    if not hp.init_vae:
      log.warning("tta: no init_vae; the VAE is random and frozen")
      return state
    vae_params = trained.put_like(trained.component(hp.init_vae, "vae"), state.frozen["vae"], "tta.init_vae")
    return state.replace(frozen={**state.frozen, "vae": vae_params})

  return Stage(name="tta", hparams=hp, init=init, loss=loss, load_pretrained=load_pretrained,
               batch_keys=("audio", "audio_mask", "text_emb", "text_mask", "latents", "latents_mask"))
