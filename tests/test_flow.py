"""Flow matching (DESIGN.md §2): sway grid, Euler + CFG sampler, loss; a tiny DiT end to end."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax import flow
from star_jax.models.dit import DiTConfig, velocity_fn

X0 = jax.random.normal(jax.random.key(0), (2, 7, 3))


def oracle(variables, x_bld, t_b, context_bsd, context_mask_bs, x_mask_bl):
  """The exact velocity towards `variables['x0']`: (x − x0)/σ with σ = t/1000 (x = (1−σ)x0 + σε)."""
  sigma = (t_b / 1000.0)[:, None, None]
  x0 = jnp.concatenate([variables["x0"]] * (x_bld.shape[0] // variables["x0"].shape[0]))
  return (x_bld - x0) / sigma


def conditioned(variables, x_bld, t_b, context_bsd, context_mask_bs, x_mask_bl):
  """A velocity that depends on x, t and the context, to tell conditional from guided passes apart."""
  return jnp.tanh(x_bld * variables["w"] + t_b[:, None, None] / 1000.0) + context_bsd.mean(1, keepdims=True)


@pytest.mark.parametrize("n", [1, 4, 20])
def test_sway_grid(n):
  sig = np.asarray(flow.sway_sigmas(n, -1.0))
  np.testing.assert_allclose(sig, np.cos(np.pi * np.arange(n + 1) / (2 * n)), atol=1e-6)
  lin = np.asarray(flow.sway_sigmas(n, 0.0))
  np.testing.assert_allclose(lin, 1 - np.arange(n + 1) / n, atol=1e-6)
  assert sig[0] == 1.0 and abs(sig[-1]) < 1e-6


@pytest.mark.parametrize("n,coef", [(1, -1.0), (3, 0.0), (20, -1.0), (8, 0.7)])
def test_euler_with_exact_velocity_lands_on_x0(n, coef):
  noise = jax.random.normal(jax.random.key(1), X0.shape)
  ctx = jnp.zeros((2, 1, 4))
  out = flow.sample(oracle, {"x0": X0}, noise, ctx, num_steps=n, sway_coef=coef)
  np.testing.assert_allclose(out, X0, atol=1e-5)
  guided = flow.sample(oracle, {"x0": X0}, noise, ctx, num_steps=n, cfg_scale=5.0, sway_coef=coef)
  np.testing.assert_allclose(guided, X0, atol=1e-5)


def test_cfg_one_equals_conditional_and_guidance_extrapolates():
  noise = jax.random.normal(jax.random.key(2), X0.shape)
  ctx = jax.random.normal(jax.random.key(3), (2, 3, 3))
  var = {"w": jnp.float32(0.7)}
  cond = flow.sample(conditioned, var, noise, ctx, num_steps=6)
  np.testing.assert_allclose(flow.sample(conditioned, var, noise, ctx, num_steps=6, cfg_scale=1.0), cond,
                             atol=1e-6)
  uncond = flow.sample(conditioned, var, noise, jnp.zeros_like(ctx), num_steps=6)
  # One step, where everything is linear: x1 = x + dσ·(v_u + w (v_c − v_u)).
  one = lambda **kw: flow.sample(conditioned, var, noise, ctx, num_steps=1, **kw)
  v_c = (one() - noise) / -1.0
  v_u = (flow.sample(conditioned, var, noise, jnp.zeros_like(ctx), num_steps=1) - noise) / -1.0
  np.testing.assert_allclose((one(cfg_scale=3.0) - noise) / -1.0, v_u + 3.0 * (v_c - v_u), atol=1e-5)
  assert np.abs(cond - uncond).max() > 1e-2


def test_sampling_compiles_once_per_shape():
  traced = chex.assert_max_traces(conditioned, n=2)  # one unguided, one guided program
  ctx = jnp.ones((2, 3, 3))
  for seed, w in [(0, 2.0), (1, 5.0), (2, 1.5)]:
    noise = jax.random.normal(jax.random.key(seed), X0.shape)
    flow.sample(traced, {"w": jnp.float32(seed)}, noise, ctx, num_steps=4, cfg_scale=w, sway_coef=-w / 5)
    flow.sample(traced, {"w": jnp.float32(seed)}, noise, ctx, num_steps=4)


def test_loss_is_zero_for_the_exact_velocity_and_ignores_padding():
  rng = jax.random.key(4)
  ctx = jnp.ones((2, 3, 4))
  loss = flow.flow_matching_loss(oracle, {"x0": X0}, X0, ctx, rng)
  assert float(loss) < 1e-8
  mask = jnp.arange(7)[None] < jnp.array([[7], [3]])
  padded = jnp.where(mask[..., None], X0, 1e3)
  off = lambda v, x, t, c, cm, xm: oracle({"x0": padded}, x, t, c, cm, xm) + 1.0 + 1e3 * ~xm[..., None]
  assert abs(float(flow.flow_matching_loss(off, None, padded, ctx, rng, x_mask_bl=mask)) - 1.0) < 1e-4


def test_condition_dropout_replaces_context_with_zeros():
  seen = []
  spy = lambda v, x, t, c, cm, xm: (jax.debug.callback(lambda a: seen.append(np.asarray(a)), c), x)[1]
  ctx = jnp.ones((64, 2, 3))
  x0 = jnp.zeros((64, 4, 3))
  flow.flow_matching_loss(spy, None, x0, ctx, jax.random.key(5), cond_drop_prob=0.0)
  flow.flow_matching_loss(spy, None, x0, ctx, jax.random.key(5), cond_drop_prob=0.5)
  flow.flow_matching_loss(spy, None, x0, ctx, jax.random.key(5), cond_drop_prob=1.0)
  kept = [(s != 0).all(axis=(1, 2)).mean() for s in seen]
  assert kept[0] == 1.0 and 0.25 < kept[1] < 0.75 and kept[2] == 0.0
  assert all(((s == 0) | (s == 1)).all() for s in seen)


@pytest.mark.slow
def test_tiny_dit_trains_and_samples():
  cfg = DiTConfig(latent_channels=4, hidden_size=32, depth=2, num_heads=2, context_dim=6, lora_rank=2,
                  lora_alpha=2.0)
  fn = velocity_fn(cfg)
  x0 = jax.random.normal(jax.random.key(6), (2, 8, 4))
  ctx = jax.random.normal(jax.random.key(7), (2, 3, 6))
  params = jax.jit(fn.__self__.init)(jax.random.key(8), x0, jnp.ones((2,)), ctx)
  grad = jax.jit(jax.grad(lambda p: flow.flow_matching_loss(fn, p, x0, ctx, jax.random.key(9),
                                                            cond_drop_prob=0.2)))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))
  out = flow.sample(fn, params, x0, ctx, num_steps=3, cfg_scale=5.0)
  assert out.shape == x0.shape and np.isfinite(np.asarray(out)).all()


def test_sigma_mean_shifts_the_logit_normal_noise_levels():
  seen = []
  spy = lambda v, x, t, c, cm, xm: (jax.debug.callback(lambda a: seen.append(np.asarray(a)), t), x)[1]
  x0, ctx = jnp.zeros((4096, 2, 1)), jnp.ones((4096, 1, 1))
  for mean in (0.0, 1.0):
    flow.flow_matching_loss(spy, None, x0, ctx, jax.random.key(6), sigma_mean=mean)
  logits = [np.log(s / 1000.0) - np.log1p(-s / 1000.0) for s in seen]
  assert abs(logits[0].mean()) < 0.05 and abs(logits[1].mean() - 1.0) < 0.05
  assert all(abs(lg.std() - 1.0) < 0.05 for lg in logits)
