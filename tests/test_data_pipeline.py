"""grain pipeline: shapes and masks, crops, resampling, restore from state, per-process sharding."""

import os

import numpy as np
import pytest

from star_jax.data import pipeline
from tests.dataset_writer import write_cache, write_split

NUM = 22
SPEECH_RATE, AUDIO_RATE = 16000, 8000


def _record(i):
  speech_len, audio_len = 8000 + 1000 * i, 4000 + 700 * i
  # Waveforms count their own time so a test can read where a crop started.
  return dict(id=f"r{i:02d}", caption=" ".join(["word"] * (1 + i % 5)),
              speech=(np.arange(speech_len) / SPEECH_RATE).astype(np.float32),
              audio=(np.arange(audio_len) / AUDIO_RATE).astype(np.float32),
              labels=np.eye(5, dtype=np.uint8)[i % 5], text_emb=np.full((1 + i % 5, 4), i, np.float32))


def _write(path, with_features=False):
  recs = [_record(i) for i in range(NUM)]
  write_split(path, "train", recs, label_names=list("abcde"), speech_sample_rate_hz=SPEECH_RATE,
              audio_sample_rate_hz=AUDIO_RATE, text_dim=4)  # 3 shards: 8, 8, 6
  if with_features:  # 50 frames/s, value = the frame's start time
    frames = [np.repeat((np.arange(len(r["speech"]) // 320) / 50)[:, None], 3, 1).astype(np.float32) for r in recs]
    write_cache(path, "train", "hubert", [dict(id=r["id"], hubert=f) for r, f in zip(recs, frames)])
    latents = [np.repeat((np.arange(len(r["audio"]) // 160) / 50)[:, None], 2, 1).astype(np.float32) for r in recs]
    write_cache(path, "train", "latents", [dict(id=r["id"], latents=lat, latents_std=np.zeros_like(lat))
                                           for r, lat in zip(recs, latents)])
  return recs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ds") / "plain")
  return path, _write(path)


def _cfg(path, **kw):
  return dict(path=path, speech_duration_s=1.0, audio_duration_s=0.75, speech_sample_rate_hz=16000,
              text_max_tokens=3, num_workers=0, **kw)


def _iter(path, split="train", **kw):
  kw = dict(dict(batch_size=4, audio_sample_rate_hz=AUDIO_RATE, process_index=0, process_count=1), **kw)
  return pipeline.make_iterator(_cfg(path), split, **kw)


def test_batch_shapes_masks_and_eval_crop_from_start(dataset):
  path, recs = dataset
  batch = next(_iter(path, shuffle=False, random_crop=False))
  assert batch["speech"].shape == (4, 16000) and batch["speech_mask"].dtype == bool
  assert batch["audio"].shape == (4, 6000) and batch["labels"].shape == (4, 5)
  assert batch["text_emb"].shape == (4, 3, 4) and batch["labels"].dtype == np.float32
  assert list(batch["id"]) == ["r00", "r01", "r02", "r03"] and batch["caption"][0] == "word"
  for b in range(4):
    n = min(len(recs[b]["speech"]), 16000)
    np.testing.assert_array_equal(batch["speech"][b, :n], recs[b]["speech"][:n])
    assert batch["speech_mask"][b].sum() == n and not batch["speech"][b, n:].any()
    np.testing.assert_array_equal(batch["text_mask"][b], np.arange(3) < min(1 + b % 5, 3))
    np.testing.assert_array_equal(batch["labels"][b], np.eye(5)[b % 5])


def test_random_crop_is_seeded_and_resampling_gives_the_asked_rate(dataset):
  path, _ = dataset
  a = next(_iter(path, seed=7))
  b = next(_iter(path, seed=7))
  np.testing.assert_array_equal(a["audio"], b["audio"])
  long_rows = [i for i, rid in enumerate(a["id"]) if int(rid[1:]) > 4]
  assert any(a["audio"][i, 0] > 0 for i in long_rows)  # some crop started after the clip start
  up = next(_iter(path, seed=7, audio_sample_rate_hz=16000))
  assert up["audio"].shape == (4, 12000) and up["audio_mask"].any(1).all()


def test_random_crop_false_crops_the_shuffled_train_split_at_the_start(dataset):
  # What a stage with `random_crop=False` (tiny's flow stages) reads: the same shuffled batch as the test
  # above, whose long clips there start later.
  path, recs = dataset
  batch = next(_iter(path, seed=7, random_crop=False))
  for b, rid in enumerate(batch["id"]):
    rec = recs[int(rid[1:])]
    n = min(len(rec["audio"]), 6000)
    np.testing.assert_array_equal(batch["audio"][b, :n], rec["audio"][:n])  # the clip's first 0.75 s


def test_restored_iterator_yields_the_same_batches(dataset):
  path, _ = dataset
  it = _iter(path, batch_size=3, seed=1)
  for _ in range(5):  # past the first epoch (22 records -> 7 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]
  restored = _iter(path, batch_size=3, seed=1)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert list(got["id"]) == list(want["id"])
    for key in ("speech", "audio", "audio_mask", "labels", "text_emb"):
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_parts_that_cover_the_data(dataset):
  path, _ = dataset
  seen = []
  for p in range(2):
    it = _iter(path, batch_size=1, shuffle=True, seed=3, num_epochs=1, process_index=p, process_count=2,
               drop_remainder=False)
    seen.append([str(b["id"][0]) for b in it])
  assert set(seen[0]).isdisjoint(seen[1])
  assert sorted(seen[0] + seen[1]) == [f"r{i:02d}" for i in range(NUM)]
  assert len(seen[0]) == len(seen[1]) == NUM // 2


def test_cached_features_stay_aligned_with_the_waveforms(tmp_path):
  path = str(tmp_path / "feats")
  _write(path, with_features=True)
  batch = next(_iter(path, batch_size=8, seed=5))
  assert batch["hubert"].shape == (8, 50, 3) and batch["latents"].shape == (8, 38, 2)
  # Frame 0 of a crop starts at the same time as sample 0 (both count their own time).
  np.testing.assert_allclose(batch["hubert"][:, 0, 0], batch["speech"][:, 0], atol=1e-6)
  np.testing.assert_allclose(batch["latents"][:, 0, 0], batch["audio"][:, 0], atol=1e-6)
  assert batch["hubert_mask"].dtype == bool and batch["latents_mask"].any(1).all()


def test_worker_processes_give_the_same_batches(dataset):
  path, _ = dataset
  want = [next(it) for it in [_iter(path, seed=2)] for _ in range(2)]
  it = _iter(path, seed=2, num_workers=1)
  for w in want:
    np.testing.assert_array_equal(next(it)["audio"], w["audio"])


def test_unknown_split_is_a_user_error(dataset):
  from star_jax.errors import UserError

  with pytest.raises(UserError, match="no split 'valid'"):
    _iter(dataset[0], split="valid")


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(dataset, tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  path, _ = dataset
  it = _iter(path, seed=1)
  next(it)
  mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",),
                              item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  mgr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  want = next(it)
  restored = _iter(path, seed=1)
  mgr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  got = next(restored)
  assert list(got["id"]) == list(want["id"])
  np.testing.assert_array_equal(got["audio"], want["audio"])
