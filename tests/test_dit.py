"""UDiT structure (DESIGN.md §2): size of DiT-L, masks, init, long-skip order, RoPE, sharding, converter."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax import sharding
from star_jax.convert.dit import from_ezaudio_state_dict, to_ezaudio_state_dict
from star_jax.errors import UserError
from star_jax.models.dit import DiT, DiTConfig, rope, sinusoidal_positions, timestep_embedding

CFG = DiTConfig(latent_channels=6, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2, context_dim=10,
                lora_rank=3, lora_alpha=6.0)
B, L, S = 2, 9, 5


def _inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (B, L, CFG.latent_channels))
  ctx = jax.random.normal(k[1], (B, S, CFG.context_dim))
  t = jnp.array([37.0, 810.0])
  return x, t, ctx


@functools.lru_cache(maxsize=None)
def _init(cfg=CFG):
  x, t, ctx = _inputs()
  return nn.unbox(jax.jit(DiT(cfg).init)(jax.random.key(1), x, t, ctx)["params"])


def _perturbed(params, seed=2, scale=0.2):
  """Every param moved off its init, so zero-initialised paths (gates, cross-attention) are live."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
  return jax.jit(DiT(cfg).apply)


def _apply(params, *args, cfg=CFG, **kw):
  return _jitted(cfg)({"params": params}, *args, **kw)


def ezaudio_param_count(d, depth, heads, ratio, rank, context_dim, channels, in_channels):
  """Parameters of EzAudio's MaskDiT(UDiT) counted from its module list (torch layouts)."""
  hd = d // heads
  attn = 4 * d * d + d + 2 * 2 * hd                        # to_q/k/v (no bias), proj, norm_q/k
  block = 4 * 2 * d + 2 * attn + (d * 2 * ratio * d + 2 * ratio * d) + (ratio * d * d + d) \
      + d * 6 * rank + 6 * rank * 6 * d + 6 * d              # 4 norms, attns, GEGLU, lora_a/b, table
  skip = 2 * 2 * d + 2 * d * d + d
  top = (in_channels * d + d) + (256 * d + d + d * d + d) + (d * 6 * d + 6 * d) + (d * 2 * d + 2 * d) \
      + (context_dim * d + d + d * d + d) + 2 * d + (d * channels + channels) + (3 * channels ** 2 + channels)
  mask_embed = channels if in_channels != channels else 0
  return (depth + 1) * block + depth // 2 * skip + top + mask_embed


def test_paper_l_parameter_count_is_ezaudio_l():
  cfg = DiTConfig()  # DiT-L defaults = configs/star.py:paper
  shapes = jax.eval_shape(lambda: DiT(cfg).init(
      jax.random.key(0), jnp.zeros((1, 4, 128)), jnp.zeros((1,)), jnp.zeros((1, 2, 1024))))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  assert n == ezaudio_param_count(1024, 24, 16, 4, 32, 1024, 128, 128)
  # The released EzAudio-L (257 input channels + mask_embed, folded away at conversion): ≈597M.
  ezaudio_l = ezaudio_param_count(1024, 24, 16, 4, 32, 1024, 128, 257)
  assert ezaudio_l - n == 129 * 1024 + 128 and round(ezaudio_l / 1e6) == 597


def test_config_section_builds_the_model():
  from star_jax.config import load_config
  for variant in ("tiny", "paper"):
    cfg = DiTConfig(**load_config(f"configs/star.py:{variant}").dit.to_dict())
    assert cfg.depth % 2 == 0


def test_init_zero_paths():
  """EzAudio zero-inits time_ada, time_ada_final, lora_b, the (6, D) table and cross-attention's output:
  at init every gate is 0 (full residual), modulation is the identity, and t and context are ignored."""
  p = _init()
  zero = [p["time_ada"], p["time_ada_final"]]
  for name in ["in_blocks_0", "mid_block", "out_blocks_0"]:
    zero += [p[name]["adaln"]["lora_b"], p[name]["adaln"]["scale_shift_table"], p[name]["cross_attn"]["proj"]]
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(zero))
  x, t, ctx = _inputs()
  out = _apply(p, x, t, ctx)
  np.testing.assert_array_equal(_apply(p, x, t[::-1] + 3.0, ctx * 5.0 - 1.0), out)
  # ...and become live once trained (perturbed).
  q = _perturbed(p)
  assert np.abs(_apply(q, x, t[::-1], ctx) - _apply(q, x, t, ctx)).max() > 1e-3
  assert np.abs(_apply(q, x, t, ctx * 2.0) - _apply(q, x, t, ctx)).max() > 1e-3


def test_frames_beyond_the_mask_cannot_change_valid_outputs():
  p = _perturbed(_init())
  x, t, ctx = _inputs()
  valid = np.array([L, 5])
  x_mask = jnp.arange(L)[None] < valid[:, None]
  out = _apply(p, x, t, ctx, x_mask_bl=x_mask)
  garbage = jnp.where(x_mask[..., None], x, 100.0 * jax.random.normal(jax.random.key(9), x.shape))
  out2 = _apply(p, garbage, t, ctx, x_mask_bl=x_mask)
  np.testing.assert_allclose(out2[0], out[0], atol=1e-5)
  np.testing.assert_allclose(out2[1, :5], out[1, :5], atol=1e-5)
  # Truncating the sequence to its valid frames gives the same valid outputs.
  short = _apply(p, x[1:, :5], t[1:], ctx[1:])
  np.testing.assert_allclose(short[0], out[1, :5], atol=1e-5)


def test_context_padding_cannot_change_outputs():
  p = _perturbed(_init())
  x, t, ctx = _inputs()
  ctx_mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  out = _apply(p, x, t, ctx, context_mask_bs=ctx_mask)
  noisy = jnp.where(ctx_mask[..., None], ctx, 50.0)
  np.testing.assert_allclose(_apply(p, x, t, noisy, context_mask_bs=ctx_mask), out, atol=1e-5)
  np.testing.assert_allclose(_apply(p, x[1:], t[1:], ctx[1:, :2])[0], out[1], atol=1e-5)
  assert np.abs(_apply(p, x, t, noisy) - out).max() > 1e-3  # without the mask the padding matters


def test_long_skips_are_last_in_first_out():
  p = _perturbed(_init(dataclasses.replace(CFG, depth=6)))
  x, t, ctx = _inputs()
  outputs, skips = {}, {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    name = context.module.name or ""
    if context.method_name == "__call__" and name.startswith(("in_blocks_", "out_blocks_")):
      outputs[name] = y
      if name.startswith("out_blocks_"):
        skips[name] = args[4]
    return y

  with nn.intercept_methods(record):  # eager, so the recorded values are arrays
    DiT(dataclasses.replace(CFG, depth=6)).apply({"params": p}, x, t, ctx)
  for i in range(3):
    np.testing.assert_array_equal(skips[f"out_blocks_{i}"], outputs[f"in_blocks_{2 - i}"])


def test_rope_is_neox_rotate_half_and_relative():
  x = jax.random.normal(jax.random.key(0), (1, 7, 2, 8))
  y = np.asarray(rope(x))
  np.testing.assert_allclose(y[:, 0], np.asarray(x[:, 0]), atol=1e-6)  # position 0 is the identity
  # Rotate-half pairs dim j with j + hd/2 as one complex number rotated by p·10000^(-2j/hd).
  theta = 10000.0 ** (-np.arange(4) * 2 / 8)
  z = np.asarray(x[..., :4]) + 1j * np.asarray(x[..., 4:])
  rot = z * np.exp(1j * np.arange(7)[None, :, None, None] * theta)
  np.testing.assert_allclose(y, np.concatenate([rot.real, rot.imag], -1), atol=1e-5)
  # q_i·k_j depends only on i − j.
  q = jnp.broadcast_to(x[:, :1], x.shape)
  k = jnp.broadcast_to(x[:, 1:2], x.shape)
  s = np.einsum("blhd,bmhd->hlm", rope(q), rope(k))
  for off in range(-6, 7):
    diag = np.diagonal(s, offset=off, axis1=1, axis2=2)
    np.testing.assert_allclose(diag, diag[:, :1].repeat(diag.shape[1], 1), atol=1e-4)


def test_timestep_embedding_is_cos_then_sin():
  e = np.asarray(timestep_embedding(jnp.array([0.0, 250.0]), 8))
  f = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(e[1], np.concatenate([np.cos(250 * f), np.sin(250 * f)]), atol=1e-5)
  np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_gradients_finite_and_remat_policies_agree():
  p = _perturbed(_init())
  x, t, ctx = _inputs()
  mask = jnp.arange(L)[None] < jnp.array([[L], [4]])

  def loss(params, remat):
    return jnp.mean(_apply(params, x, t, ctx, x_mask_bl=mask, cfg=dataclasses.replace(CFG, remat=remat)) ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_l, ref_g = grad(p, "none")
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(ref_g))
  for remat in ("dots",):
    l, g = grad(p, remat)
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g, ref_g)


def test_bf16_matmul_gradient_takes_bf16_inputs_with_the_cotangent_rounded():
  """layers.mp_matmul in bf16: both gradient matmuls read bf16 operands (the f32 cotangent rounded to bf16, as
  autocast does; JAX's own transpose would run them in f32 at half the rate) and accumulate in f32; f32 compute
  is plain autodiff."""
  from star_jax.models.layers import mp_matmul

  r = np.random.default_rng(0)
  x, k, w = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((3, 5, 8), (8, 16), (3, 5, 16)))
  grads = lambda dt: jax.grad(lambda x, k: (mp_matmul(x, k, dt) * w).sum(), (0, 1))(x, k)
  plain = jax.grad(lambda x, k: (jnp.einsum("abk,kn->abn", x, k) * w).sum(), (0, 1))(x, k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), grads(jnp.float32), plain)

  bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  dx, dk = grads(jnp.bfloat16)
  assert dx.dtype == dk.dtype == jnp.float32
  np.testing.assert_allclose(dx, jnp.einsum("abn,kn->abk", bf(w), bf(k)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dk, jnp.einsum("abk,abn->kn", bf(x), bf(w)), rtol=1e-6, atol=1e-6)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, k: mp_matmul(x, k, jnp.bfloat16).sum(), (0, 1)))(x, k)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_bf16_compute_keeps_f32_params_and_tracks_f32():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  p = _perturbed(_init(cfg), scale=0.05)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  x, t, ctx = _inputs()
  out16, out32 = _apply(p, x, t, ctx, cfg=cfg), _apply(p, x, t, ctx)
  assert out16.dtype == jnp.float32
  assert np.abs(out16 - out32).max() < 0.05 * np.abs(out32).max()


def test_sharded_equals_unsharded(mesh222, rules):
  x, t, ctx = _inputs()
  x, t, ctx = (jnp.concatenate([a, a[::-1]]) for a in (x, t, ctx))  # batch 4 over data x fsdp
  init = lambda k: DiT(CFG).init(k, x, t, ctx)["params"]
  params, shardings = sharding.init_sharded(init, mesh222, rules, jax.random.key(1))
  params = jax.device_put(_perturbed(params), shardings)
  assert any(len(s.spec) and any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
  fwd = lambda p, *a: _apply(p, *a)
  with nn.logical_axis_rules(rules):
    bs = sharding.batch_sharding(mesh222)
    out = jax.jit(fwd)(params, *(jax.device_put(a, bs) for a in (x, t, ctx)))
  ref = jax.jit(fwd)(jax.device_get(params), x, t, ctx)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_converter_folds_maskdit_input_exactly():
  p = _perturbed(_init())
  sd = to_ezaudio_state_dict(p)
  c, d = CFG.latent_channels, CFG.hidden_size
  rng = np.random.default_rng(0)
  w_extra = rng.normal(size=(d, c + 1)).astype(np.float32)
  w257 = np.concatenate([sd["model.patch_embed.proj.weight"][:, :, 0], w_extra], 1)[:, :, None]
  sd["model.patch_embed.proj.weight"] = w257
  sd["model.patch_embed.proj.bias"] = bias = rng.normal(size=d).astype(np.float32)
  sd["mask_embed"] = mask_embed = rng.normal(size=c).astype(np.float32)
  sd["text_encoder.unrelated.weight"] = np.zeros(3, np.float32)  # outside the UDiT: ignored
  cfg, q = from_ezaudio_state_dict(sd)
  assert cfg == dataclasses.replace(CFG, lora_alpha=float(CFG.lora_rank))
  cfg, q = from_ezaudio_state_dict(sd, lora_alpha=CFG.lora_alpha)
  assert cfg == CFG
  # MaskDiT's plain-generation input: [latents, mask_embed on every frame, ones], through the 257-ch conv.
  x, t, ctx = _inputs()
  x_np = np.asarray(x)
  x257 = np.concatenate([x_np, np.broadcast_to(mask_embed, x_np.shape), np.ones((B, L, 1), np.float32)], -1)
  emb257 = x257 @ w257[:, :, 0].T + bias
  np.testing.assert_allclose(x_np @ q["patch_embed"]["kernel"] + q["patch_embed"]["bias"], emb257,
                             rtol=1e-5, atol=1e-5)
  # Every other parameter round-trips exactly, so the whole model matches MaskDiT's computation.
  rest = lambda tree: {k: v for k, v in tree.items() if k != "patch_embed"}
  jax.tree.map(np.testing.assert_array_equal, rest(q), rest(jax.tree.map(np.asarray, p)))


def test_converter_reads_star_backbone_names_and_rejects_unknown():
  p = _perturbed(_init())
  sd = to_ezaudio_state_dict(p, prefix="backbone.")
  cfg, q = from_ezaudio_state_dict(sd, lora_alpha=CFG.lora_alpha)
  x, t, ctx = _inputs()
  np.testing.assert_allclose(_apply(q, x, t, ctx), _apply(p, x, t, ctx), atol=1e-6)
  sd["backbone.in_blocks.0.attn.to_q.bias"] = np.zeros(CFG.hidden_size, np.float32)
  with pytest.raises(UserError, match="unrecognised"):
    from_ezaudio_state_dict(sd)


def test_convert_cli_writes_a_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  from star_jax import cli
  from star_jax.checkpoint import load_params

  p = _perturbed(_init())
  sd = {k: torch.from_numpy(np.array(v)) for k, v in to_ezaudio_state_dict(p).items()}
  torch.save(sd, tmp_path / "ezaudio.pt")
  assert cli.main(["convert", "dit", "--from", str(tmp_path / "ezaudio.pt"), "--out", str(tmp_path / "ckpt"),
                   "--lora-alpha", str(CFG.lora_alpha), "--dtype", "float32", "--remat", "none"]) == 0
  params, meta = load_params(str(tmp_path / "ckpt"))
  assert meta["kind"] == "dit" and DiTConfig(**meta["config"]) == CFG
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, p))


def test_pytorch_reference_of_the_bench_computes_the_same_function():
  # bench/generation.py times bench/torch_udit.py as its PyTorch reference: it must be the same network.
  torch = pytest.importorskip("torch")
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from bench.torch_udit import UDiT, load_from_jax

  cfg = dataclasses.replace(CFG, depth=4)
  x, t, ctx = _inputs()
  params = _perturbed(nn.unbox(jax.jit(DiT(cfg).init)(jax.random.key(1), x, t, ctx)["params"]))
  ours = np.asarray(_apply(params, x, t, ctx, cfg=cfg))
  model = load_from_jax(UDiT(**dataclasses.asdict(cfg)).eval(), jax.device_get(params))
  with torch.inference_mode():
    ref = model(*(torch.from_numpy(np.asarray(a)) for a in (x, t, ctx))).numpy()
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_real_ezaudio_state_dict_with_its_buffers_converts_to_the_same_function(tmp_path):
  """EzAudio's MaskDiT (bench/torch_udit.py, EzAudio's module names) saved as its released `.pt` files are,
  {"model": state_dict()} with the 257-channel input, `mask_embed` and the rotary `inv_freq` buffers: the
  converter checks and drops the buffers, folds the input, and computes what the PyTorch model computes."""
  torch = pytest.importorskip("torch")
  from bench.torch_udit import MaskDiT
  from star_jax.convert.torch_io import load_state_dict

  torch.manual_seed(0)
  cfg = dataclasses.replace(CFG, depth=4, lora_alpha=float(CFG.lora_rank))
  model = MaskDiT(**dataclasses.asdict(cfg)).eval()
  with torch.no_grad():
    for q in model.parameters():
      q.add_(0.2 * torch.randn_like(q))
  sd = model.state_dict()
  assert sum(k.endswith("attn.rotary.inv_freq") for k in sd) == cfg.depth + 1
  torch.save({"model": sd}, tmp_path / "ezaudio.pt")
  got_cfg, params = from_ezaudio_state_dict(load_state_dict(str(tmp_path / "ezaudio.pt")))
  assert got_cfg == cfg
  x, t, ctx = _inputs()
  with torch.inference_mode():
    ref = model(*(torch.from_numpy(np.asarray(a)) for a in (x, t, ctx))).numpy()
  ours = np.asarray(_apply(params, x, t, ctx, cfg=cfg))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * np.abs(ref).max())

  numpy_sd = {k: v.numpy() for k, v in sd.items()}
  bad = dict(numpy_sd, **{"model.mid_block.attn.rotary.inv_freq": 2 * numpy_sd["model.mid_block.attn.rotary.inv_freq"]})
  with pytest.raises(UserError, match=r"'model\.mid_block\.attn\.rotary\.inv_freq'"):
    from_ezaudio_state_dict(bad)
  unknown = dict(numpy_sd, **{"model.mid_block.attn.rotary.scale": np.ones(2, np.float32)})
  with pytest.raises(UserError, match=r"unrecognised.*model\.mid_block\.attn\.rotary\.scale"):
    from_ezaudio_state_dict(unknown)


def test_pooled_context_is_ezaudio_cls_embed_of_the_masked_context_mean():
  """pooled_context: cls_embed(masked mean of the context) joins the time embedding before its SiLU. It starts
  at zero (the same outputs as without it), padding tokens cannot move it, and the converter maps
  EzAudio's `cls_embed.{0,2}` to it."""
  cfg = dataclasses.replace(CFG, pooled_context=True)
  x, t, ctx = _inputs()
  p = nn.unbox(jax.jit(DiT(cfg).init)(jax.random.key(1), x, t, ctx)["params"])
  assert not np.any(np.asarray(p["cls_embed_2"]["kernel"]))
  plain = {k: v for k, v in p.items() if not k.startswith("cls_embed")}
  np.testing.assert_array_equal(_apply(p, x, t, ctx, cfg=cfg), _apply(plain, x, t, ctx))
  q = _perturbed(p)
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  out = _apply(q, x, t, ctx, context_mask_bs=mask, cfg=cfg)
  np.testing.assert_allclose(_apply(q, x, t, jnp.where(mask[..., None], ctx, 50.0), context_mask_bs=mask, cfg=cfg),
                             out, atol=1e-5)
  # The pooled path alone carries the condition: with cross-attention silenced, the context still matters.
  silent = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 0 if "cross_attn" in jax.tree_util.keystr(path) and "proj" in jax.tree_util.keystr(path)
      else v, q)
  assert np.abs(_apply(silent, x, t, ctx * 2.0, cfg=cfg) - _apply(silent, x, t, ctx, cfg=cfg)).max() > 1e-3
  # ...through the mean only: other tokens with the same mean give the same output.
  same_mean = ctx + jnp.array([1.0, -1.0, 2.0, -2.0, 0.0])[None, :, None]
  np.testing.assert_allclose(_apply(silent, x, t, same_mean, cfg=cfg), _apply(silent, x, t, ctx, cfg=cfg), atol=1e-5)
  sd = to_ezaudio_state_dict({k: v for k, v in q.items() if not k.startswith("cls_embed")})
  for ours, theirs in (("cls_embed_1", "cls_embed.0"), ("cls_embed_2", "cls_embed.2")):
    sd[f"model.{theirs}.weight"] = np.asarray(q[ours]["kernel"]).T
    sd[f"model.{theirs}.bias"] = np.asarray(q[ours]["bias"])
  got_cfg, got = from_ezaudio_state_dict(sd, lora_alpha=CFG.lora_alpha)
  assert got_cfg == cfg
  np.testing.assert_allclose(_apply(got, x, t, ctx, cfg=got_cfg), _apply(q, x, t, ctx, cfg=cfg), atol=1e-5)


def test_patch_size_groups_frames_into_tokens_around_a_frame_rate_final_conv():
  """patch_size p: the UDiT core runs on tokens of p frames (the same network as a p = 1 UDiT on p·C channels
  with the frames regrouped), the final Linear's p·C outputs go back to frames, and the final conv runs at the
  frame rate. Lengths need not divide by p, and masked frames cannot reach valid ones."""
  p2 = dataclasses.replace(CFG, patch_size=2)
  core = dataclasses.replace(CFG, latent_channels=2 * CFG.latent_channels)
  x, t, ctx = _inputs()
  x = x[:, :8]
  q = _perturbed(nn.unbox(jax.jit(DiT(p2).init)(jax.random.key(1), x, t, ctx)["params"]))
  c = CFG.latent_channels
  identity = np.zeros((3, 2 * c, 2 * c), np.float32)
  identity[1] = np.eye(2 * c)
  q_core = {**q, "final_conv": {"kernel": jnp.asarray(identity), "bias": jnp.zeros(2 * c)}}
  tokens = _apply(q_core, x.reshape(B, 4, 2 * c), t, ctx, cfg=core).reshape(B, 8, c)
  want = jax.lax.conv_general_dilated(tokens, q["final_conv"]["kernel"], (1,), [(1, 1)],
                                      dimension_numbers=("NWC", "WIO", "NWC")) + q["final_conv"]["bias"]
  np.testing.assert_allclose(_apply(q, x, t, ctx, cfg=p2), want, atol=1e-5)

  x9, _, _ = _inputs()  # L = 9: the last token is half padding
  out = _apply(q, x9, t, ctx, cfg=p2)
  assert out.shape == x9.shape
  x_mask = jnp.arange(L)[None] < jnp.array([L, 5])[:, None]  # the second clip ends inside token 2
  out = _apply(q, x9, t, ctx, x_mask_bl=x_mask, cfg=p2)
  garbage = jnp.where(x_mask[..., None], x9, 100.0)
  out2 = _apply(q, garbage, t, ctx, x_mask_bl=x_mask, cfg=p2)
  np.testing.assert_allclose(out2[0], out[0], atol=1e-5)
  np.testing.assert_allclose(out2[1, :5], out[1, :5], atol=1e-5)
  with pytest.raises(ValueError, match="patch_size"):
    DiTConfig(patch_size=0)


def test_converter_rejects_patch_size_above_one():
  sd = to_ezaudio_state_dict(_perturbed(_init()))
  w = sd["model.patch_embed.proj.weight"]
  sd["model.patch_embed.proj.weight"] = np.concatenate([w, w], axis=2)
  with pytest.raises(UserError, match="patch_size"):
    from_ezaudio_state_dict(sd, lora_alpha=CFG.lora_alpha)


def test_sinusoidal_abs_pe_lets_a_constant_input_vary_over_time():
  """abs_pe "sinusoidal" (EzAudio's PE_wrapper "sinu"): sin(p·w_i) on even and cos(p·w_i) on odd channels,
  w_i = 10000^(-2i/D), added after the patch embedding. RoPE alone sees only offsets: the same input at every
  frame gives the same output at every frame the final conv's padding cannot reach; with the table it varies."""
  table = np.asarray(sinusoidal_positions(7, 6))
  pos, i = np.arange(7)[:, None], np.arange(3)[None]
  w = 10000.0 ** (-2 * i / 6)
  np.testing.assert_allclose(table[:, 0::2], np.sin(pos * w), atol=1e-6)
  np.testing.assert_allclose(table[:, 1::2], np.cos(pos * w), atol=1e-6)

  x, t, ctx = _inputs()
  constant = jnp.broadcast_to(x[:, :1], x.shape)
  p = _perturbed(_init())
  inner = np.asarray(_apply(p, constant, t, ctx))[:, 1:-1]
  np.testing.assert_allclose(inner, np.broadcast_to(inner[:, :1], inner.shape), atol=1e-5)
  cfg = dataclasses.replace(CFG, abs_pe="sinusoidal")
  inner = np.asarray(_apply(p, constant, t, ctx, cfg=cfg))[:, 1:-1]  # no new params: the same tree applies
  assert np.abs(inner - inner[:, :1]).max() > 1e-2
  with pytest.raises(ValueError, match="abs_pe"):
    DiTConfig(abs_pe="learned")


def test_context_slots_give_each_context_token_its_own_linear_map():
  """dit.context_slots (not in EzAudio): token s of the context goes through its own (Dc, Dc) matrix before the
  context MLP; the rest of the DiT is unchanged, so it equals the plain DiT on the mapped context."""
  x, t, ctx = _inputs()
  cfg = dataclasses.replace(CFG, context_slots=S)
  p = _perturbed(_init(cfg))
  assert p["context_slot_proj"].shape == (S, CFG.context_dim, CFG.context_dim)
  mapped = jnp.einsum("bsd,sde->bse", ctx, p["context_slot_proj"])
  base = {k: v for k, v in p.items() if k != "context_slot_proj"}
  np.testing.assert_allclose(_apply(p, x, t, ctx, cfg=cfg), _apply(base, x, t, mapped), atol=1e-5)
  # Identical tokens reach cross-attention as distinct ones, so the output differs from the plain DiT on them.
  same = jnp.broadcast_to(ctx[:, :1], ctx.shape)
  assert np.abs(np.asarray(_apply(p, x, t, same, cfg=cfg) - _apply(base, x, t, same))).max() > 1e-3
  with pytest.raises(ValueError, match="context_slots"):
    _apply(p, x, t, ctx[:, :3], cfg=cfg)


@pytest.mark.parametrize("extra", [{}, {"patch_size": 3, "mean_flow": True, "context_slots": S,
                                        "pooled_context": True}])
def test_kernels_cast_to_the_compute_dtype_once_give_identical_outputs(extra):
  """The Generator holds a bf16 DiT's kernels in bf16 (layers.cast_kernels): bit-identical outputs, half the
  weight bytes, and no per-call conversion."""
  from star_jax.models.layers import cast_kernels

  cfg = dataclasses.replace(CFG, dtype="bfloat16", **extra)
  x, t, ctx = _inputs()
  kw = {"r_b": t * 0.5} if cfg.mean_flow else {}
  params = _perturbed(nn.unbox(jax.jit(functools.partial(DiT(cfg).init, **kw))(jax.random.key(1), x, t, ctx)["params"]))
  cast = cast_kernels(params, cfg.dtype)
  kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(cast) if path[-1].key == "kernel"]
  assert kernels and all(k.dtype == jnp.bfloat16 for k in kernels)
  assert all(x.dtype == jnp.float32 for path, x in jax.tree_util.tree_leaves_with_path(cast) if path[-1].key != "kernel")
  apply = jax.jit(lambda p: DiT(cfg).apply({"params": p}, x, t, ctx, **kw))
  np.testing.assert_array_equal(np.asarray(apply(cast)), np.asarray(apply(params)))
  assert cast_kernels(params, "float32") is params
