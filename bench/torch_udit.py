"""A PyTorch UDiT (EzAudio's DiT with AdaLN-SOLA) of the same sizes and math as star_jax.models.dit,
used by bench/generation.py as the same-run PyTorch reference. Eager, `inference_mode`,
`F.scaled_dot_product_attention`; bf16 = the module and inputs in torch.bfloat16 (what EzAudio does).
`load_from_jax(params)` copies a star_jax DiT param tree in, so the two can be compared numerically.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _rope(x):  # (B, H, L, Dh), GPT-NeoX rotate-half
  length, dh = x.shape[2], x.shape[3]
  inv = 1.0 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float32, device=x.device) / dh)
  ang = torch.arange(length, dtype=torch.float32, device=x.device)[:, None] * inv[None]
  ang = torch.cat([ang, ang], -1)
  x1, x2 = x.float().chunk(2, -1)
  return (x.float() * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()).to(x.dtype)


class Attention(nn.Module):
  def __init__(self, d, heads, rope):
    super().__init__()
    self.h, self.rope = heads, rope
    self.to_q, self.to_k, self.to_v = (nn.Linear(d, d, bias=False) for _ in range(3))
    self.norm_q, self.norm_k = nn.LayerNorm(d // heads), nn.LayerNorm(d // heads)
    self.proj = nn.Linear(d, d)

  def forward(self, x, ctx):
    b, lq, d = x.shape
    split = lambda y: y.view(b, -1, self.h, d // self.h).transpose(1, 2)
    q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
    q, k = self.norm_q(q), self.norm_k(k)
    if self.rope:
      q, k = _rope(q), _rope(k)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, lq, d))


class GEGLU(nn.Module):
  def __init__(self, d, hidden):
    super().__init__()
    self.proj_value, self.proj_gate, self.proj_out = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

  def forward(self, x):
    return self.proj_out(self.proj_value(x) * F.gelu(self.proj_gate(x)))


class Block(nn.Module):
  def __init__(self, d, heads, ratio, rank, alpha, skip):
    super().__init__()
    self.skip = skip
    if skip:
      self.skip_norm, self.skip_linear = nn.LayerNorm(2 * d), nn.Linear(2 * d, d)
    self.lora_a, self.lora_b = nn.Linear(d, 6 * rank, bias=False), nn.Linear(6 * rank, 6 * d, bias=False)
    self.scale = alpha / rank
    self.table = nn.Parameter(torch.zeros(6, d))
    self.norm1, self.norm2, self.norm3, self.norm_context = (nn.LayerNorm(d) for _ in range(4))
    self.attn, self.cross_attn = Attention(d, heads, True), Attention(d, heads, False)
    self.mlp = GEGLU(d, ratio * d)

  def forward(self, x, temb, time_ada, ctx, skip=None):
    if self.skip:
      x = self.skip_linear(self.skip_norm(torch.cat([x, skip], -1)))
    d = x.shape[-1]
    mod = (time_ada + self.lora_b(self.lora_a(temb)) * self.scale).view(-1, 6, d) + self.table
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, i, None, :] for i in range(6))
    x = x + (1 - g1) * self.attn(*(2 * (self.norm1(x) * (1 + sc1) + sh1,)))
    x = x + self.cross_attn(self.norm2(x), self.norm_context(ctx))
    return x + (1 - g2) * self.mlp(self.norm3(x) * (1 + sc2) + sh2)


class UDiT(nn.Module):
  def __init__(self, latent_channels, hidden_size, depth, num_heads, mlp_ratio, context_dim, lora_rank,
               lora_alpha, time_freq_dim=256, **_):
    super().__init__()
    d = hidden_size
    self.d, self.freq = d, time_freq_dim
    self.patch_embed = nn.Linear(latent_channels, d)
    self.time_embed_1, self.time_embed_2 = nn.Linear(time_freq_dim, d), nn.Linear(d, d)
    self.time_ada, self.time_ada_final = nn.Linear(d, 6 * d), nn.Linear(d, 2 * d)
    self.context_embed_1, self.context_embed_2 = nn.Linear(context_dim, d), nn.Linear(d, d)
    args = (d, num_heads, mlp_ratio, lora_rank, lora_alpha)
    self.in_blocks = nn.ModuleList(Block(*args, False) for _ in range(depth // 2))
    self.mid_block = Block(*args, False)
    self.out_blocks = nn.ModuleList(Block(*args, True) for _ in range(depth // 2))
    self.final_norm = nn.LayerNorm(d)
    self.final_linear = nn.Linear(d, latent_channels)
    self.final_conv = nn.Conv1d(latent_channels, latent_channels, 3, padding=1)

  def forward(self, x, t, ctx):
    half = self.freq // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([args.cos(), args.sin()], -1).to(x.dtype)
    temb = F.silu(self.time_embed_2(F.silu(self.time_embed_1(temb))))
    time_ada, final = self.time_ada(temb), self.time_ada_final(temb)
    ctx = self.context_embed_2(F.silu(self.context_embed_1(ctx)))
    x = self.patch_embed(x)
    skips = []
    for blk in self.in_blocks:
      x = blk(x, temb, time_ada, ctx)
      skips.append(x)
    x = self.mid_block(x, temb, time_ada, ctx)
    for blk in self.out_blocks:
      x = blk(x, temb, time_ada, ctx, skips.pop())
    x = self.final_norm(x) * (1 + final[:, None, self.d:]) + final[:, None, :self.d]
    x = self.final_linear(x)
    return self.final_conv(x.transpose(1, 2)).transpose(1, 2)


def load_from_jax(model: UDiT, params) -> UDiT:
  """Copy a star_jax DiT param tree (numpy/jax arrays) into `model` (Dense kernels transposed)."""
  def t(a):
    return torch.from_numpy(np.asarray(a, np.float32).copy())

  def dense(mod, p):
    mod.weight.data = t(p["kernel"]).T.contiguous()
    if "bias" in p:
      mod.bias.data = t(p["bias"])

  def norm(mod, p):
    mod.weight.data, mod.bias.data = t(p["scale"]), t(p["bias"])

  def block(b, p):
    if b.skip:
      norm(b.skip_norm, p["skip_norm"])
      dense(b.skip_linear, p["skip_linear"])
    dense(b.lora_a, p["adaln"]["lora_a"])
    dense(b.lora_b, p["adaln"]["lora_b"])
    b.table.data = t(p["adaln"]["scale_shift_table"])
    for n in ("norm1", "norm2", "norm3", "norm_context"):
      norm(getattr(b, n), p[n])
    for a in ("attn", "cross_attn"):
      for n in ("to_q", "to_k", "to_v", "proj"):
        dense(getattr(getattr(b, a), n), p[a][n])
      norm(getattr(b, a).norm_q, p[a]["norm_q"])
      norm(getattr(b, a).norm_k, p[a]["norm_k"])
    for n in ("proj_value", "proj_gate", "proj_out"):
      dense(getattr(b.mlp, n), p["mlp"][n])

  for n in ("patch_embed", "time_embed_1", "time_embed_2", "time_ada", "time_ada_final", "context_embed_1",
            "context_embed_2", "final_linear"):
    dense(getattr(model, n), params[n])
  norm(model.final_norm, params["final_norm"])
  model.final_conv.weight.data = t(params["final_conv"]["kernel"]).permute(2, 1, 0).contiguous()
  model.final_conv.bias.data = t(params["final_conv"]["bias"])
  for i, b in enumerate(model.in_blocks):
    block(b, params[f"in_blocks_{i}"])
  block(model.mid_block, params["mid_block"])
  for i, b in enumerate(model.out_blocks):
    block(b, params[f"out_blocks_{i}"])
  return model
