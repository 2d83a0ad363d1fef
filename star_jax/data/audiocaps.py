"""AudioCaps clips + AudioSet labels + synthesised speech -> records (DESIGN.md §4).

Inputs: an AudioCaps caption CSV (`audiocap_id, youtube_id, start_time, caption`), a folder of the clips
the user downloaded (already cut to their 10-s segments), AudioSet segment CSVs
(`YTID, start_seconds, end_seconds, positive_labels`, '#' comment lines) and the class CSV
(`index, mid, display_name`). Every item that cannot be used is skipped with a reason.
"""

from __future__ import annotations

import csv
import os
import zlib
from typing import Any, Sequence

import numpy as np

from star_jax.data import audio as audio_lib
from star_jax.data import text as text_lib
from star_jax.data.tts import make_tts
from star_jax.errors import UserError

CAPTION_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
EXTENSIONS = ("wav", "flac", "ogg", "mp3")
TRIM_NOTE_S = 1.0  # a clip this much longer than --max-duration-s gets a "trimmed" note in the report
# File names tried under --audio-dir when no --audio-pattern is given (common download-script layouts).
DEFAULT_PATTERNS = tuple(f"{stem}.{ext}" for stem in ("{youtube_id}", "Y{youtube_id}", "{youtube_id}_{start}",
                                                       "{audiocap_id}") for ext in EXTENSIONS)


def _read_csv(path: str, required: Sequence[str]) -> list[dict[str, str]]:
  """Rows as {column: value} ('' for a short row); raises UserError naming the file if it is unusable."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file; pass the path of an existing CSV")
  try:
    with open(path, newline="", encoding="utf-8") as f:
      lines = [line for line in f if not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines, skipinitialspace=True)
    rows = [{k: (v or "").strip() for k, v in row.items() if isinstance(k, str)} for row in reader]
  except (UnicodeDecodeError, csv.Error) as e:
    raise UserError(f"{path}: not a UTF-8 CSV ({type(e).__name__}: {str(e)[:100]}); pass the CSV itself") from None
  missing = [c for c in required if c not in (reader.fieldnames or [])]
  if missing:
    raise UserError(f"{path}: missing columns {missing}; expected a header line with {list(required)}")
  return rows


def read_captions(path: str, *, all_captions: bool = False) -> list[dict[str, str]]:
  """Items in CSV order: the first caption per youtube_id (or every caption), with a unique `id`."""
  items, seen = [], set()
  for row in _read_csv(path, CAPTION_COLUMNS):
    yid = row.get("youtube_id", "")
    if not all_captions and yid in seen:
      continue
    seen.add(yid)
    items.append(dict(id=row.get("audiocap_id", "") if all_captions else yid, youtube_id=yid,
                      audiocap_id=row.get("audiocap_id", ""), start_time=row.get("start_time", ""),
                      caption=row.get("caption", "")))
  return items


def read_audioset(segment_csvs: Sequence[str], classes_csv: str) -> tuple[list[str], list[str], dict[str, list[int]]]:
  """-> (display names, mids, {youtube_id: label indices}) from AudioSet's CSVs."""
  classes = _read_csv(classes_csv, ("index", "mid", "display_name"))
  try:
    classes.sort(key=lambda r: int(r["index"]))
  except (KeyError, ValueError):
    raise UserError(f"{classes_csv}: the index column must hold integers "
                    "(pass AudioSet's class_labels_indices.csv)") from None
  names = [r["display_name"] for r in classes]
  mids = [r["mid"] for r in classes]
  index = {mid: i for i, mid in enumerate(mids)}
  labels: dict[str, list[int]] = {}
  for path in segment_csvs:
    if not os.path.isfile(path):
      raise UserError(f"{path}: no such file; pass the path of an existing AudioSet segments CSV")
    try:
      with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.reader(f, skipinitialspace=True):
          if not row or row[0].startswith("#") or len(row) < 4:
            continue
          ids = [index[m.strip()] for m in row[3].split(",") if m.strip() in index]
          labels.setdefault(row[0].strip(), [])
          labels[row[0].strip()] = sorted(set(labels[row[0].strip()]) | set(ids))
    except csv.Error as e:
      raise UserError(f"{path}: not a CSV ({e}); pass an AudioSet segments CSV") from None
  return names, mids, labels


def find_audio(root: str, item: dict[str, str], patterns: Sequence[str]) -> str:
  """The first existing file under `root` named by `patterns`; raises AudioError if none or unsafe."""
  try:
    start = str(int(float(item["start_time"])))
  except (ValueError, OverflowError):
    start = item["start_time"]
  root_abs = os.path.abspath(root)
  for pattern in patterns:
    name = pattern.format(youtube_id=item["youtube_id"], audiocap_id=item["audiocap_id"], start=start)
    path = os.path.abspath(os.path.join(root_abs, name.replace("\0", "")))
    # Ids come from a CSV: never let one name a file outside the audio root ("../", absolute paths).
    if "\0" in name or os.path.isabs(name) or os.path.commonpath([root_abs, path]) != root_abs:
      raise audio_lib.AudioError(f"unsafe path: {name!r} leaves the audio directory")
    if os.path.exists(path):
      return path
  raise audio_lib.AudioError("missing file")


_STATE: dict[str, Any] = {}


def init_worker(settings: dict[str, Any]) -> None:
  """Loads the TTS and the label table once per worker process."""
  _STATE.clear()
  _STATE.update(settings)
  _STATE["tts"] = make_tts(settings["tts"], model_dir=settings["tts_model"],
                           sample_rate_hz=settings["speech_rate_hz"], **settings["tts_kwargs"])
  if settings.get("text_encoder"):
    _STATE["t5"] = text_lib.T5Features(settings["text_encoder"])


def _speak_one(caption: str, seed: int):
  """One caption's Utterance, or the skip reason when the TTS fails on it."""
  try:
    return _STATE["tts"].synthesize([caption], seed=seed)[0]
  except Exception as e:  # noqa: BLE001
    return f"tts failed: {type(e).__name__}: {str(e)[:120]}"


def build_records(items: Sequence[dict[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, str]], list]:
  """Items -> (records, skipped with reasons, notes); a `shards.Builder`."""
  s = _STATE
  good, skipped, notes = [], [], []
  for item in items:
    try:
      if not item["caption"]:
        raise audio_lib.AudioError("empty caption")
      label_ids = s["labels"].get(item["youtube_id"])
      if not label_ids:
        raise audio_lib.AudioError("no labels")
      path = find_audio(s["audio_dir"], item, s["patterns"])
      wave, duration_s = audio_lib.read_audio(path, s["audio_rate_hz"], max_duration_s=s["max_duration_s"])
      audio_lib.check_audio(wave, s["audio_rate_hz"], min_duration_s=s["min_duration_s"])
    except audio_lib.AudioError as e:
      skipped.append(dict(id=item["id"], reason=str(e)))
      continue
    if duration_s > s["max_duration_s"] + TRIM_NOTE_S:
      notes.append(dict(id=item["id"], note=f"trimmed: {duration_s:.1f} s cut to {s['max_duration_s']} s"))
    good.append((item, wave, label_ids, os.path.relpath(path, s["audio_dir"])))
  return _finish(good, skipped, notes)


def _finish(good: list[tuple], skipped: list[dict[str, str]], notes: list[dict[str, str]]
            ) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[dict[str, str]]]:
  """Speaks the captions of the usable items and assembles their records."""
  s = _STATE
  if not good:
    return [], skipped, notes
  seed = (s["seed"] * 1_000_003 + zlib.crc32(good[0][0]["id"].encode())) % 2**31
  try:
    speech = s["tts"].synthesize([g[0]["caption"] for g in good], seed=seed)
  except Exception:  # noqa: BLE001 - find the caption that broke the batch, keep the rest
    speech = [_speak_one(g[0]["caption"], seed + i) for i, g in enumerate(good)]
  records = []
  t5 = s.get("t5")
  text = t5([g[0]["caption"] for g in good]) if t5 is not None else [None] * len(good)
  for (item, wave, label_ids, rel), utt, text_emb in zip(good, speech, text):
    if isinstance(utt, str):
      skipped.append(dict(id=item["id"], reason=utt))
      continue
    if utt.wave.size == 0 or float(np.max(np.abs(utt.wave))) == 0.0:
      skipped.append(dict(id=item["id"], reason="tts produced no speech"))
      continue
    labels = np.zeros(s["num_labels"], np.uint8)
    labels[label_ids] = 1
    record = dict(id=item["id"], caption=item["caption"], speech=utt.wave, audio=wave, labels=labels,
                  voice=utt.voice, sources=rel)
    if text_emb is not None:
      record["text_emb"] = text_emb
    elif s["text_dim"]:
      record["text_emb"] = text_lib.hash_embed(item["caption"], s["text_dim"])
    records.append(record)
  return records, skipped, notes
