"""The grain data source of a split: the TFDS data source, wrapped so every bad shard or record is named or skipped.

`tfds.data_source`'s random-access source (here `builder.as_data_source(split)` of the version directory) reads
the records; `RecordSource` wraps it, with the split's cached features (star_jax.data.cache) joined record for
record. A shard is bad when it is missing, cannot be opened, or holds another number of records than
dataset_info.json says (a truncated ArrayRecord file opens as an empty one). A record is bad when its chunk fails
riegeli's hash check, it is not a valid tf.train.Example of the features, its cached features belong to another
record, or it holds non-finite values. Without skip_bad_records reading one raises `BadRecordError` naming the
shard file and the record. With it, the bad record's slot is filled by a good record chosen by a hash of its index
and the element is tagged, so batches keep their shape, epochs their length, and a restored iterator replays
exactly (with grain's worker processes too): which records are bad is a function of the files, not of the
reading order.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import os
import threading
import zlib
from typing import Any

import numpy as np

from star_jax.data import records
from star_jax.errors import UserError

REQUIRED_FIELDS = ("id", "caption", "speech", "audio", "labels")
FINITE_FIELDS = ("speech", "audio", "text_emb", "hubert", "latents", "latents_std")
MAX_SUBSTITUTE_TRIES = 64  # random records tried to fill a bad slot before giving up on the dataset
FIX = ("re-run `star-jax prepare` for this split (delete the shard and its .json sidecar first, or prepare cache "
       "for a cached_* shard), "
       "or skip bad records (make_iterator(skip_bad_records=True), data.skip_bad_records, --skip-bad-records)")


class BadRecordError(UserError):
  """A shard or record that cannot be read; the message names the file and the record."""


class _Bad(Exception):
  """Internal: one bad record, with where and why."""


@dataclasses.dataclass(frozen=True)
class Shard:
  path: str
  num_records: int
  error: str | None  # why the whole shard is unreadable, or None


def _open_shard(path: str, expected: int) -> Shard:
  from array_record.python import array_record_module

  if not os.path.exists(path):
    return Shard(path, expected, "missing file")
  try:
    reader = array_record_module.ArrayRecordReader(path)
    found = reader.num_records()
    reader.close()
  except Exception as e:  # noqa: BLE001 - whatever the reader says is the reason
    return Shard(path, expected, f"cannot be opened ({type(e).__name__}: {str(e)[:200]})")
  if found != expected:
    return Shard(path, expected, f"holds {found} records but dataset_info.json says {expected} (truncated?)")
  return Shard(path, found, None)


def split_shards(version_dir: str, split: str) -> list[Shard]:
  """Every shard `split` has in dataset version directory `version_dir` (from dataset_info.json), each checked."""
  builder = records.open_builder(version_dir)
  if split not in builder.info.splits:
    raise UserError(f"{version_dir}: no split '{split}'; it has {sorted(builder.info.splits)}")
  info = builder.info.splits[split]
  paths = [os.path.join(version_dir, os.path.basename(str(p))) for p in info.filepaths]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # opening reads each shard's index: I/O bound
    return list(pool.map(_open_shard, paths, info.shard_lengths))


def check_record(r: dict[str, Any]) -> None:
  """Raises ValueError if a decoded record cannot be trained on."""
  missing = [k for k in REQUIRED_FIELDS if k not in r]
  if missing:
    raise ValueError(f"missing fields {missing}")
  for key in ("speech", "audio"):
    if r[key].ndim != 1 or r[key].dtype.kind != "f":
      raise ValueError(f"{key} is {r[key].dtype} {r[key].shape}, not a float waveform")
  for key in FINITE_FIELDS:
    if key in r and not np.all(np.isfinite(r[key])):
      raise ValueError(f"non-finite values in {key}")


@dataclasses.dataclass(frozen=True)
class Part:
  """One TFDS dataset's split: the corpus records, or cached features joined to them by position."""
  version_dir: str
  split: str
  shards: tuple[Shard, ...]


def split_part(version_dir: str, split: str) -> Part:
  return Part(version_dir, split, tuple(split_shards(version_dir, split)))


class RecordSource:
  """grain RandomAccessDataSource: index -> decoded, checked record (with its cached features) plus `_bad` (0/1)
  and `_bad_where` (str)."""

  def __init__(self, part: Part, *, cached: tuple[Part, ...] = (), skip_bad_records: bool = False):
    for c in cached:
      if [s.num_records for s in c.shards] != [s.num_records for s in part.shards]:
        raise BadRecordError(f"{c.version_dir} split '{c.split}' has other shards than {part.version_dir}; "
                             "re-run `star-jax prepare cache`")
    shards = [s for p in (part, *cached) for s in p.shards]
    bad = [s for s in shards if s.error]
    if bad and not skip_bad_records:
      raise BadRecordError(f"shard {bad[0].path} {bad[0].error}"
                           + (f" (and {len(bad) - 1} more bad shards)" if len(bad) > 1 else "") + f"; {FIX}")
    self.part, self.cached = part, tuple(cached)
    self.shards = list(part.shards)
    self.skip_bad_records = skip_bad_records
    self._ends = np.cumsum([s.num_records for s in part.shards]).tolist()
    if not self._ends or self._ends[-1] == 0:
      raise BadRecordError(f"no readable records in {[s.path for s in part.shards]}; {FIX}")
    self._sources: dict[str, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._ends[-1]

  def __repr__(self) -> str:
    # grain checks this against the checkpoint: the files and their sizes, not skip_bad_records, so a run
    # can be resumed with skipping switched on.
    return f"RecordSource({[(os.path.basename(s.path), s.num_records) for s in self.shards]})"

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_sources"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._sources = {}
    self._lock = threading.Lock()

  def locate(self, index: int) -> tuple[int, int]:
    """Global record index -> (shard number, position in the shard)."""
    i = bisect.bisect_right(self._ends, index)
    return i, index - (self._ends[i - 1] if i else 0)

  def _source(self, part: Part):
    """tfds's data source of `part`, opened once per process (grain pickles this object to its workers)."""
    if part.version_dir not in self._sources:
      with self._lock:
        if part.version_dir not in self._sources:
          self._sources[part.version_dir] = records.open_builder(part.version_dir).as_data_source(part.split)
    return self._sources[part.version_dir]

  def _read(self, index: int) -> dict[str, Any]:
    i, position = self.locate(index)
    r: dict[str, Any] = {}
    for part in (self.part, *self.cached):
      shard = part.shards[i]
      where = f"shard {shard.path} record {position}"
      if shard.error:
        raise _Bad(f"{where}: the shard {shard.error}")
      try:
        got = records.from_example(self._source(part)[index])
        if r and got["id"] != r["id"]:
          raise ValueError(f"cached features of record '{got['id']}', not of '{r['id']}'")
        r.update(got)
        check_record(r)
      except Exception as e:  # noqa: BLE001 - riegeli, protobuf and our own checks each raise their own types
        raise _Bad(f"{where}: {type(e).__name__}: {str(e)[:200]}") from None
    return r

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    try:
      return dict(self._read(index), _bad=np.int32(0), _bad_where=np.str_(""))
    except _Bad as e:
      if not self.skip_bad_records:
        raise BadRecordError(f"{e}; {FIX}") from None
      bad = e
    for attempt in range(MAX_SUBSTITUTE_TRIES):
      try:
        r = self._read(zlib.crc32(f"{index}/{attempt}".encode()) % len(self))
      except _Bad:
        continue
      return dict(r, _bad=np.int32(1), _bad_where=np.str_(str(bad)))
    raise BadRecordError(f"{bad}; and {MAX_SUBSTITUTE_TRIES} random other records are bad too: "
                         "the split is mostly unreadable; re-run `star-jax prepare`")
