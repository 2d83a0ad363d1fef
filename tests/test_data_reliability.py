"""Data reliability: corrupt or truncated shards are named or skipped (restore stays exact); bad prep input."""

import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from star_jax.data import pipeline, records
from star_jax.data.source import BadRecordError

NUM_SHARDS, PER_SHARD = 3, 6
AUDIO_RATE = 8000


def _record(i):
  rng = np.random.default_rng(i)
  return dict(id=f"r{i:02d}", caption="a dog barks", speech=rng.standard_normal(4000).astype(np.float32),
              audio=rng.standard_normal(2000).astype(np.float32), labels=np.eye(3, dtype=np.uint8)[i % 3])


def _write(path, payloads=None):
  """3 shards of 6 records with sidecars, as `star-jax prepare` writes them; payloads overrides records."""
  os.makedirs(path)
  payloads = payloads or {}
  for s in range(NUM_SHARDS):
    shard = os.path.join(path, records.shard_name("train", s, NUM_SHARDS))
    ids = range(s * PER_SHARD, (s + 1) * PER_SHARD)
    writer = ArrayRecordWriter(shard, "group_size:1,uncompressed")  # so a test can find a record's bytes
    for i in ids:
      writer.write(payloads.get(i) or records.encode_record(_record(i)))
    writer.close()
    records.write_json(shard + ".json", dict(shard=os.path.basename(shard), records=PER_SHARD))
  records.update_info(path, "train", NUM_SHARDS * PER_SHARD, label_names=list("abc"), speech_sample_rate_hz=16000,
                      audio_sample_rate_hz=AUDIO_RATE, text_dim=0)


def _shard(path, s):
  return os.path.join(path, records.shard_name("train", s, NUM_SHARDS))


def _iter(path, **kw):
  cfg = dict(path=path, speech_duration_s=0.25, audio_duration_s=0.25, speech_sample_rate_hz=16000, num_workers=0)
  kw = dict(dict(batch_size=3, audio_sample_rate_hz=AUDIO_RATE, process_index=0, process_count=1, seed=4), **kw)
  return pipeline.make_iterator(cfg, "train", **kw)


def _flip_record_byte(path, i):
  """Flips one byte inside record i's stored chunk (riegeli's chunk hash then fails)."""
  shard = _shard(path, i // PER_SHARD)
  data = bytearray(open(shard, "rb").read())
  offset = bytes(data).find(_record(i)["speech"][100:120].tobytes())
  assert offset > 0
  data[offset] ^= 0xFF
  open(shard, "wb").write(bytes(data))


def _epoch_ids(it, num_batches=NUM_SHARDS * PER_SHARD // 3):
  return [str(x) for _ in range(num_batches) for x in next(it)["id"]]


@pytest.mark.parametrize("keep", [65536, 100000])
def test_truncated_shard_is_named_or_skipped(tmp_path, keep):
  path = str(tmp_path / "ds")
  _write(path)
  with open(_shard(path, 1), "r+b") as f:  # cut at a block boundary the reader sees no records at all
    f.truncate(keep)
  with pytest.raises(BadRecordError, match=r"train\.array_record-00001-of-00003 (holds 0 records but its sidecar "
                                           r"says 6 \(truncated\?\)|cannot be opened).*--skip-bad-records"):
    _iter(path)
  it = _iter(path, skip_bad_records=True, shuffle=False)
  ids = _epoch_ids(it)
  assert len(ids) == 18 and not {f"r{i:02d}" for i in range(6, 12)} & set(ids)  # slots refilled by good records
  assert it.bad_records == PER_SHARD


def test_missing_shard_keeps_the_index_space(tmp_path):
  path = str(tmp_path / "ds")
  _write(path)
  os.remove(_shard(path, 2))
  with pytest.raises(BadRecordError, match="00002-of-00003 missing file"):
    _iter(path)
  assert len(_epoch_ids(_iter(path, skip_bad_records=True))) == 18


@pytest.mark.parametrize("fault", ["chunk", "payload", "nan"])
def test_bad_record_names_shard_and_record_or_is_skipped_and_counted(tmp_path, fault):
  path = str(tmp_path / "ds")
  bad = 8  # shard 1, record 2
  payloads = {}
  if fault == "payload":
    payloads[bad] = b"not an npz at all" * 10
  elif fault == "nan":
    payloads[bad] = records.encode_record(dict(_record(bad), audio=np.full(2000, np.nan, np.float32)))
  _write(path, payloads)
  if fault == "chunk":
    _flip_record_byte(path, bad)
  reason = {"chunk": "hash mismatch", "payload": "(BadZipFile|ValueError)", "nan": "non-finite values in audio"}[fault]
  with pytest.raises(BadRecordError, match=rf"00001-of-00003 record 2: .*{reason}.*skip-bad-records"):
    _epoch_ids(_iter(path, shuffle=False))
  it = _iter(path, skip_bad_records=True, shuffle=False)
  ids = _epoch_ids(it)
  assert "r08" not in ids and len(ids) == 18 and it.bad_records == 1
  _epoch_ids(it)
  assert it.bad_records == 2  # met again in the second epoch


def test_skipping_restores_exactly_with_and_without_workers(tmp_path):
  path = str(tmp_path / "ds")
  _write(path)
  _flip_record_byte(path, 3)
  _flip_record_byte(path, 14)
  runs = []
  for workers in (0, 1):
    it = _iter(path, skip_bad_records=True, num_workers=workers)
    for _ in range(4):
      next(it)
    state = it.get_state()
    want = [next(it) for _ in range(9)]  # across the epoch boundary
    restored = _iter(path, skip_bad_records=True, num_workers=workers)
    restored.set_state(state)
    for w in want:
      got = next(restored)
      assert list(got["id"]) == list(w["id"]) and set(got) == set(w)
      np.testing.assert_array_equal(got["audio"], w["audio"])
    assert restored.bad_records == it.bad_records >= 2
    runs.append(want)
  assert [list(b["id"]) for b in runs[0]] == [list(b["id"]) for b in runs[1]]


def test_a_run_without_skipping_resumes_with_skipping(tmp_path):
  path = str(tmp_path / "ds")
  _write(path)
  it = _iter(path, shuffle=False)
  next(it)
  state = it.get_state()
  _flip_record_byte(path, 5)
  resumed = _iter(path, skip_bad_records=True, shuffle=False)
  resumed.set_state(state)  # grain accepts it: the source's repr does not depend on skipping
  ids = _epoch_ids(resumed, 5)
  assert ids[:2] == ["r03", "r04"] and "r05" not in ids and resumed.bad_records == 1


def test_worker_processes_report_the_bad_record(tmp_path):
  path = str(tmp_path / "ds")
  _write(path, {4: b"garbage"})
  with pytest.raises(Exception, match=r"00000-of-00003 record 4"):
    _epoch_ids(_iter(path, shuffle=False, num_workers=1))
