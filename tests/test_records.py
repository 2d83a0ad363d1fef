"""The record format: NPZ round trip, and decoding from many threads at once (grain's readers)."""

import io
import threading

import numpy as np
import pytest

from star_jax.data import records


def _record(rng):
  return {"id": "clip-1", "caption": "rain falls on a tin roof – naïve", "speech": rng.normal(size=1600).astype(np.float32),
          "labels": np.array([0, 1, 0, 1], np.uint8), "latents": rng.normal(size=(5, 3)).astype(np.float16),
          "hubert": np.zeros((0, 8), np.float32)}


def test_round_trip_keeps_values_dtypes_and_shapes():
  rec = _record(np.random.default_rng(0))
  out = records.decode_record(records.encode_record(rec))
  assert set(out) == set(rec)
  for key, value in rec.items():
    if isinstance(value, str):
      assert out[key] == value
    else:
      assert out[key].dtype == value.dtype and out[key].shape == value.shape and out[key].flags.writeable
      np.testing.assert_array_equal(out[key], value)


def test_decodes_what_numpy_writes_including_fortran_order():
  buf = io.BytesIO()
  np.savez(buf, audio=np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)))
  np.testing.assert_array_equal(records.decode_record(buf.getvalue())["audio"], np.arange(12).reshape(3, 4))


@pytest.mark.parametrize("cut", [-10, 40])
def test_truncated_record_is_an_error(cut):
  data = records.encode_record(_record(np.random.default_rng(0)))
  with pytest.raises(Exception):
    records.decode_record(data[:cut])


def test_object_arrays_are_refused():
  buf = io.BytesIO()
  np.savez(buf, id=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="objects"):
    records.decode_record(buf.getvalue())


def test_decoding_does_not_use_ast(monkeypatch):
  # np.load parses NPY headers with ast.literal_eval; on CPython 3.11 that raised "SystemError: AST
  # constructor recursion depth mismatch" in a grain reader thread and stopped the demo's stage 2.
  import ast

  def refuse(*args, **kwargs):
    raise AssertionError("decode_record called ast.literal_eval")
  monkeypatch.setattr(ast, "literal_eval", refuse)
  rec = _record(np.random.default_rng(1))
  np.testing.assert_array_equal(records.decode_record(records.encode_record(rec))["speech"], rec["speech"])


def test_decoding_from_many_threads_at_once():
  data = records.encode_record(_record(np.random.default_rng(0)))
  errors = []

  def work():
    try:
      for _ in range(400):
        assert records.decode_record(data)["caption"].startswith("rain")
    except Exception as e:  # noqa: BLE001 - collected and reported below
      errors.append(repr(e))

  threads = [threading.Thread(target=work) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[:3]
