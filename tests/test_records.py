"""The record format: TFDS features round trip (corpus and cache records), and decoding from many threads at once
(grain's readers), with no ast use (CPython 3.11's per-interpreter AST recursion counter broke np.load in threads)."""

import threading

import numpy as np
import pytest

from star_jax.data import records


def _record(rng):
  return {"id": "clip-1", "caption": "rain falls on a tin roof – naïve", "speech": rng.normal(size=1600).astype(np.float32),
          "audio": rng.normal(size=800).astype(np.float32), "labels": np.array([0, 1, 0, 1], np.uint8),
          "voice": "en-us/s160/p50", "sources": "a.wav", "text_emb": rng.normal(size=(3, 8)).astype(np.float32)}


def _assert_same(out, rec):
  assert set(out) == set(rec)
  for key, value in rec.items():
    if isinstance(value, str):
      assert out[key] == value
    else:
      assert out[key].dtype == value.dtype and out[key].shape == value.shape
      np.testing.assert_array_equal(out[key], value)


def test_round_trip_keeps_values_dtypes_and_shapes():
  rec = _record(np.random.default_rng(0))
  _assert_same(records.decode_record(records.encode_record(rec, dim=8), dim=8), rec)
  bare = {k: rec[k] for k in ("id", "caption", "speech", "audio", "labels")}  # optional fields default to empty
  out = records.decode_record(records.encode_record(bare, dim=8), dim=8)
  assert out.pop("voice") == out.pop("sources") == "" and "text_emb" not in out
  _assert_same(out, bare)
  hubert = {"id": "clip-1", "hubert": np.random.default_rng(1).normal(size=(5, 6)).astype(np.float16)}
  _assert_same(records.decode_record(records.encode_record(hubert, "hubert", "float16", 6), "hubert", "float16", 6),
               hubert)


def test_unknown_fields_and_truncated_records_are_errors():
  rec = _record(np.random.default_rng(0))
  with pytest.raises(ValueError, match="not in the features"):
    records.encode_record(dict(rec, extra=np.zeros(2)), dim=8)
  data = records.encode_record(rec, dim=8)
  with pytest.raises(Exception):
    records.decode_record(data[:-10], dim=8)


def test_decoding_from_many_threads_at_once(monkeypatch):
  import ast

  def refuse(*args, **kwargs):
    raise AssertionError("decode_record called ast.literal_eval")
  monkeypatch.setattr(ast, "literal_eval", refuse)
  data = records.encode_record(_record(np.random.default_rng(0)), dim=8)
  errors = []

  def work():
    try:
      for _ in range(400):
        assert records.decode_record(data, dim=8)["caption"].startswith("rain")
    except Exception as e:  # noqa: BLE001 - collected and reported below
      errors.append(repr(e))

  threads = [threading.Thread(target=work) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[:3]
