"""One 10-s generation with DiT-L (NFE 20, CFG 5, batch 1) plus VAE decode, in f32 and bf16.

  python bench/generation.py            # one DiT-L forward (the CFG batch of 2) x NFE, + VAE decode
  python bench/generation.py --full     # also time the whole jitted sampling loop once
FLOPs come from XLA's compiled cost analysis; achieved FLOP/s is compared with a matmul peak
(2048^3, same dtype policy) measured in the same run. The PyTorch figures are the lead's measurement of
EzAudio's DiT-L forward on this machine (batch 2, 500 frames), quoted for the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from star_jax import flow  # noqa: E402
from star_jax.config import load_config  # noqa: E402
from star_jax.models.dit import DiT, DiTConfig  # noqa: E402

PYTORCH_FORWARD_S = {"float32": 6.4, "bfloat16": 2.3}  # EzAudio DiT-L, batch 2 x 500 frames


def best_time(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def matmul_peak(dtype, n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of an n^3 matmul with `dtype` inputs and an f32 accumulator."""
  a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / best_time(f, a, a, reps=reps)


def vae_decode_bench(dtype: str, frames: int, reps: int):
  """(seconds, flops) of decoding (1, frames, 128) latents with the paper VAE, or None if absent."""
  try:
    from star_jax.models.vae import OobleckVAE, VAEConfig
  except ImportError:
    return None
  cfg = VAEConfig(**{**load_config("configs/star.py:paper").vae.to_dict(), "dtype": dtype})
  vae = OobleckVAE(cfg)
  z = jnp.zeros((1, frames, cfg.latent_channels))
  wav = jnp.zeros((1, 480 * frames))
  params = jax.jit(lambda k: nn.unbox(vae.init(k, wav, method="encode")))(jax.random.key(0))
  fn = jax.jit(lambda p, z: vae.apply(p, z, method="decode"))
  compiled = fn.lower(params, z).compile()
  return best_time(compiled, params, z, reps=reps), flops_of(compiled)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--frames", type=int, default=500, help="latent frames (500 = 10 s at 50 Hz)")
  ap.add_argument("--nfe", type=int, default=20)
  ap.add_argument("--cfg-scale", type=float, default=5.0)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--full", action="store_true", help="also time the whole sampling loop")
  args = ap.parse_args()

  uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  print(f"# {jax.devices()[0].device_kind}, {os.cpu_count()} cores; {uptime}")
  section = load_config("configs/star.py:paper").dit.to_dict()
  rows = []
  for dtype in args.dtypes.split(","):
    peak = matmul_peak(jnp.dtype(dtype))
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
    flops = flops_of(compiled)
    fwd_s = best_time(compiled, params, x, t, ctx, reps=args.reps)
    gen_s = args.nfe * fwd_s
    full_s = None
    if args.full:
      sample = lambda n: flow.sample(model.apply, params, n, ctx[:1], num_steps=args.nfe,
                                     cfg_scale=args.cfg_scale)
      full_s = best_time(sample, x[:1], reps=1)
    vae = vae_decode_bench(dtype, args.frames, args.reps)
    rows.append(dict(dtype=dtype, peak=peak, flops=flops, fwd_s=fwd_s, compile_s=compile_s, gen_s=gen_s,
                     full_s=full_s, vae=vae))
    del params, compiled

  print("\n| dtype | matmul peak GFLOP/s | DiT-L fwd (B=2, L=%d) GFLOP | fwd s | GFLOP/s | %% of peak "
        "| PyTorch fwd s | ours / PyTorch | compile s |" % args.frames)
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ach = r["flops"] / r["fwd_s"]
    ref = PYTORCH_FORWARD_S.get(r["dtype"])
    print(f"| {r['dtype']} | {r['peak'] / 1e9:.0f} | {r['flops'] / 1e9:.0f} | {r['fwd_s']:.2f} | "
          f"{ach / 1e9:.0f} | {100 * ach / r['peak']:.0f}% | {ref} | {r['fwd_s'] / ref:.2f} | "
          f"{r['compile_s']:.0f} |")
  print(f"\n| dtype | {args.nfe} x DiT-L fwd s | full sampler s | VAE decode s | VAE GFLOP | VAE GFLOP/s "
        f"| 10-s generation s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    full = f"{r['full_s']:.1f}" if r["full_s"] is not None else "not run (--full)"
    if r["vae"] is None:
      vae_cols, vae_s = "VAE not in this tree | - | -", 0.0
    else:
      vae_s, vae_flops = r["vae"]
      vae_cols = f"{vae_s:.2f} | {vae_flops / 1e9:.0f} | {vae_flops / vae_s / 1e9:.0f}"
    total = (r["full_s"] if r["full_s"] is not None else r["gen_s"]) + vae_s
    print(f"| {r['dtype']} | {r['gen_s']:.1f} | {full} | {vae_cols} | {total:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
