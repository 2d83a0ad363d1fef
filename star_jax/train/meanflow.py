"""MeanFlow fine-tuning: a stage-2 DiT learns the average velocity u(z_t, r, t), with classifier-free guidance
folded into its target, so 1-4 steps of one pass each generate (DESIGN.md §2, Few-step generation; docs/meanflow.md).

  star-jax train --config configs/star.py:tiny --stage meanflow --workdir outputs/tiny/meanflow \\
      --set meanflow.init_stage2=outputs/tiny/stage2

Starts from a stage-2 workdir (every component); trains the DiT only, which gains the zero-initialised interval
embedding of t - r, so step 0 is the stage-2 flow model. HuBERT, the whole bridge and the VAE are frozen.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from star_jax import flow, trained
from star_jax.errors import UserError
from star_jax.models import build as build_lib
from star_jax.train import state as state_lib
from star_jax.train.stage import Stage

log = logging.getLogger("star_jax.train")


def dit_config(cfg):
  """The stage-2 DiT's config with the mean-flow time input r."""
  return dataclasses.replace(build_lib.dit_config(cfg), mean_flow=True)


def loss_options(cfg) -> dict:
  """`flow.mean_flow_loss` options from the `meanflow` and `flow` sections (guidance w: meanflow.cfg_scale,
  0 for none)."""
  hp = cfg.meanflow
  w = float(hp.cfg_scale)
  return dict(cond_drop_prob=float(cfg.flow.cond_drop_prob), sigma_mean=float(cfg.flow.get("sigma_mean", 0.0)),
              interval_prob=float(hp.interval_prob), cfg_scale=w if w else None,
              adaptive_p=float(hp.adaptive_p), adaptive_c=float(hp.adaptive_c))


def build(cfg, data=None) -> Stage:
  from star_jax.models.dit import DiT

  hp = cfg.meanflow
  hubert, bridge = build_lib.hubert(cfg), build_lib.bridge(cfg)
  dit = DiT(dit_config(cfg))
  options = loss_options(cfg)

  def init(rng):
    r_hub, r_bridge, r_dit, r_vae = jax.random.split(rng, 4)
    q, width = build_lib.bridge_tokens(cfg)
    latents = jnp.zeros((1, 4, cfg.vae.latent_channels))
    return {
        "params": {"dit": dit.init(r_dit, latents, jnp.zeros((1,)), jnp.zeros((1, q, width)))["params"]},
        "frozen": {"hubert": hubert.init(r_hub, jnp.zeros((1, 4000)))["params"],
                   "bridge": build_lib.init_bridge(cfg, bridge, r_bridge),
                   **build_lib.init_vae(cfg, r_vae)},
    }

  def loss(params, frozen, batch, rng):
    r_latents, r_flow = jax.random.split(rng)
    tokens = jax.lax.stop_gradient(build_lib.speech_tokens(cfg, frozen, batch, modules=(hubert, bridge)))
    x0, x_mask = build_lib.audio_latents(cfg, frozen.get("vae"), batch, r_latents)
    if not hp.get("mask_padding", True):  # as stage 2: short clips' silence is generated too
      x_mask = None
    value, mse = flow.mean_flow_loss(dit.apply, {"params": params["dit"]}, x0, tokens, r_flow, x_mask_bl=x_mask,
                                     **options)
    return value, {"mean_flow_mse": mse}

  def load_pretrained(state):
    if not hp.init_stage2:
      raise UserError("meanflow: set meanflow.init_stage2 to the stage-2 workdir it fine-tunes")
    parts, _ = trained.load_trained(hp.init_stage2)
    missing = [n for n in ("dit", *state.frozen) if n not in parts]
    if missing:
      raise UserError(f"meanflow.init_stage2 '{hp.init_stage2}' lacks {missing}; give a stage-2 workdir")
    params, frozen = dict(state.params), dict(state.frozen)
    fresh = state.params["dit"]
    if "interval_embed_1" in parts["dit"]:  # a mean-flow DiT already: continue from it
      dit_params = parts["dit"]
    else:
      dit_params = {**parts["dit"], **{k: v for k, v in fresh.items() if k.startswith("interval_embed")}}
    params["dit"] = trained.put_like(dit_params, fresh, "meanflow.init_stage2 (DiT)")
    for name in state.frozen:
      frozen[name] = trained.put_like(parts[name], frozen[name], f"meanflow.init_stage2 ({name})")
    return state_lib.with_pretrained(state, params, frozen)

  return Stage(name="meanflow", hparams=hp, init=init, loss=loss, load_pretrained=load_pretrained,
               batch_keys=("speech", "speech_mask", "audio", "audio_mask", "hubert", "hubert_mask",
                           "latents", "latents_mask"))
