"""Data reliability: corrupt or truncated shards are named or skipped (restore stays exact); bad prep input."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from star_jax import cli
from star_jax.data import audio, audiocaps, pipeline, records
from star_jax.data.source import BadRecordError
from tests.dataset_writer import shard_path, write_split

NUM_SHARDS, PER_SHARD = 3, 6
AUDIO_RATE = 8000


def _record(i):
  rng = np.random.default_rng(i)
  return dict(id=f"r{i:02d}", caption="a dog barks", speech=rng.standard_normal(4000).astype(np.float32),
              audio=rng.standard_normal(2000).astype(np.float32), labels=np.eye(3, dtype=np.uint8)[i % 3])


def _write(path, payloads=None):
  """3 shards of 6 records with sidecars, as `star-jax prepare` writes them; payloads overrides records."""
  write_split(path, "train", [_record(i) for i in range(NUM_SHARDS * PER_SHARD)], shard_size=PER_SHARD,
              payloads=payloads, options="group_size:1,uncompressed",  # so a test can find a record's bytes
              label_names=list("abc"), speech_sample_rate_hz=16000, audio_sample_rate_hz=AUDIO_RATE, text_dim=0)


def _shard(path, s):
  return shard_path(path, "train", s, NUM_SHARDS)


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
  with pytest.raises(BadRecordError, match=r"train\.array_record-00001-of-00003 (holds 0 records but dataset_info"
                                           r"\.json says 6 \(truncated\?\)|cannot be opened).*--skip-bad-records"):
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
    payloads[bad] = b"not a tf.train.Example at all" * 10
  elif fault == "nan":
    payloads[bad] = records.encode_record(dict(_record(bad), audio=np.full(2000, np.nan, np.float32)))
  _write(path, payloads)
  if fault == "chunk":
    _flip_record_byte(path, bad)
  reason = {"chunk": "hash mismatch", "payload": "(DecodeError|ValueError)", "nan": "non-finite values in audio"}[fault]
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


# --- prepare on bad input -------------------------------------------------------------------------------------

HAS_ESPEAK = shutil.which("espeak-ng") is not None


def _tone(seconds, rate, channels=1):
  t = np.arange(int(seconds * rate)) / rate
  wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
  return np.stack([wave] * channels, 1) if channels > 1 else wave


@pytest.fixture(scope="module")
def bad_clips(tmp_path_factory):
  """(clips dir, {name: expected skip reason or None (kept)}) for every kind of bad input file."""
  clips = tmp_path_factory.mktemp("bad") / "clips"
  clips.mkdir()
  rng = np.random.default_rng(0)
  (clips / "random.wav").write_bytes(rng.bytes(5000))
  (clips / "random.mp3").write_bytes(rng.bytes(5000))
  (clips / "empty.wav").write_bytes(b"")
  sf.write(clips / "zero.wav", np.zeros(0, np.float32), 16000)
  nan = _tone(2.0, 16000)
  nan[100] = np.nan
  sf.write(clips / "nan.wav", nan, 16000, subtype="FLOAT")
  sf.write(clips / "eight.wav", _tone(2.0, 22050, channels=8), 22050)
  sf.write(clips / "low.wav", _tone(2.0, 8000), 8000)
  sf.write(clips / "high.flac", _tone(2.0, 96000), 96000)
  sf.write(clips / "hour.wav", np.tile(_tone(1.0, 2000), 3600), 2000, subtype="PCM_16")  # an hour at 2 kHz: 14 MB
  return clips, {"random.wav": "unreadable", "random.mp3": "unreadable", "empty.wav": "unreadable: empty file",
          "zero.wav": "too short", "nan.wav": "unreadable: non-finite samples", "nowhere.wav": "missing file",
          "eight.wav": None, "low.wav": None, "high.flac": None, "hour.wav": None}


def test_read_audio_skips_or_repairs_every_bad_file(bad_clips):
  clips, expected = bad_clips
  for name, reason in expected.items():
    path = str(clips / name)
    if reason:
      with pytest.raises(audio.AudioError, match=reason):
        wave, _ = audio.read_audio(path, 16000, max_duration_s=10.0)
        audio.check_audio(wave, 16000, min_duration_s=1.0)
      continue
    wave, duration_s = audio.read_audio(path, 16000, max_duration_s=10.0)
    audio.check_audio(wave, 16000, min_duration_s=1.0)
    assert wave.ndim == 1 and wave.dtype == np.float32 and np.isfinite(wave).all()
    want_s = 10.0 if name == "hour.wav" else 2.0  # the hour is cut (and only 10 s of it read)
    assert abs(wave.shape[0] - want_s * 16000) <= 2 and 0.25 < np.abs(wave).max() < 0.35, name
    assert duration_s == pytest.approx(3600.0 if name == "hour.wav" else 2.0, abs=1e-3)


def test_csv_paths_cannot_leave_the_audio_root(tmp_path):
  root = tmp_path / "clips"
  (root / "sub").mkdir(parents=True)
  (tmp_path / "secret.wav").write_bytes(b"x")
  (root / "ok.wav").write_bytes(b"x")
  item = dict(audiocap_id="1", start_time="0")
  assert audiocaps.find_audio(str(root), dict(item, youtube_id="ok"), ["{youtube_id}.wav"]) == str(root / "ok.wav")
  for yid in ("../secret", "sub/../../secret", str(tmp_path / "secret"), "/etc/passwd", "ok\0"):
    with pytest.raises(audio.AudioError, match="unsafe path"):
      audiocaps.find_audio(str(root), dict(item, youtube_id=yid), ["{youtube_id}.wav"])
  with pytest.raises(audio.AudioError, match="missing file"):  # a bad start_time is just a name that is absent
    audiocaps.find_audio(str(root), dict(item, youtube_id="ok", start_time="inf"), ["{youtube_id}_{start}.wav"])


def _csvs(tmp_path, names, clips=None):
  captions = tmp_path / "train.csv"
  captions.write_text("audiocap_id,youtube_id,start_time,caption\n"
                      + "".join(f"{i},{n},0,a dog barks {i}\n" for i, n in enumerate(names)))
  segments = tmp_path / "segments.csv"
  segments.write_text("".join(f'{n}, 0.0, 10.0, "/m/dog"\n' for n in names))
  classes = tmp_path / "classes.csv"
  classes.write_text('index,mid,display_name\n0,/m/dog,"Dog"\n')
  return ["--captions", str(captions), "--audio-dir", str(clips or tmp_path / "clips"), "--audioset-segments",
          str(segments), "--audioset-classes", str(classes), "--tts", "espeak", "--audio-rate-hz", "16000",
          "--shard-size", "4", "--workers", "1", "--no-progress", "--audio-pattern", "{youtube_id}"]


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng not installed")
def test_prepare_keeps_or_reports_every_bad_file(tmp_path, capsys, bad_clips):
  clips, expected = bad_clips
  out = tmp_path / "out"
  assert cli.main(["prepare", "audiocaps", *_csvs(tmp_path, list(expected), clips), "--out", str(out)]) == 0
  report = json.loads((out / "train.report.json").read_text())
  skipped = {s["id"]: s["reason"] for s in report["skipped"]}
  assert set(skipped) == {n for n, r in expected.items() if r}
  for name, reason in skipped.items():
    assert reason.startswith(expected[name]), (name, reason)
  assert report["records"] == 4 and report["notes"] == [dict(id="hour.wav", note="trimmed: 3600.0 s cut to 10.0 s")]
  assert "warning: hour.wav: trimmed" in capsys.readouterr().err
  # Killed while writing shard 1: its sidecar never appeared and a half temp file is left. A rerun redoes only it.
  shard = out / "audiocaps" / "1.0.0" / records.shard_name("audiocaps", "train", 1, 3)
  os.remove(str(shard) + ".json")
  (shard.parent / (shard.name + ".tmp")).write_bytes(b"half a shard")
  assert cli.main(["prepare", "audiocaps", *_csvs(tmp_path, list(expected), clips), "--out", str(out)]) == 0
  again = json.loads((out / "train.report.json").read_text())
  assert again["shards_written_now"] == 1 and again["records"] == 4
  assert not (shard.parent / (shard.name + ".tmp")).exists()


def _fails_with_one_line(capsys, argv, match):
  code = cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert re.search(match, err), err


def test_prepare_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
  (tmp_path / "clips").mkdir()
  args = _csvs(tmp_path, ["a", "b", "c"]) + ["--out", str(tmp_path / "out")]

  def with_arg(flag, value):
    a = list(args)
    a[a.index(flag) + 1] = value
    return ["prepare", "audiocaps", *a]

  (tmp_path / "wrong.csv").write_text("id,ytid,text\n1,x,hello\n")
  (tmp_path / "noise.csv").write_bytes(np.random.default_rng(0).bytes(3000))
  (tmp_path / "file").write_text("")
  (tmp_path / "not_vits").mkdir()
  _fails_with_one_line(capsys, with_arg("--captions", str(tmp_path / "nope.csv")), "nope.csv: no such file")
  _fails_with_one_line(capsys, with_arg("--captions", str(tmp_path / "wrong.csv")), r"missing columns \['audiocap_id'")
  _fails_with_one_line(capsys, with_arg("--captions", str(tmp_path / "noise.csv")), "not a UTF-8 CSV")
  _fails_with_one_line(capsys, with_arg("--audioset-classes", str(tmp_path / "wrong.csv")), "missing columns")
  _fails_with_one_line(capsys, with_arg("--audio-dir", str(tmp_path / "nope")), "--audio-dir .*not a directory")
  _fails_with_one_line(capsys, with_arg("--out", str(tmp_path / "file" / "out")), "--out .*cannot write there")
  _fails_with_one_line(capsys, with_arg("--audio-pattern", "{ytid}.wav"), "--audio-pattern .*bad placeholder")
  _fails_with_one_line(capsys, with_arg("--tts", "vits") + ["--tts-model", str(tmp_path / "not_vits")],
                       "--tts-model .*cannot load a transformers VitsModel")
  _fails_with_one_line(capsys, ["prepare", "opensfx", "--cat", str(tmp_path / "nope.cat"), "--out", "x"],
                       "nope.cat not found")
  with pytest.raises(SystemExit) as exit_info:  # argparse: usage line + one error line
    cli.main(with_arg("--shard-size", "0"))
  assert exit_info.value.code == 2 and "--shard-size: '0' must be > 0" in capsys.readouterr().err


def test_a_failing_worker_start_is_an_error_not_a_hang(tmp_path, capsys):
  (tmp_path / "clips").mkdir()
  args = _csvs(tmp_path, ["a", "b", "c"]) + ["--out", str(tmp_path / "out")]
  args[args.index("--workers") + 1], args[args.index("--shard-size") + 1] = "2", "1"
  _fails_with_one_line(capsys, ["prepare", "audiocaps", *args, "--tts", "vits", "--tts-model", str(tmp_path / "no")],
                       "--tts-model .*not a directory")
