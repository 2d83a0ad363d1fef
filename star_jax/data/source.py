"""The grain data source over a split's shards: every bad shard or record is named, or skipped.

A shard is bad when it is missing, cannot be opened, or holds another number of records than its sidecar
says (a truncated ArrayRecord file opens as an empty one). A record is bad when its chunk fails riegeli's
hash check, it is not a valid NPZ, lacks a required field, or holds non-finite values. Without
skip_bad_records reading one raises `BadRecordError` naming the shard file and the record. With it, the
bad record's slot is filled by a good record chosen by a hash of its index and the element is tagged, so
batches keep their shape, epochs their length, and a restored iterator replays exactly (with grain's
worker processes too): which records are bad is a function of the files, not of the reading order.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import json
import os
import re
import threading
import zlib
from typing import Any

import numpy as np

from star_jax.data import records
from star_jax.errors import UserError

REQUIRED_FIELDS = ("id", "caption", "speech", "audio", "labels")
FINITE_FIELDS = ("speech", "audio", "text_emb", "hubert", "latents")
MAX_SUBSTITUTE_TRIES = 64  # random records tried to fill a bad slot before giving up on the dataset
FIX = ("re-run `star-jax prepare` for this split (delete the shard and its .json sidecar first), "
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


def _sidecar_records(path: str) -> int | None:
  try:
    with open(path + ".json") as f:
      return int(json.load(f)["records"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _open_shard(path: str) -> Shard:
  from array_record.python import array_record_module

  expected = _sidecar_records(path)
  if not os.path.exists(path):
    return Shard(path, expected or 0, "missing file")
  try:
    reader = array_record_module.ArrayRecordReader(path)
    found = reader.num_records()
    reader.close()
  except Exception as e:  # noqa: BLE001 - whatever the reader says is the reason
    return Shard(path, expected or 0, f"cannot be opened ({type(e).__name__}: {str(e)[:200]})")
  if expected is not None and found != expected:
    return Shard(path, expected, f"holds {found} records but its sidecar says {expected} (truncated?)")
  return Shard(path, found, None)


def split_shards(path: str, split: str) -> list[Shard]:
  """Every shard `split` should have in dataset `path` (from the `-of-N` names), each checked."""
  found = records.shard_paths(path, split)
  if not found:
    raise UserError(f"{path}: no shards for split '{split}'")
  counts = {int(m.group(1)) for p in found if (m := re.search(r"-of-(\d+)$", p))}
  if len(counts) != 1:
    raise BadRecordError(f"{path}: shards of split '{split}' disagree on their count {sorted(counts)}; {FIX}")
  count = counts.pop()
  paths = [os.path.join(path, records.shard_name(split, i, count)) for i in range(count)]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # opening reads each shard's index: I/O bound
    return list(pool.map(_open_shard, paths))


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


class RecordSource:
  """grain RandomAccessDataSource: index -> decoded, checked record plus `_bad` (0/1) and `_bad_where` (str)."""

  def __init__(self, shards: list[Shard], *, skip_bad_records: bool = False):
    bad = [s for s in shards if s.error]
    if bad and not skip_bad_records:
      raise BadRecordError(f"shard {bad[0].path} {bad[0].error}"
                           + (f" (and {len(bad) - 1} more bad shards)" if len(bad) > 1 else "") + f"; {FIX}")
    self.shards = shards
    self.skip_bad_records = skip_bad_records
    self._ends = np.cumsum([s.num_records for s in shards]).tolist()
    if not self._ends or self._ends[-1] == 0:
      raise BadRecordError(f"no readable records in {[s.path for s in shards]}; {FIX}")
    self._readers: list[Any] = [None] * len(shards)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._ends[-1]

  def __repr__(self) -> str:
    # grain checks this against the checkpoint: the files and their sizes, not skip_bad_records, so a run
    # can be resumed with skipping switched on.
    return f"RecordSource({[(os.path.basename(s.path), s.num_records) for s in self.shards]})"

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_readers"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._readers = [None] * len(self.shards)
    self._lock = threading.Lock()

  def locate(self, index: int) -> tuple[int, int]:
    """Global record index -> (shard number, position in the shard)."""
    i = bisect.bisect_right(self._ends, index)
    return i, index - (self._ends[i - 1] if i else 0)

  def _reader(self, i: int):
    if self._readers[i] is None:
      from array_record.python import array_record_module

      with self._lock:
        if self._readers[i] is None:
          self._readers[i] = array_record_module.ArrayRecordReader(
              self.shards[i].path, options="readahead_buffer_size:0", file_reader_buffer_size=32768)
    return self._readers[i]

  def _read(self, index: int) -> dict[str, Any]:
    i, position = self.locate(index)
    shard = self.shards[i]
    where = f"shard {shard.path} record {position}"
    if shard.error:
      raise _Bad(f"{where}: the shard {shard.error}")
    try:
      data = self._reader(i).read([position])[0]
      r = records.decode_record(data)
      check_record(r)
    except Exception as e:  # noqa: BLE001 - riegeli, zip and our own checks each raise their own types
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
