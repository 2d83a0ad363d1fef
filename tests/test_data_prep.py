"""Data prep: fake AudioCaps folder -> records + report of every bad item; rerun no-op; VITS and espeak TTS."""

import argparse
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from star_jax.data import opensfx, prepare_cli, records, tts
from star_jax.errors import UserError
from tests.tiny_vits import save_tiny_vits

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng not installed")
CLASSES = [("0", "/m/dog", "Dog"), ("1", "/m/cat", "Cat"), ("2", "/m/rain", "Rain")]


def _tone(seconds, rate, freq, seed):
  t = np.arange(int(seconds * rate)) / rate
  noise = np.random.default_rng(seed).standard_normal(t.size) * 0.05
  return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture
def fake_audiocaps(tmp_path):
  """6 good clips (stereo 22.05 kHz, flac, Y-prefixed names...) and one of each kind of bad item."""
  clips = tmp_path / "clips"
  clips.mkdir()
  good = ["good0", "good1", "good2", "good3", "-good4", "good5"]
  for i, yid in enumerate(good):
    wave = _tone(1.5 + 0.2 * i, 22050, 200 + 50 * i, i)
    if i == 1:
      sf.write(clips / f"{yid}.flac", wave, 22050)
    elif i == 2:
      sf.write(clips / f"Y{yid}.wav", np.stack([wave, wave], 1), 22050)
    else:
      sf.write(clips / f"{yid}.wav", wave, 22050)
  (clips / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wav file" * 10)
  sf.write(clips / "silent.wav", np.zeros(22050 * 2, np.float32), 22050)
  sf.write(clips / "short.wav", _tone(0.3, 22050, 300, 9), 22050)
  sf.write(clips / "emptycap.wav", _tone(2.0, 22050, 300, 8), 22050)
  sf.write(clips / "nolabel.wav", _tone(2.0, 22050, 300, 7), 22050)
  (tmp_path / "secret.wav").write_bytes(b"outside the audio root")
  rows = [(i, yid, 30, f"a dog barks number {i}") for i, yid in enumerate(good)]
  rows += [(10, "good0", 30, "a second caption for good0"), (11, "corrupt", 0, "glitch"),
           (12, "silent", 0, "nothing at all"), (13, "missing", 0, "a cat meows"), (14, "emptycap", 0, ""),
           (15, "short", 0, "a click"), (16, "nolabel", 0, "an unknown sound"), (17, "../secret", 0, "escape")]
  captions = tmp_path / "train.csv"
  with open(captions, "w") as f:
    f.write("audiocap_id,youtube_id,start_time,caption\n")
    for r in rows:
      f.write(f'{r[0]},{r[1]},{r[2]},"{r[3]}"\n')
  segments = tmp_path / "segments.csv"
  labelled = good + ["corrupt", "silent", "missing", "emptycap", "short", "../secret"]
  with open(segments, "w") as f:
    f.write("# Segments csv created Sun Mar  5 10:54:31 2017\n# YTID, start_seconds, end_seconds, positive_labels\n")
    for i, yid in enumerate(labelled):
      f.write(f'{yid}, 30.000, 40.000, "/m/dog,/m/{"cat" if i % 2 else "rain"}"\n')
  classes = tmp_path / "classes.csv"
  classes.write_text("index,mid,display_name\n" + "".join(f'{i},{m},"{n}"\n' for i, m, n in CLASSES))
  expected_skips = {"corrupt": "unreadable", "silent": "silent", "missing": "missing file",
                    "emptycap": "empty caption", "short": "too short", "nolabel": "no labels",
                    "../secret": "unsafe path"}
  return dict(root=tmp_path, clips=clips, captions=captions, segments=segments, classes=classes, good=good,
              expected_skips=expected_skips)


def _prepare(*argv):
  parser = argparse.ArgumentParser()
  prepare_cli.add_arguments(parser)
  return prepare_cli.run(parser.parse_args(list(argv)))


def _audiocaps_args(fake, out, *extra):
  return ["audiocaps", "--captions", str(fake["captions"]), "--audio-dir", str(fake["clips"]),
          "--audioset-segments", str(fake["segments"]), "--audioset-classes", str(fake["classes"]),
          "--out", str(out), "--audio-rate-hz", "16000", "--shard-size", "4", "--workers", "1", "--no-progress",
          *extra]


def _read_all(out, split):
  """Every record of `split`, read as any TFDS user would (no star_jax code, no TensorFlow)."""
  import tensorflow_datasets as tfds

  source = tfds.builder_from_directory(records.find_dataset(str(out))).as_data_source(split)
  return [records.from_example(source[i]) for i in range(len(source))]


@needs_espeak
def test_audiocaps_prep_skips_bad_items_with_reasons_and_rerun_is_noop(fake_audiocaps, tmp_path):
  out = tmp_path / "out"
  assert _prepare(*_audiocaps_args(fake_audiocaps, out, "--tts", "espeak")) == 0
  report = json.loads((out / "train.report.json").read_text())
  got = {s["id"]: s["reason"] for s in report["skipped"]}
  assert set(got) == set(fake_audiocaps["expected_skips"])
  for item, reason in fake_audiocaps["expected_skips"].items():
    assert got[item].startswith(reason), (item, got[item])
  assert report["items"] == len(fake_audiocaps["good"]) + len(got)  # every item is a record or a skip
  assert report["records"] == len(fake_audiocaps["good"])

  recs = _read_all(out, "train")
  assert [r["id"] for r in recs] == fake_audiocaps["good"]
  assert recs[0]["caption"] == "a dog barks number 0"  # the first caption of good0, not the second
  info = records.read_info(str(out))
  assert info["splits"] == {"train": 6} and info["label_names"] == ["Dog", "Cat", "Rain"]
  assert info["audio_sample_rate_hz"] == 16000 and info["speech_sample_rate_hz"] == 16000
  for i, r in enumerate(recs):
    assert r["audio"].dtype == np.float32 and abs(r["audio"].shape[0] - (1.5 + 0.2 * i) * 16000) <= 2
    assert r["speech"].dtype == np.float32 and r["speech"].shape[0] > 8000 and np.abs(r["speech"]).max() > 0.01
    np.testing.assert_array_equal(r["labels"], [1, i % 2, 1 - i % 2])
    assert r["text_emb"].shape[1] == 64

  version_dir = info["version_dir"]
  assert version_dir == str(out / "audiocaps" / "1.0.0")
  shard_files = sorted(p for p in os.listdir(version_dir) if ".array_record-" in p)
  mtimes = {p: os.stat(os.path.join(version_dir, p)).st_mtime_ns for p in shard_files}
  assert _prepare(*_audiocaps_args(fake_audiocaps, out, "--tts", "espeak")) == 0
  again = json.loads((out / "train.report.json").read_text())
  assert again["shards_written_now"] == 0 and again["records"] == report["records"]
  assert {p: os.stat(os.path.join(version_dir, p)).st_mtime_ns for p in shard_files} == mtimes

  with pytest.raises(UserError, match="other settings"):
    _prepare(*_audiocaps_args(fake_audiocaps, out, "--tts", "espeak", "--min-duration-s", "0.1"))


def test_vits_tts_is_batched_and_seeded(tmp_path):
  save_tiny_vits(tmp_path / "vits")
  voice = tts.VitsTTS(str(tmp_path / "vits"), 16000, batch_size=2)
  assert voice.model.noise_scale == 0.667 and voice.model.noise_scale_duration == 0.8
  texts = ["a dog barks", "rain on a roof", "wind"]
  first, second = voice.synthesize(texts, seed=3), voice.synthesize(texts, seed=3)
  for a, b in zip(first, second):
    assert a.wave.size > 0 and a.voice == "vits:vits"
    np.testing.assert_array_equal(a.wave, b.wave)
  assert any(a.wave.shape != b.wave.shape or not np.array_equal(a.wave, b.wave)
             for a, b in zip(first, voice.synthesize(texts, seed=4)))


def test_vits_speaks_in_the_prep_path(fake_audiocaps, tmp_path):
  save_tiny_vits(tmp_path / "vits")
  out = tmp_path / "out"
  assert _prepare(*_audiocaps_args(fake_audiocaps, out, "--tts", "vits", "--tts-model", str(tmp_path / "vits"),
                                   "--split", "val")) == 0
  recs = _read_all(out, "val")
  assert len(recs) == len(fake_audiocaps["good"])
  assert all(r["voice"] == "vits:vits" and r["speech"].size > 0 and np.isfinite(r["speech"]).all() for r in recs)


def test_missing_columns_is_a_user_error(tmp_path, fake_audiocaps):
  bad = tmp_path / "bad.csv"
  bad.write_text("id,ytid,caption\n1,x,hello\n")
  args = _audiocaps_args(fake_audiocaps, tmp_path / "o", "--tts", "espeak")
  args[args.index("--captions") + 1] = str(bad)
  with pytest.raises(UserError, match="missing columns"):
    _prepare(*args)


@needs_espeak
def test_espeak_voices_speak_and_choice_is_seeded():
  voice = tts.EspeakTTS(sample_rate_hz=16000)
  for v in tts.DEFAULT_VOICES:
    utt = voice.speak("a cow moos in the rain", v)
    assert 0.5 < utt.wave.size / 16000 < 5 and np.abs(utt.wave).max() > 0.05, v
  texts = ["one", "two", "three", "four"]
  assert [u.voice for u in voice.synthesize(texts, seed=1)] == [u.voice for u in voice.synthesize(texts, seed=1)]
  assert voice.speak("", tts.DEFAULT_VOICES[0]).wave.size == 0
  assert voice.speak("-v is not an option", tts.DEFAULT_VOICES[0]).wave.size > 0


def test_opensfx_descriptions_and_classes():
  label, credit, lic = opensfx.parse_description(
      '"Tropical: Bird (1)". Original "Bird Noise - 1.wav" by "SpaceJoe". Edited by "Wuzzy". '
      'License: Creative Commons Zero 1.0.')
  assert (label, lic) == ("Tropical: Bird (1)", "Creative Commons Zero 1.0") and "SpaceJoe" in credit
  assert opensfx.class_name(label) == "bird"
  assert opensfx.class_name("Toyland: Bubble plop") == "cartoon bubble plop"
  assert opensfx.class_name("Toyland: Toy factory (2)") == "toy factory"
  assert opensfx.class_name("Splat (terraform/non-rail builds") == "splat"
  assert opensfx.article("explosion") == "an explosion" and opensfx.article("monkeys") == "monkeys"


@pytest.mark.skipif(not os.path.exists(opensfx.CAT_PATH), reason="openttd-opensfx not installed")
def test_opensfx_plan_holds_out_a_voice_and_mixtures():
  clips = opensfx.read_cat()
  assert len(clips) == 71 and abs(sum(c.wave.shape[0] / c.rate_hz for c in clips) - 149.3) < 1
  classes, specs = opensfx.plan(clips)
  assert len(classes) > 50
  train_voices = {s.voice for s in specs["train"]} | {s.voice for s in specs["valid"]}
  # Many voices speak the training captions; the held-out voice's accent and variant never do.
  assert len(train_voices) > 500 and len({v.name for v in train_voices}) > 50
  accent, variant = opensfx.TEST_VOICE.name.split("+")
  assert not any(v.name.split("+")[0] == accent or v.name.endswith("+" + variant) for v in train_voices)
  assert opensfx.plan(clips)[1] == specs  # deterministic
  assert opensfx.TEST_VOICE in {s.voice for s in specs["test"]}
  captions = lambda split: {s.caption for s in specs[split] if s.mode != "single"}  # noqa: E731
  assert captions("test") and not captions("test") & captions("train")
  ids = [s.id for split in specs.values() for s in split]
  assert len(ids) == len(set(ids))


@needs_espeak
@pytest.mark.skipif(not os.path.exists(opensfx.CAT_PATH), reason="openttd-opensfx not installed")
def test_opensfx_records(monkeypatch):
  clips = opensfx.read_cat()
  classes, specs = opensfx.plan(clips)
  opensfx.init_worker(opensfx.CAT_PATH, 16000, 16000, 8)
  mixture = next(s for s in specs["test"] if s.mode == "sequence")
  recs, skipped, _ = opensfx.build_records([specs["train"][0], mixture])
  assert not skipped and len(recs) == 2
  assert recs[0]["labels"].sum() == 1 and recs[1]["labels"].sum() == 2
  a, b = (opensfx._STATE["waves"][k] for k in mixture.clips)
  assert recs[1]["audio"].shape[0] > a.shape[0] + b.shape[0]  # b follows a after a gap
  assert recs[1]["text_emb"].shape == (len(mixture.caption.split()), 8)


def test_a_tts_failure_skips_only_its_item(monkeypatch):
  from star_jax.data import audiocaps

  class Flaky:
    def synthesize(self, texts, seed=0):
      if any("boom" in t for t in texts):
        raise RuntimeError("cannot say boom")
      return [tts.Utterance(np.ones(1600, np.float32), "fake") for _ in texts]

  wave = np.ones(16000, np.float32)
  monkeypatch.setattr(audiocaps, "_STATE", dict(tts=Flaky(), seed=0, num_labels=3, text_dim=0))
  good = [(dict(id=i, caption=c), wave, [0], f"{i}.wav") for i, c in (("a", "a dog"), ("b", "boom"))]
  recs, skipped, _ = audiocaps._finish(good, [], [])
  assert [r["id"] for r in recs] == ["a"] and skipped == [dict(id="b", reason="tts failed: RuntimeError: cannot say boom")]
