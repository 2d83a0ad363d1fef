"""What `star-jax prepare opensfx|audiocaps` writes is a TFDS dataset: tfds.builder_from_directory and
tfds.data_source open it, grain reads every split, and TensorFlow is neither installed nor imported."""

import importlib.util
import json
import os
import sys

import grain
import numpy as np
import pytest

from star_jax.data import builders, opensfx, pipeline, records
from star_jax.errors import UserError
from tests.test_data_prep import _audiocaps_args, _prepare, fake_audiocaps, needs_espeak  # noqa: F401 - a fixture

pytestmark = needs_espeak


def _read_every_split_with_grain(version_dir):
  """{split: ids}, read by grain from tfds's data source of each split, in order."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(version_dir)
  out = {}
  for split, info in builder.info.splits.items():
    source = tfds.data_source(builder.name, data_dir=os.path.dirname(os.path.dirname(version_dir)), split=split)
    sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=False, num_epochs=1)
    loader = grain.DataLoader(data_source=source, sampler=sampler, worker_count=0)
    out[split] = [r["id"].decode() for r in loader]
    assert len(out[split]) == info.num_examples > 0
  return builder, out


@pytest.mark.skipif(not os.path.exists(opensfx.CAT_PATH), reason="openttd-opensfx not installed")
def test_prepare_opensfx_and_audiocaps_write_tfds_datasets_grain_reads_without_tensorflow(
    fake_audiocaps, tmp_path, monkeypatch):  # noqa: F811 - the fixture
  assert importlib.util.find_spec("tensorflow") is None  # nothing below may need it
  plan = opensfx.plan
  monkeypatch.setattr(opensfx, "plan", lambda clips: (lambda c, s: (c, {k: v[:5] for k, v in s.items()}))(*plan(clips)))
  sfx = tmp_path / "opensfx"
  assert _prepare("opensfx", "--out", str(sfx), "--audio-rate-hz", "16000", "--shard-size", "2", "--workers", "1",
                  "--no-progress") == 0
  caps = tmp_path / "audiocaps"
  for split in ("train", "val"):
    assert _prepare(*_audiocaps_args(fake_audiocaps, caps, "--tts", "espeak", "--split", split)) == 0

  builder, ids = _read_every_split_with_grain(str(sfx / "opensfx" / builders.VERSION))
  assert builder.name == "opensfx" and str(builder.version) == builders.VERSION
  assert {k: len(v) for k, v in ids.items()} == {"train": 5, "valid": 5, "test": 5}
  assert builder.info.citation and "CC BY-SA 3.0" in builder.info.redistribution_info.license
  meta = builder.info.metadata
  assert len(meta["label_names"]) > 50 and meta["credits"][0]["license"] and meta["audio_sample_rate_hz"] == 16000
  assert builder.info.splits["train"].num_shards == 3 and os.path.exists(sfx / "report.json")

  builder, ids = _read_every_split_with_grain(str(caps / "audiocaps" / builders.VERSION))
  assert ids == {"train": fake_audiocaps["good"], "val": fake_audiocaps["good"]}
  assert builder.info.metadata["label_names"] == ["Dog", "Cat", "Rain"] and "AudioCaps" in builder.info.citation
  assert set(builder.info.features.keys()) >= {"id", "caption", "speech", "audio", "labels", "text_emb"}

  for path, split in ((sfx, "test"), (caps, "val")):  # and through our pipeline
    batch = next(pipeline.make_iterator(dict(path=str(path), speech_duration_s=1.0, audio_duration_s=1.0),
                                        split, batch_size=2, audio_sample_rate_hz=16000, shuffle=False,
                                        process_index=0, process_count=1))
    assert batch["speech"].shape == (2, 16000) and batch["caption"][0]
  assert "tensorflow" not in sys.modules


def test_an_old_prepared_folder_is_a_one_line_error_saying_how_to_rebuild(tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  (old / "info.json").write_text(json.dumps({"format_version": 1, "splits": {"train": 3}}))
  (old / "train.array_record-00000-of-00001").write_bytes(b"")
  for call in (lambda: records.read_info(str(old)),
               lambda: pipeline.make_iterator(dict(path=str(old), speech_duration_s=1.0, audio_duration_s=1.0),
                                              "train", batch_size=1, audio_sample_rate_hz=16000),
               lambda: _prepare("opensfx", "--out", str(old), "--workers", "1", "--no-progress")):
    with pytest.raises(UserError, match=r"old NPZ format.*rebuild it: `star-jax prepare opensfx --out") as e:
      call()
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="not a prepared dataset"):
    records.read_info(str(tmp_path))


def test_cached_and_corpus_shards_must_line_up(tmp_path):
  from star_jax.data import source
  from tests.dataset_writer import write_cache, write_split

  recs = [dict(id=f"r{i}", caption="a dog", speech=np.ones(800, np.float32), audio=np.ones(800, np.float32),
               labels=np.eye(2, dtype=np.uint8)[i % 2]) for i in range(5)]
  write_split(tmp_path, "train", recs, shard_size=2, label_names=["a", "b"], speech_sample_rate_hz=16000,
              audio_sample_rate_hz=16000)
  write_cache(tmp_path, "train", "hubert", [dict(id=r["id"], hubert=np.zeros((2, 3), np.float32)) for r in recs],
              shard_size=3)
  info = records.read_info(str(tmp_path))
  with pytest.raises(source.BadRecordError, match="other shards"):
    source.RecordSource(source.split_part(info["version_dir"], "train"),
                        cached=(source.split_part(info["cache_dirs"]["hubert"], "train"),))
