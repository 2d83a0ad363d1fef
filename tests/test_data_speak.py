"""Speech synthesised as the pipeline reads: a voice per example and epoch, bit-exact restore (also through
three stage-1 steps and their checkpoint), bad captions and a failing synthesiser keep the stored speech."""

import logging
import shutil

import numpy as np
import pytest

from star_jax.data import pipeline, speak
from star_jax.errors import UserError
from tests.dataset_writer import write_cache, write_split
from tests.tiny_vits import save_tiny_vits

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

RATE = 16000
CAPTIONS = ["a dog barks", "rain on a tin roof", "a cow moos", "wind and a bell", "a train passes",
            "applause", "a helicopter", "birds sing"]
BAD_CAPTIONS = ["", "... !? --", "x" * 10_000, "狗在叫"]


def _record(i, caption, rng):
  stored = np.full(RATE // 2, 0.01 * (i + 1), np.float32)  # the stored speech: a constant a test can recognise
  return dict(id=f"r{i}", caption=caption, speech=stored, audio=(0.1 * rng.standard_normal(RATE)).astype(np.float32),
              labels=np.eye(4, dtype=np.uint8)[i % 4], voice="stored-voice")


def _write(path, captions, splits=("train",)):
  rng = np.random.default_rng(0)
  for split in splits:
    recs = [_record(i, c, rng) for i, c in enumerate(captions)]
    write_split(str(path), split, recs, label_names=list("abcd"), speech_sample_rate_hz=RATE,
                audio_sample_rate_hz=RATE)
    write_cache(str(path), split, "hubert", [dict(id=r["id"], hubert=np.zeros((25, 4), np.float32)) for r in recs])
  return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return _write(tmp_path_factory.mktemp("speak") / "ds", CAPTIONS, ("train", "valid"))


def _cfg(path, **kw):
  return dict(dict(path=path, speech_duration_s=3.0, audio_duration_s=0.5, num_workers=0,
                   speech_source="synthesized"), **kw)


def _iter(path, split="train", cfg=None, **kw):
  kw = dict(dict(batch_size=4, audio_sample_rate_hz=RATE, process_index=0, process_count=1, seed=3), **kw)
  return pipeline.make_iterator(cfg or _cfg(path), split, **kw)


def test_speakable():
  assert speak.speakable("  A dog\tbarks\n", 500) == ("A dog barks", "")
  assert speak.speakable("a dog 狗 barks, café", 500) == ("a dog barks, café", "")
  for bad, why in zip(BAD_CAPTIONS, ("empty", "no Latin", "10000 characters", "empty")):
    text, reason = speak.speakable(bad, 500)
    assert text is None and why in reason


def test_two_epochs_of_one_example_give_different_voices_and_the_seed_replays(dataset):
  it = _iter(dataset, batch_size=1, shuffle=False, num_epochs=2)
  batches = [next(it) for _ in range(2 * len(CAPTIONS))]
  first, second = batches[0], batches[len(CAPTIONS)]  # example r0 in epochs 1 and 2
  assert first["id"][0] == second["id"][0] == "r0"
  assert first["voice"][0] != second["voice"][0] and first["voice"][0] != "stored-voice"
  assert not np.array_equal(first["speech"], second["speech"])
  assert np.abs(first["speech"][0]).max() > 0.05 and first["speech_mask"][0].sum() > RATE // 2  # spoken, not stored
  again = _iter(dataset, batch_size=1, shuffle=False, num_epochs=2)
  np.testing.assert_array_equal(next(again)["speech"], first["speech"])
  assert len({b["voice"][0] for b in batches}) == len(batches)
  tags = [b["voice"][0].split("/")[0] for b in batches]
  assert not any(t.startswith("en-029") or t.endswith("+f2") for t in tags)  # the held-out voice's accent, variant
  assert it.speech_fallbacks == 0


def test_held_out_split_keeps_stored_speech_and_cached_hubert_only_follows_stored_voices(dataset):
  valid = next(_iter(dataset, "valid", shuffle=False))
  assert set(valid["voice"]) == {"stored-voice"} and "hubert" in valid
  np.testing.assert_allclose(valid["speech"][:, 0], [0.01, 0.02, 0.03, 0.04], rtol=1e-6)
  train = next(_iter(dataset, shuffle=False))
  assert "hubert" not in train and "stored-voice" not in set(train["voice"])
  stored = next(_iter(dataset, cfg=_cfg(dataset, speech_source="stored"), shuffle=False))
  assert "hubert" in stored and set(stored["voice"]) == {"stored-voice"}
  with pytest.raises(UserError, match="speech_source"):
    _iter(dataset, cfg=_cfg(dataset, speech_source="tts"))


def test_restored_iterator_replays_the_synthesised_batches(dataset):
  it = _iter(dataset, seed=5)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  restored = _iter(dataset, seed=5)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert list(got["voice"]) == list(want["voice"])
    for key in ("speech", "speech_mask", "audio", "labels"):
      np.testing.assert_array_equal(got[key], want[key])


def test_a_grain_worker_process_speaks_the_same_batches(dataset):
  want = [next(it) for it in [_iter(dataset, seed=6)] for _ in range(2)]
  it = _iter(dataset, seed=6, num_workers=1)  # its own espeak-ng server, another synthesis history
  for w in want:
    got = next(it)
    assert list(got["voice"]) == list(w["voice"])
    np.testing.assert_array_equal(got["speech"], w["speech"])


def test_bad_captions_keep_their_stored_speech_counted_and_logged(tmp_path, caplog):
  path = _write(tmp_path / "bad", BAD_CAPTIONS + ["a dog barks"])
  it = _iter(path, batch_size=5, shuffle=False, num_epochs=2)
  with caplog.at_level(logging.WARNING):
    batch = next(it)
    next(it)
  np.testing.assert_allclose(batch["speech"][:4, 0], [0.01, 0.02, 0.03, 0.04], rtol=1e-6)  # stored
  assert list(batch["voice"][:4]) == ["stored-voice"] * 4 and batch["voice"][4] != "stored-voice"
  assert it.speech_fallbacks == 8  # 4 per epoch
  logged = [r.getMessage() for r in caplog.records if "stored speech" in r.getMessage()]
  assert len(logged) == 4 and all(f"record r{i}" in " ".join(logged) for i in range(4))
  restored = _iter(path, batch_size=5, shuffle=False, num_epochs=2)
  restored.set_state(it.get_state())
  assert restored.speech_fallbacks == 8


def test_vits_voices_multi_speaker_and_a_broken_model_falls_back(tmp_path):
  save_tiny_vits(tmp_path / "vits", num_speakers=3)
  path = _write(tmp_path / "ds", CAPTIONS[:4])
  cfg = _cfg(path, synth=dict(espeak=False, vits_models=(str(tmp_path / "vits"),)))
  batches = [next(it) for it in [_iter(path, cfg=cfg, batch_size=4, shuffle=False, num_epochs=2)] for _ in range(2)]
  voices = [v for b in batches for v in b["voice"]]
  assert all(v.startswith("vits:vits#") for v in voices) and len(set(voices)) > 1
  assert not np.array_equal(batches[0]["speech"], batches[1]["speech"])  # the same 4 captions, epoch 2
  replay = next(_iter(path, cfg=cfg, batch_size=4, shuffle=False, num_epochs=2))
  np.testing.assert_array_equal(replay["speech"], batches[0]["speech"])
  # A model directory whose weights are missing: every element keeps its stored speech, training goes on.
  (tmp_path / "broken").mkdir()
  shutil.copy(tmp_path / "vits" / "config.json", tmp_path / "broken" / "config.json")
  it = _iter(path, cfg=_cfg(path, synth=dict(espeak=False, vits_models=(str(tmp_path / "broken"),))))
  batch = next(it)
  assert it.speech_fallbacks == 4 and set(batch["voice"]) == {"stored-voice"}
  with pytest.raises(UserError, match="VitsModel directory"):
    _iter(path, cfg=_cfg(path, synth=dict(vits_models=(str(tmp_path / "none"),))))


def test_stage1_three_steps_on_synthesised_speech_restore_replays_the_next_batches(tmp_path, mesh1):
  from star_jax.config import load_config
  from star_jax.train import loop
  from star_jax.train.stage import RecordData, build_stage

  path = _write(tmp_path / "ds", CAPTIONS, ("train", "valid"))
  cfg = load_config("configs/star.py:tiny", [
      "data.speech_duration_s=0.5", "data.audio_duration_s=0.32", "hubert.num_layers=1", "hubert.conv_dim=(16,16)",
      "qformer.num_layers=1", "train.log_every_steps=1", "stage1.max_epochs=3", "stage1.batch_size=8",
      f"data.path={path}", "data.speech_source=synthesized"])
  data = RecordData(cfg)
  res = loop.train(cfg, build_stage(cfg, "stage1", data), str(tmp_path / "work"), data, mesh=mesh1, progress=False)
  assert res.step == 3

  def fresh():
    return data.iterator("train", batch_size=8, shuffle=True, num_epochs=None, seed=int(cfg.data.shuffle_seed),
                         random_crop=bool(cfg.stage1.random_crop))

  uninterrupted = fresh()
  seen = [next(uninterrupted) for _ in range(3)]
  assert len({v for b in seen for v in b["voice"]}) == 24 and "hubert" not in seen[0]  # HuBERT runs in the step
  restored = fresh()  # set to the position the checkpoint of step 3 saved, as the loop restores it
  restored.set_state((tmp_path / "work" / "checkpoints" / "3" / "data" / "process_0-of-1.json").read_bytes())
  for _ in range(2):
    want, got = next(uninterrupted), next(restored)
    assert list(got["voice"]) == list(want["voice"])
    for key in ("speech", "speech_mask", "audio", "audio_mask", "labels"):
      np.testing.assert_array_equal(got[key], want[key])
