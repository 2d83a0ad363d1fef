"""Writes small prepared datasets for tests, in the format `star-jax prepare` writes (a TFDS dataset)."""

import os

from star_jax.data import builders, records

NAME = "opensfx"  # the builder the test datasets are written with


def version_dir(path):
  return os.path.join(path, NAME, builders.VERSION)


def shard_path(path, split, index, count):
  return os.path.join(version_dir(path), records.shard_name(NAME, split, index, count))


def write_split(path, split, recs, *, shard_size=8, payloads=None, options="group_size:1", **metadata):
  """`recs` (dicts of record fields) as split `split` of the dataset under `path`, `shard_size` records per shard
  (ArrayRecord writer `options`); `payloads` {record number: bytes} replaces those records' encoded bytes.
  Returns the version directory."""
  from array_record.python.array_record_module import ArrayRecordWriter

  builder = builders.make(NAME, str(path), metadata)
  os.makedirs(builder.data_dir, exist_ok=True)
  payloads = payloads or {}
  starts = range(0, len(recs), shard_size)
  for s, start in enumerate(starts):
    shard = shard_path(path, split, s, len(starts))
    chunk = range(start, min(start + shard_size, len(recs)))
    writer = ArrayRecordWriter(shard, options)
    for i in chunk:
      writer.write(payloads.get(i) or records.encode_record(recs[i], dim=metadata.get("text_dim", 0)))
    writer.close()
    records.write_json(shard + ".json", dict(shard=os.path.basename(shard), records=len(chunk)))
  builders.finish(builder)
  return builder.data_dir


def write_cache(path, split, field, entries, *, shard_size=8, frame_rate_hz=50, dtype="float32"):
  """Cached features (`field` "hubert": entries {id, hubert}; "latents": {id, latents, latents_std}) of split
  `split`, record for record with the corpus written by `write_split` with the same shard_size."""
  dim = entries[0][field].shape[-1]
  meta = {records.RATE_KEYS[field]: frame_rate_hz, records.DIM_KEYS[field]: dim, "dtype": dtype,
          "settings": {split: {"dtype": dtype}}}
  builder = builders.make(records.CACHED[field], str(path), meta)
  os.makedirs(builder.data_dir, exist_ok=True)
  starts = range(0, len(entries), shard_size)
  for s, start in enumerate(starts):
    shard = os.path.join(builder.data_dir, records.shard_name(builder.name, split, s, len(starts)))
    chunk = entries[start:start + shard_size]
    records.write_shard(shard, [records.encode_record(e, field, dtype, dim) for e in chunk])
    records.write_json(shard + ".json", dict(shard=os.path.basename(shard), records=len(chunk)))
  builders.finish(builder)
