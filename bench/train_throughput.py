"""Stage-2 train-step throughput: steps/s, latent tokens/s, FLOPs per step and MFU, f32 and bf16 compute.

  python bench/train_throughput.py       # tiny (batch 8, f32 + bf16) + paper (DiT-L, batch 1, 100 frames, bf16)
  python bench/train_throughput.py --configs paper --paper-frames 500 --paper-batch 2 --inputs cached,raw
The step is the trainer's own (`state.make_train_step` on `stage2.build`'s loss and AdamW, jitted with the
loop's shardings, state donated), compiled once ahead of time, warmed up, then timed as the median of
`--steps` steps. Inputs `cached`: the batch carries HuBERT frames and VAE latents (the frozen Q-Former body
still runs); `raw`: waveforms, so the frozen HuBERT and VAE encoder run inside every step. FLOPs come from
XLA's compiled cost analysis and include rematerialised recomputation (paper DiT: remat "dots"), so MFU is
hardware-FLOPs utilisation: achieved FLOP/s over a matmul peak measured in the same run, right before the
row, with the row's dtype policy (bf16 inputs with f32 accumulation, or f32). Tokens = latent frames × batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import flops_of, machine_line, matmul_peak  # noqa: E402
from star_jax import sharding  # noqa: E402
from star_jax.config import load_config  # noqa: E402
from star_jax.constants import FRAME_RATE_HZ  # noqa: E402
from star_jax.models import build  # noqa: E402
from star_jax.train import stage2  # noqa: E402
from star_jax.train import state as state_lib  # noqa: E402

PAPER_FRAMES = 500  # 10-s clips (DESIGN.md §2)
DTYPE_SECTIONS = ("hubert", "qformer", "dit", "vae")


def make_config(variant: str, dtype: str, overrides: list[str]):
  """The config variant with every stage-2 component computing in `dtype` (params stay f32)."""
  return load_config(f"configs/star.py:{variant}", [f"{s}.dtype={dtype}" for s in DTYPE_SECTIONS] + overrides)


def make_batch(cfg, batch: int, frames: int, inputs: str) -> dict:
  """Random numpy inputs with the pipeline's keys and shapes: `frames` latent frames, the config's speech."""
  rng = np.random.default_rng(0)
  speech_s = float(cfg.data.speech_duration_s)
  if inputs == "cached":
    th = int(round(speech_s * FRAME_RATE_HZ))
    return {"hubert": rng.standard_normal((batch, th, cfg.hubert.hidden_size), np.float32),
            "hubert_mask": np.ones((batch, th), bool),
            "latents": rng.standard_normal((batch, frames, cfg.vae.latent_channels), np.float32),
            "latents_mask": np.ones((batch, frames), bool)}
  ts = int(round(speech_s * cfg.data.speech_sample_rate_hz))
  ta = frames * build.vae_hop(cfg)
  return {"speech": 0.1 * rng.standard_normal((batch, ts), np.float32), "speech_mask": np.ones((batch, ts), bool),
          "audio": 0.1 * rng.standard_normal((batch, ta), np.float32), "audio_mask": np.ones((batch, ta), bool)}


def bench_step(variant: str, dtype: str, batch: int, frames: int, inputs: str, steps: int, warmup: int,
               overrides: list[str]) -> dict:
  """Build, compile (once, ahead of time) and time the stage-2 train step -> one table row."""
  cfg = make_config(variant, dtype, overrides)
  stage = stage2.build(cfg)
  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  rules = sharding.logical_rules(cfg.logical_axis_rules)
  sharding.check_batch_size(batch, mesh)
  schedule = state_lib.make_schedule(stage.hparams, 1000, 1000)
  tx = state_lib.make_optimizer(stage.hparams, schedule)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(0))
  ema = float(stage.hparams.get("ema_decay", 0.0) or 0.0)
  shapes, shardings = state_lib.state_layout(stage.init, tx, mesh, rules, init_rng, ema > 0)
  host_batch = make_batch(cfg, batch, frames, inputs)
  # The loop's own step signature (star_jax/train/state.py): in/out shardings, state donated.
  signature = state_lib.train_step_with_signature(
      stage.loss, stage.hparams, cfg.train.nan_policy, tx, schedule, shapes, shardings,
      {k: (v.shape, v.dtype) for k, v in host_batch.items()}, mesh)
  replicated = sharding.replicated(mesh)
  t0 = time.perf_counter()
  compiled = signature.compile(mesh, rules)
  compile_s = time.perf_counter() - t0
  flops = flops_of(compiled)
  state = state_lib.init_state(stage.init, tx, mesh, rules, init_rng, shardings)
  device_batch = sharding.global_batch(host_batch, mesh)
  step_rng = jax.device_put(step_rng, replicated)
  for _ in range(warmup):
    state, metrics = compiled(state, device_batch, step_rng)
    jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, device_batch, step_rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  loss = float(metrics["loss"])
  del state, metrics, device_batch, compiled
  gc.collect()
  step_s = statistics.median(times)
  return {"config": variant, "dtype": dtype, "inputs": inputs, "batch": batch, "frames": frames,
          "remat": str(cfg.dit.remat),
          "trainable_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.params)),
          "compile_s": compile_s, "step_s": step_s, "steps_per_s": 1.0 / step_s,
          "tokens_per_s": batch * frames / step_s, "flops_per_step": flops,
          "flops_per_s": flops / step_s, "loss": loss, "times_s": times}


def row_label(r: dict) -> str:
  short = r["config"] == "paper" and r["frames"] < PAPER_FRAMES
  return f"{r['config']}" + (f" (L={r['frames']} of {PAPER_FRAMES})" if short else "")


def print_table(rows: list[dict]) -> None:
  head = ["config", "inputs", "dtype", "B x L", "trainable", "remat", "compile s", "step s (median)", "steps/s",
          "tokens/s", "GFLOP/step", "GFLOP/s", "matmul peak GFLOP/s", "MFU"]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for r in rows:
    cells = [row_label(r), r["inputs"], r["dtype"], f"{r['batch']} x {r['frames']}",
             f"{r['trainable_params'] / 1e6:.1f}M", r["remat"], f"{r['compile_s']:.0f}", f"{r['step_s']:.3f}",
             f"{r['steps_per_s']:.3g}", f"{r['tokens_per_s']:.4g}", f"{r['flops_per_step'] / 1e9:.1f}",
             f"{r['flops_per_s'] / 1e9:.1f}", f"{r['peak_flops_per_s'] / 1e9:.0f}", f"{100 * r['mfu']:.0f}%"]
    print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="tiny,paper", help="comma list of configs/star.py variants")
  p.add_argument("--dtypes", default="", help="compute dtypes of every config (params stay f32); default: "
                 "float32,bfloat16 for tiny, bfloat16 (its own) for paper, whose step takes minutes to compile")
  p.add_argument("--inputs", default="cached", help="comma list: cached (HuBERT frames + latents), raw (waveforms)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--tiny-batch", type=int, default=0, help="tiny batch (0: the config's stage2.batch_size)")
  p.add_argument("--tiny-frames", type=int, default=0, help="tiny latent frames (0: data.audio_duration_s x 50)")
  p.add_argument("--paper-batch", type=int, default=1, help="paper batch (the paper trains with 16)")
  p.add_argument("--paper-frames", type=int, default=100, help=f"paper latent frames (the paper: {PAPER_FRAMES})")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every row")
  p.add_argument("--json", default="", help="also write the rows and machine info to this JSON file")
  args = p.parse_args(argv)

  load = os.getloadavg()
  print(machine_line() + " at start", flush=True)
  rows = []
  for variant in args.configs.split(","):
    base = load_config(f"configs/star.py:{variant}", args.set)
    if variant == "tiny":
      batch = args.tiny_batch or int(base.stage2.batch_size)
      frames = args.tiny_frames or int(round(float(base.data.audio_duration_s) * FRAME_RATE_HZ))
    else:
      batch, frames = args.paper_batch, args.paper_frames
    dtypes = args.dtypes or ("float32,bfloat16" if variant == "tiny" else str(base.dit.dtype))
    for inputs in args.inputs.split(","):
      for dtype in dtypes.split(","):
        peak = matmul_peak(dtype)
        row = bench_step(variant, dtype, batch, frames, inputs, args.steps, args.warmup, args.set)
        row["peak_flops_per_s"] = peak
        row["mfu"] = row["flops_per_s"] / peak
        rows.append(row)
        print(f"# {row_label(row)} {inputs} {dtype}: {row['step_s']:.3f} s/step, loss {row['loss']:.3f}, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
  print()
  print_table(rows)
  load_end = os.getloadavg()
  print(f"\nload average {load[0]:.1f} at start, {load_end[0]:.1f} at end")
  if args.json:
    info = {"machine": platform.platform(), "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__, "load_average_start": load, "load_average_end": load_end,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    with open(args.json, "w") as f:
      json.dump({"info": info, "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
