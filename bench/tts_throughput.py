"""Speech synthesis in the pipeline: utterances/s per grain worker process, per synthesiser, and the workers a
paper stage-1 step (batch 512) needs to be fed.

  python bench/tts_throughput.py [--utterances 40]

Each row speaks AudioCaps-like captions through `star_jax.data.speak.SpeakCaption` (what `data.speech_source:
synthesized` runs per record: voice draw, synthesis, resampling to 16 kHz) in this one process with one torch
thread, as one grain worker would. Synthesisers: espeak-ng (the C library behind its fork-per-utterance server;
and the espeak-ng command, for comparison), a tiny random VITS (the tests' size) and VITS at the size of
kakao-enterprise/vits-ljs, which facebook/mms-tts-eng shares at 16 kHz (transformers' VitsConfig defaults: 192 hidden, 6 text-encoder
layers, 4 flows, HiFi-GAN 512 channels upsampling 8-8-2-2), with RANDOM weights: nothing is downloaded. Random
weights predict random durations, so the VITS models here use the deterministic duration predictor with its
output fixed to a natural rate (`FRAMES_PER_TOKEN`: ~14 characters/s, as LJSpeech reads); the synthesis cost
is that of real speech of that length. Rates are per wall second and per CPU second (this process plus, for
espeak-ng, its server and the forks): on a busy machine the CPU rate is what a free core gives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

CAPTIONS = (  # AudioCaps-like: 8-14 words, 45-75 characters
    "A man speaks while a vehicle engine idles in the background",
    "Birds chirp and sing as wind blows through the trees",
    "A dog barks repeatedly while people talk nearby",
    "Rain falls steadily on a metal roof with distant thunder",
    "A train horn blows as the train passes by on the tracks",
    "Water runs from a faucet and splashes into a sink",
    "A crowd applauds and cheers loudly after a speech",
    "An engine revs up and a car accelerates away quickly",
)
BATCH = 512  # the paper's stage-1 batch (DESIGN.md, paper hyper-parameters)
STEP_TIMES_S = (0.25, 0.5, 1.0, 2.0)
FRAMES_PER_TOKEN = 3.0  # spectrogram frames (hop 256) per input token, blanks included: ~14 characters/s


def _cpu_s(pid: int | None = None) -> float:
  """CPU seconds of this process, or of process `pid` and its waited-for children (from /proc)."""
  if pid is None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
  fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
  return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _save_vits(model_dir: str, size: str) -> None:
  import torch
  from transformers import VitsConfig, VitsModel, VitsTokenizer

  chars = list("abcdefghijklmnopqrstuvwxyz ',.")
  vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
  os.makedirs(model_dir)
  with open(os.path.join(model_dir, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  tokenizer = VitsTokenizer(os.path.join(model_dir, "vocab.json"), phonemize=False, add_blank=True, normalize=True)
  if size == "tiny":
    from tests.tiny_vits import TINY

    config = VitsConfig(vocab_size=len(vocab), **TINY, use_stochastic_duration_prediction=False)
  else:  # vits-ljs at 22.05 kHz; mms-tts-eng has the same layers at 16 kHz (fewer samples per second of speech)
    config = VitsConfig(vocab_size=len(vocab), sampling_rate=22050, use_stochastic_duration_prediction=False)
  torch.manual_seed(0)
  model = VitsModel(config)
  with torch.no_grad():  # a fixed, natural duration per token instead of a random one
    proj = model.duration_predictor.proj
    proj.weight.zero_()
    proj.bias.fill_(math.log(FRAMES_PER_TOKEN))
  model.save_pretrained(model_dir)
  tokenizer.save_pretrained(model_dir)


def _espeak_command(n: int) -> tuple[float, float, float]:
  from star_jax.data import tts

  rng = np.random.default_rng(0)
  start, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  audio_s = 0.0
  for i in range(n):
    v = tts.ESPEAK_POOL.draw(rng)
    out = subprocess.run(["espeak-ng", "-v", v.name, "-s", str(v.speed_wpm), "-p", str(v.pitch), "--stdout", "--",
                          CAPTIONS[i % len(CAPTIONS)]], check=True, capture_output=True).stdout
    audio_s += (len(out) - 44) / 2 / 22050
  wall = time.perf_counter() - start
  cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  return wall, (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), audio_s


def _through_pipeline(pool, n: int) -> tuple[float, float, float]:
  from star_jax.data import speak, tts

  transform = speak.SpeakCaption(pool, 16000)
  record = dict(id="bench", caption=CAPTIONS[0], speech=np.zeros(16000, np.float32))
  transform.random_map(record, np.random.default_rng(0))  # loads the model / starts the server
  server = tts._EspeakServer._running.get(os.getpid()) if pool.espeak else None
  server_pid = server._process.pid if server else None
  start, cpu0 = time.perf_counter(), _cpu_s() + (_cpu_s(server_pid) if server_pid else 0.0)
  audio_s = 0.0
  for i in range(n):
    out = transform.random_map(dict(record, caption=CAPTIONS[i % len(CAPTIONS)]), np.random.default_rng(i + 1))
    assert out["_tts_fallback"] == 0, out["_tts_why"]
    audio_s += len(out["speech"]) / 16000
  wall = time.perf_counter() - start
  cpu = _cpu_s() + (_cpu_s(server_pid) if server_pid else 0.0) - cpu0
  return wall, cpu, audio_s


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--utterances", type=int, default=40, help="per row (the big VITS: a quarter of it)")
  args = ap.parse_args()

  import torch

  from star_jax.data import speak

  torch.set_num_threads(1)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    cases = [("espeak-ng, C library via fork server (pipeline)", lambda n: _through_pipeline(speak.Pool(), n), 1),
             ("espeak-ng, one command per utterance", _espeak_command, 1)]
    for size, label, share in (("tiny", "VITS tiny (tests' size), random weights", 1),
                               ("ljs", "VITS vits-ljs / mms-tts-eng size, random weights", 4)):
      model_dir = os.path.join(tmp, size)
      _save_vits(model_dir, size)
      pool = speak.Pool(espeak=False, vits_models=(model_dir,))
      cases.append((label, lambda n, pool=pool: _through_pipeline(pool, n), share))
    for label, run, share in cases:
      n = max(4, args.utterances // share)
      wall, cpu, audio_s = run(n)
      rows.append((label, n, audio_s / n, n / wall, n / cpu if cpu > 0 else float("nan")))

  load = os.getloadavg()
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} "
        f"{load[1]:.1f} {load[2]:.1f}; torch {torch.__version__}, 1 thread; {args.utterances} AudioCaps-like "
        "captions per row")
  print()
  print("| synthesiser | utterances | mean speech s | utt/s per worker (wall) | utt/s per worker (CPU s) | "
        + " | ".join(f"workers for B=512 in {t:g} s" for t in STEP_TIMES_S) + " |")
  print("|---|---|---|---|---|" + "---|" * len(STEP_TIMES_S))
  for label, n, mean_s, per_wall, per_cpu in rows:
    workers = [str(math.ceil(BATCH / (per_cpu * t))) for t in STEP_TIMES_S]
    print(f"| {label} | {n} | {mean_s:.2f} | {per_wall:.1f} | {per_cpu:.1f} | " + " | ".join(workers) + " |")


if __name__ == "__main__":
  main()
