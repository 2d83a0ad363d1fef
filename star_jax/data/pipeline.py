"""grain input pipeline: a prepared TFDS dataset's split -> fixed-shape, per-process numpy batches with masks.

Each element is decoded, cropped (seeded random start for training, the start for evaluation) or
zero-padded to the configured durations, resampled when the stored rate differs from the one asked for,
and batched. Batch fields (B = per-process batch size):
  speech (B, Ts) f32, speech_mask (B, Ts) bool     Ts = speech_duration_s * speech_sample_rate_hz
  audio (B, Ta) f32, audio_mask (B, Ta) bool       Ta = audio_duration_s * audio_sample_rate_hz
  labels (B, C) f32 multi-hot
  text_emb (B, Lt, Dt) f32, text_mask (B, Lt)      if the records carry text_emb (Lt = text_max_tokens)
  hubert (B, Th, D), hubert_mask (B, Th)           if cached; Th = speech_duration_s * hubert_frame_rate_hz
  latents (B, Tl, Dl), latents_mask (B, Tl)        if cached; Tl = audio_duration_s * latent_frame_rate_hz; with a
                                                   cached posterior (latents_std) a fresh sample mean + std·ε per
                                                   element (seeded like the crop), or its mean (sample_latents=False)
  id, caption, voice (B,) numpy unicode arrays     host-only: drop them before device_put
Bad shards and records raise `source.BadRecordError` naming them, or with skip_bad_records are replaced and
counted in `BatchIterator.bad_records` (see star_jax.data.source).
With `data.speech_source: synthesized` the train split's speech is spoken anew as each record is read, a fresh
voice per example and epoch (star_jax.data.speak); other splits keep their stored, fixed voices. Captions that
cannot be spoken keep their stored speech, counted in `BatchIterator.speech_fallbacks`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import grain
import numpy as np

from star_jax.constants import FRAME_RATE_HZ as FEATURE_RATE_HZ
from star_jax.data import audio as audio_lib
from star_jax.data import records
from star_jax.data import source as source_lib
from star_jax.data import speak as speak_lib
from star_jax.errors import UserError


def _start(length: int, window: int, rng: np.random.Generator, random_crop: bool) -> int:
  """Crop start in [0, length - window] (0 when the clip fits or for a deterministic crop)."""
  if not random_crop or length <= window:
    return 0
  return int(rng.integers(0, length - window + 1))


def _fit(x: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Crop/zero-pad the first axis to `length`; the mask marks real frames."""
  valid = min(x.shape[0], length)
  return audio_lib.fit_length(x, length), np.arange(length) < valid


class FitRecord(grain.transforms.RandomMap):
  """Encoded record -> dict of fixed-shape arrays (module-level, so grain's worker processes can unpickle it)."""

  def __init__(self, *, speech_rate_hz: tuple[int, int], audio_rate_hz: tuple[int, int], speech_duration_s: float,
               audio_duration_s: float, text_max_tokens: int, hubert_rate_hz: float, latent_rate_hz: float,
               random_crop: bool, sample_latents: bool = True, cached_fields: tuple[str, ...] = ()):
    self.speech_rate_hz = speech_rate_hz  # (stored, wanted)
    self.audio_rate_hz = audio_rate_hz
    self.speech_duration_s = speech_duration_s
    self.audio_duration_s = audio_duration_s
    self.text_max_tokens = text_max_tokens
    self.hubert_rate_hz = hubert_rate_hz
    self.latent_rate_hz = latent_rate_hz
    self.random_crop = random_crop
    self.sample_latents = sample_latents
    self.cached_fields = cached_fields  # cached features joined to every record of the split

  def _wave(self, wave: np.ndarray, feats: np.ndarray | None, rates: tuple[int, int], duration_s: float,
            feat_rate_hz: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Crops a waveform (and its cached frame features, aligned in time) to duration_s at rates[1]."""
    stored, wanted = rates
    out: dict[str, np.ndarray] = {}
    if feats is not None:  # choose the start on the frame grid so waveform and features stay aligned
      num_frames = int(round(duration_s * feat_rate_hz))
      frame0 = _start(feats.shape[0], num_frames, rng, self.random_crop)
      out["feats"], out["feats_mask"] = _fit(feats[frame0:frame0 + num_frames].astype(np.float32), num_frames)
      start = int(round(frame0 * stored / feat_rate_hz))
    else:
      start = _start(wave.shape[0], int(math.ceil(duration_s * stored)), rng, self.random_crop)
    segment = wave[start:start + int(math.ceil(duration_s * stored))]
    out["wave"], out["mask"] = _fit(audio_lib.resample(segment, stored, wanted), int(round(duration_s * wanted)))
    return out

  def _cached(self, r: dict[str, Any], field: str) -> np.ndarray | None:
    return r[field] if field in self.cached_fields else None

  def random_map(self, r: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {"id": np.str_(r["id"]), "caption": np.str_(r["caption"]),
                           "voice": np.str_(r.get("voice", "")), "_bad": r["_bad"], "_bad_where": r["_bad_where"],
                           "_tts_fallback": r.get("_tts_fallback", np.int32(0)),
                           "_tts_why": r.get("_tts_why", np.str_(""))}
    speech = self._wave(r["speech"], self._cached(r, "hubert"), self.speech_rate_hz, self.speech_duration_s,
                        self.hubert_rate_hz, rng)
    latents = self._cached(r, "latents")
    if latents is not None and "latents_std" in r:  # crop mean ‖ std together, then sample
      latents = np.concatenate([latents, r["latents_std"]], axis=-1)
    audio = self._wave(r["audio"], latents, self.audio_rate_hz, self.audio_duration_s, self.latent_rate_hz, rng)
    out["speech"], out["speech_mask"] = speech["wave"], speech["mask"]
    out["audio"], out["audio_mask"] = audio["wave"], audio["mask"]
    if "feats" in speech:
      out["hubert"], out["hubert_mask"] = speech["feats"], speech["feats_mask"]
    if "feats" in audio:
      out["latents"], out["latents_mask"] = audio["feats"], audio["feats_mask"]
      if "latents_std" in r:
        mean, std = np.split(audio["feats"], 2, axis=-1)
        # DESIGN.md §2: encoding samples the posterior; padded frames have mean = std = 0 and stay 0.
        out["latents"] = mean + std * rng.standard_normal(mean.shape, np.float32) if self.sample_latents else mean
    out["labels"] = r["labels"].astype(np.float32)
    if "text_emb" in r:
      out["text_emb"], out["text_mask"] = _fit(r["text_emb"], self.text_max_tokens)
    return out


class BatchIterator:
  """grain's DataLoaderIterator plus bad-record and speech-fallback accounting, both saved in the state."""

  def __init__(self, iterator):
    self._iterator = iterator
    self.bad_records = 0  # bad records skipped so far (each time one is met: once per epoch)
    self.speech_fallbacks = 0  # synthesised-speech elements that kept their stored speech
    self._warned: set[str] = set()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    batch = next(self._iterator)
    bad, where = batch.pop("_bad"), batch.pop("_bad_where")
    self.bad_records += int(bad.sum())
    for w in set(where[bad > 0].tolist()) - self._warned:
      logging.warning("skipped a bad record (replaced by another): %s", w)
      self._warned.add(w)
    fallback, why = batch.pop("_tts_fallback"), batch.pop("_tts_why")
    self.speech_fallbacks += int(fallback.sum())
    for w in set(why[fallback > 0].tolist()) - self._warned:
      logging.warning("could not synthesise speech, kept the stored speech: %s", w)
      self._warned.add(w)
    return batch

  def get_state(self) -> bytes:
    state = json.loads(self._iterator.get_state())
    state["bad_records"] = self.bad_records
    state["speech_fallbacks"] = self.speech_fallbacks
    return json.dumps(state, indent=4).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state)
    self.bad_records = int(state.pop("bad_records", 0))
    self.speech_fallbacks = int(state.pop("speech_fallbacks", 0))
    self._iterator.set_state(json.dumps(state).encode())

  def start_prefetch(self) -> None:
    self._iterator.start_prefetch()


def make_iterator(data_cfg, split: str, *, batch_size: int, audio_sample_rate_hz: int, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, drop_remainder: bool = True, num_workers: int | None = None,
                  random_crop: bool | None = None, skip_bad_records: bool | None = None,
                  sample_latents: bool | None = None) -> BatchIterator:
  """A checkpointable iterator (next, get_state, set_state) over this process's batches of `split`.

  Process i of n reads records [i*N/n, (i+1)*N/n) of the (shuffled) index space; with drop_remainder every
  process gets the same number of records and batches (what multi-host training needs).
  random_crop defaults to split == "train"; crops are seeded by (seed, record position), so they replay
  exactly after a restore. skip_bad_records (default data.skip_bad_records, False): replace and count bad
  records instead of raising `source.BadRecordError`. sample_latents (default data.sample_latents, True): serve
  cached posteriors as samples, else as their mean. data.speech_source "synthesized" speaks the train split's
  captions anew (star_jax.data.speak, voices from data.synth); cached HuBERT frames are then not served.
  """
  import absl.flags

  path = data_cfg["path"]
  info = records.read_info(path)
  if split not in info.get("splits", {}):
    raise UserError(f"{path} has no split '{split}'; it has {sorted(info.get('splits', {}))}")
  if skip_bad_records is None:
    skip_bad_records = bool(data_cfg.get("skip_bad_records", False))
  speech_source = data_cfg.get("speech_source", "stored")
  if speech_source not in speak_lib.SPEECH_SOURCES:
    raise UserError(f"data.speech_source '{speech_source}': choose one of {list(speak_lib.SPEECH_SOURCES)}")
  synthesize = speech_source == "synthesized" and split == "train"  # held-out splits keep their fixed voices
  operations = []
  if synthesize:
    operations.append(speak_lib.SpeakCaption(speak_lib.Pool.from_config(data_cfg.get("synth")),
                                             info["speech_sample_rate_hz"]))
  # Cached HuBERT frames belong to the stored voice: with synthesised speech the stage runs HuBERT in the step.
  cached_fields = tuple(f for f in info["cache"].get(split, {}) if not (synthesize and f == "hubert"))
  source = source_lib.RecordSource(
      source_lib.split_part(info["version_dir"], split),
      cached=tuple(source_lib.split_part(info["cache_dirs"][f], split) for f in cached_fields),
      skip_bad_records=skip_bad_records)
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  num_workers = data_cfg.get("num_workers", 0) if num_workers is None else num_workers
  if num_workers and not absl.flags.FLAGS.is_parsed():
    absl.flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  fit = FitRecord(
      speech_rate_hz=(info["speech_sample_rate_hz"], data_cfg.get("speech_sample_rate_hz", 16000)),
      audio_rate_hz=(info["audio_sample_rate_hz"], audio_sample_rate_hz),
      speech_duration_s=float(data_cfg["speech_duration_s"]), audio_duration_s=float(data_cfg["audio_duration_s"]),
      text_max_tokens=int(data_cfg.get("text_max_tokens", 16)),
      hubert_rate_hz=float(info.get("hubert_frame_rate_hz", FEATURE_RATE_HZ)),
      latent_rate_hz=float(info.get("latent_frame_rate_hz", FEATURE_RATE_HZ)),
      random_crop=split == "train" if random_crop is None else random_crop,
      sample_latents=bool(data_cfg.get("sample_latents", True) if sample_latents is None else sample_latents),
      cached_fields=cached_fields)
  shard_options = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                              drop_remainder=drop_remainder)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard_options, shuffle=shuffle,
                                        num_epochs=num_epochs, seed=int(seed))
  loader = grain.DataLoader(data_source=source, sampler=sampler, worker_count=num_workers,
                            operations=[*operations, fit, grain.transforms.Batch(batch_size,
                                                                                 drop_remainder=drop_remainder)])
  return BatchIterator(iter(loader))
