"""The speed check for one accelerator, in one process: train step, generation latency, speech-processing latency.

  bash bench/gpu.sh                # paper sizes (one H100: well under 8 minutes)
  bash bench/gpu.sh --small        # tiny sizes on whatever device there is (CPU: about a minute)
  bash bench/gpu.sh --set dit.attention=xla    # a config override for every part (here: no cuDNN attention)
  python bench/gpu.py --parts generation        # paper-size generation only (this CPU, idle: several minutes)

Prints four tables:
  1. the stage-2 train step (the trainer's own step, bench/train_throughput.py) at batch x frames (paper: 16 x 500
     bf16, cached HuBERT frames and latents): steps/s and MFU, FLOPs from XLA's cost analysis, against 989 TFLOP/s
     (H100 SXM dense bf16) on an H100, else against a matmul peak measured in the same run;
  2. 10-s generation (the Generator's one program: sampler loop + VAE decode, batch 1): Euler 20 steps + CFG
     (a batch of 2 per step) against the mean-flow sampler at 1 and 2 steps (one pass per step);
  3. speech processing (HuBERT-large + Q-Former, waveform -> S, batch 1, 4-s utterance) against STAR's 35.9 ms.
Random weights throughout: latency and throughput do not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # star_jax and bench

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import machine_line, matmul_peak, median_time  # noqa: E402
from bench.train_throughput import bench_step, make_config  # noqa: E402
from star_jax.generate import generation_programs  # noqa: E402
from star_jax.models import build  # noqa: E402
from star_jax.models.dit import DiT  # noqa: E402
from star_jax.models.layers import cast_kernels  # noqa: E402

H100_BF16_PEAK = 989e12  # FLOP/s, H100 SXM dense bf16 (NVIDIA's datasheet)
PAPER_SPEECH_MS = 35.9   # STAR's reported speech-processing latency
SPEECH_S = 4.0


def peak_flops(dtype: str) -> tuple[float, str]:
  kind = jax.devices()[0].device_kind
  if "H100" in kind and dtype == "bfloat16":
    return H100_BF16_PEAK, "H100 bf16 datasheet"
  return matmul_peak(dtype), "same-run matmul"


def train_table(args, variant: str, dtype: str) -> None:
  batch, frames = (8, 100) if args.small else (args.batch, args.frames)
  peak, peak_kind = peak_flops(dtype)
  r = bench_step(variant, dtype, batch, frames, "cached", args.steps, 1, args.set)
  print(f"\n| stage-2 train step | B x L | compile s | step s | steps/s | TFLOP/step | TFLOP/s | peak ({peak_kind}) "
        f"| MFU |\n|---|---|---|---|---|---|---|---|---|")
  print(f"| {variant} {dtype} | {batch} x {frames} | {r['compile_s']:.0f} | {r['step_s']:.3f} | {r['steps_per_s']:.2f} "
        f"| {r['flops_per_step'] / 1e12:.2f} | {r['flops_per_s'] / 1e12:.1f} | {peak / 1e12:.0f} "
        f"| {100 * r['flops_per_s'] / peak:.0f}% |", flush=True)


def generation_table(args, cfg) -> None:
  frames = int(round(float(cfg.data.audio_duration_s) * 50))
  q, width = int(cfg.qformer.num_queries), int(cfg.qformer.output_size)
  tokens = jax.random.normal(jax.random.key(1), (1, q, width))
  noise = jax.random.normal(jax.random.key(2), (1, frames, int(cfg.vae.latent_channels)))
  vae = build.vae(cfg)
  vae_params = jax.jit(lambda k: nn.unbox(build.init_vae(cfg, k)).get("vae", {}))(jax.random.key(3))
  vae_params = cast_kernels(vae_params, cfg.vae.dtype) if vae_params else vae_params  # as the Generator holds them
  rows = []
  for mean_flow, steps, guided in ((False, int(cfg.flow.num_steps), True), (True, 1, False), (True, 2, False)):
    dit = DiT(dataclasses.replace(build.dit_config(cfg), mean_flow=mean_flow))
    dit_params = jax.jit(lambda k: nn.unbox(dit.init(k, noise[:, :8], jnp.zeros((1,)), tokens))["params"])(
        jax.random.key(4))
    dit_params = cast_kernels(dit_params, dit.cfg.dtype)  # as the Generator holds them
    program = generation_programs(dit, vae, 1.0)[1]
    def call(program=program, dit_params=dit_params, steps=steps, guided=guided):  # this row's, not the last's
      jax.block_until_ready(program(dit_params, vae_params, noise, tokens, steps, guided,
                                    jnp.float32(cfg.flow.cfg_scale), jnp.float32(0.0)))
    t0 = time.perf_counter()
    call()
    name = f"mean flow, {steps} step{'s' * (steps > 1)}" if mean_flow else f"Euler {steps} steps + CFG"
    rows.append((name, steps * (2 if guided else 1), time.perf_counter() - t0, call, []))
  # The timed calls take turns (A B C A B C ...), so that a drift in the machine's speed, which on a shared VM
  # moves by tens of percent over minutes, reaches every row alike.
  for _ in range(args.reps):
    for *_, call, times in rows:
      t0 = time.perf_counter()
      call()
      times.append(time.perf_counter() - t0)
  base = statistics.median(rows[0][4])
  print(f"\n| {float(cfg.data.audio_duration_s):g}-s generation + VAE decode, batch 1 | DiT rows (NFE x batch) "
        f"| compile + first s | s (median of {args.reps}, interleaved) | speed-up |\n|---|---|---|---|---|")
  for name, rows_per, first_s, _, times in rows:
    seconds = statistics.median(times)
    print(f"| {name} | {rows_per} | {first_s:.1f} | {seconds:.3f} | {base / seconds:.1f}x |", flush=True)


def speech_table(args, cfg) -> None:
  hubert, bridge = build.hubert(cfg), build.bridge(cfg)
  wave = 0.1 * jax.random.normal(jax.random.key(5), (1, int(SPEECH_S * 16000)))
  mask = jnp.ones(wave.shape, bool)
  params = jax.jit(lambda k: nn.unbox({"hubert": hubert.init(k, wave[:, :4000])["params"],
                                       "bridge": build.init_bridge(cfg, bridge, k)}))(jax.random.key(6))
  encode = jax.jit(lambda p, w, m: build.speech_tokens(cfg, p, {"speech": w, "speech_mask": m},
                                                       modules=(hubert, bridge)))
  seconds = median_time(lambda: jax.block_until_ready(encode(params, wave, mask)), max(args.reps, 10))
  print(f"\n| speech processing (HuBERT + Q-Former), {SPEECH_S:g}-s utterance, batch 1 | ms | STAR paper ms |\n"
        f"|---|---|---|\n| {cfg.hubert.dtype} | {1e3 * seconds:.1f} | {PAPER_SPEECH_MS} |", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="tiny sizes (configs/star.py:tiny), for CPU and tests")
  p.add_argument("--batch", type=int, default=16, help="train batch (the paper: 16)")
  p.add_argument("--frames", type=int, default=500, help="train latent frames (the paper: 500, 10 s)")
  p.add_argument("--steps", type=int, default=5, help="timed train steps (median)")
  p.add_argument("--reps", type=int, default=3, help="timed generations (median)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every part")
  p.add_argument("--parts", default="train,generation,speech", help="comma list of the parts to run")
  args = p.parse_args(argv)
  variant = "tiny" if args.small else "paper"
  dtype = "float32" if args.small else "bfloat16"
  cfg = make_config(variant, dtype, args.set)
  print(f"{machine_line()}; {jax.devices()[0].device_kind}, {variant} sizes", flush=True)
  t0 = time.perf_counter()
  parts = args.parts.split(",")
  if "train" in parts:
    train_table(args, variant, dtype)
  if "generation" in parts:
    generation_table(args, cfg)
  if "speech" in parts:
    speech_table(args, cfg)
  print(f"\n# total {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
