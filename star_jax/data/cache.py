"""The optional cache pass: add frozen-model features to a prepared dataset's records, in place.

  star-jax prepare cache --data data/audiocaps --hubert ckpt/hubert --vae ckpt/vae [--splits train,val]

Fields added (docs/data.md):
  hubert (Th, D)            HuBERT last_hidden_state of the whole utterance, its Th = frame_lengths(len) valid frames
  latents, latents_std (Tl, Dl)  the VAE posterior's mean and std over latent_length(len) frames; the pipeline serves
                            a fresh sample mean + std·ε per element (DESIGN.md §2: encoding samples the posterior),
                            so training sees what online encoding gives, not one sample frozen for every epoch.
Forward passes are batched over a few padded lengths (one compile each). Padding is exact for HuBERT (the frame
mask stops it) except for GroupNorm feature extractors (hubert-base, the tiny config: conv 0 statistics span the
padding, as in transformers), whose utterances are padded to at least the speech window they were trained on
(`data.speech_duration_s` of the checkpoint's config; `hubert.min_input_length`), as the training pipeline and
`generate` pad them. The VAE encodes each clip followed by at least `vae_reach` zero samples: its frames are
those of an encoder that sees silence after the clip, whatever the bucket (the last few frames differ from an
unpadded encode, whose every conv pads with zeros instead).
A shard is rewritten atomically and its sidecar then records each field's settings (a digest of the params,
the model config, dtypes): a rerun skips shards whose fields match, and recomputes the ones cached with other
settings (another checkpoint, wherever it lives).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from star_jax.constants import SPEECH_RATE_HZ as HUBERT_RATE_HZ
from star_jax.data import audio as audio_lib
from star_jax.data import records
from star_jax.data import source as source_lib
from star_jax.errors import UserError

GROUP_RECORDS = 512  # records encoded together: enough to fill each length bucket's batches, few enough for RAM
RATE_KEYS = {"hubert": "hubert_frame_rate_hz", "latents": "latent_frame_rate_hz"}
DIM_KEYS = {"hubert": "hubert_dim", "latents": "latent_dim"}


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """One frozen encoder ready to run over a record field."""
  field: str                        # "hubert" | "latents": the cache entry (sidecars, info.json)
  outputs: tuple[str, ...]          # record fields its outputs go to
  source: str                       # record field it reads: "speech" | "audio"
  rate_hz: int                      # sample rate it reads
  quantum: int                      # samples per output frame
  margin: int                       # zero samples every clip is padded with, at least
  num_frames: Callable[[int], int]  # valid output frames of a clip of n samples
  forward: Callable                 # jitted (params, wave_bt, mask_bt) -> tuple of (B, T', D)
  params: Any
  checkpoint: str                   # where the params came from (recorded in info.json)
  settings: dict                    # what the cached values depend on: params digest, model config
  dim: int
  min_length: int = 0               # every clip is padded to at least this many samples

  @property
  def frame_rate_hz(self) -> float | int:
    rate = self.rate_hz / self.quantum
    return int(rate) if rate.is_integer() else rate


def bucket_length(num_samples: int, quantum: int) -> int:
  """Padded length of a clip: `quantum` × units rounded up to 4 steps per octave (1..7 exact, then 8, 10, 12,
  14, 16, 20, ...), so a split needs a few shapes (one compile each) and pads at most 25%."""
  units = max(1, -(-num_samples // quantum))
  step = max(1, 2 ** (units.bit_length() - 3))
  return -(-units // step) * step * quantum


def vae_reach(cfg) -> int:
  """Samples after a latent frame's start that the Oobleck encoder's value for it reads (DESIGN.md §2 layout):
  conv k7 → per block 3 residual units (k7, dilations 1, 3, 9) and a conv k=2s, stride s, padding ceil(s/2) →
  conv k3."""
  jump, reach = 1, 3
  for s in cfg.downsampling_ratios:
    reach += jump * sum(3 * d for d in (1, 3, 9)) + jump * (2 * s - 1 - math.ceil(s / 2))
    jump *= s
  return reach + jump


def _load_component(directory: str, name: str, config_cls):
  """A converted component (`star-jax convert NAME`), a stage's `best/`, or a train workdir (its `best/`, else
  its latest checkpoint), whose config is NAME's or holds a section NAME -> (config, params of NAME, the whole
  saved config as a dict)."""
  from star_jax.trained import load_trained, trained_config

  parts, kind = load_trained(directory)
  config = trained_config(directory)
  if not isinstance(config, dict):
    raise UserError(f"{directory}: config.json holds no model config; write the checkpoint with "
                    f"`star-jax convert {name}` or a train stage")
  saved = config
  if isinstance(config.get(name), dict):
    config = config[name]
  fields = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(config) - fields)
  if unknown:
    raise UserError(f"{directory}: config fields {unknown} are not {config_cls.__name__} fields; is this a "
                    f"{name} checkpoint (kind '{kind}')?")
  tree = parts[name] if name in parts else parts.get(kind, {})
  if isinstance(tree, dict) and name in tree:  # a bundle (star-jax export) holds every component by name
    tree = tree[name]
  return config_cls(**config), tree, saved


def _check_params(directory: str, params, init) -> str:
  """Every parameter `init` makes must be in the loaded tree with its shape (extra ones, e.g. a VAE's decoder,
  are fine) -> sha256 of those parameters (what the cached values depend on, wherever the checkpoint lives)."""
  import flax.linen as nn
  import jax
  from flax import traverse_util

  want = traverse_util.flatten_dict(nn.unbox(jax.eval_shape(init)["params"]), sep="/")
  got = traverse_util.flatten_dict(params, sep="/") if isinstance(params, dict) else {}
  for key, shape in want.items():
    if key not in got or tuple(np.shape(got[key])) != tuple(shape.shape):
      found = tuple(np.shape(got[key])) if key in got else "missing"
      raise UserError(f"{directory}: parameters do not fit the model of its config.json (first mismatch: "
                      f"{key}: {found}, expected {tuple(shape.shape)})")
  digest = hashlib.sha256()
  for key in sorted(want):
    value = np.ascontiguousarray(got[key], np.float32)
    digest.update(f"{key}{value.shape}".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def load_hubert(directory: str, compute_dtype: str = "float32") -> FrozenModel:
  """A HuBERT checkpoint -> FrozenModel writing `hubert` (last_hidden_state over the valid frames)."""
  import jax

  from star_jax.models.hubert import Hubert, HubertConfig, frame_lengths, min_input_length

  directory = os.path.abspath(directory)
  cfg, params, saved = _load_component(directory, "hubert", HubertConfig)
  cfg = dataclasses.replace(cfg, dtype=compute_dtype)
  module = Hubert(cfg)
  digest = _check_params(directory, params,
                         lambda: module.init(jax.random.key(0), np.zeros((1, HUBERT_RATE_HZ), np.float32)))

  def forward(p, wave_bt, mask_bt):
    return (module.apply({"params": p}, wave_bt, mask_bt)[0],)

  window_s = float((saved.get("data") or {}).get("speech_duration_s") or 0)  # a train stage's; 0 if converted
  min_length = min_input_length(cfg, round(window_s * HUBERT_RATE_HZ))
  return FrozenModel(
      field="hubert", outputs=("hubert",), source="speech", rate_hz=HUBERT_RATE_HZ,
      quantum=math.prod(cfg.conv_stride), margin=0, min_length=min_length,
      num_frames=lambda n: int(frame_lengths(cfg, np.int64(n))), forward=jax.jit(forward),
      params=jax.device_put(params), checkpoint=directory,
      settings=dict(params_sha256=digest, config=dataclasses.asdict(cfg), min_length=min_length),
      dim=cfg.hidden_size)


def load_vae(directory: str, compute_dtype: str = "float32") -> FrozenModel:
  """A VAE checkpoint -> FrozenModel writing `latents` (posterior mean) and `latents_std`."""
  import jax

  from star_jax.models.vae import OobleckVAE, VAEConfig, hop_length, latent_length

  directory = os.path.abspath(directory)
  cfg, params, _ = _load_component(directory, "vae", VAEConfig)
  cfg = dataclasses.replace(cfg, dtype=compute_dtype)
  if cfg.audio_channels != 1:
    raise UserError(f"{directory}: a {cfg.audio_channels}-channel VAE; records hold mono audio")
  module = OobleckVAE(cfg)
  digest = _check_params(directory, params, lambda: module.init(
      jax.random.key(0), np.zeros((1, 4 * hop_length(cfg)), np.float32), method="encode"))

  def forward(p, wave_bt, mask_bt):
    del mask_bt  # the padding is already zeros: the encoder sees silence after the clip
    return module.apply({"params": p}, wave_bt, method="encode")

  return FrozenModel(
      field="latents", outputs=("latents", "latents_std"), source="audio", rate_hz=cfg.sample_rate_hz,
      quantum=hop_length(cfg), margin=vae_reach(cfg), num_frames=lambda n: latent_length(cfg, n),
      forward=jax.jit(forward), params=jax.device_put(params), checkpoint=directory,
      settings=dict(params_sha256=digest, config=dataclasses.asdict(cfg)), dim=cfg.encoder_latent_channels)


def encode_waves(model: FrozenModel, waves: Sequence[np.ndarray], batch_size: int) -> list[tuple[np.ndarray, ...]]:
  """Clips at model.rate_hz -> per clip a tuple of (num_frames(n), D) f32 arrays, batched by padded length."""
  buckets: dict[int, list[int]] = {}
  for i in sorted(range(len(waves)), key=lambda i: len(waves[i])):
    length = max(bucket_length(len(waves[i]) + model.margin, model.quantum), model.min_length)
    buckets.setdefault(length, []).append(i)
  results: list[Any] = [None] * len(waves)

  def collect(idx, outs):
    outs = [np.asarray(o, np.float32) for o in outs]  # waits for the device; the next batch already runs
    for row, i in enumerate(idx):
      frames = model.num_frames(len(waves[i]))
      results[i] = tuple(o[row, :frames] for o in outs)

  pending = None
  for length, members in buckets.items():
    for start in range(0, len(members), batch_size):
      idx = members[start:start + batch_size]
      wave = np.zeros((batch_size, length), np.float32)
      mask = np.zeros((batch_size, length), np.float32)
      for row in range(batch_size):  # rows past the last clip repeat it: a fixed shape, no empty rows
        w = waves[idx[min(row, len(idx) - 1)]]
        wave[row, :len(w)], mask[row, :len(w)] = w, 1.0
      outs = model.forward(model.params, wave, mask)
      if pending:
        collect(*pending)
      pending = (idx, outs)
  if pending:
    collect(*pending)
  return results


def _read_shard(path: str) -> list[dict[str, Any]]:
  from array_record.python import array_record_module

  reader = array_record_module.ArrayRecordReader(path)
  try:
    data = reader.read_all()
  except Exception as e:  # noqa: BLE001 - riegeli raises its own types
    raise source_lib.BadRecordError(f"shard {path}: {type(e).__name__}: {str(e)[:200]}; {source_lib.FIX}") from None
  finally:
    reader.close()
  out = []
  for i, d in enumerate(data):
    try:
      r = records.decode_record(d)
      source_lib.check_record(r)
    except Exception as e:  # noqa: BLE001
      raise source_lib.BadRecordError(f"shard {path} record {i}: {type(e).__name__}: {str(e)[:200]}; "
                                      f"{source_lib.FIX}") from None
    out.append(r)
  return out


def _add_features(model: FrozenModel, recs: list[dict[str, Any]], stored_rate_hz: int, dtype: str,
                  batch_size: int, where: str) -> None:
  waves = [audio_lib.resample(r[model.source], stored_rate_hz, model.rate_hz) for r in recs]
  for r, outs in zip(recs, encode_waves(model, waves, batch_size)):
    for name, value in zip(model.outputs, outs):
      value = value.astype(dtype)
      if not np.all(np.isfinite(value)):
        raise UserError(f"{where}, record {r['id']}: {model.field} features are not finite in {dtype}"
                        + (" (use --dtype float32)" if dtype != "float32" else " (a broken checkpoint?)"))
      r[name] = value


def _settings(model: FrozenModel, dtype: str) -> dict:
  return json.loads(json.dumps(dict(model.settings, dtype=dtype)))  # as it reads back from a sidecar


def cache_split(path: str, split: str, models: Sequence[FrozenModel], *, dtype: str = "float32",
                batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
  """Adds each model's fields to every record of `split` (skipping shards already cached with the same
  settings), then records the rates, widths and settings in info.json; returns a summary."""
  from tqdm import tqdm

  info = records.read_info(path)
  shards = source_lib.split_shards(path, split)
  source_lib.RecordSource(shards)  # raises BadRecordError naming a missing or truncated shard
  wanted = {m.field: _settings(m, dtype) for m in models}
  todo = []
  for shard in shards:
    sidecar = _read_sidecar(shard.path)
    stale = [m for m in models if sidecar.get("cache", {}).get(m.field) != wanted[m.field]]
    if stale:
      todo.append((shard, sidecar, stale))
  if todo:  # until every shard has them, the pipeline serves none of the fields being (re)computed
    _set_info_cache(path, split, {k: None for k in wanted})
  bar = tqdm(total=sum(s.num_records for s, _, _ in todo), unit="record", disable=not progress or not todo,
             desc=f"cache {split}: {len(shards) - len(todo)}/{len(shards)} shards done")
  rates = {"speech": info["speech_sample_rate_hz"], "audio": info["audio_sample_rate_hz"]}
  for group in _groups(todo, GROUP_RECORDS):
    loaded = [(shard, sidecar, stale, _read_shard(shard.path)) for shard, sidecar, stale in group]
    for m in models:  # one pass per model over the group's shards that need it: fuller length buckets
      recs = [r for _, _, stale, rs in loaded if m in stale for r in rs]
      _add_features(m, recs, rates[m.source], dtype, batch_size, f"split {split}")
    for shard, sidecar, stale, recs in loaded:
      # The sidecar forgets the fields being replaced before the shard changes: a crash in between leaves
      # them stale (recomputed on a rerun), never marked with settings they were not computed with.
      cache = {k: v for k, v in sidecar.get("cache", {}).items() if k not in {m.field for m in stale}}
      sidecar.update(shard=os.path.basename(shard.path), records=len(recs), cache=cache)
      records.write_json(shard.path + ".json", sidecar)
      records.write_shard(shard.path, [records.encode_record(r) for r in recs])
      done = dict(cache, **{m.field: wanted[m.field] for m in stale})
      records.write_json(shard.path + ".json", dict(sidecar, cache=done))
      bar.update(len(recs))
  bar.close()
  _set_info_cache(path, split, {m.field: dict(wanted[m.field], checkpoint=m.checkpoint) for m in models}, models)
  return dict(split=split, shards=len(shards), shards_written_now=len(todo),
              records=sum(s.num_records for s in shards), fields=sorted(o for m in models for o in m.outputs))


def _groups(todo: list, size: int) -> list[list]:
  """Consecutive shards holding at least `size` records together (the last group may hold fewer)."""
  groups, current, count = [], [], 0
  for item in todo:
    current.append(item)
    count += item[0].num_records
    if count >= size:
      groups.append(current)
      current, count = [], 0
  return groups + ([current] if current else [])


def _read_sidecar(shard_path: str) -> dict[str, Any]:
  try:
    with open(shard_path + ".json") as f:
      return json.load(f)
  except FileNotFoundError:  # shards written by hand (records.write_shard) have none
    return {}


def check_rates(path: str, splits: Sequence[str], models: Sequence[FrozenModel]) -> None:
  """A frame rate must agree with the one other splits' cached fields were written at (the pipeline reads one)."""
  info = records.read_info(path)
  for m in models:
    before = info.get(RATE_KEYS[m.field])
    others = [s for s, fields in info.get("cache", {}).items() if m.field in fields and s not in splits]
    if before is not None and before != m.frame_rate_hz and others:
      raise UserError(f"{path}: splits {others} hold {m.field} at {before} frames/s, this checkpoint gives "
                      f"{m.frame_rate_hz}; cache those splits again too (--splits) or use a new dataset copy")


def _set_info_cache(path: str, split: str, fields: dict, models: Sequence[FrozenModel] = ()) -> None:
  """info['cache'][split][field] = settings (None removes the field); frame rates and widths of `models`."""
  info = records.read_info(path)
  for m in models:
    info[RATE_KEYS[m.field]] = m.frame_rate_hz
    info[DIM_KEYS[m.field]] = m.dim
  entry = info.setdefault("cache", {}).setdefault(split, {})
  for field, settings in fields.items():
    if settings is None:
      entry.pop(field, None)
    else:
      entry[field] = settings
  info["schema"] = {k: dict(dtype=d, shape=s, meaning=m) for k, (d, s, m) in records.SCHEMA.items()}
  records.write_json(os.path.join(path, records.INFO_FILE), info)
