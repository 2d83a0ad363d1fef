"""Speech encoder + Q-Former latency: our jitted HuBERT + Q-Former against transformers' PyTorch models.

    python bench/speech_latency.py [--seconds 4] [--repeats 10] [--size paper|tiny]

Paper sizes (hubert-large-ll60k + the 2-layer Q-Former, 768 -> 1024) with random weights, one utterance,
batch 1. Both sides use the same weights (ours converted from the torch models), so the table also shows
how far the outputs agree. bf16 rows: torch runs `.to(torch.bfloat16)`; ours keeps f32 params cast once
to bf16 and accumulates every matmul in f32. Prints median seconds over `--repeats` runs after warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import median_time  # noqa: E402
from star_jax.convert import hubert as convert_hubert  # noqa: E402
from star_jax.convert import qformer as convert_qformer  # noqa: E402
from star_jax.models.bridge import QFormer  # noqa: E402
from star_jax.models.hubert import Hubert  # noqa: E402

SIZES = {
    "paper": dict(hubert=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
                  qformer=dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                               cross_attention_frequency=2, encoder_hidden_size=1024),
                  queries=32, output=1024),
    "tiny": dict(hubert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             conv_dim=(64,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
                 qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              cross_attention_frequency=2, encoder_hidden_size=64),
                 queries=8, output=64),
}


def build_torch(size: dict):
  import torch
  from transformers import Blip2QFormerConfig, Blip2QFormerModel, HubertConfig, HubertModel

  torch.manual_seed(0)
  hubert = HubertModel(HubertConfig(mask_time_prob=0.0, **size["hubert"])).eval()
  qformer = Blip2QFormerModel(Blip2QFormerConfig(**size["qformer"])).eval()
  queries = torch.randn(1, size["queries"], size["qformer"]["hidden_size"]) * 0.02
  projection = torch.nn.Linear(size["qformer"]["hidden_size"], size["output"]).eval()
  return hubert, qformer, queries, projection


def torch_forward(hubert, qformer, queries, projection, wav):
  hidden = hubert(wav).last_hidden_state
  out = qformer(query_embeds=queries.expand(wav.shape[0], -1, -1), encoder_hidden_states=hidden).last_hidden_state
  return projection(out)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seconds", type=float, default=4.0)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--size", default="paper", choices=sorted(SIZES))
  args = parser.parse_args()

  import torch

  size = SIZES[args.size]
  t_hubert, t_qformer, t_queries, t_proj = build_torch(size)
  h_cfg, h_params = convert_hubert.from_torch(t_hubert)
  q_cfg, q_params = convert_qformer.from_torch(t_qformer, t_queries, t_proj)
  wav = np.random.RandomState(0).randn(1, int(16000 * args.seconds)).astype(np.float32) * 0.1

  rows = []
  for dtype in ("float32", "bfloat16"):
    hubert = Hubert(h_cfg.__class__(**{**h_cfg.__dict__, "dtype": dtype}))
    qformer = QFormer(q_cfg.__class__(**{**q_cfg.__dict__, "dtype": dtype}))
    cast = (lambda x: x) if dtype == "float32" else (lambda x: x.astype(jnp.bfloat16))
    params = jax.device_put(jax.tree.map(lambda x: cast(jnp.asarray(x)), {"hubert": h_params, "qformer": q_params}))

    @jax.jit
    def ours(p, wav_bt):
      hidden, mask = hubert.apply({"params": p["hubert"]}, wav_bt)
      return qformer.apply({"params": p["qformer"]}, hidden, mask)

    wav_j = jnp.asarray(wav)
    ours_out = np.asarray(ours(params, wav_j), np.float32)
    t_ours = median_time(lambda: ours(params, wav_j).block_until_ready(), args.repeats, warmup=2)

    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    mods = [m.to(tdt) for m in (t_hubert, t_qformer, t_proj)]
    wav_t, q_t = torch.from_numpy(wav).to(tdt), t_queries.to(tdt)
    with torch.inference_mode():
      ref = torch_forward(*mods[:2], q_t, mods[2], wav_t).float().numpy()
      t_torch = median_time(lambda: torch_forward(*mods[:2], q_t, mods[2], wav_t), args.repeats, warmup=2)
    diff = float(np.abs(ours_out - ref).max() / (np.abs(ref).max() + 1e-12))
    rows.append((dtype, t_ours, t_torch, t_ours / t_torch, diff))
    del params

  print(f"# speech encoder + Q-Former latency, {args.size} sizes, {args.seconds:g} s utterance, batch 1")
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
        f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
  print(f"| dtype | ours (s) | PyTorch (s) | ours / PyTorch | max rel. diff |")
  print(f"|---|---|---|---|---|")
  for dtype, a, b, r, d in rows:
    print(f"| {dtype} | {a:.3f} | {b:.3f} | {r:.2f} | {d:.1e} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
