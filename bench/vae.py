"""Oobleck VAE speed: paper-size decode of 10 s of 24 kHz audio (500 latents) and encode, ours vs diffusers.

  PYTHONPATH=. .venv/bin/python bench/vae.py [--runs 3] [--what decode,encode] [--dtype float32,bfloat16]

Both models share random weights (ours converted from the diffusers model with `from_torch`, so they compute
the same function). Prints the median wall time of `--runs` calls after a warm-up, ours as it runs by default
(on CPU its residual units go one time tile at a time: `OobleckVAE.time_tile`) and untiled, the ratio ours /
PyTorch, the FLOPs from XLA's compiled cost analysis of the untiled program, and the achieved FLOP/s against
a matmul peak measured in the same run (f32, and bf16 inputs with f32 accumulation).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # star_jax and bench

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import matmul_peak, median_time  # noqa: E402
from star_jax.convert.vae import from_torch  # noqa: E402
from star_jax.models.vae import OobleckVAE  # noqa: E402

PAPER = dict(encoder_hidden_size=128, decoder_channels=128, decoder_input_channels=128, audio_channels=1,
             channel_multiples=[1, 2, 4, 8], downsampling_ratios=[2, 4, 6, 10], sampling_rate=24000)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--what", default="decode,encode")
  p.add_argument("--dtype", default="float32,bfloat16")
  p.add_argument("--seconds", type=float, default=10.0)
  args = p.parse_args()
  import torch
  from diffusers import AutoencoderOobleck
  from diffusers.utils import logging as diffusers_logging

  diffusers_logging.set_verbosity_error()

  torch.manual_seed(0)
  model = AutoencoderOobleck(**PAPER).eval()
  cfg, params = from_torch(model)
  num_samples = int(args.seconds * cfg.sample_rate_hz)
  num_latents = num_samples // int(np.prod(cfg.downsampling_ratios))
  rng = np.random.default_rng(0)
  inputs = {"decode": rng.standard_normal((1, num_latents, cfg.latent_channels), np.float32),
            "encode": rng.standard_normal((1, num_samples), np.float32)}

  print(f"# Oobleck VAE, {args.seconds:g} s at {cfg.sample_rate_hz} Hz ({num_latents} latents), batch 1; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
  peaks = {d: matmul_peak(jnp.dtype(d), reps=args.runs) for d in args.dtype.split(",")}
  print("| what | dtype | ours (s) | ours untiled (s) | PyTorch (s) | ours / PyTorch | GFLOP | ours GFLOP/s "
        "| matmul peak GFLOP/s | ours % of peak |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for what in args.what.split(","):
    for dtype in args.dtype.split(","):
      x = jnp.asarray(inputs[what])
      seconds, flops = {}, float("nan")
      for tile in (None, 0):  # the default (time-tiled on CPU) and untiled: the same math
        vae = OobleckVAE(dataclasses.replace(cfg, dtype=dtype), time_tile=tile)
        compiled = jax.jit(partial(vae.apply, method=what)).lower({"params": params}, x).compile()
        if tile == 0:  # XLA counts a loop body once: the FLOPs are the untiled program's
          flops = compiled.cost_analysis().get("flops", float("nan"))
        seconds[tile] = median_time(lambda: jax.block_until_ready(compiled({"params": params}, x)), args.runs)
      x_torch = torch.from_numpy(inputs[what].transpose(0, 2, 1) if what == "decode" else inputs[what][:, None])
      torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
      ref_model = model.to(torch_dtype)
      ref_fn = ref_model.decode if what == "decode" else ref_model.encode
      with torch.inference_mode():
        ref = median_time(lambda: ref_fn(x_torch.to(torch_dtype)), args.runs)
      ours = seconds[None]
      print(f"| {what} | {dtype} | {ours:.2f} | {seconds[0]:.2f} | {ref:.2f} | {ours / ref:.2f} | {flops / 1e9:.0f} | "
            f"{flops / ours / 1e9:.0f} | {peaks[dtype] / 1e9:.0f} | {100 * flops / ours / peaks[dtype]:.0f}% |",
            flush=True)
      model.to(torch.float32)

if __name__ == "__main__":
  main()
