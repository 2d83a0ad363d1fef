"""The prepared-dataset format: TFDS datasets in the array_record file format, read without TensorFlow.

`star-jax prepare ... --out DIR` writes
  DIR/<corpus>/<version>/         the records (`tfds.builder_from_directory` opens it): dataset_info.json,
                                  features.json, metadata.json (label names, rates, credits) and per split
                                  `<corpus>-<split>.array_record-<i>-of-<n>` shards, one tf.train.Example per clip
  DIR/cached_hubert/<version>/    optional (`prepare cache --hubert`): per split the same shards, record for record,
  DIR/cached_latents/<version>/   holding `id` and the cached fields (star_jax.data.cache)
Every shard has a sidecar `<shard>.json` (its record count, skipped items, cache settings), written once the shard
is complete: preparation resumes from them, and dataset_info.json lists a split once all its shards are there.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any

import numpy as np

from star_jax.errors import UserError

SHARD_FORMAT = "array_record"
CACHED = {"hubert": "cached_hubert", "latents": "cached_latents"}  # cache field -> its dataset's name
RATE_KEYS = {"hubert": "hubert_frame_rate_hz", "latents": "latent_frame_rate_hz"}  # in a cache's metadata
DIM_KEYS = {"hubert": "hubert_dim", "latents": "latent_dim"}
OLD_INFO_FILE = "info.json"  # the NPZ-record format before TFDS

# Field -> (dtype, shape, meaning). voice and sources may be "", text_emb (0, text_dim) or absent (text_dim 0).
SCHEMA = {
    "id": ("str", "()", "unique record id"),
    "caption": ("str", "()", "the text the speech says"),
    "speech": ("float32", "(Ts,)", "synthesised speech at speech_sample_rate_hz"),
    "audio": ("float32", "(Ta,)", "the sound at audio_sample_rate_hz, mono, peak <= 1"),
    "labels": ("uint8", "(C,)", "multi-hot over the metadata's label_names"),
    "voice": ("str", "()", "TTS voice that spoke the caption"),
    "sources": ("str", "()", "where the audio came from, e.g. a file or clip indices"),
    "text_emb": ("float32", "(Lt, text_dim)", "hashed bag-of-words caption embedding, star_jax.data.text"),
}
CACHE_SCHEMA = {
    "hubert": ("float32|float16", "(Th, D)", "HuBERT last_hidden_state at hubert_frame_rate_hz, valid frames"),
    "latents": ("float32|float16", "(Tl, Dl)", "VAE posterior mean at latent_frame_rate_hz"),
    "latents_std": ("float32|float16", "(Tl, Dl)", "VAE posterior std; the pipeline serves latents + std * N(0, 1)"),
}
TEXT_FIELDS = ("id", "caption", "voice", "sources")


def rebuild_hint(path: str) -> str:
  return (f"rebuild it: `star-jax prepare opensfx --out {path}.tfds` (or `prepare audiocaps ... --out DIR`), then "
          "point data.path at the new directory")


def _version_key(path: str) -> tuple[int, ...]:
  return tuple(int(p) if p.isdigit() else -1 for p in os.path.basename(path).split("."))


def find_dataset(path: str, name: str | None = None) -> str | None:
  """The newest version directory of dataset `name` (default: the corpus, any name but a cache's) under `path`,
  or `path` itself when it is one; None when there is none. Raises UserError for the old NPZ format."""
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  pattern = os.path.join(path, name or "*", "*", "dataset_info.json")
  found = [os.path.dirname(f) for f in glob.glob(pattern)
           if name or os.path.basename(os.path.dirname(os.path.dirname(f))) not in CACHED.values()]
  if not found:
    if os.path.isfile(os.path.join(path, OLD_INFO_FILE)):
      raise UserError(f"{path} holds records in the old NPZ format (info.json), which this version does not read; "
                      + rebuild_hint(path))
    return None
  names = {os.path.basename(os.path.dirname(f)) for f in found}
  if len(names) > 1:
    raise UserError(f"{path} holds several datasets {sorted(names)}; point data.path at one of their version "
                    "directories")
  return max(found, key=_version_key)


def open_builder(version_dir: str):
  """tfds.builder_from_directory, with a UserError naming the directory when it cannot be read."""
  import tensorflow_datasets as tfds

  try:
    return tfds.builder_from_directory(version_dir)
  except Exception as e:  # noqa: BLE001 - tfds raises many types for a broken dataset_info.json
    raise UserError(f"{version_dir}: not a readable TFDS dataset ({type(e).__name__}: {str(e)[:200]}); "
                    + rebuild_hint(os.path.dirname(os.path.dirname(version_dir)))) from None


def read_info(path: str) -> dict[str, Any]:
  """The corpus under `path` as a dict: name, version, version_dir, splits {name: records}, its metadata
  (label_names, speech/audio_sample_rate_hz, ...), `cache` {split: {field: settings}} for the splits a cache
  holds completely, `cache_dirs` {field: version_dir}, and the frame rates and widths of the cached fields."""
  version_dir = find_dataset(path)
  if version_dir is None:
    raise UserError(f"{path} is not a prepared dataset (no <corpus>/<version>/dataset_info.json); build one with "
                    "`star-jax prepare`")
  builder = open_builder(version_dir)
  info = dict(builder.info.metadata or {})
  info.update(name=builder.name, version=str(builder.version), version_dir=version_dir,
              splits={s: int(v.num_examples) for s, v in builder.info.splits.items()}, cache={}, cache_dirs={})
  for field, name in CACHED.items():
    cache_dir = find_dataset(os.path.dirname(os.path.dirname(version_dir)), name)
    if cache_dir is None:
      continue
    cache = open_builder(cache_dir).info
    meta = dict(cache.metadata or {})
    for split in cache.splits:  # the complete ones
      info["cache"].setdefault(split, {})[field] = meta.get("settings", {}).get(split, {})
    info["cache_dirs"][field] = cache_dir
    info.update({k: v for k, v in meta.items() if k.endswith(("_frame_rate_hz", "_dim"))})
  return info


def shard_name(name: str, split: str, index: int, count: int) -> str:
  return f"{name}-{split}.{SHARD_FORMAT}-{index:05d}-of-{count:05d}"


def shard_paths(version_dir: str, split: str) -> list[str]:
  """The shard files of `split` in a dataset version directory, in order."""
  name = os.path.basename(os.path.dirname(version_dir))
  return sorted(glob.glob(os.path.join(version_dir, f"{name}-{split}.{SHARD_FORMAT}-?????-of-?????")))


@functools.lru_cache(maxsize=None)
def _features(kind: str, dtype: str, dim: int):
  import tensorflow_datasets as tfds

  f = tfds.features

  def array(shape, dt=np.float32):  # raw bytes: decoding is a copy, not a parse of a float list
    return f.Tensor(shape=shape, dtype=dt, encoding="bytes")

  if kind == "records":
    fields = dict(id=f.Text(), caption=f.Text(), speech=array((None,)), audio=array((None,)),
                  labels=array((None,), np.uint8), voice=f.Text(), sources=f.Text())
    if dim:
      fields["text_emb"] = array((None, dim))
    return f.FeaturesDict(fields)
  names = {"hubert": ("hubert",), "latents": ("latents", "latents_std")}[kind]
  return f.FeaturesDict(dict(id=f.Text(), **{k: array((None, dim), np.dtype(dtype)) for k in names}))


def features(kind: str = "records", dtype: str = "float32", dim: int = 0):
  """The TFDS features of corpus records ("records"; `dim`: text_emb width, 0 for none) or of a cache ("hubert" |
  "latents": `dim` wide, stored as `dtype`)."""
  return _features(kind, dtype, int(dim))


def encode_record(record: dict[str, Any], kind: str = "records", dtype: str = "float32", dim: int = 0) -> bytes:
  """One record (str or array values) -> a serialised tf.train.Example; voice, sources and text_emb default
  to empty."""
  feats = features(kind, dtype, dim)
  unknown = set(record) - set(feats.keys())
  if unknown:
    raise ValueError(f"record fields {sorted(unknown)} are not in the features {sorted(feats.keys())}")
  defaults = {"voice": "", "sources": "", "text_emb": np.zeros((0, dim), np.float32)} if kind == "records" else {}
  defaults = {k: v for k, v in defaults.items() if k in feats.keys()}
  return feats.serialize_example({**defaults, **record})


def decode_record(data: bytes, kind: str = "records", dtype: str = "float32", dim: int = 0) -> dict[str, Any]:
  """Inverse of `encode_record`: text comes back as `str`, an empty text_emb is dropped."""
  return from_example(features(kind, dtype, dim).deserialize_example_np(data))


def from_example(example: dict[str, Any]) -> dict[str, Any]:
  """A decoded TFDS example (text as bytes) -> a record: text as `str`, an empty text_emb dropped."""
  out = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in example.items()}
  if "text_emb" in out and out["text_emb"].size == 0:
    del out["text_emb"]
  return out


def write_shard(path: str, records: list[bytes]) -> None:
  """Writes encoded records to one ArrayRecord file atomically (a tmp file renamed when complete)."""
  from array_record.python import array_record_module

  tmp = path + ".tmp"
  # group_size:1 makes every record its own chunk: what random access by grain wants.
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for data in records:
    writer.write(data)
  writer.close()
  os.replace(tmp, path)


def write_json(file: str, obj: Any) -> None:
  """Writes JSON atomically, so an interrupted run never leaves a half file behind."""
  tmp = file + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=False)
  os.replace(tmp, file)
