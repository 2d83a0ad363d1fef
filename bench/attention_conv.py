"""The two kernels that bound generation on CPU, each against its alternatives, at paper sizes, bf16.

  python bench/attention_conv.py                    # both tables (a few minutes on 2 cores)
  python bench/attention_conv.py --parts attention  # or: conv

1. Attention, one DiT-L self-attention call (batch 2, 500 frames, 16 heads of 64): `layers.attention` with each
   implementation against the plain einsum, time and GFLOP/s (the score and probability matmuls' FLOPs).
2. One k7 dilated conv of the Oobleck decoder at each level's channels x samples (10 s at 24 kHz): XLA's
   `conv_general_dilated` (the VAE's choice) against im2col + one dot, 7 shifted dots, and the plain dot of the
   same FLOP count, as % of a bf16 matmul peak measured in the same run; f32 operands for the conv as well.
Best of --reps after one call that compiles. Figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # star_jax and bench

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import best_time, machine_line, matmul_peak  # noqa: E402
from star_jax.models import layers  # noqa: E402

BF16 = jnp.bfloat16


def einsum_attention(q, k, v, mask_bk, dtype):
  """The plain einsum attention (the layers' first one): the reference every implementation is held to here
  and in tests/test_meanflow.py."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", (q * q.shape[-1] ** -0.5).astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32)
  if mask_bk is not None:
    scores = jnp.where(mask_bk[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)


def attention_table(reps: int, b=2, length=500, heads=16, head_dim=64) -> None:
  q, k, v = (jax.random.normal(jax.random.key(i), (b, length, heads, head_dim)) for i in range(3))
  flops = 4 * b * heads * length * length * head_dim
  ref = jax.jit(functools.partial(einsum_attention, mask_bk=None, dtype=BF16))
  rows = [("einsum (reference)", ref)]
  rows += [(f"layers.attention '{impl}'", jax.jit(lambda q, k, v, impl=impl: layers.attention(q, k, v, None, BF16, impl)))
           for impl in ("dots", "xla")]
  want = ref(q, k, v)
  print(f"\n| attention, ({b}, {length}, {heads}, {head_dim}) bf16 | ms | GFLOP/s | max diff vs einsum |\n|---|---|---|---|")
  for name, fn in rows:
    s = best_time(fn, q, k, v, reps=reps)
    print(f"| {name} | {1e3 * s:.1f} | {flops / s / 1e9:.0f} | {float(jnp.abs(fn(q, k, v) - want).max()):.1e} |",
          flush=True)


def conv_table(reps: int, dilation=3) -> None:
  peak = matmul_peak(BF16)
  d, h = dilation, 3 * dilation

  def conv(x, w, dtype=BF16):
    return jax.lax.conv_general_dilated(x.astype(dtype), w.astype(dtype), (1,), [(h, h)], rhs_dilation=(d,),
                                        dimension_numbers=("NWC", "WIO", "NWC"), preferred_element_type=jnp.float32)

  def shifted(x, w, im2col):
    t = x.shape[1]
    xp = jnp.pad(x.astype(BF16), ((0, 0), (h, h), (0, 0)))
    taps = [xp[:, i * d:i * d + t] for i in range(7)]
    if im2col:
      return jnp.dot(jnp.concatenate(taps, -1), w.astype(BF16).reshape(-1, w.shape[-1]),
                     preferred_element_type=jnp.float32)
    return sum(jnp.dot(tap, w[i].astype(BF16), preferred_element_type=jnp.float32) for i, tap in enumerate(taps))

  def plain_dot(x, w):  # the same FLOPs as one matmul (T, C) @ (C, 7C): no shifts at all
    return jnp.dot(x.astype(BF16), w.astype(BF16).transpose(1, 0, 2).reshape(w.shape[1], -1),
                   preferred_element_type=jnp.float32)

  variants = [("conv_general_dilated", conv), ("same, f32 operands", functools.partial(conv, dtype=jnp.float32)),
              ("im2col + one dot", functools.partial(shifted, im2col=True)),
              ("7 shifted dots", functools.partial(shifted, im2col=False)), ("plain dot, same FLOPs", plain_dot)]
  print(f"\n| k7 conv, dilation {d}, bf16 (% of the {peak / 1e9:.0f} GFLOP/s bf16 matmul peak) | "
        + " | ".join(n for n, _ in variants) + " |\n|---|" + "---|" * len(variants))
  for c, t in ((512, 5000), (256, 30000), (128, 120000)):
    x = jax.random.normal(jax.random.key(1), (1, t, c))
    w = 0.05 * jax.random.normal(jax.random.key(2), (7, c, c))
    flops = 2 * 7 * c * c * t
    cells = []
    for _, fn in variants:
      s = best_time(jax.jit(fn), x, w, reps=reps)
      cells.append(f"{1e3 * s:.0f} ms, {100 * flops / s / peak:.0f} %")
    print(f"| {c} channels x {t} samples | " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="attention,conv")
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args(argv)
  print(machine_line(), flush=True)
  if "attention" in args.parts:
    attention_table(args.reps)
  if "conv" in args.parts:
    conv_table(args.reps)
  return 0


if __name__ == "__main__":
  sys.exit(main())
