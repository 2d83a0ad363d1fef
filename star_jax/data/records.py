"""The prepared-dataset format: ArrayRecord shards per split, one record per clip, plus `info.json`.

A record is an uncompressed NPZ (numpy `savez`, no pickles) holding the fields in `SCHEMA`; strings are
0-d unicode arrays. `info.json` names the splits, their record counts, the label set and the rates.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import zipfile
from typing import Any

import numpy as np

from star_jax.errors import UserError

FORMAT_VERSION = 1
INFO_FILE = "info.json"
SHARD_SUFFIX = ".array_record"

# Field -> (dtype, shape, meaning). Optional fields are absent from records that do not carry them.
SCHEMA = {
    "id": ("str", "()", "unique record id"),
    "caption": ("str", "()", "the text the speech says"),
    "speech": ("float32", "(Ts,)", "synthesised speech at speech_sample_rate_hz"),
    "audio": ("float32", "(Ta,)", "the sound at audio_sample_rate_hz, mono, peak <= 1"),
    "labels": ("uint8", "(C,)", "multi-hot over info['label_names']"),
    "voice": ("str", "()", "TTS voice that spoke the caption (optional)"),
    "sources": ("str", "()", "where the audio came from, e.g. a file or clip indices (optional)"),
    "text_emb": ("float32", "(Lt, text_dim)", "hashed bag-of-words caption embedding, star_jax.data.text (optional)"),
    "hubert": ("float32|float16", "(Th, D)",
               "cached HuBERT last_hidden_state at hubert_frame_rate_hz, valid frames (optional; prepare cache)"),
    "latents": ("float32|float16", "(Tl, Dl)",
                "cached VAE latents at latent_frame_rate_hz: the posterior mean when latents_std is there (optional)"),
    "latents_std": ("float32|float16", "(Tl, Dl)",
                    "cached VAE posterior std; the pipeline serves latents + latents_std * N(0, 1) (optional)"),
}


def encode_record(record: dict[str, Any]) -> bytes:
  """Serialises one record (str or array values) to NPZ bytes."""
  unknown = set(record) - set(SCHEMA)
  if unknown:
    raise ValueError(f"record fields {sorted(unknown)} are not in the schema {sorted(SCHEMA)}")
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in record.items()})
  return buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record`: strings come back as `str`, arrays as numpy arrays.

  Reads the NPZ without `np.load`: numpy parses NPY headers with `ast.literal_eval`, and CPython 3.11's
  AST validator keeps its recursion depth per interpreter, not per thread, so grain's reader threads
  decoding at once fail at random with "SystemError: AST constructor recursion depth mismatch".
  """
  out = {}
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    for name in zf.namelist():
      if not name.endswith(".npy"):
        raise ValueError(f"NPZ member '{name}' is not an .npy array")
      value = _read_npy(zf.read(name), name)
      out[name[:-4]] = str(value) if value.dtype.kind == "U" else value
  return out


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=]?[a-zA-Z]\d*)', 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>[\d, ]*)\), \}\s*$")


def _read_npy(raw: bytes, name: str) -> np.ndarray:
  """One NPY file (format 1.0-3.0, simple dtypes, no pickles) -> a writable array."""
  if raw[:6] != _NPY_MAGIC or len(raw) < 10:
    raise ValueError(f"NPZ member '{name}' is not in NPY format")
  major = raw[6]
  if major == 1:
    size, start = int.from_bytes(raw[8:10], "little"), 10
  elif major in (2, 3):
    size, start = int.from_bytes(raw[8:12], "little"), 12
  else:
    raise ValueError(f"NPZ member '{name}': unsupported NPY version {major}")
  header = raw[start:start + size].decode("utf8" if major == 3 else "latin1")
  m = _NPY_HEADER.match(header)
  if m is None:
    raise ValueError(f"NPZ member '{name}': unsupported NPY header {header.strip()[:120]!r}")
  dtype = np.dtype(m["descr"])
  if dtype.hasobject:
    raise ValueError(f"NPZ member '{name}' holds Python objects, which records may not")
  shape = tuple(int(d) for d in m["shape"].replace(" ", "").split(",") if d)
  count = int(np.prod(shape, dtype=np.int64))
  body = raw[start + size:]
  if len(body) != count * dtype.itemsize:
    raise ValueError(f"NPZ member '{name}': {len(body)} data bytes for shape {shape} of {dtype} "
                     f"(truncated?)")
  array = np.frombuffer(body, dtype=dtype, count=count).copy()
  return array.reshape(shape, order="F" if m["fortran"] == "True" else "C")


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}{SHARD_SUFFIX}-{index:05d}-of-{count:05d}"


def shard_paths(path: str, split: str) -> list[str]:
  """The finished shard files of `split` in dataset directory `path`, in order."""
  return sorted(glob.glob(os.path.join(path, f"{split}{SHARD_SUFFIX}-?????-of-?????")))


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


def read_info(path: str) -> dict[str, Any]:
  """Loads `info.json` of a prepared dataset directory."""
  file = os.path.join(path, INFO_FILE)
  if not os.path.exists(file):
    raise UserError(f"{path} is not a prepared dataset (no {INFO_FILE}); build one with `star-jax prepare`")
  with open(file) as f:
    return json.load(f)


def update_info(path: str, split: str, num_records: int, **fields: Any) -> dict[str, Any]:
  """Adds (or replaces) `split` in `info.json`; the other fields must agree with what is there."""
  file = os.path.join(path, INFO_FILE)
  info = read_info(path) if os.path.exists(file) else {}
  for key, value in fields.items():
    if key in info and info[key] != value and key not in ("prepared_by",):
      raise UserError(f"{path}: {key} differs from the splits already there ({info[key]!r} vs {value!r}); "
                      "prepare into a new --out directory")
  info.update(fields)
  info["format_version"] = FORMAT_VERSION
  info["record_format"] = "array_record shards, one NPZ (numpy savez, no pickle) per record"
  info["schema"] = {k: dict(dtype=d, shape=s, meaning=m) for k, (d, s, m) in SCHEMA.items()}
  info.setdefault("splits", {})[split] = int(num_records)
  write_json(file, info)
  return info


def write_json(file: str, obj: Any) -> None:
  """Writes JSON atomically, so an interrupted run never leaves a half file behind."""
  tmp = file + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=False)
  os.replace(tmp, file)
