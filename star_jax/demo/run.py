"""The demo, step by step through the library: corpus (prepare_opensfx), vae -> stage1 -> cache -> stage2
(train.loop), export_bundle, Generator on the held-out spoken queries, evaluators, report."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from star_jax.constants import SPEECH_RATE_HZ


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", default="outputs/demo", help="where data, checkpoints and outputs go")
  p.add_argument("--config", default="configs/star.py:tiny", help="FILE.py:VARIANT (default: %(default)s)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value for every stage (repeatable)")
  p.add_argument("--max-queries", type=int, default=None,
                 help="held-out test queries to generate for, spread over the split (default: all of them)")
  p.add_argument("--png", type=int, default=8, help="spectrogram PNGs to draw")
  p.add_argument("--listen", type=int, default=16, help="queries on the listening page, report.html")


def _say(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _safe(name: str) -> str:
  """A record id as a file name (voice tags hold slashes: 'en-us/s160/p50')."""
  return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


SPLIT_KEYS = ("speech", "speech_mask", "audio", "labels", "id", "caption")


def split_arrays(cfg, split: str, limit: int | None = None, keys: tuple[str, ...] = SPLIT_KEYS) -> dict:
  """A split's fixed-length `keys` (deterministic crops; default speech, audio, labels, ids and captions), as
  numpy. Cached fields (latents, hubert) are there after `star-jax prepare cache`."""
  from star_jax.data import pipeline
  from star_jax.errors import UserError
  it = pipeline.make_iterator(cfg.data, split, batch_size=32, audio_sample_rate_hz=cfg.vae.sample_rate_hz,
                              shuffle=False, num_epochs=1, drop_remainder=False, random_crop=False,
                              process_index=0, process_count=1)
  parts: dict[str, list] = {}
  for batch in it:
    missing = sorted(set(keys) - set(batch))
    if missing:
      raise UserError(f"{cfg.data.path}: the {split} records have no {', '.join(missing)}; cached fields come from "
                      f"`star-jax prepare cache`")
    for k in keys:
      parts.setdefault(k, []).append(np.asarray(batch[k]))
  return spread({k: np.concatenate(v) for k, v in parts.items()}, limit)


def spread(arrays: dict, limit: int | None) -> dict:
  """At most `limit` rows of equal-length `arrays`, spread over them (every k-th, first and last included), so
  all classes and mixtures of a split are represented; all of them for no limit."""
  n = len(next(iter(arrays.values()), ()))
  if not limit or limit >= n:
    return arrays
  idx = np.linspace(0, n - 1, limit).round().astype(int)
  return {k: v[idx] for k, v in arrays.items()}


def _train_stage(args, name: str, workdir: str, overrides: list[str]) -> dict:
  from star_jax.config import load_config
  from star_jax.train import loop
  from star_jax.train.stage import RecordData, build_stage

  cfg = load_config(args.config, [f"data.path={args.data}", *args.overrides, *overrides])
  data = RecordData(cfg)
  start = time.time()
  result = loop.train(cfg, build_stage(cfg, name, data), workdir, data)
  loss = result.metrics.get("loss")
  _say(f"{name}: {result.status} at step {result.step} in {time.time() - start:.0f} s"
       + (f" (loss {loss:.4f})" if loss is not None else " (already trained: resumed from its workdir)"))
  return {"status": result.status, "step": result.step, "seconds": round(time.time() - start, 1),
          "loss": result.metrics.get("loss"), "best": result.best}


def run(args: argparse.Namespace) -> int:
  import jax
  import scipy.signal

  from star_jax import trained
  from star_jax.config import load_config
  from star_jax.data.prepare_cli import prepare_cache, prepare_opensfx
  from star_jax.demo.evaluator import Evaluator, event_hits, paired_test
  from star_jax.demo import page
  from star_jax.demo.report import report_md, spectrogram_png
  from star_jax.models import build
  from star_jax.export import export_bundle
  from star_jax.generate import Generator, write_wav
  from star_jax.metrics.scores import frechet_distance, mean_average_precision
  from star_jax.train import stage1
  from star_jax.train.cli import setup_logging
  from star_jax.train.stage import RecordData

  setup_logging()
  t0 = time.time()
  work = os.path.abspath(args.workdir)
  args.data = os.path.join(work, "data")
  out_dir = work  # report.md, wavs/ and spectrograms/ beside the stage folders
  os.makedirs(out_dir, exist_ok=True)
  cfg = load_config(args.config, [f"data.path={args.data}", *args.overrides])
  _say(f"config {args.config}, {jax.device_count()} device(s), workdir {work}")

  # 1. The corpus (resumable: finished shards are skipped).
  if not os.path.exists(os.path.join(args.data, "report.json")):
    _say("building the OpenSFX corpus (espeak-ng speech for every caption)")
    prepare_opensfx(args.data, audio_rate_hz=int(cfg.vae.sample_rate_hz))
  timings = {"corpus_s": round(time.time() - t0, 1)}

  # 2. The stages, each resuming from its own workdir.
  stages = {}
  vae_dir = os.path.join(work, "vae") if build.vae_trained(cfg) else None  # the mel codec (tiny) is fixed
  if vae_dir:
    stages["vae"] = _train_stage(args, "vae", vae_dir, [])
  stages["stage1"] = _train_stage(args, "stage1", os.path.join(work, "stage1"), [])
  # Stage 2's frozen inputs, HuBERT frames (stage 1's HuBERT) and VAE posteriors, computed once into the records
  # rather than at every step: the VAE encoder was most of a stage-2 step (the mel codec's STFT is not).
  _say("caching stage 2's frozen features (HuBERT frames" + (", VAE posteriors)" if vae_dir else ")"))
  cache_start = time.time()
  prepare_cache(args.data, hubert=os.path.join(work, "stage1"), vae=vae_dir, splits=["train"])
  timings["cache_s"] = round(time.time() - cache_start, 1)
  stages["stage2"] = _train_stage(args, "stage2", os.path.join(work, "stage2"), [
      f"stage2.init_bridge={os.path.join(work, 'stage1')}", *([f"stage2.init_vae={vae_dir}"] if vae_dir else [])])
  bundle = export_bundle(os.path.join(work, "stage2"), os.path.join(work, "bundle"))
  timings["training_s"] = round(time.time() - t0 - timings["corpus_s"] - timings["cache_s"], 1)

  # 3. Stage-1 mAP on the held-out test split beside chance (random scores).
  _say("scoring stage 1 on the test split")
  data = RecordData(cfg)
  test = split_arrays(cfg, "test")
  s1 = trained.load_trained(os.path.join(work, "stage1"))[0]
  # The checkpoint stage 2 read (stage 1's best/ with `stage1.keep_best`, else its last).
  stage1_map = mean_average_precision(
      test["labels"], stage1.classify(cfg, s1, test["speech"], test["speech_mask"], len(data.label_names))[1])
  rng = np.random.default_rng(0)
  chance_map = float(np.mean([mean_average_precision(test["labels"], rng.random(test["labels"].shape))
                              for _ in range(10)]))

  # 4. Generation for the held-out spoken queries: the model, and the same model with a zero / random condition.
  queries = spread(test, args.max_queries)
  gen = Generator(bundle)
  seconds = float(cfg.data.audio_duration_s)
  _say(f"generating {len(queries['id'])} clips of {seconds:g} s ({cfg.flow.num_steps} steps, CFG {cfg.flow.cfg_scale})")
  speech = [s[m] for s, m in zip(queries["speech"], queries["speech_mask"])]
  outputs = {"speech": [], "zero": [], "random": []}
  bs = 16
  for i in range(0, len(speech), bs):
    tokens = np.asarray(gen.tokens(speech[i:i + bs]))
    rand = rng.standard_normal(tokens.shape).astype(np.float32) * tokens.std() + tokens.mean()
    for kind, cond in (("speech", tokens), ("zero", np.zeros_like(tokens)), ("random", rand)):
      outputs[kind].append(gen.sample(cond, seconds, seed=i))
  outputs = {k: np.concatenate(v) for k, v in outputs.items()}
  timings["generation_s"] = round(time.time() - t0 - sum(timings.values()), 1)

  # 5. The evaluator, trained on the real training clips (and degraded copies), judges audio as heard. With a
  # trained VAE a second one has also heard the VAE's reconstructions of those clips, so it judges which event a
  # clip holds as this VAE renders it: while a tiny VAE is weak (its reconstructions fool the first evaluator
  # rarely), it shows what the spoken query contributes. The fixed mel codec keeps 0.9 of the events: no second.
  _say("training the evaluator classifier on the real training clips")
  train = split_arrays(cfg, "train")
  evaluator = Evaluator(gen.sample_rate_hz).fit(train["audio"], train["labels"])
  evaluators = {"evaluator": evaluator}
  if build.vae_trained(cfg):
    half = np.arange(0, len(train["id"]), 2)  # every other clip: the VAE's rendering, at half the time
    train_recon = np.concatenate([gen.reconstruct(train["audio"][half[i:i + 64]])
                                  for i in range(0, len(half), 64)])
    evaluators["VAE-aware evaluator"] = evaluator.extended(train_recon, train["labels"][half])
  _say("scoring real, generated and baseline clips")
  real_emb = evaluator.embed(test["audio"])
  labels = queries["labels"]

  hits = {}

  def score(wav_nt, name):
    hits[name] = tuple(event_hits(ev, wav_nt, labels) for ev in evaluators.values())
    row = {"accuracy": float(hits[name][0].mean()), "hits": int(hits[name][0].sum()),
           "fd": frechet_distance(evaluator.embed(wav_nt), real_emb)}
    if len(hits[name]) > 1:
      row.update(accuracy_vae_aware=float(hits[name][1].mean()), hits_vae_aware=int(hits[name][1].sum()))
    return row

  scores = {"real test clips": score(queries["audio"], "real")}
  # The evaluator judges events, not fidelity: the real clips low-passed at 4 kHz should still score high.
  lowpassed = scipy.signal.sosfiltfilt(scipy.signal.butter(6, 4000, fs=gen.sample_rate_hz, output="sos"),
                                       queries["audio"], axis=1).astype(np.float32)
  scores["real test clips, low-passed at 4 kHz"] = score(lowpassed, "lowpassed")
  # The ceiling of generation: the same real clips through the trained VAE alone.
  recon = np.concatenate([gen.reconstruct(queries["audio"][i:i + bs]) for i in range(0, len(speech), bs)])
  scores["real clips through the codec (ceiling)"] = score(recon, "recon")
  for kind, name in (("speech", "generated (spoken query)"), ("zero", "baseline: zero condition"),
                     ("random", "baseline: random condition")):
    scores[name] = score(outputs[kind], kind)
  # Is the query's gain over each baseline more than chance? Paired over the same queries, per evaluator.
  significance = {f"{base} ({ev})": paired_test(hits["speech"][e], hits[base][e])
                  for base in ("zero", "random") for e, ev in enumerate(evaluators)}

  # 6. Files: wavs, spectrograms, report.
  wav_dir = os.path.join(out_dir, "wavs")
  for i, qid in enumerate(queries["id"]):
    write_wav(os.path.join(wav_dir, f"{_safe(qid)}.wav"), outputs["speech"][i], gen.sample_rate_hz)
    write_wav(os.path.join(wav_dir, f"{_safe(qid)}.query.wav"), speech[i], SPEECH_RATE_HZ)
  png_dir = os.path.join(out_dir, "spectrograms")
  os.makedirs(png_dir, exist_ok=True)
  pngs = []
  for i in np.linspace(0, len(queries["id"]) - 1, min(args.png, len(queries["id"]))).round().astype(int):
    path = os.path.join(png_dir, f"{_safe(queries['id'][i])}.png")
    spectrogram_png(path, queries["audio"][i], outputs["speech"][i], outputs["zero"][i], gen.sample_rate_hz,
                     f"\"{queries['caption'][i]}\" ({queries['id'][i]})")
    pngs.append(path)
  timings["total_s"] = round(time.time() - t0, 1)
  report = dict(config=args.config, devices=jax.device_count(), stages=stages, timings=timings,
                stage1={"test_mAP": stage1_map, "chance_mAP": chance_map,
                        "best_valid": stages["stage1"]["best"],
                        "checkpoint": "best validation epoch" if cfg.stage1.get("keep_best", True) else "last epoch"},
                generation=scores, significance=significance, queries=len(queries["id"]), classes=len(data.label_names),
                evaluator_train_clips=len(train["id"]))
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2, default=float)
  markdown = report_md(report, queries, pngs, out_dir)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown)
  # The listening page: queries drawn at random over the test split (fixed seed), not picked.
  examples = [dict(id=queries["id"][i], caption=queries["caption"][i], rate_hz=gen.sample_rate_hz,
                   query_rate_hz=SPEECH_RATE_HZ, query=speech[i], generated=outputs["speech"][i],
                   zero=outputs["zero"][i], real=queries["audio"][i], hit=bool(hits["speech"][0][i]))
              for i in page.pick(len(queries["id"]), args.listen, seed=0)]
  page.write_page(out_dir, examples, markdown)
  _say(f"done in {timings['total_s'] / 60:.1f} min: {os.path.join(out_dir, 'report.md')}; listen: "
       f"{os.path.join(out_dir, 'report.html')}")
  _say(f"speak to it: star-jax serve --ckpt {bundle}   (then open http://127.0.0.1:8000/)")
  return 0


