"""`star-jax prepare cache`: cached HuBERT features and VAE posteriors equal the models run on each record,
the pipeline serves them aligned with the crops, and a rerun is a no-op."""

import dataclasses
import glob
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from star_jax import cli
from star_jax.checkpoint import TrainCheckpointer, save_params
from star_jax.data import audio as audio_lib
from star_jax.data import cache, pipeline, records, source
from star_jax.models.hubert import Hubert, HubertConfig, frame_lengths
from star_jax.models.vae import OobleckVAE, VAEConfig, latent_length
from tests.dataset_writer import write_split

SPEECH_RATE, AUDIO_RATE = 16000, 16000  # the audio is stored at 16 kHz, the VAE reads 8 kHz (resampled)
HUBERT_CFG = HubertConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, conv_dim=(8,) * 7,
                          conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                          num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
VAE_CFG = VAEConfig(sample_rate_hz=8000, encoder_hidden_size=4, decoder_channels=4, channel_multiples=(1, 2, 2),
                    downsampling_ratios=(4, 5, 8), latent_channels=3)  # hop 160 at 8 kHz: 50 frames/s
SHARDS = (4, 3)
# Two lengths each (not multiples of a frame): a few buckets, and the references compile once per length.
SPEECH_LENGTHS, AUDIO_LENGTHS = (5100, 17000), (4100, 16300)


def _random_params(module, num_samples, seed):
  """Random params of the init's shapes (no init compile), biases and norms away from their zero / one init so
  that padding would show if it leaked."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, num_samples), np.float32))["params"])

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    name = path[-1].key
    if name == "kernel":
      return 0.5 * noise / np.sqrt(np.prod(x.shape[:-1]))  # activations stay O(1) through the deep VAE
    return 1 + 0.1 * noise if name == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  hubert_p, vae_p = _random_params(Hubert(HUBERT_CFG), 4000, 0), _random_params(OobleckVAE(VAE_CFG), 640, 1)
  hubert_dir = save_params(str(root / "hubert"), hubert_p, HUBERT_CFG, kind="hubert")
  vae_dir = save_params(str(root / "vae"), vae_p, VAE_CFG, kind="vae")
  rng = np.random.default_rng(0)
  recs = [dict(id=f"r{i}", caption="a dog", labels=np.eye(3, dtype=np.uint8)[i % 3],
               speech=rng.uniform(-0.5, 0.5, SPEECH_LENGTHS[i % 2]).astype(np.float32),
               audio=rng.uniform(-0.5, 0.5, AUDIO_LENGTHS[i % 2]).astype(np.float32)) for i in range(sum(SHARDS))]
  data = str(root / "data")
  write_split(data, "train", recs, shard_size=SHARDS[0], label_names=list("abc"), speech_sample_rate_hz=SPEECH_RATE,
              audio_sample_rate_hz=AUDIO_RATE)
  argv = ["prepare", "cache", "--data", data, "--hubert", hubert_dir, "--vae", vae_dir, "--batch-size", "3",
          "--no-progress"]
  assert cli.main(argv) == 0
  return dict(data=data, recs=recs, hubert_p=hubert_p, vae_p=vae_p, argv=argv)


def _cached(data):
  """Every record of the corpus with its cached features joined, as the pipeline reads them."""
  info = records.read_info(data)
  src = source.RecordSource(source.split_part(info["version_dir"], "train"),
                            cached=tuple(source.split_part(d, "train") for d in info["cache_dirs"].values()))
  return [src[i] for i in range(len(src))]


def _shards(data, field):
  name = records.CACHED[field]
  return [os.path.join(data, name, "1.0.0", records.shard_name(name, "train", s, len(SHARDS)))
          for s in range(len(SHARDS))]


def _by_length(arrays):
  """{length: indices of the arrays of that length}: a reference batch per length, no padding."""
  groups = {}
  for i, x in enumerate(arrays):
    groups.setdefault(len(x), []).append(i)
  return groups.items()


def test_cached_features_equal_the_models_run_on_each_record(setup):
  recs, cached = setup["recs"], _cached(setup["data"])
  assert [c["id"] for c in cached] == [r["id"] for r in recs]
  hubert = jax.jit(lambda x: Hubert(HUBERT_CFG).apply({"params": setup["hubert_p"]}, x)[0])
  for n, idx in _by_length([r["speech"] for r in recs]):
    want = hubert(np.stack([recs[i]["speech"] for i in idx]))
    for row, i in enumerate(idx):
      np.testing.assert_array_equal(cached[i]["speech"], recs[i]["speech"])
      assert cached[i]["hubert"].shape == (int(frame_lengths(HUBERT_CFG, n)), 16)
      np.testing.assert_allclose(cached[i]["hubert"], want[row], rtol=1e-5, atol=1e-5)

  encode = jax.jit(lambda x: OobleckVAE(VAE_CFG).apply({"params": setup["vae_p"]}, x, method="encode"))
  reach = cache.vae_reach(VAE_CFG)
  audio = [audio_lib.resample(r["audio"], AUDIO_RATE, VAE_CFG.sample_rate_hz) for r in recs]
  for n, idx in _by_length(audio):
    frames = latent_length(VAE_CFG, n)
    mean, std = encode(np.stack([np.pad(audio[i], (0, reach)) for i in idx]))  # the clip, then silence
    for row, i in enumerate(idx):
      assert cached[i]["latents"].shape == cached[i]["latents_std"].shape == (frames, 3)
      np.testing.assert_allclose(cached[i]["latents"], mean[row, :frames], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(cached[i]["latents_std"], std[row, :frames], rtol=1e-5, atol=1e-5)
  # However long the silence; and away from the end, the frames of an unpadded encode.
  frames = latent_length(VAE_CFG, len(audio[1]))
  mean, _ = encode(np.pad(audio[1], (0, reach + 1000))[None])
  np.testing.assert_allclose(cached[1]["latents"], mean[0, :frames], rtol=1e-5, atol=1e-5)
  mean, _ = encode(audio[1][None])
  inner = frames - -(-reach // 160)
  np.testing.assert_allclose(cached[1]["latents"][:inner], mean[0, :inner], rtol=1e-5, atol=1e-5)

  info = records.read_info(setup["data"])
  assert info["hubert_frame_rate_hz"] == 50 and info["latent_frame_rate_hz"] == 50
  assert info["hubert_dim"] == 16 and info["latent_dim"] == 3
  assert info["cache"]["train"]["latents"]["dtype"] == "float32"
  # Each cache is a TFDS dataset of its own, readable without this code or TensorFlow.
  import tensorflow_datasets as tfds
  latents = tfds.builder_from_directory(info["cache_dirs"]["latents"])
  assert set(latents.info.features.keys()) == {"id", "latents", "latents_std"}
  assert latents.info.splits["train"].num_examples == len(recs)


def _locate(cached_feats, served_feats, served_mask):
  """The frame where a served crop starts in the cached features."""
  n = int(served_mask.sum())
  for f0 in range(len(cached_feats) - n + 1):
    if np.allclose(cached_feats[f0:f0 + n], served_feats[:n], atol=1e-6):
      return f0
  raise AssertionError("served features are not a crop of the cached ones")


def test_pipeline_serves_the_cache_aligned_with_the_crops(setup):
  data = setup["data"]
  by_id = {r["id"]: r for r in _cached(data)}
  cfg = dict(path=data, speech_duration_s=0.4, audio_duration_s=0.3, speech_sample_rate_hz=16000, num_workers=0)

  def batches(**kw):
    return pipeline.make_iterator(cfg, "train", batch_size=7, audio_sample_rate_hz=AUDIO_RATE, seed=4,
                                  process_index=0, process_count=1, **kw)

  mean_batch = next(batches(sample_latents=False))
  assert mean_batch["hubert"].shape == (7, 20, 16) and mean_batch["latents"].shape == (7, 15, 3)
  for b, rid in enumerate(mean_batch["id"]):
    r = by_id[str(rid)]
    for feats, mask, wave, wave_mask, cached, stored in (
        ("hubert", "hubert_mask", "speech", "speech_mask", r["hubert"], r["speech"]),
        ("latents", "latents_mask", "audio", "audio_mask", r["latents"], r["audio"])):
      f0 = _locate(cached, mean_batch[feats][b], mean_batch[mask][b])
      assert mean_batch[mask][b].sum() == min(len(cached) - f0, mean_batch[mask].shape[1])
      assert not mean_batch[feats][b][~mean_batch[mask][b]].any()
      start, n = f0 * 320, int(mean_batch[wave_mask][b].sum())  # 50 frames/s of 16 kHz waveforms
      np.testing.assert_array_equal(mean_batch[wave][b, :n], stored[start:start + n])

  sampled = next(batches())
  again = next(batches())
  np.testing.assert_array_equal(sampled["latents"], again["latents"])  # seeded like the crops
  np.testing.assert_array_equal(sampled["audio"], mean_batch["audio"])  # the same crops (sampling draws last)
  for b, rid in enumerate(sampled["id"]):
    r, m = by_id[str(rid)], sampled["latents_mask"][b]
    mean, got = mean_batch["latents"][b][m], sampled["latents"][b][m]
    f1 = _locate(r["latents"], mean_batch["latents"][b], m)
    std = r["latents_std"][f1:f1 + len(mean)]
    z = (got - mean) / std
    assert np.all(np.abs(z) < 6) and np.std(z) > 0.3  # a draw from the posterior, not its mean
    assert not sampled["latents"][b][~m].any()


def test_rerun_is_a_noop_and_an_interrupted_recache_resumes(setup, capsys, monkeypatch, tmp_path):
  data = setup["data"]
  shards = _shards(data, "hubert") + _shards(data, "latents")
  shards += sorted(glob.glob(os.path.join(records.read_info(data)["version_dir"], "*")))  # the corpus: never written
  before = [os.stat(p).st_mtime_ns for p in shards]
  capsys.readouterr()
  assert cli.main(setup["argv"]) == 0
  assert "0 of 2 shards written now" in capsys.readouterr().out
  vae_dir = setup["argv"][setup["argv"].index("--vae") + 1]
  moved = shutil.copytree(vae_dir, str(tmp_path / "moved_vae"))  # the same weights elsewhere: still cached
  assert cli.main([moved if a == vae_dir else a for a in setup["argv"]]) == 0
  assert "0 of 2 shards written now" in capsys.readouterr().out
  # A train stage's checkpoint (whole config; component under params/frozen) with the same HuBERT: cached too.
  stage = save_params(str(tmp_path / "stage1"), {"params": {"bridge": {"w": np.zeros(2)}},
                                                 "frozen": {"hubert": setup["hubert_p"]}},
                      {"hubert": dataclasses.asdict(HUBERT_CFG), "seed": 0}, kind="stage1")
  assert cli.main(["prepare", "cache", "--data", data, "--hubert", stage, "--no-progress"]) == 0
  assert "0 of 2 shards written now" in capsys.readouterr().out
  # A train workdir with no best/ (the vae stage's, as `make demo` passes it): its latest checkpoint.
  workdir = tmp_path / "vae_stage"
  ckptr = TrainCheckpointer(str(workdir / "checkpoints"))
  ckptr.save(7, {"params": {"vae": setup["vae_p"]}, "frozen": {}}, meta={"stage": "vae"})
  ckptr.wait()
  (workdir / "config.json").write_text(json.dumps({"vae": dataclasses.asdict(VAE_CFG), "seed": 0}))
  assert cli.main(["prepare", "cache", "--data", data, "--vae", str(workdir), "--no-progress"]) == 0
  assert "0 of 2 shards written now" in capsys.readouterr().out
  assert [os.stat(p).st_mtime_ns for p in shards] == before

  # Other settings for one field (f16 latents, no --hubert) redo that field only. Interrupted after one
  # shard: the pipeline serves no latents until every shard has the new ones, then the rerun does the rest.
  argv = setup["argv"][:]
  argv[argv.index("--hubert"):argv.index("--hubert") + 2] = []
  argv += ["--dtype", "float16"]
  write_shard, calls = records.write_shard, []

  def crash_on_second(path, recs):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt
    write_shard(path, recs)

  monkeypatch.setattr(records, "write_shard", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    cli.main(argv)
  monkeypatch.undo()
  cfg = dict(path=data, speech_duration_s=0.4, audio_duration_s=0.3, num_workers=0)
  batch = next(pipeline.make_iterator(cfg, "train", batch_size=7, audio_sample_rate_hz=AUDIO_RATE,
                                      process_index=0, process_count=1))
  assert "hubert" in batch and "latents" not in batch
  latents_0 = _shards(data, "latents")[0]
  written = os.stat(latents_0).st_mtime_ns
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "1 of 2 shards written now" in capsys.readouterr().out and os.stat(latents_0).st_mtime_ns == written
  cached = _cached(data)
  assert all(c["latents"].dtype == np.float16 and c["hubert"].dtype == np.float32 for c in cached)
  for field, dtype in (("latents", "float16"), ("hubert", "float32")):
    for p in _shards(data, field):
      with open(p + ".json") as f:
        sidecar = json.load(f)
      assert sidecar["settings"]["dtype"] == dtype
  assert sidecar["records"] == SHARDS[1]
  batch = next(pipeline.make_iterator(cfg, "train", batch_size=7, audio_sample_rate_hz=AUDIO_RATE,
                                      process_index=0, process_count=1))
  assert batch["latents"].dtype == np.float32 and batch["latents"].shape == (7, 15, 3)


def test_bad_arguments_are_one_line_errors(setup, tmp_path, capsys):
  data = setup["data"]
  assert cli.main(["prepare", "cache", "--data", data]) == 2
  assert "--hubert" in capsys.readouterr().err
  assert cli.main(["prepare", "cache", "--data", data, "--vae", str(tmp_path), "--splits", "nope"]) == 2
  assert "no split" in capsys.readouterr().err
  wrong = save_params(str(tmp_path / "wrong"), setup["hubert_p"], HUBERT_CFG, kind="hubert")
  assert cli.main(["prepare", "cache", "--data", data, "--vae", wrong]) == 2
  assert "not VAEConfig fields" in capsys.readouterr().err


def test_groupnorm_hubert_is_cached_padded_to_its_training_window(tmp_path):
  """hubert-base's GroupNorm spans the padding (as in transformers): the cache pads each utterance to the speech
  window of the checkpoint's training config, as the pipeline and `generate` do, so stage 2 sees those features."""
  cfg = dataclasses.replace(HUBERT_CFG, feat_extract_norm="group", conv_dim=(8, 8), conv_kernel=(10, 8),
                            conv_stride=(5, 8))
  params = _random_params(Hubert(cfg), 4000, 2)
  full = {"hubert": dataclasses.asdict(cfg), "data": {"speech_duration_s": 1.5}}
  model = cache.load_hubert(save_params(str(tmp_path / "stage1"), {"hubert": params}, full, kind="stage1"))
  assert model.min_length == 24000 and model.settings["min_length"] == 24000
  wave = np.random.default_rng(3).uniform(-0.5, 0.5, 5100).astype(np.float32)
  (got,), = cache.encode_waves(model, [wave], batch_size=2)
  padded, mask = np.zeros((1, 24000), np.float32), np.zeros((1, 24000), np.float32)
  padded[0, :5100], mask[0, :5100] = wave, 1
  want = np.asarray(Hubert(cfg).apply({"params": params}, padded, mask)[0])[0, :len(got)]
  assert len(got) == int(frame_lengths(cfg, np.int64(5100)))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Padded only to its bucket, the same utterance gives other features: the window matters.
  short = dataclasses.replace(model, min_length=0)
  (other,), = cache.encode_waves(short, [wave], batch_size=2)
  assert np.abs(other - got).max() > 1e-3
  # A converted checkpoint (no training config) pads to its bucket only.
  plain = cache.load_hubert(save_params(str(tmp_path / "converted"), params, cfg, kind="hubert"))
  assert plain.min_length == 0
