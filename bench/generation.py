"""One 10-s generation with DiT-L (NFE 20, CFG 5, batch 1) plus VAE decode, in f32 and bf16.

  python bench/generation.py            # one DiT-L forward (the CFG batch of 2) x NFE, + VAE decode
  python bench/generation.py --full     # also time the whole jitted sampling loop once
FLOPs come from XLA's compiled cost analysis; achieved FLOP/s is compared with a matmul peak
(2048^3, same dtype policy) measured in the same run. The PyTorch reference is the same UDiT in eager
PyTorch (bench/torch_udit.py: same sizes and math; tests/test_dit.py checks it against ours), timed in
the same run on the same inputs (bf16: the module in torch.bfloat16, as EzAudio runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # star_jax and bench

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import best_time, flops_of, matmul_peak  # noqa: E402
from star_jax import flow  # noqa: E402
from star_jax.config import load_config  # noqa: E402
from star_jax.models.dit import DiT, DiTConfig  # noqa: E402


def vae_decode_bench(dtype: str, frames: int, reps: int):
  """(seconds, flops) of decoding (1, frames, 128) latents with the paper VAE."""
  from star_jax.models.build import vae_config
  from star_jax.models.vae import OobleckVAE, hop_length
  cfg = dataclasses.replace(vae_config(load_config("configs/star.py:paper")), dtype=dtype)
  vae = OobleckVAE(cfg)
  z = jnp.zeros((1, frames, cfg.latent_channels))
  wav = jnp.zeros((1, 8 * hop_length(cfg)))  # param shapes do not depend on the length
  params = jax.jit(lambda k: nn.unbox(vae.init(k, wav)))(jax.random.key(0))
  fn = jax.jit(lambda p, z: vae.apply(p, z, method="decode"))
  compiled = fn.lower(params, z).compile()
  # XLA counts a loop body once: the FLOPs are those of the same decode untiled (OobleckVAE's time tiles).
  untiled = OobleckVAE(cfg, time_tile=0)
  flops = flops_of(jax.jit(lambda p, z: untiled.apply(p, z, method="decode")).lower(params, z).compile())
  return best_time(compiled, params, z, reps=reps), flops


def dit_bench(dtype: str, args) -> dict:
  """Compile and time one DiT-L forward on the CFG batch of 2 (and optionally the whole sampler)."""
  section = load_config("configs/star.py:paper").dit.to_dict()
  cfg = DiTConfig(**{**section, "dtype": dtype, "remat": "none"})
  model = DiT(cfg)
  x = jax.random.normal(jax.random.key(1), (2, args.frames, cfg.latent_channels))  # cond + uncond
  t = jnp.full((2,), 500.0)
  ctx = jax.random.normal(jax.random.key(2), (2, 32, cfg.context_dim))
  params = jax.jit(lambda k: nn.unbox(model.init(k, x[:1, :8], t[:1], ctx[:1])))(jax.random.key(0))
  fwd = jax.jit(lambda p, x, t, c: model.apply(p, x, t, c))
  t0 = time.perf_counter()
  compiled = fwd.lower(params, x, t, ctx).compile()
  compile_s = time.perf_counter() - t0
  fwd_s = best_time(compiled, params, x, t, ctx, reps=args.reps)
  full_s = None
  if args.full:
    sample = lambda n: flow.sample(model.apply, params, n, ctx[:1], num_steps=args.nfe,
                                   cfg_scale=args.cfg_scale)
    full_s = best_time(sample, x[:1], reps=1)
  return dict(flops=flops_of(compiled), fwd_s=fwd_s, compile_s=compile_s, gen_s=args.nfe * fwd_s,
              full_s=full_s)


def torch_forward_s(dtype: str, args) -> float | None:
  """Best-of-reps seconds of the PyTorch UDiT forward on the same shapes, or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  from bench.torch_udit import UDiT
  torch.set_num_threads(os.cpu_count())
  section = load_config("configs/star.py:paper").dit.to_dict()
  tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  model = UDiT(**section).eval().to(tdtype)
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(2, args.frames, section["latent_channels"], generator=gen).to(tdtype)
  t = torch.full((2,), 500.0)
  ctx = torch.randn(2, 32, section["context_dim"], generator=gen).to(tdtype)
  times = []
  with torch.inference_mode():
    model(x, t, ctx)
    for _ in range(args.reps):
      t0 = time.perf_counter()
      model(x, t, ctx)
      times.append(time.perf_counter() - t0)
  del model
  return min(times)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--frames", type=int, default=500, help="latent frames (500 = 10 s at 50 Hz)")
  ap.add_argument("--nfe", type=int, default=20)
  ap.add_argument("--cfg-scale", type=float, default=5.0)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--full", action="store_true", help="also time the whole sampling loop")
  ap.add_argument("--skip-vae", action="store_true", help="time the DiT only")
  ap.add_argument("--skip-dit", action="store_true", help="time the VAE decode only")
  ap.add_argument("--skip-torch", action="store_true", help="do not time the PyTorch reference")
  args = ap.parse_args()

  uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  print(f"# {jax.devices()[0].device_kind}, {os.cpu_count()} cores; {uptime}")
  rows = []
  for dtype in args.dtypes.split(","):
    r = dict(dtype=dtype, peak=matmul_peak(jnp.dtype(dtype)))
    if not args.skip_dit:
      r.update(dit_bench(dtype, args))
      r["torch_s"] = None if args.skip_torch else torch_forward_s(dtype, args)
    r["vae"] = None if args.skip_vae else vae_decode_bench(dtype, args.frames, args.reps)
    rows.append(r)

  if not args.skip_dit:
    print("\n| dtype | matmul peak GFLOP/s | DiT-L fwd (B=2, L=%d) GFLOP | fwd s | GFLOP/s | %% of peak "
          "| PyTorch fwd s | ours / PyTorch | compile s |" % args.frames)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
      ach = r["flops"] / r["fwd_s"]
      ref = r.get("torch_s")
      ref_cols = "not run | -" if ref is None else f"{ref:.2f} | {r['fwd_s'] / ref:.2f}"
      print(f"| {r['dtype']} | {r['peak'] / 1e9:.0f} | {r['flops'] / 1e9:.0f} | {r['fwd_s']:.2f} | "
            f"{ach / 1e9:.0f} | {100 * ach / r['peak']:.0f}% | {ref_cols} | {r['compile_s']:.0f} |")
  print(f"\n| dtype | {args.nfe} x DiT-L fwd s | full sampler s | VAE decode s | VAE GFLOP | VAE GFLOP/s "
        f"| VAE % of peak | 10-s generation s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    gen = r.get("gen_s")
    full = r.get("full_s")
    if r["vae"] is None:
      vae_cols, vae_s = "not run | - | - | -", 0.0
    else:
      vae_s, vae_flops = r["vae"]
      vae_cols = (f"{vae_s:.2f} | {vae_flops / 1e9:.0f} | {vae_flops / vae_s / 1e9:.0f} | "
                  f"{100 * vae_flops / vae_s / r['peak']:.0f}%")
    dit_s = full if full is not None else gen
    total = "-" if dit_s is None else f"{dit_s + vae_s:.1f}"
    print(f"| {r['dtype']} | {'-' if gen is None else f'{gen:.1f}'} | "
          f"{'not run' if full is None else f'{full:.1f}'} | {vae_cols} | {total} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
