"""A PyTorch UDiT (EzAudio's DiT with AdaLN-SOLA) of the same sizes and math as star_jax.models.dit, with
EzAudio's module names, so its `state_dict()` is laid out like a released EzAudio checkpoint: the rotary
embedding's persistent `inv_freq` buffers included, and `MaskDiT` adds the 257-channel input + `mask_embed`.

Used by bench/generation.py as the same-run PyTorch reference (eager, `inference_mode`,
`F.scaled_dot_product_attention`; bf16 = the module and inputs in torch.bfloat16, what EzAudio does) and by
the tests as the reference a real EzAudio state dict comes from. `load_from_jax(model, params)` copies a
star_jax DiT param tree in through `star_jax.convert.dit.to_ezaudio_state_dict`, the converter's inverse.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Rotary(nn.Module):
  """GPT-NeoX rotate-half RoPE; `inv_freq` is a persistent buffer, as in EzAudio's RotaryEmbedding."""

  def __init__(self, head_dim):
    super().__init__()
    self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))

  def forward(self, x):  # (B, H, L, Dh)
    ang = torch.arange(x.shape[2], dtype=torch.float32, device=x.device)[:, None] * self.inv_freq.float()[None]
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()).to(x.dtype)


class Attention(nn.Module):
  def __init__(self, d, heads, rope):
    super().__init__()
    self.h = heads
    self.to_q, self.to_k, self.to_v = (nn.Linear(d, d, bias=False) for _ in range(3))
    self.norm_q, self.norm_k = nn.LayerNorm(d // heads), nn.LayerNorm(d // heads)
    self.proj = nn.Linear(d, d)
    self.rotary = Rotary(d // heads) if rope else None

  def forward(self, x, ctx):
    b, lq, d = x.shape
    split = lambda y: y.view(b, -1, self.h, d // self.h).transpose(1, 2)
    q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
    q, k = self.norm_q(q), self.norm_k(k)
    if self.rotary is not None:
      q, k = self.rotary(q), self.rotary(k)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, lq, d))


class GEGLUProj(nn.Module):
  """Linear(D, 2H): first half value, second half gate -> value · GELU(gate)."""

  def __init__(self, d, hidden):
    super().__init__()
    self.proj = nn.Linear(d, 2 * hidden)

  def forward(self, x):
    value, gate = self.proj(x).chunk(2, -1)
    return value * F.gelu(gate)


class AdaLNSOLA(nn.Module):
  def __init__(self, d, rank, alpha):
    super().__init__()
    self.lora_a, self.lora_b = nn.Linear(d, 6 * rank, bias=False), nn.Linear(6 * rank, 6 * d, bias=False)
    self.scale_shift_table = nn.Parameter(torch.zeros(6, d))
    self.scale = alpha / rank

  def forward(self, temb, time_ada):
    d = self.scale_shift_table.shape[1]
    return (time_ada + self.lora_b(self.lora_a(temb)) * self.scale).view(-1, 6, d) + self.scale_shift_table


class Block(nn.Module):
  def __init__(self, d, heads, ratio, rank, alpha, skip):
    super().__init__()
    self.skip = skip
    if skip:
      self.skip_norm, self.skip_linear = nn.LayerNorm(2 * d), nn.Linear(2 * d, d)
    self.adaln = AdaLNSOLA(d, rank, alpha)
    self.norm1, self.norm2, self.norm3, self.norm_context = (nn.LayerNorm(d) for _ in range(4))
    self.attn, self.cross_attn = Attention(d, heads, True), Attention(d, heads, False)
    self.mlp = nn.Module()
    self.mlp.net = nn.Sequential(GEGLUProj(d, ratio * d), nn.Dropout(0.0), nn.Linear(ratio * d, d))

  def forward(self, x, temb, time_ada, ctx, skip=None):
    if self.skip:
      x = self.skip_linear(self.skip_norm(torch.cat([x, skip], -1)))
    mod = self.adaln(temb, time_ada)
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, i, None, :] for i in range(6))
    h = self.norm1(x) * (1 + sc1) + sh1
    x = x + (1 - g1) * self.attn(h, h)
    x = x + self.cross_attn(self.norm2(x), self.norm_context(ctx))
    return x + (1 - g2) * self.mlp.net(self.norm3(x) * (1 + sc2) + sh2)


class UDiT(nn.Module):
  """Takes DiTConfig's fields; x (B, L, in_chans), t (B,) on the 0..1000 scale, ctx (B, S, context_dim)."""

  def __init__(self, latent_channels, hidden_size, depth, num_heads, mlp_ratio, context_dim, lora_rank,
               lora_alpha, time_freq_dim=256, in_chans=None, **_):
    super().__init__()
    d = hidden_size
    self.d, self.freq = d, time_freq_dim
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv1d(in_chans or latent_channels, d, 1)
    self.time_embed = nn.Module()
    self.time_embed.mlp = nn.Sequential(nn.Linear(time_freq_dim, d), nn.SiLU(), nn.Linear(d, d))
    self.time_ada, self.time_ada_final = nn.Linear(d, 6 * d), nn.Linear(d, 2 * d)
    self.context_embed = nn.Sequential(nn.Linear(context_dim, d), nn.SiLU(), nn.Linear(d, d))
    args = (d, num_heads, mlp_ratio, lora_rank, lora_alpha)
    self.in_blocks = nn.ModuleList(Block(*args, False) for _ in range(depth // 2))
    self.mid_block = Block(*args, False)
    self.out_blocks = nn.ModuleList(Block(*args, True) for _ in range(depth // 2))
    self.final_block = nn.Module()
    self.final_block.norm = nn.LayerNorm(d)
    self.final_block.linear = nn.Linear(d, latent_channels)
    self.final_block.final_layer = nn.Conv1d(latent_channels, latent_channels, 3, padding=1)

  def forward(self, x, t, ctx):
    half = self.freq // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([args.cos(), args.sin()], -1).to(x.dtype)
    temb = F.silu(self.time_embed.mlp(temb))
    time_ada, final = self.time_ada(temb), self.time_ada_final(temb)
    ctx = self.context_embed(ctx)
    x = self.patch_embed.proj(x.transpose(1, 2)).transpose(1, 2)
    skips = []
    for blk in self.in_blocks:
      x = blk(x, temb, time_ada, ctx)
      skips.append(x)
    x = self.mid_block(x, temb, time_ada, ctx)
    for blk in self.out_blocks:
      x = blk(x, temb, time_ada, ctx, skips.pop())
    fb = self.final_block
    x = fb.linear(fb.norm(x) * (1 + final[:, None, self.d:]) + final[:, None, :self.d])
    return fb.final_layer(x.transpose(1, 2)).transpose(1, 2)


class MaskDiT(nn.Module):
  """EzAudio's wrapper for plain generation: the UDiT under `model` takes [x, mask_embed on every frame, ones]
  (2C + 1 channels); its state dict is what EzAudio's `{"model": ...}` checkpoints hold."""

  def __init__(self, **udit_kwargs):
    super().__init__()
    c = udit_kwargs["latent_channels"]
    self.model = UDiT(**udit_kwargs, in_chans=2 * c + 1)
    self.mask_embed = nn.Parameter(torch.zeros(c))

  def forward(self, x, t, ctx):
    b, length, _ = x.shape
    extra = [self.mask_embed.to(x.dtype).expand(b, length, -1), torch.ones(b, length, 1, dtype=x.dtype)]
    return self.model(torch.cat([x, *extra], -1), t, ctx)


def load_from_jax(model: UDiT, params) -> UDiT:
  """Copy a star_jax DiT param tree (numpy/jax arrays) into `model`; its buffers keep their values."""
  from star_jax.convert.dit import to_ezaudio_state_dict

  sd = {k: torch.from_numpy(np.array(v)) for k, v in to_ezaudio_state_dict(params, prefix="").items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  left = [k for k in missing if not k.endswith("rotary.inv_freq")]
  if left or unexpected:
    raise ValueError(f"load_from_jax: missing {left}, unexpected {unexpected}")
  return model
