"""The optional cache pass: add frozen-model features to a prepared dataset's records, in place.

  star-jax prepare cache --data data/audiocaps --hubert ckpt/hubert --vae ckpt/vae [--splits train,val]

Fields (docs/data.md):
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
Each model writes its own TFDS dataset beside the corpus (records.CACHED: cached_hubert, cached_latents), with
the corpus's splits and shards record for record; a shard's sidecar records the settings it was computed with (a
digest of the params, the model config, dtypes): a rerun skips shards whose settings match and recomputes the
others (another checkpoint, wherever it lives). A split is listed in the cache's dataset_info.json, and so served
by the pipeline, once all its shards are there.
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
RATE_KEYS, DIM_KEYS = records.RATE_KEYS, records.DIM_KEYS


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """One frozen encoder ready to run over a record field."""
  field: str                        # "hubert" | "latents": which cache dataset (records.CACHED)
  outputs: tuple[str, ...]          # record fields its outputs go to
  source: str                       # record field it reads: "speech" | "audio"
  rate_hz: int                      # sample rate it reads
  quantum: int                      # samples per output frame
  margin: int                       # zero samples every clip is padded with, at least
  num_frames: Callable[[int], int]  # valid output frames of a clip of n samples
  forward: Callable                 # jitted (params, wave_bt, mask_bt) -> tuple of (B, T', D)
  params: Any
  checkpoint: str                   # where the params came from (recorded in the cache metadata)
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


def _add_features(model: FrozenModel, recs: list[dict[str, Any]], stored_rate_hz: int, dtype: str,
                  batch_size: int, where: str) -> list[dict[str, Any]]:
  """-> per record {id, the model's output fields} as `dtype`."""
  waves = [audio_lib.resample(r[model.source], stored_rate_hz, model.rate_hz) for r in recs]
  out = []
  for r, outs in zip(recs, encode_waves(model, waves, batch_size)):
    entry = {"id": r["id"]}
    for name, value in zip(model.outputs, outs):
      value = value.astype(dtype)
      if not np.all(np.isfinite(value)):
        raise UserError(f"{where}, record {r['id']}: {model.field} features are not finite in {dtype}"
                        + (" (use --dtype float32)" if dtype != "float32" else " (a broken checkpoint?)"))
      entry[name] = value
    out.append(entry)
  return out


def _settings(model: FrozenModel, dtype: str) -> dict:
  return json.loads(json.dumps(dict(model.settings, dtype=dtype)))  # as it reads back from a sidecar


def _cache_metadata(path: str, model: FrozenModel) -> dict[str, Any]:
  """The metadata a cache dataset already has (settings per split, rate, width, dtype), or {}."""
  version_dir = records.find_dataset(path, records.CACHED[model.field])
  if version_dir is None:
    return {}
  with open(os.path.join(version_dir, "metadata.json")) as f:
    return json.load(f)


def check_rates(path: str, splits: Sequence[str], models: Sequence[FrozenModel], dtype: str = "float32") -> None:
  """A cache dataset has one frame rate, width and dtype (its features): other splits cached with others must be
  cached again with these too."""
  for m in models:
    meta = _cache_metadata(path, m)
    others = sorted(set(meta.get("settings", {})) - set(splits))
    new = {RATE_KEYS[m.field]: m.frame_rate_hz, DIM_KEYS[m.field]: m.dim, "dtype": dtype}
    changed = [k for k, v in new.items() if k in meta and meta[k] != v]
    if changed and others:
      raise UserError(f"{path}: splits {others} hold {m.field} with other {', '.join(changed)} "
                      f"({', '.join(f'{meta[k]} vs {new[k]}' for k in changed)}); cache those splits again too "
                      "(--splits) or use a new dataset copy")


def cache_split(path: str, split: str, models: Sequence[FrozenModel], *, dtype: str = "float32",
                batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
  """Writes each model's features of every record of `split` into its cache dataset (skipping shards already
  cached with the same settings), then lists the split in that dataset's dataset_info.json; returns a summary."""
  from tqdm import tqdm

  from star_jax.data import builders

  info = records.read_info(path)
  part = source_lib.split_part(info["version_dir"], split)
  source = source_lib.RecordSource(part)  # raises BadRecordError naming a missing or truncated shard
  starts = np.concatenate([[0], np.cumsum([s.num_records for s in part.shards])]).tolist()
  count = len(part.shards)
  wanted = {m.field: _settings(m, dtype) for m in models}
  cache_builders, todo = {}, {}
  for m in models:
    meta = _cache_metadata(path, m)
    others = {k: v for k, v in meta.get("settings", {}).items() if k != split}
    meta = dict(settings=dict(others, **{split: dict(wanted[m.field], checkpoint=m.checkpoint)}), dtype=dtype,
                **{RATE_KEYS[m.field]: m.frame_rate_hz, DIM_KEYS[m.field]: m.dim})
    builder = cache_builders[m.field] = builders.make(records.CACHED[m.field], path, meta)
    os.makedirs(builder.data_dir, exist_ok=True)
    for i in range(count):
      shard = os.path.join(builder.data_dir, records.shard_name(builder.name, split, i, count))
      if _read_sidecar(shard).get("settings") != wanted[m.field]:
        todo.setdefault(i, []).append(m)
        if os.path.exists(shard + ".json"):  # until it is rewritten, the split is not complete
          os.remove(shard + ".json")
  for m in models:  # dataset_info.json lists the split only when every shard is there
    builders.finish(cache_builders[m.field])
  bar = tqdm(total=sum(part.shards[i].num_records for i in todo), unit="record", disable=not progress or not todo,
             desc=f"cache {split}: {count - len(todo)}/{count} shards done")
  rates = {"speech": info["speech_sample_rate_hz"], "audio": info["audio_sample_rate_hz"]}
  for group in _groups(sorted(todo), [s.num_records for s in part.shards], GROUP_RECORDS):
    loaded = {i: [source[j] for j in range(starts[i], starts[i + 1])] for i in group}
    for m in models:  # one pass per model over the group's shards that need it: fuller length buckets
      shards_m = [i for i in group if m in todo[i]]
      feats = _add_features(m, [r for i in shards_m for r in loaded[i]], rates[m.source], dtype, batch_size,
                            f"split {split}")
      builder = cache_builders[m.field]
      for i in shards_m:
        shard = os.path.join(builder.data_dir, records.shard_name(builder.name, split, i, count))
        n = len(loaded[i])
        records.write_shard(shard, [records.encode_record(e, m.field, dtype, m.dim) for e in feats[:n]])
        records.write_json(shard + ".json", dict(shard=os.path.basename(shard), records=n,
                                                 settings=wanted[m.field]))
        feats = feats[n:]
    bar.update(sum(len(loaded[i]) for i in group))
  bar.close()
  for m in models:
    builders.finish(cache_builders[m.field])
  return dict(split=split, shards=count, shards_written_now=len(todo), records=len(source),
              fields=sorted(o for m in models for o in m.outputs))


def _groups(shards: list[int], sizes: list[int], size: int) -> list[list[int]]:
  """Consecutive shards holding at least `size` records together (the last group may hold fewer)."""
  groups, current, total = [], [], 0
  for i in shards:
    current.append(i)
    total += sizes[i]
    if total >= size:
      groups.append(current)
      current, total = [], 0
  return groups + ([current] if current else [])


def _read_sidecar(shard_path: str) -> dict[str, Any]:
  try:
    with open(shard_path + ".json") as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
