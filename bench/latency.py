"""Speech-processing latency as STAR reports it: end-to-end (HuBERT + Q-Former) against the ASR cascade.

    python bench/latency.py [--data data/opensfx] [--num-utterances 20] [--threads 2] [--json OUT]
    python bench/latency.py --size tiny --num-utterances 3       # smoke run, seconds

Per utterance of the built-in corpus's test split (`star-jax prepare opensfx --out data/opensfx
--audio-rate-hz 16000`; `--num-utterances` records evenly spaced over the split), batch 1, random weights:
  ours      our jitted HuBERT-large + 2-layer Q-Former (configs/star.py:paper), waveform -> S (1, 32, 1024).
            XLA compiles once per input shape, so each waveform is zero-padded (with its mask) up to a
            multiple of `--bucket-s`; every bucket is compiled and run `--warmup` times before timing.
  PyTorch   the same pair in transformers (`HubertModel` + `Blip2QFormerModel` + Linear), eager, exact length.
  cascade   Whisper large-v3 (`WhisperFeatureExtractor` 128 mels, `WhisperForConditionalGeneration`) greedy
            decoding forced to the caption's length, then the FLAN-T5-large encoder on the caption.
Token counts come from a rule, not a tokenizer (nothing is downloaded): Whisper decodes one token per
caption word plus a final period plus end-of-text (its BPE keeps these common lower-case English words
whole), end-of-text suppressed as `min_new_tokens = max_new_tokens` does; T5 reads one token per word
plus `</s>`. Systems run one after another (so only one big model is in memory); the load average is
recorded around each. Reduction = 1 - mean(E2E) / mean(cascade), as the paper reports it (76.9 %).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

SAMPLE_RATE_HZ = 16000
PAPER_REDUCTION = 0.769
# Whisper large-v3 special tokens: <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>; <|endoftext|>.
WHISPER_PROMPT = (50258, 50259, 50360, 50364)
WHISPER_EOT = 50257
T5_EOS = 1
CASCADE = "cascade: Whisper + FLAN-T5 encoder, PyTorch float32"
CASCADE_SIZES = {
    "paper": dict(
        whisper=dict(vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
                     encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
                     decoder_ffn_dim=5120, max_source_positions=1500, max_target_positions=448),
        t5=dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)),  # flan-t5-large
    "tiny": dict(
        whisper=dict(vocab_size=51866, num_mel_bins=128, d_model=64, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448),
        t5=dict(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}


def load_utterances(path: str, split: str, count: int) -> list[dict]:
  """`count` records evenly spaced over `split` (all if fewer): dicts with id, caption, speech (T,) f32."""
  import tensorflow_datasets as tfds

  from star_jax.data import records

  info = records.read_info(path)
  if info["speech_sample_rate_hz"] != SAMPLE_RATE_HZ:
    raise SystemExit(f"{path}: speech is at {info['speech_sample_rate_hz']} Hz, expected {SAMPLE_RATE_HZ}")
  source = tfds.builder_from_directory(info["version_dir"]).as_data_source(split)
  indices = np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).round().astype(int))
  return [records.from_example(source[int(i)]) for i in indices]


def token_counts(caption: str) -> tuple[int, int]:
  """(Whisper decode steps, T5 input tokens) by the rule in the module docstring."""
  from star_jax.data.text import words

  n = len(words(caption))
  return n + 2, n + 1


def bucket_samples(num_samples: int, bucket_s: float) -> int:
  step = int(round(bucket_s * SAMPLE_RATE_HZ))
  return max(1, math.ceil(num_samples / step)) * step


def stats(times: list[float]) -> dict:
  return dict(mean_s=statistics.fmean(times), std_s=statistics.pstdev(times), median_s=statistics.median(times),
              n=len(times))


def load() -> float:
  return round(os.getloadavg()[0], 2)


def time_ours(utts: list[dict], size: str, dtype: str, bucket_s: float, warmup: int) -> dict:
  """Our jitted HuBERT + Q-Former per utterance, one compiled executable per length bucket."""
  import jax
  import jax.numpy as jnp
  from flax.linen import meta

  from star_jax.config import load_config
  from star_jax.models.bridge import QFormer, QFormerConfig
  from star_jax.models.hubert import Hubert, HubertConfig

  cfg = load_config(f"{ROOT}/configs/star.py:{size}")
  hubert = Hubert(HubertConfig(**{**cfg.hubert.to_dict(), "dtype": dtype}))
  qformer = QFormer(QFormerConfig(**{**cfg.qformer.to_dict(), "dtype": dtype}))

  def init(key):
    k1, k2 = jax.random.split(key)
    wave = jnp.zeros((1, SAMPLE_RATE_HZ), jnp.float32)
    h_params = hubert.init(k1, wave)["params"]
    speech, mask = hubert.apply({"params": h_params}, wave)
    return {"hubert": h_params, "qformer": qformer.init(k2, speech, mask)["params"]}

  params = meta.unbox(jax.jit(init)(jax.random.key(0)))
  if dtype == "bfloat16":  # inference keeps one bf16 copy instead of casting f32 params on every call
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)

  @jax.jit
  def encode(p, wave_bt, mask_bt):
    speech, frame_mask = hubert.apply({"params": p["hubert"]}, wave_bt, mask_bt)
    return qformer.apply({"params": p["qformer"]}, speech, frame_mask)

  def inputs(speech: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    length = bucket_samples(len(speech), bucket_s)
    wave = np.zeros((1, length), np.float32)
    wave[0, :len(speech)] = speech
    return wave, np.arange(length)[None] < len(speech)

  compiled, compile_s = {}, {}
  for utt in utts:
    length = bucket_samples(len(utt["speech"]), bucket_s)
    if length not in compiled:
      wave, mask = inputs(utt["speech"])
      t0 = time.perf_counter()
      compiled[length] = encode.lower(params, wave, mask).compile()
      compile_s[length / SAMPLE_RATE_HZ] = round(time.perf_counter() - t0, 2)
      for _ in range(warmup):
        compiled[length](params, wave, mask).block_until_ready()
  times = []
  for utt in utts:
    t0 = time.perf_counter()
    wave, mask = inputs(utt["speech"])
    out = compiled[wave.shape[1]](params, jnp.asarray(wave), jnp.asarray(mask))
    out.block_until_ready()
    times.append(time.perf_counter() - t0)
  return dict(times_s=times, compile_s_by_bucket_s=compile_s, output_shape=list(out.shape))


def torch_pair(size: str):
  """transformers HubertModel + Blip2QFormerModel + query tokens + Linear with configs/star.py's sizes."""
  import torch
  from transformers import Blip2QFormerConfig, Blip2QFormerModel, HubertConfig, HubertModel

  from star_jax.config import load_config

  cfg = load_config(f"{ROOT}/configs/star.py:{size}")
  h, q = cfg.hubert, cfg.qformer
  torch.manual_seed(0)
  hubert = HubertModel(HubertConfig(
      hidden_size=h.hidden_size, num_hidden_layers=h.num_layers, num_attention_heads=h.num_heads,
      intermediate_size=h.intermediate_size, conv_dim=tuple(h.conv_dim), conv_kernel=tuple(h.conv_kernel),
      conv_stride=tuple(h.conv_stride), conv_bias=h.conv_bias, feat_extract_norm=h.feat_extract_norm,
      do_stable_layer_norm=h.do_stable_layer_norm, num_conv_pos_embeddings=h.num_conv_pos_embeddings,
      num_conv_pos_embedding_groups=h.num_conv_pos_embedding_groups, layer_norm_eps=h.layer_norm_eps,
      mask_time_prob=0.0)).eval()
  qformer = Blip2QFormerModel(Blip2QFormerConfig(
      hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
      intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_frequency,
      encoder_hidden_size=q.encoder_hidden_size, layer_norm_eps=q.layer_norm_eps)).eval()
  queries = torch.randn(1, q.num_queries, q.hidden_size) * 0.02
  projection = torch.nn.Linear(q.hidden_size, q.output_size).eval()

  def encode(wave_bt):
    hidden = hubert(wave_bt).last_hidden_state
    tokens = qformer(query_embeds=queries, encoder_hidden_states=hidden).last_hidden_state
    return projection(tokens)

  return encode


def time_torch_e2e(utts: list[dict], size: str, warmup: int) -> dict:
  import torch

  encode = torch_pair(size)
  with torch.inference_mode():
    for _ in range(warmup):
      encode(torch.from_numpy(utts[0]["speech"])[None])
    times = []
    for utt in utts:
      t0 = time.perf_counter()
      out = encode(torch.from_numpy(utt["speech"])[None])
      times.append(time.perf_counter() - t0)
  return dict(times_s=times, output_shape=list(out.shape))


def time_cascade(utts: list[dict], size: str, warmup: int) -> dict:
  """Whisper (log-mel, encoder, forced-length greedy decoding with a KV cache) then the T5 encoder."""
  import torch
  from transformers import (T5Config, T5EncoderModel, WhisperConfig, WhisperFeatureExtractor,
                            WhisperForConditionalGeneration)
  from transformers.modeling_outputs import BaseModelOutput

  from star_jax.data.text import words

  sizes = CASCADE_SIZES[size]
  torch.manual_seed(0)
  features = WhisperFeatureExtractor(feature_size=sizes["whisper"]["num_mel_bins"])
  whisper = WhisperForConditionalGeneration(WhisperConfig(**sizes["whisper"])).eval()
  t5 = T5EncoderModel(T5Config(**sizes["t5"])).eval()

  def asr(speech: np.ndarray, steps: int) -> list[int]:
    feats = features(speech, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt").input_features
    encoded = BaseModelOutput(last_hidden_state=whisper.model.encoder(feats).last_hidden_state)
    ids, past, tokens = torch.tensor([WHISPER_PROMPT]), None, []
    for _ in range(steps):  # what generate(min_new_tokens=max_new_tokens=steps, greedy) does
      out = whisper(encoder_outputs=encoded, decoder_input_ids=ids, past_key_values=past, use_cache=True)
      logits, past = out.logits[:, -1], out.past_key_values
      logits[:, WHISPER_EOT] = -math.inf
      ids = logits.argmax(-1, keepdim=True)
      tokens.append(int(ids))
    return tokens

  def text_encode(caption: str, num_tokens: int) -> torch.Tensor:
    # Token ids only need to be deterministic: cost depends on the count, not the values.
    ids = [zlib.crc32(w.encode()) % (sizes["t5"]["vocab_size"] - 100) + 100 for w in words(caption)]
    ids = (ids + [T5_EOS])[-num_tokens:]
    return t5(input_ids=torch.tensor([ids])).last_hidden_state

  with torch.inference_mode():
    for _ in range(warmup):
      steps, num_tokens = token_counts(utts[0]["caption"])
      asr(utts[0]["speech"], steps)
      text_encode(utts[0]["caption"], num_tokens)
    times, asr_s, t5_s, steps_all = [], [], [], []
    for utt in utts:
      steps, num_tokens = token_counts(utt["caption"])
      t0 = time.perf_counter()
      tokens = asr(utt["speech"], steps)
      t1 = time.perf_counter()
      out = text_encode(utt["caption"], num_tokens)
      t2 = time.perf_counter()
      assert len(tokens) == steps
      times.append(t2 - t0)
      asr_s.append(t1 - t0)
      t5_s.append(t2 - t1)
      steps_all.append(steps)
      print(f"  cascade {utt['id']}: {t2 - t0:.2f} s ({steps} decode steps)", flush=True)
  return dict(times_s=times, asr_s=asr_s, t5_s=t5_s, decode_steps=steps_all, output_shape=list(out.shape))


def table(results: dict) -> str:
  cascade = results["systems"].get(CASCADE)
  rows = ["| system | mean ± std (s) | median (s) | n | reduction vs cascade (paper: 76.9 %) |",
          "|---|---|---|---|---|"]
  for name, r in results["systems"].items():
    s = r["stats"]
    red = "–" if cascade is None or name == CASCADE else \
        f"{100 * (1 - s['mean_s'] / cascade['stats']['mean_s']):.1f} %"
    rows.append(f"| {name} | {s['mean_s']:.3f} ± {s['std_s']:.3f} | {s['median_s']:.3f} | {s['n']} | {red} |")
  if cascade is not None:
    rows.append(f"\ncascade parts: Whisper {statistics.fmean(cascade['asr_s']):.3f} s "
                f"(mean {statistics.fmean(cascade['decode_steps']):.1f} decode steps), "
                f"FLAN-T5 encoder {statistics.fmean(cascade['t5_s']):.3f} s (means)")
  return "\n".join(rows)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default="data/opensfx", help="prepared dataset directory")
  parser.add_argument("--split", default="test")
  parser.add_argument("--num-utterances", type=int, default=20)
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="CPUs for both frameworks (process affinity + torch threads)")
  parser.add_argument("--size", default="paper", choices=sorted(CASCADE_SIZES))
  parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes of ours")
  parser.add_argument("--systems", default="ours,pytorch,cascade")
  parser.add_argument("--bucket-s", type=float, default=1.0, help="ours: pad lengths up to a multiple of this")
  parser.add_argument("--warmup", type=int, default=1, help="untimed runs per system (ours: per bucket)")
  parser.add_argument("--json", help="write every per-utterance time and the settings here")
  args = parser.parse_args()

  # Both XLA's and torch's thread pools size themselves from the affinity mask, set before they start.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import jax
  import torch

  torch.set_num_threads(args.threads)
  from star_jax.errors import UserError

  try:
    utts = load_utterances(args.data, args.split, args.num_utterances)
  except UserError as e:
    print(f"error: {e}\n(build the corpus: star-jax prepare opensfx --out {args.data} --audio-rate-hz 16000)")
    return 2
  seconds = [len(u["speech"]) / SAMPLE_RATE_HZ for u in utts]
  systems = args.systems.split(",")
  results = dict(
      date=time.strftime("%Y-%m-%d %H:%M"), machine=f"{platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPUs, {args.threads} used", jax=jax.__version__, torch=torch.__version__,
      command=" ".join(sys.argv), size=args.size, bucket_s=args.bucket_s, warmup=args.warmup,
      utterances=[dict(id=u["id"], caption=u["caption"], seconds=s) for u, s in zip(utts, seconds)], systems={})
  print(f"{len(utts)} utterances of {args.data}:{args.split}, {min(seconds):.2f}-{max(seconds):.2f} s "
        f"(mean {statistics.fmean(seconds):.2f} s); load {load()}", flush=True)

  def record(name: str, run) -> None:
    before, t0 = load(), time.perf_counter()
    r = run()
    r.update(stats=stats(r["times_s"]), load_before=before, load_after=load(), phase_s=time.perf_counter() - t0)
    results["systems"][name] = r
    print(f"{name}: {r['stats']['mean_s']:.3f} ± {r['stats']['std_s']:.3f} s, median {r['stats']['median_s']:.3f} s "
          f"(phase {r['phase_s']:.0f} s, load {before} -> {r['load_after']})", flush=True)

  if "ours" in systems:
    for dtype in args.dtypes.split(","):
      record(f"ours: HuBERT + Q-Former, JAX {dtype}",
             lambda: time_ours(utts, args.size, dtype, args.bucket_s, args.warmup))
  if "pytorch" in systems:
    record("HuBERT + Q-Former, PyTorch float32", lambda: time_torch_e2e(utts, args.size, args.warmup))
  if "cascade" in systems:
    record(CASCADE, lambda: time_cascade(utts, args.size, args.warmup))

  sizes = ("HuBERT-large + 2-layer Q-Former vs Whisper large-v3 + FLAN-T5-large encoder" if args.size == "paper"
           else "tiny configs")
  print(f"\n# speech-processing latency per utterance, batch 1, random weights, {sizes}; "
        f"{results['machine']}, load {load()}; ours padded to multiples of {args.bucket_s:g} s")
  print(table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
