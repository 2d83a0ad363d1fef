"""Build TFDS datasets (array_record files) of (caption, speech, audio, labels) records; see docs/data.md.

  star-jax prepare opensfx --out data/opensfx --audio-rate-hz 16000        (writes data/opensfx/opensfx/1.0.0/)
  star-jax prepare audiocaps --captions train.csv --audio-dir clips/ --audioset-segments seg.csv \\
      --audioset-classes class_labels_indices.csv --tts vits --tts-model vits-ljs/ --out data/audiocaps
  star-jax prepare cache --data data/audiocaps --hubert ckpt/hubert --vae ckpt/vae   (cached_hubert, cached_latents)

A rerun skips the shards already written; each split gets a JSON report of every skipped item and why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from star_jax.constants import SPEECH_RATE_HZ


def _workers_default() -> int:
  return max(1, min(os.cpu_count() or 1, 8))


def _positive(kind):
  """argparse type: a number > 0 (bad values exit 2 with argparse's one-line message)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also rejects NaN
      raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value
  return parse


def _natural(text: str) -> int:
  """argparse type: an integer >= 0."""
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
  return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
  sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)

  o = sub.add_parser("opensfx", help="the built-in OpenSFX corpus with espeak-ng speech")
  o.add_argument("--out", required=True, help="dataset directory to write")
  o.add_argument("--cat", default=None, help="path of opensfx.cat (default: the Debian package's)")
  o.add_argument("--audio-rate-hz", type=_positive(int), default=24000, help="rate the audio is stored at (the VAE's)")
  o.add_argument("--text-dim", type=_natural, default=64, help="width of the hashed caption embedding (0: none)")
  o.add_argument("--shard-size", type=_positive(int), default=64, help="records per shard")
  o.add_argument("--workers", type=_positive(int), default=_workers_default(), help="parallel processes")
  o.add_argument("--no-progress", action="store_true")

  a = sub.add_parser("audiocaps", help="AudioCaps clips + AudioSet labels + synthesised speech")
  a.add_argument("--captions", required=True, help="AudioCaps CSV: audiocap_id, youtube_id, start_time, caption")
  a.add_argument("--audio-dir", required=True, help="folder holding the downloaded clips")
  a.add_argument("--audio-pattern", action="append", default=None,
                 help="file name under --audio-dir, with {youtube_id} {audiocap_id} {start}; repeatable "
                      "(default: {youtube_id}.wav, Y{youtube_id}.wav, {youtube_id}_{start}.wav, ... and "
                      ".flac/.ogg/.mp3)")
  a.add_argument("--audioset-segments", required=True, nargs="+", help="AudioSet segment CSV(s)")
  a.add_argument("--audioset-classes", required=True, help="AudioSet class_labels_indices.csv")
  a.add_argument("--tts", choices=("vits", "espeak"), default="espeak")
  a.add_argument("--tts-model", default=None, help="local transformers VitsModel directory (--tts vits)")
  a.add_argument("--noise-scale", type=_positive(float), default=0.667, help="VITS noise scale (STAR: 0.667)")
  a.add_argument("--noise-scale-duration", type=_positive(float), default=0.8, help="VITS duration noise (STAR: 0.8)")
  a.add_argument("--tts-batch-size", type=_positive(int), default=8)
  a.add_argument("--out", required=True, help="dataset directory to write (one per dataset; splits add up)")
  a.add_argument("--split", default=None, help="split name (default: the captions file's stem)")
  a.add_argument("--all-captions", action="store_true", help="one record per caption, not per clip")
  a.add_argument("--audio-rate-hz", type=_positive(int), default=24000, help="rate the audio is stored at (the VAE's)")
  a.add_argument("--max-duration-s", type=_positive(float), default=10.0, help="longer clips are cut")
  a.add_argument("--min-duration-s", type=_positive(float), default=1.0, help="shorter clips are skipped")
  a.add_argument("--text-dim", type=_natural, default=64,
                 help="width of the hashed bag-of-words caption embedding, the offline fallback (0: none)")
  a.add_argument("--text-encoder", default=None,
                 help="local FLAN-T5 directory (e.g. google/flan-t5-large): store each caption's encoder states "
                      "(up to 100 tokens) as text_emb instead of the hashed fallback")
  a.add_argument("--shard-size", type=_positive(int), default=256, help="items per shard")
  a.add_argument("--workers", type=_positive(int), default=_workers_default(), help="parallel processes")
  a.add_argument("--seed", type=int, default=0, help="TTS seed (voice choice, VITS noise)")
  a.add_argument("--no-progress", action="store_true")

  c = sub.add_parser("cache", help="add cached HuBERT features and VAE posteriors to a prepared dataset")
  c.add_argument("--data", required=True, help="dataset directory written by `star-jax prepare` (changed in place)")
  c.add_argument("--hubert", default=None,
                 help="HuBERT params checkpoint (star-jax convert hubert), or the workdir of a stage that holds one")
  c.add_argument("--vae", default=None, help="VAE params checkpoint (star-jax convert vae), or the workdir of a stage that holds one")
  c.add_argument("--splits", default=None, help="comma-separated splits (default: all the corpus has)")
  c.add_argument("--batch-size", type=_positive(int), default=8, help="clips per forward pass")
  c.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                 help="storage dtype of the cached fields (float16 halves the size)")
  c.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                 help="matmul/conv input dtype of the forward passes (f32 accumulation either way)")
  c.add_argument("--no-progress", action="store_true")


def _check_out(out: str) -> None:
  """Creates --out and proves it writable before any work starts."""
  from star_jax.errors import UserError

  probe = os.path.join(out, ".write-test")
  try:
    os.makedirs(out, exist_ok=True)
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); choose a directory you can write") from None


def _builder(out: str, name: str, metadata: dict):
  """The TFDS builder writing corpus `name` under --out; its metadata must agree with the splits already there."""
  from star_jax.data import builders, records
  from star_jax.errors import UserError

  records.find_dataset(out)  # a folder in the old format: a one-line error saying how to rebuild
  builder = builders.make(name, out, metadata)
  file = os.path.join(builder.data_dir, "metadata.json")
  if os.path.exists(file):
    with open(file) as f:
      before = json.load(f)
    changed = sorted(k for k in set(before) | set(metadata) if before.get(k) != metadata.get(k))
    if changed:
      raise UserError(f"{out}: {', '.join(changed)} differ from the splits already there; prepare into a new --out "
                      "directory")
  os.makedirs(builder.data_dir, exist_ok=True)
  return builder


def _check_settings(out: str, split: str, settings: dict) -> None:
  """A rerun resumes only with the settings that wrote the finished shards."""
  from star_jax.data import records
  from star_jax.errors import UserError

  file = os.path.join(out, f"{split}.prep.json")
  if os.path.exists(file):
    with open(file) as f:
      before = json.load(f)
    if before != settings:
      changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
      raise UserError(f"{out} holds split '{split}' prepared with other settings ({', '.join(changed)}); "
                      "use a new --out or delete the split's files")
  else:
    records.write_json(file, settings)


def prepare_opensfx(out: str, *, audio_rate_hz: int = 24000, cat: str | None = None, text_dim: int = 64,
                    shard_size: int = 64, workers: int | None = None, progress: bool = True) -> dict:
  """Build the OpenSFX corpus at `out` (finished shards are kept) -> the build report written to report.json."""
  from star_jax.data import builders, opensfx, records, shards

  start = time.time()
  workers = workers or _workers_default()
  cat = cat or opensfx.CAT_PATH
  if not os.path.isfile(cat):
    from star_jax.errors import UserError
    raise UserError(f"{cat} not found: install Debian's openttd-opensfx (apt-get install openttd-opensfx)")
  _check_out(out)
  clips = opensfx.read_cat(cat)
  classes, specs = opensfx.plan(clips)
  builder = _builder(out, "opensfx", dict(
      source="opensfx", label_names=classes, speech_sample_rate_hz=SPEECH_RATE_HZ, audio_sample_rate_hz=audio_rate_hz,
      text_dim=text_dim, credits=opensfx.credits(clips)))
  settings = dict(source="opensfx", audio_rate_hz=audio_rate_hz, text_dim=text_dim, shard_size=shard_size)
  report = dict(source="opensfx", classes=len(classes), clips=len(clips),
                clips_duration_s=round(sum(c.wave.shape[0] / c.rate_hz for c in clips), 1), splits={})
  for split, split_specs in specs.items():
    _check_settings(out, split, settings)
    summary = shards.write_split(
        builder.data_dir, builder.name, split, shards.chunk(split_specs, shard_size), opensfx.build_records,
        speech_rate=SPEECH_RATE_HZ, audio_rate=audio_rate_hz, text_dim=text_dim, workers=workers,
        init=opensfx.init_worker, init_args=(cat, audio_rate_hz, SPEECH_RATE_HZ, text_dim), progress=progress)
    report["splits"][split] = {k: summary[k] for k in ("records", "audio_s", "speech_s", "voices", "shards",
                                                       "shards_written_now")}
  builders.finish(builder)
  report["dataset"] = builder.data_dir
  report["records"] = sum(s["records"] for s in report["splits"].values())
  report["audio_s"] = round(sum(s["audio_s"] for s in report["splits"].values()), 1)
  report["build_s"] = round(time.time() - start, 1)
  records.write_json(os.path.join(out, "report.json"), report)
  return report


def run_opensfx(args: argparse.Namespace) -> int:
  report = prepare_opensfx(args.out, audio_rate_hz=args.audio_rate_hz, cat=args.cat, text_dim=args.text_dim,
                           shard_size=args.shard_size, workers=args.workers, progress=not args.no_progress)
  print(json.dumps(report, indent=1))
  return 0


def run_audiocaps(args: argparse.Namespace) -> int:
  from star_jax.data import audiocaps, builders, records, shards
  from star_jax.errors import UserError

  start = time.time()
  split = args.split or os.path.splitext(os.path.basename(args.captions))[0]
  items = audiocaps.read_captions(args.captions, all_captions=args.all_captions)
  if not items:
    raise UserError(f"{args.captions}: no captions; pass an AudioCaps CSV with at least one row")
  if not os.path.isdir(args.audio_dir):
    raise UserError(f"--audio-dir {args.audio_dir}: not a directory; pass the folder holding the clips")
  for pattern in args.audio_pattern or ():
    try:
      pattern.format(youtube_id="x", audiocap_id="1", start="0")
    except (KeyError, IndexError, ValueError) as e:
      raise UserError(f"--audio-pattern {pattern!r}: bad placeholder ({e}); use {{youtube_id}}, {{audiocap_id}}, "
                      "{start}") from None
  if args.min_duration_s > args.max_duration_s:
    raise UserError(f"--min-duration-s {args.min_duration_s} is above --max-duration-s {args.max_duration_s}")
  _check_out(args.out)
  names, mids, labels = audiocaps.read_audioset(args.audioset_segments, args.audioset_classes)
  text_dim = args.text_dim
  if args.text_encoder:  # the stored width is the encoder's
    config = os.path.join(args.text_encoder, "config.json")
    if not os.path.isfile(config):
      raise UserError(f"--text-encoder {args.text_encoder}: no config.json; pass a local T5 / FLAN-T5 directory")
    with open(config) as f:
      text_dim = int(json.load(f)["d_model"])
  builder = _builder(args.out, "audiocaps", dict(
      source="audiocaps", label_names=names, label_mids=mids, speech_sample_rate_hz=SPEECH_RATE_HZ,
      audio_sample_rate_hz=args.audio_rate_hz, text_dim=text_dim))
  tts_kwargs = {}
  if args.tts == "vits":
    tts_kwargs = dict(noise_scale=args.noise_scale, noise_scale_duration=args.noise_scale_duration,
                      batch_size=args.tts_batch_size)
  wanted = {i["youtube_id"] for i in items}
  settings = dict(source="audiocaps", captions=os.path.abspath(args.captions),
                  audio_dir=os.path.abspath(args.audio_dir), audio_patterns=args.audio_pattern,
                  tts=args.tts, tts_model=args.tts_model, tts_kwargs=tts_kwargs, all_captions=args.all_captions,
                  audio_rate_hz=args.audio_rate_hz, max_duration_s=args.max_duration_s,
                  min_duration_s=args.min_duration_s, text_dim=text_dim, shard_size=args.shard_size,
                  seed=args.seed, text_encoder=os.path.abspath(args.text_encoder) if args.text_encoder else None)
  _check_settings(args.out, split, settings)
  worker = dict(settings, audio_dir=os.path.abspath(args.audio_dir), speech_rate_hz=SPEECH_RATE_HZ,
                patterns=args.audio_pattern or audiocaps.DEFAULT_PATTERNS, num_labels=len(names),
                labels={k: v for k, v in labels.items() if k in wanted})
  summary = shards.write_split(
      builder.data_dir, builder.name, split, shards.chunk(items, args.shard_size), audiocaps.build_records,
      speech_rate=SPEECH_RATE_HZ, audio_rate=args.audio_rate_hz, text_dim=text_dim, workers=args.workers,
      init=audiocaps.init_worker, init_args=(worker,), progress=not args.no_progress)
  builders.finish(builder)
  reasons: dict[str, int] = {}
  for s in summary["skipped"]:
    key = s["reason"].split(":")[0]
    reasons[key] = reasons.get(key, 0) + 1
  report = dict(summary, skipped_by_reason=reasons, build_s=round(time.time() - start, 1))
  report_file = os.path.join(args.out, f"{split}.report.json")
  records.write_json(report_file, report)
  for note in report["notes"][:5]:
    print(f"warning: {note['id']}: {note['note']}", file=sys.stderr)
  print(f"{split}: {report['records']} records from {report['items']} items, {len(report['skipped'])} skipped "
        f"{reasons}, {len(report['notes'])} notes (e.g. trimmed); report: {report_file}")
  return 0


def prepare_cache(data: str, *, hubert: str | None = None, vae: str | None = None, splits: list[str] | None = None,
                  dtype: str = "float32", compute_dtype: str = "float32", batch_size: int = 8,
                  progress: bool = True) -> None:
  """Cache HuBERT frames (`hubert`: a checkpoint or a stage workdir) and VAE posteriors (`vae`) of the corpus
  under `data` into the TFDS datasets cached_hubert / cached_latents beside it; shards already cached are
  skipped."""
  from star_jax.data import cache, records
  from star_jax.errors import UserError

  start = time.time()
  if not hubert and not vae:
    raise UserError("prepare cache: give --hubert CKPT_DIR and/or --vae CKPT_DIR")
  info = records.read_info(data)
  splits = splits or list(info.get("splits", {}))
  unknown = sorted(set(splits) - set(info.get("splits", {})))
  if unknown:
    raise UserError(f"--splits: {data} has no split {unknown}; it has {sorted(info.get('splits', {}))}")
  _check_out(data)
  models = [load(ckpt, compute_dtype) for ckpt, load in ((hubert, cache.load_hubert), (vae, cache.load_vae)) if ckpt]
  cache.check_rates(data, splits, models, dtype)
  for split in splits:
    summary = cache.cache_split(data, split, models, dtype=dtype, batch_size=batch_size, progress=progress)
    print(f"{split}: {summary['records']} records, {summary['shards_written_now']} of {summary['shards']} shards "
          f"written now, fields {summary['fields']}")
  print(f"prepare cache: done in {time.time() - start:.1f} s; frame rates in the metadata.json of "
        f"{', '.join(records.CACHED[m.field] for m in models)} under {data}")


def run_cache(args: argparse.Namespace) -> int:
  prepare_cache(args.data, hubert=args.hubert, vae=args.vae, splits=args.splits.split(",") if args.splits else None,
                dtype=args.dtype, compute_dtype=args.compute_dtype, batch_size=args.batch_size,
                progress=not args.no_progress)
  return 0


def run(args: argparse.Namespace) -> int:
  return {"opensfx": run_opensfx, "audiocaps": run_audiocaps, "cache": run_cache}[args.source](args)
