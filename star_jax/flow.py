"""Rectified-flow training loss, the sway sampling grid and the Euler + CFG sampler; MeanFlow's loss and
few-step sampler (DESIGN.md §2, Flow matching and Few-step generation).

A velocity function has the signature of `DiT(cfg).apply`:
  velocity_fn(variables, x_bld, t_b, context_bsd, context_mask_bs, x_mask_bl) -> v_bld,  t = 1000·σ;
a mean-flow one also takes `r_b=` (the interval's start, same scale) and returns the average velocity.
Noise level σ runs from 1 (pure noise) to 0 (data): x_σ = (1 − σ)·x0 + σ·ε, velocity ε − x0.
A sampler's `prepare_context(variables, context_bsd, context_mask_bs)` (optional) runs once per sample, before
the steps, and its result reaches the velocity function in the context's place (the DiT: cross-attention K/V).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[..., jax.Array]
T_SCALE = 1000.0  # the DiT's time input is 1000·σ


def masked_mse(pred_bld: jax.Array, target_bld: jax.Array, x_mask_bl: jax.Array | None) -> jax.Array:
  """Mean squared error over valid frames and all channels -> scalar f32."""
  sq = jnp.square(pred_bld.astype(jnp.float32) - target_bld.astype(jnp.float32))
  if x_mask_bl is None:
    return sq.mean()
  m = x_mask_bl.astype(jnp.float32)[..., None]
  return (sq * m).sum() / jnp.maximum(m.sum() * sq.shape[-1], 1.0)


def flow_matching_loss(velocity_fn: VelocityFn, variables: Any, x0_bld: jax.Array, context_bsd: jax.Array,
                       rng: jax.Array, context_mask_bs: jax.Array | None = None,
                       x_mask_bl: jax.Array | None = None, cond_drop_prob: float = 0.0,
                       sigma_mean: float = 0.0) -> jax.Array:
  """Flow-matching loss of one batch: σ ~ logit-normal(sigma_mean, 1) (the paper: mean 0; a positive mean
  trains more at high noise, where the condition decides), target ε − x0, condition replaced by zeros with
  probability `cond_drop_prob` per example (classifier-free guidance training) -> scalar."""
  k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
  b = x0_bld.shape[0]
  x0 = x0_bld.astype(jnp.float32)
  sigma_b = jax.nn.sigmoid(sigma_mean + jax.random.normal(k_sigma, (b,)))
  eps = jax.random.normal(k_noise, x0.shape)
  s = sigma_b[:, None, None]
  x_sigma = (1.0 - s) * x0 + s * eps
  drop_b = jax.random.bernoulli(k_drop, cond_drop_prob, (b,))
  context_bsd = jnp.where(drop_b[:, None, None], 0.0, context_bsd).astype(context_bsd.dtype)
  v = velocity_fn(variables, x_sigma, T_SCALE * sigma_b, context_bsd, context_mask_bs, x_mask_bl)
  return masked_mse(v, eps - x0, x_mask_bl)


def sway_sigmas(num_steps: int, coef: float = -1.0) -> jax.Array:
  """Sway grid (F5-TTS): u = linspace(0, 1, N+1), t = u + s·(cos(πu/2) − 1 + u), σ = 1 − t -> (N+1,)
  from 1 to 0; s = −1 gives σ_i = cos(πi / 2N)."""
  u = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32)
  return 1.0 - (u + coef * (jnp.cos(jnp.pi / 2 * u) - 1.0 + u))


def sample(velocity_fn: VelocityFn, variables: Any, noise_bld: jax.Array, context_bsd: jax.Array,
           context_mask_bs: jax.Array | None = None, x_mask_bl: jax.Array | None = None, *,
           num_steps: int, cfg_scale: float | None = None, sway_coef: float = -1.0,
           prepare_context: Callable | None = None) -> jax.Array:
  """Euler from σ = 1 (`noise_bld`) to σ = 0 on the sway grid -> latents (B, L, C) f32.

  With `cfg_scale` w, v = v_u + w·(v_c − v_u); the unconditional pass (zero context) and the
  conditional one run as one batched call of 2B. The whole loop is one jit, compiled once per
  (velocity_fn, shapes, num_steps, guided or not); w, sway_coef and variables are traced.
  """
  return _sample(velocity_fn, prepare_context, num_steps, cfg_scale is not None, variables, noise_bld,
                 context_bsd, context_mask_bs, x_mask_bl, jnp.float32(1.0 if cfg_scale is None else cfg_scale),
                 jnp.float32(sway_coef))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sample(velocity_fn, prepare_context, num_steps, guided, variables, noise_bld, context_bsd, context_mask_bs,
            x_mask_bl, cfg_scale, sway_coef):
  sigmas = sway_sigmas(num_steps, sway_coef)
  b = noise_bld.shape[0]
  if guided:
    context = jnp.concatenate([context_bsd, jnp.zeros_like(context_bsd)], axis=0)
    # Zero context tokens are all equal, so any non-empty key mask gives the same unconditional pass.
    ctx_mask = None if context_mask_bs is None else jnp.concatenate(
        [context_mask_bs, jnp.ones_like(context_mask_bs)], axis=0)
    x_mask = None if x_mask_bl is None else jnp.concatenate([x_mask_bl, x_mask_bl], axis=0)
  else:
    context, ctx_mask, x_mask = context_bsd, context_mask_bs, x_mask_bl
  if prepare_context is not None:
    context = prepare_context(variables, context, ctx_mask)

  def velocity(x, sigma):
    if not guided:
      return velocity_fn(variables, x, jnp.full((b,), T_SCALE * sigma), context, ctx_mask, x_mask)
    v = velocity_fn(variables, jnp.concatenate([x, x], axis=0), jnp.full((2 * b,), T_SCALE * sigma),
                    context, ctx_mask, x_mask)
    v_c, v_u = v[:b], v[b:]
    return v_u + cfg_scale * (v_c - v_u)

  def step(i, x):
    return x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i]).astype(jnp.float32)

  return jax.lax.fori_loop(0, num_steps, step, noise_bld.astype(jnp.float32))


def mean_flow_loss(u_fn: VelocityFn, variables: Any, x0_bld: jax.Array, context_bsd: jax.Array, rng: jax.Array,
                   context_mask_bs: jax.Array | None = None, x_mask_bl: jax.Array | None = None, *,
                   cond_drop_prob: float = 0.0, sigma_mean: float = 0.0, interval_prob: float = 0.25,
                   cfg_scale: float | None = None, adaptive_p: float = 0.0, adaptive_c: float = 1e-3
                   ) -> tuple[jax.Array, jax.Array]:
  """MeanFlow loss of one batch -> (loss, plain MSE), both scalars.

  t and r: two logit-normal(sigma_mean, 1) draws, t the larger; r = t (flow matching) except with probability
  `interval_prob`. Target u_tgt = v − (t − r)·du/dt, du/dt from one `jax.jvp` of u_fn at (z_t, r, t) along
  (v, 0, 1), under stop-gradient. With `cfg_scale` w, v is the guided field w·v + (1 − w)·u(z_t, t, t | ∅)
  for the examples whose condition was kept (dropped ones keep v). `adaptive_p` > 0 weights each example by
  1 / (its MSE + adaptive_c)^p under stop-gradient (MeanFlow's adaptive loss weighting).
  """
  k_t, k_r, k_pair, k_noise, k_drop = jax.random.split(rng, 5)
  b = x0_bld.shape[0]
  x0 = x0_bld.astype(jnp.float32)
  s_a = jax.nn.sigmoid(sigma_mean + jax.random.normal(k_t, (b,)))
  s_b = jax.nn.sigmoid(sigma_mean + jax.random.normal(k_r, (b,)))
  t_b = jnp.maximum(s_a, s_b)
  r_b = jnp.where(jax.random.bernoulli(k_pair, interval_prob, (b,)), jnp.minimum(s_a, s_b), t_b)
  eps = jax.random.normal(k_noise, x0.shape)
  z = (1.0 - t_b)[:, None, None] * x0 + t_b[:, None, None] * eps
  v = eps - x0
  drop_b = jax.random.bernoulli(k_drop, cond_drop_prob, (b,))
  context_bsd = jnp.where(drop_b[:, None, None], 0.0, context_bsd).astype(context_bsd.dtype)
  if cfg_scale is not None:
    u_uncond = u_fn(variables, z, T_SCALE * t_b, jnp.zeros_like(context_bsd), context_mask_bs, x_mask_bl,
                    r_b=T_SCALE * t_b)
    guided = cfg_scale * v + (1.0 - cfg_scale) * jax.lax.stop_gradient(u_uncond).astype(jnp.float32)
    v = jnp.where(drop_b[:, None, None], v, guided)

  def u_of(z_bld, r, t):
    return u_fn(variables, z_bld, T_SCALE * t, context_bsd, context_mask_bs, x_mask_bl, r_b=T_SCALE * r)

  u, dudt = jax.jvp(u_of, (z, r_b, t_b), (v, jnp.zeros_like(r_b), jnp.ones_like(t_b)))
  target = jax.lax.stop_gradient(v - (t_b - r_b)[:, None, None] * dudt.astype(jnp.float32))
  sq = jnp.square(u.astype(jnp.float32) - target).mean(-1)
  m = jnp.ones(sq.shape) if x_mask_bl is None else x_mask_bl.astype(jnp.float32)
  mse_b = (sq * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
  weight_b = jax.lax.stop_gradient(1.0 / (mse_b + adaptive_c) ** adaptive_p) if adaptive_p else 1.0
  return (weight_b * mse_b).mean(), mse_b.mean()


def mean_flow_sample(u_fn: VelocityFn, variables: Any, noise_bld: jax.Array, context_bsd: jax.Array,
                     context_mask_bs: jax.Array | None = None, x_mask_bl: jax.Array | None = None, *,
                     num_steps: int, sway_coef: float = 0.0, prepare_context: Callable | None = None) -> jax.Array:
  """Mean-flow sampler from σ = 1 to 0 on the sway grid (default uniform): z_r = z_t − (t − r)·u(z_t, r, t)
  -> latents (B, L, C) f32; one pass per step, guidance folded in by training. One jit per (u_fn, shapes,
  num_steps)."""
  return _mean_flow_sample(u_fn, prepare_context, num_steps, variables, noise_bld, context_bsd, context_mask_bs,
                           x_mask_bl, jnp.float32(sway_coef))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _mean_flow_sample(u_fn, prepare_context, num_steps, variables, noise_bld, context_bsd, context_mask_bs,
                      x_mask_bl, sway_coef):
  sigmas = sway_sigmas(num_steps, sway_coef)
  b = noise_bld.shape[0]
  context = context_bsd if prepare_context is None else prepare_context(variables, context_bsd, context_mask_bs)

  def step(i, x):
    t, r = sigmas[i], sigmas[i + 1]
    u = u_fn(variables, x, jnp.full((b,), T_SCALE * t), context, context_mask_bs, x_mask_bl,
             r_b=jnp.full((b,), T_SCALE * r))
    return x - (t - r) * u.astype(jnp.float32)

  return jax.lax.fori_loop(0, num_steps, step, noise_bld.astype(jnp.float32))
