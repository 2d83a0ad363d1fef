"""EzAudio's UDiT with AdaLN-SOLA: the flow-matching velocity network of STAR (DESIGN.md §2, DiT).

`DiT(cfg).apply({"params": p}, x_bld, t_b, context_bsd, context_mask_bs=None, x_mask_bl=None) -> v_bld`
with t on the 0..1000 scale; a mean-flow DiT (`mean_flow`) also takes `r_b`, the interval's start, and returns
the average velocity over [r, t]. `DiT(cfg).apply(..., context_bsd, context_mask_bs, method="context_kv")` gives
every block's cross-attention keys and values, which a sampler computes once and passes as `context_kv`. depth // 2 in-blocks, one middle block, depth // 2 out-blocks joined by
last-in-first-out long skips; self-attention with QK-LayerNorm and rotate-half RoPE, unmodulated
cross-attention to the context, GEGLU MLP; residuals scaled by (1 - gate).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from star_jax.models.layers import (ATTENTION_IMPLEMENTATIONS, Dense, LayerNorm, as_dtype, attention, constrain,
                                    masked_mean, zeros)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Sizes of the UDiT; `depth` counts in + out blocks (the middle block comes on top)."""
  latent_channels: int = 128
  hidden_size: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: int = 4
  context_dim: int = 1024
  lora_rank: int = 32
  lora_alpha: float = 32.0  # AdaLN-SOLA low-rank scale = alpha / rank (EzAudio: alpha = rank)
  time_freq_dim: int = 256
  layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default, used by every EzAudio norm
  # EzAudio's `cls_embed`: Linear -> SiLU -> Linear (last one zero-initialised) of a pooled condition,
  # added to the time embedding, so the condition also drives every block's AdaLN modulation. STAR's and
  # EzAudio's released DiTs have none (False); here the pooled condition is the masked mean of the context.
  pooled_context: bool = False
  # EzAudio UDiT's `patch_size` for 1-d input: p consecutive latent frames form one token (a Conv1d(C, D, k=p,
  # stride=p) patch embedding; the final Linear emits p frames per token), so attention and the MLPs run on L/p
  # tokens. STAR's and EzAudio's released DiTs use 1.
  patch_size: int = 1
  # EzAudio UDiT's absolute position embedding of the tokens after the patch embedding (its `PE_wrapper`):
  # "none" (STAR's and EzAudio's released DiTs: RoPE alone) or "sinusoidal" (sin on even, cos on odd
  # channels). RoPE only sees offsets, so without it the DiT cannot place a sound at a time from noise alone.
  abs_pe: str = "none"
  # Not in EzAudio: > 0 gives each of that many context tokens its own learned Dc x Dc linear map before the
  # context MLP (init N(0, 1/Dc)). A bridge whose tokens are near copies of one another then still reaches
  # cross-attention as distinct tokens, which the DiT keys on far faster (docs/notes/tiny_demo.md). 0: STAR, EzAudio.
  context_slots: int = 0
  # MeanFlow (DESIGN.md §2, Few-step generation): a second time input r whose own timestep embedding of (t - r),
  # zero-initialised, adds to t's, so the network computes the average velocity u(z_t, r, t) and starts as the
  # flow model. False: STAR and EzAudio.
  mean_flow: bool = False
  attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS; auto: our batched dots on CPU, cuDNN flash on NVIDIA GPUs
  remat: str = "none"  # a key of REMAT_POLICIES, applied per block
  dtype: str = "float32"  # matmul input dtype; params, norms, softmax and the residual stay f32

  def __post_init__(self):
    if self.depth % 2:
      raise ValueError(f"dit.depth must be even (in + out blocks), got {self.depth}")
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
      raise ValueError(f"dit.hidden_size {self.hidden_size} must split into {self.num_heads} heads of "
                       f"even size")
    if self.patch_size < 1:
      raise ValueError(f"dit.patch_size must be >= 1, got {self.patch_size}")
    if self.abs_pe not in ("none", "sinusoidal"):
      raise ValueError(f"dit.abs_pe '{self.abs_pe}' is not one of ('none', 'sinusoidal')")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"dit.attention '{self.attention}' is not one of {ATTENTION_IMPLEMENTATIONS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"dit.remat '{self.remat}' is not one of {sorted(REMAT_POLICIES)}")


def timestep_embedding(t_b: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoid of t (0..1000 scale): (B,) -> (B, dim) as [cos, sin], freqs exp(-ln(P) i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t_b.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
  """(L, D) absolute position table: sin(p·w_i) at channel 2i, cos(p·w_i) at 2i + 1, w_i = 10000^(-2i/D): the
  timestep embedding's sinusoid at p = 0..L-1, interleaved (D is even: heads are of even size)."""
  cos, sin = jnp.split(timestep_embedding(jnp.arange(length), dim), 2, axis=-1)
  return jnp.stack([sin, cos], axis=-1).reshape(length, dim)


def rope(x_blhd: jax.Array, base: float = 10000.0) -> jax.Array:
  """GPT-NeoX rotate-half rotary embedding over positions 0..L-1, in f32."""
  length, head_dim = x_blhd.shape[1], x_blhd.shape[-1]
  inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
  x = x_blhd.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * jnp.cos(angles) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(angles)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """FiLM: x * (1 + scale) + shift with (B, D) shift/scale over (B, L, D)."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
  """Multi-head attention: q/k/v without bias, QK-LayerNorm over the head dim shared across heads,
  optional RoPE, key mask, output projection with bias. (B, Lq, D), (B, Lk, D) -> (B, Lq, D).

  `kv`: the (k, v) this module computed before for the same context (no RoPE); `x_bld=None` returns them.
  """
  num_heads: int
  use_rope: bool
  eps: float
  dtype: str
  zero_out: bool = False  # cross-attention's output projection starts at zero
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x_bld, context_bsd, mask_bs=None, kv=None):
    dtype = as_dtype(self.dtype)
    d = context_bsd.shape[-1] if kv is None else kv[0].shape[-2] * kv[0].shape[-1]
    h = self.num_heads
    split = lambda y: constrain(y.reshape(*y.shape[:2], h, d // h), ("batch", "length", "heads", "kv"))
    if kv is None:
      k = split(Dense(d, ("embed", "heads"), use_bias=False, dtype=dtype, name="to_k")(context_bsd))
      v = split(Dense(d, ("embed", "heads"), use_bias=False, dtype=dtype, name="to_v")(context_bsd))
      kv = LayerNorm(self.eps, axis="kv", name="norm_k")(k), v
      if x_bld is None:
        return kv
    k, v = kv
    q = split(Dense(d, ("embed", "heads"), use_bias=False, dtype=dtype, name="to_q")(x_bld))
    q = LayerNorm(self.eps, axis="kv", name="norm_q")(q)
    if self.use_rope:
      q, k = rope(q), rope(k)
    out = attention(q, k, v, mask_bs, dtype, self.implementation).reshape(x_bld.shape)
    init = zeros if self.zero_out else nn.initializers.xavier_uniform()
    return Dense(d, ("heads", "embed"), dtype=dtype, kernel_init=init, name="proj")(out)


class GEGLU(nn.Module):
  """Linear(D, 2H) -> value * GELU(gate) (exact) -> Linear(H, D), H = mlp_ratio * D."""
  hidden: int
  dtype: str

  @nn.compact
  def __call__(self, x_bld):
    dtype = as_dtype(self.dtype)
    value = Dense(self.hidden, ("embed", "mlp"), dtype=dtype, name="proj_value")(x_bld)
    gate = Dense(self.hidden, ("embed", "mlp"), dtype=dtype, name="proj_gate")(x_bld)
    hid = constrain(value * jax.nn.gelu(gate, approximate=False), ("batch", "length", "mlp"))
    return Dense(x_bld.shape[-1], ("mlp", "embed"), dtype=dtype, name="proj_out")(hid)


class AdaLNSola(nn.Module):
  """Per-block modulation: shared time_ada(temb) + (alpha/r) lora_b(lora_a(temb)) + table -> 6 x (B, D)."""
  rank: int
  alpha: float
  dtype: str

  @nn.compact
  def __call__(self, temb_bd, time_ada_b6d):
    dtype = as_dtype(self.dtype)
    d = temb_bd.shape[-1]
    low = Dense(6 * self.rank, ("embed", None), use_bias=False, dtype=dtype, name="lora_a",
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))(temb_bd)
    low = Dense(6 * d, (None, "mlp"), use_bias=False, dtype=dtype, kernel_init=zeros, name="lora_b")(low)
    table = self.param("scale_shift_table", nn.with_logical_partitioning(zeros, (None, "embed")),
                       (6, d), jnp.float32)
    mod = (time_ada_b6d + low * (self.alpha / self.rank)).reshape(-1, 6, d) + table[None]
    return tuple(mod[:, i] for i in range(6))


class Block(nn.Module):
  """One UDiT block; out-blocks first fuse the long skip: Linear(LN(concat[x, skip]))."""
  cfg: DiTConfig
  has_skip: bool

  @nn.compact
  def __call__(self, x_bld, temb_bd, time_ada_b6d, context_bsd, skip_bld, x_mask_bl, context_mask_bs,
               context_kv=None):
    """`context_kv`: this block's cross-attention (k, v) of the context; `x_bld=None` returns them."""
    cfg = self.cfg
    cross_attn = Attention(cfg.num_heads, False, cfg.layer_norm_eps, cfg.dtype, zero_out=True,
                           implementation=cfg.attention, name="cross_attn")
    if context_kv is None:
      context_kv = cross_attn(None, LayerNorm(cfg.layer_norm_eps, name="norm_context")(context_bsd))
    if x_bld is None:
      return context_kv
    dtype = as_dtype(cfg.dtype)
    eps = cfg.layer_norm_eps
    d = x_bld.shape[-1]
    if self.has_skip:
      cat = LayerNorm(eps, axis="mlp", name="skip_norm")(jnp.concatenate([x_bld, skip_bld], axis=-1))
      x_bld = Dense(d, ("mlp", "embed"), dtype=dtype, name="skip_linear")(cat)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNSola(
        cfg.lora_rank, cfg.lora_alpha, cfg.dtype, name="adaln")(temb_bd, time_ada_b6d)

    h = modulate(LayerNorm(eps, name="norm1")(x_bld), shift_msa, scale_msa)
    h = Attention(cfg.num_heads, True, eps, cfg.dtype, implementation=cfg.attention, name="attn")(h, h, x_mask_bl)
    x_bld = x_bld + (1.0 - gate_msa[:, None, :]) * h

    x_bld = x_bld + cross_attn(LayerNorm(eps, name="norm2")(x_bld), None, context_mask_bs, context_kv)

    h = modulate(LayerNorm(eps, name="norm3")(x_bld), shift_mlp, scale_mlp)
    h = GEGLU(cfg.mlp_ratio * d, cfg.dtype, name="mlp")(h)
    x_bld = x_bld + (1.0 - gate_mlp[:, None, :]) * h
    return constrain(x_bld, ("batch", "length", "embed"))


class DiT(nn.Module):
  """UDiT velocity network: latents (B, L, C), t (B,) on 0..1000, context (B, S, Dc) -> (B, L, C) f32."""
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x_bld, t_b, context_bsd, context_mask_bs=None, x_mask_bl=None, r_b=None, context_kv=None):
    """`r_b` (mean_flow only): the interval's start on 0..1000 (None: r = t, the instantaneous velocity);
    `context_kv`: what `context_kv` returned for this context; `x_bld=None` returns that instead."""
    cfg = self.cfg
    dtype = as_dtype(cfg.dtype)
    d = cfg.hidden_size
    block = Block if cfg.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[cfg.remat])
    names = [f"in_blocks_{i}" for i in range(cfg.depth // 2)] + ["mid_block"] + [
        f"out_blocks_{i}" for i in range(cfg.depth // 2)]
    blocks = [block(cfg, name.startswith("out"), name=name) for name in names]
    if context_kv is None:
      ctx = self.slot_projection(context_bsd) if cfg.context_slots else context_bsd
      ctx = Dense(d, ("embed", "mlp"), dtype=dtype, name="context_embed_1")(ctx)
      ctx = Dense(d, ("mlp", "embed"), dtype=dtype, name="context_embed_2")(jax.nn.silu(ctx))
      context_kv = [blk(None, None, None, ctx, None, None, None) for blk in blocks]
    if x_bld is None:
      return context_kv
    b, length = x_bld.shape[:2]
    t_b = jnp.broadcast_to(jnp.asarray(t_b, jnp.float32), (b,))

    x_tokens, token_mask = patchify(x_bld, x_mask_bl, cfg.patch_size)
    x = Dense(d, (None, "embed"), dtype=dtype, name="patch_embed")(x_tokens)
    if cfg.abs_pe == "sinusoidal":
      x = x + sinusoidal_positions(x.shape[1], d)[None]
    x = constrain(x, ("batch", "length", "embed"))

    # Time: sinusoid -> Linear -> SiLU -> Linear, then one SiLU shared by every consumer (EzAudio time_act).
    temb = timestep_embedding(t_b, cfg.time_freq_dim)
    temb = Dense(d, (None, "embed"), dtype=dtype, name="time_embed_1")(temb)
    temb = Dense(d, ("embed", "mlp"), dtype=dtype, name="time_embed_2")(jax.nn.silu(temb))
    if cfg.mean_flow:
      r_b = t_b if r_b is None else jnp.broadcast_to(jnp.asarray(r_b, jnp.float32), (b,))
      temb = temb + self.interval_embedding(t_b - r_b)
    if cfg.pooled_context:
      temb = temb + self.pooled_context_embedding(context_bsd, context_mask_bs)
    temb = jax.nn.silu(temb)
    time_ada = Dense(6 * d, ("embed", "mlp"), dtype=dtype, kernel_init=zeros, name="time_ada")(temb)
    time_ada_final = Dense(2 * d, ("embed", "mlp"), dtype=dtype, kernel_init=zeros,
                           name="time_ada_final")(temb)

    skips = []
    for blk, kv in zip(blocks, context_kv):
      skip = skips.pop() if blk.has_skip else None
      x = blk(x, temb, time_ada, None, skip, token_mask, context_mask_bs, kv)
      if blk.name.startswith("in"):
        skips.append(x)

    shift, scale = time_ada_final[:, :d], time_ada_final[:, d:]
    x = modulate(LayerNorm(cfg.layer_norm_eps, name="final_norm")(x), shift, scale)
    x = Dense(cfg.patch_size * cfg.latent_channels, ("embed", None), dtype=dtype, name="final_linear")(x)
    x = x.reshape(b, -1, cfg.latent_channels)[:, :length]  # tokens -> frames (unpatchify), padding dropped
    if x_mask_bl is not None:
      # Padded frames would leak into valid ones through the k3 conv; EzAudio never pads, so this is
      # the identity on unpadded batches.
      x = jnp.where(x_mask_bl[..., None].astype(bool), x, 0.0)
    return FinalConv(cfg.dtype, name="final_conv")(x)

  def context_kv(self, context_bsd, context_mask_bs=None):
    """Every block's cross-attention (k, v) of the context, each (B, S, H, Dh): constant over a sampler's steps."""
    return self(None, None, context_bsd, context_mask_bs)

  def interval_embedding(self, dt_b):
    """mean_flow: the timestep embedding of t - r -> Linear -> SiLU -> Linear (zero-initialised) -> (B, D)."""
    dtype = as_dtype(self.cfg.dtype)
    d = self.cfg.hidden_size
    h = Dense(d, (None, "embed"), dtype=dtype, name="interval_embed_1")(
        timestep_embedding(dt_b, self.cfg.time_freq_dim))
    return Dense(d, ("embed", "mlp"), dtype=dtype, kernel_init=zeros, name="interval_embed_2")(jax.nn.silu(h))

  def slot_projection(self, context_bsd):
    """`context_slots`: token s of the context times its own (Dc, Dc) matrix -> (B, S, Dc)."""
    cfg = self.cfg
    if context_bsd.shape[1] != cfg.context_slots:
      raise ValueError(f"DiT: dit.context_slots is {cfg.context_slots} but the context has {context_bsd.shape[1]} "
                       f"tokens (set it to the bridge's token count, e.g. qformer.num_queries, or 0)")
    dc = context_bsd.shape[-1]
    kernel = self.param("context_slot_proj", nn.with_logical_partitioning(
        nn.initializers.normal(dc ** -0.5), (None, None, "embed")), (cfg.context_slots, dc, dc), jnp.float32)
    # In f32 whatever dit.dtype (S·Dc² multiply-adds per example): XLA's CPU batched dot has no bf16 x bf16 -> f32
    # kernel ("Unsupported element type for DotThunk") once the other kernels arrive in bf16.
    return jnp.einsum("bsd,sde->bse", context_bsd.astype(jnp.float32), kernel)

  def pooled_context_embedding(self, context_bsd, context_mask_bs):
    """EzAudio cls_embed of the masked mean of the context tokens: (B, S, Dc) -> (B, D)."""
    dtype = as_dtype(self.cfg.dtype)
    d = self.cfg.hidden_size
    h = Dense(d, (None, "embed"), dtype=dtype, name="cls_embed_1")(masked_mean(context_bsd, context_mask_bs))
    return Dense(d, ("embed", "mlp"), dtype=dtype, kernel_init=zeros, name="cls_embed_2")(jax.nn.silu(h))


def patchify(x_blc: jax.Array, x_mask_bl: jax.Array | None, p: int):
  """(B, L, C) frames -> (B, ceil(L/p), p·C) tokens of p consecutive frames (frame-major; the end zero-padded),
  and the token mask (a token is valid when any of its frames is; masked frames enter as zeros) or None."""
  if p == 1:
    return x_blc, x_mask_bl
  b, length, c = x_blc.shape
  pad = -length % p
  if x_mask_bl is not None:
    x_blc = jnp.where(x_mask_bl[..., None].astype(bool), x_blc, 0.0).astype(x_blc.dtype)
  x = jnp.pad(x_blc, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, p * c)
  if x_mask_bl is None:
    return x, None
  mask = jnp.pad(x_mask_bl.astype(bool), ((0, 0), (0, pad))).reshape(b, -1, p).any(-1)
  return x, mask


class FinalConv(nn.Module):
  """Conv1d(C, C, k=3, pad 1) over length, channels last: (B, L, C) -> (B, L, C) f32."""
  dtype: str

  @nn.compact
  def __call__(self, x_blc):
    c = x_blc.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), (None, "conv_in", "conv_out")),
        (3, c, c), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(zeros, ("conv_out",)), (c,), jnp.float32)
    dtype = as_dtype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x_blc.astype(dtype), kernel.astype(dtype), window_strides=(1,), padding=[(1, 1)],
        dimension_numbers=("NWC", "WIO", "NWC"), preferred_element_type=jnp.float32)
    return y + bias


@functools.lru_cache(maxsize=None)
def velocity_fn(cfg: DiTConfig):
  """`DiT(cfg).apply`, one object per config: jitted samplers keyed on it compile once per config."""
  return DiT(cfg).apply


@functools.lru_cache(maxsize=None)
def sampler_fns(cfg: DiTConfig):
  """(prepare_context, velocity) for `flow.sample` / `flow.mean_flow_sample`, one pair per config: the context's
  cross-attention K/V computed once per sample, then every step's DiT pass reads them."""
  model = DiT(cfg)

  def prepare_context(variables, context_bsd, context_mask_bs):
    return context_bsd, model.apply(variables, context_bsd, context_mask_bs, method="context_kv")

  def velocity(variables, x_bld, t_b, context, context_mask_bs, x_mask_bl, **kw):
    context_bsd, kv = context
    return model.apply(variables, x_bld, t_b, context_bsd, context_mask_bs, x_mask_bl, context_kv=kv, **kw)

  return prepare_context, velocity
