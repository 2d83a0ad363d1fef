"""Writes small prepared datasets for tests, in the format `star-jax prepare` writes."""

import os

from star_jax.data import records


def write_split(path, split, recs, *, shard_size=8, **info):
  """`recs` (dicts of record fields) as split `split` of dataset `path`, `shard_size` records per shard."""
  os.makedirs(path, exist_ok=True)
  starts = range(0, len(recs), shard_size)
  for s, start in enumerate(starts):
    shard = os.path.join(path, records.shard_name(split, s, len(starts)))
    records.write_shard(shard, [records.encode_record(r) for r in recs[start:start + shard_size]])
    records.write_json(shard + ".json", dict(shard=os.path.basename(shard), records=len(recs[start:start + shard_size])))
  records.update_info(path, split, len(recs), **info)
