"""`export` + `generate` on a tiny random bundle: wav length and rate, folder mode, and bad input."""

import os

import jax
import numpy as np
import pytest
import soundfile as sf

from star_jax.cli import main
from star_jax.config import load_config
from star_jax.export import export_bundle
from tests.train_standin import random_workdir

RATE = 16000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  """A stage-2 workdir holding random tiny weights (as `best/`), exported to a bundle."""
  root = tmp_path_factory.mktemp("gen")
  # latent_scale 0.4 (tiny's is 1.0 with the mel codec) so the test sees `sample` divide it back out.
  cfg = load_config("configs/star.py:tiny", ["dit.depth=2", "hubert.num_layers=1", "flow.num_steps=2",
                                             "flow.latent_scale=0.4"])
  random_workdir(cfg, str(root / "stage2"))
  return export_bundle(str(root / "stage2"), str(root / "bundle"))


def test_tokens_from_cached_features_are_the_speech_tokens(bundle):
  """`tokens_from_features` (the bridge on HuBERT frames cached by `prepare cache`, in batches) gives the tokens
  that HuBERT + bridge give on the speech itself; 3 clips in batches of 2 cover a short last batch."""
  from star_jax.generate import Generator
  gen = Generator(bundle)
  rng = np.random.default_rng(0)
  speech = rng.uniform(-0.3, 0.3, (3, 4 * RATE)).astype(np.float32)
  mask = np.arange(4 * RATE)[None] < np.array([[4 * RATE], [3 * RATE], [2 * RATE]])
  feats, frame_mask = gen.hubert.apply({"params": gen.params["hubert"]}, speech, mask)
  want = np.asarray(gen._tokens(gen.params, speech, mask))
  got = gen.tokens_from_features(np.asarray(feats), np.asarray(frame_mask), batch_size=2)
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-5)


def _speech(path, seconds=1.0, rate=RATE, channels=1):
  t = np.arange(int(seconds * rate)) / rate
  wave = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None] * np.ones((1, channels))
  sf.write(str(path), wave.astype(np.float32), rate)
  return str(path)


def test_generate_writes_requested_length(bundle, tmp_path):
  src = _speech(tmp_path / "q.wav", seconds=1.3, rate=44100, channels=2)  # resampled and mixed down
  out = tmp_path / "out.wav"
  assert main(["generate", "--ckpt", bundle, "--speech", src, "--out", str(out), "--seconds", "0.75",
               "--steps", "2", "--cfg", "2.0"]) == 0
  wav, rate = sf.read(str(out))
  assert rate == RATE and wav.shape == (int(0.75 * RATE),) and np.all(np.isfinite(wav))


def test_generate_folder_mode(bundle, tmp_path):
  queries = tmp_path / "queries"
  queries.mkdir()
  for i, rate in enumerate((8000, 16000, 96000)):
    _speech(queries / f"q{i}.wav", seconds=0.5 + 0.3 * i, rate=rate, channels=1 + 7 * (i == 2))
  (queries / "notes.txt").write_text("ignored")
  assert main(["generate", "--ckpt", bundle, "--speech", str(queries), "--out", str(tmp_path / "outs"),
               "--seconds", "0.5", "--batch-size", "2"]) == 0
  assert sorted(os.listdir(tmp_path / "outs")) == ["q0.wav", "q1.wav", "q2.wav"]


@pytest.mark.parametrize("case", ["missing", "random_bytes", "empty_file", "zero_length", "silent", "nan",
                                  "too_long"])
def test_generate_bad_input_exits_2(case, bundle, tmp_path, capsys):
  path = tmp_path / "in.wav"
  if case == "random_bytes":
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  elif case == "empty_file":
    path.write_bytes(b"")
  elif case == "zero_length":
    sf.write(str(path), np.zeros(0, np.float32), RATE)
  elif case == "silent":
    sf.write(str(path), np.zeros(RATE, np.float32), RATE)
  elif case == "nan":
    sf.write(str(path), np.full(RATE, np.nan, np.float32), RATE, subtype="FLOAT")
  elif case == "too_long":
    sf.write(str(path), np.zeros(61 * 8000, np.int16), 8000)
  code = main(["generate", "--ckpt", bundle, "--speech", str(path), "--out", str(tmp_path / "o.wav")])
  err = capsys.readouterr().err
  assert code == 2 and "in.wav" in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1


def test_generator_pads_speech_to_the_training_window_and_undoes_the_latent_scale(bundle, tmp_path):
  import jax.numpy as jnp

  from star_jax import flow
  from star_jax.generate import Generator

  gen = Generator(bundle)
  assert gen.cfg.hubert.feat_extract_norm == "group"  # the tiny front end: GroupNorm statistics span padding
  speech = np.random.default_rng(0).uniform(-0.3, 0.3, 16000).astype(np.float32)
  window = int(gen.cfg.data.speech_duration_s * RATE)
  padded, mask = np.zeros((1, window), np.float32), np.zeros((1, window), bool)
  padded[0, :16000], mask[0, :16000] = speech, True
  tokens = np.asarray(gen.tokens([speech]))
  np.testing.assert_allclose(tokens, np.asarray(gen._tokens(gen.params, padded, mask)), atol=1e-5)
  one_second = np.asarray(gen._tokens(gen.params, padded[:, :16000], mask[:, :16000]))
  assert np.abs(one_second - tokens).max() > 1e-4  # the window matters, so padding as training did matters

  f = gen.cfg.flow
  scale = float(f.latent_scale)
  assert scale != 1.0
  wav = gen.sample(tokens, 0.4, seed=3)
  noise = jax.random.normal(jax.random.PRNGKey(3), (1, wav.shape[1] // gen.hop, int(gen.cfg.vae.latent_channels)))
  latents = flow.sample(gen.dit.apply, {"params": gen.params["dit"]}, noise, tokens, num_steps=int(f.num_steps),
                        cfg_scale=float(f.cfg_scale), sway_coef=float(f.sway_coef))
  want = np.asarray(gen._decode(gen.vae_params, jnp.asarray(latents) / scale))[:, :wav.shape[1]]
  # `sample` runs the loop and the decode as one program: XLA's fusion moves the last bits, and the mel codec's
  # Griffin-Lim (momentum 0.99) grows them at a few samples of a guided (loud) clip; a wrong scale is off everywhere.
  np.testing.assert_allclose(wav[:, :want.shape[1]], want, atol=2e-3 * np.abs(want).max())


def test_mlp_bridge_bundle_generates(tmp_path):
  """bridge.kind=mlp: the bundle's bridge is the MLP's variables (params and BatchNorm statistics) and
  `generate` conditions on its single token, through the same speech path as the stages."""
  from star_jax.generate import Generator
  cfg = load_config("configs/star.py:tiny", ["bridge.kind=mlp", "dit.context_slots=0", "dit.depth=2",
                                             "hubert.num_layers=1", "flow.num_steps=2"])
  random_workdir(cfg, str(tmp_path / "stage2"))
  gen = Generator(export_bundle(str(tmp_path / "stage2"), str(tmp_path / "bundle")))
  speech = [np.random.default_rng(0).uniform(-0.3, 0.3, RATE).astype(np.float32)] * 2
  tokens = np.asarray(gen.tokens(speech))
  assert tokens.shape == (2, 1, cfg.mlp_bridge.hidden_size) and np.abs(tokens).max() > 0
  wav = gen.sample(tokens, 0.5, steps=2)
  assert wav.shape == (2, RATE // 2) and np.all(np.isfinite(wav))


def test_init_noise_fixes_the_sample_and_its_length_and_float_writes_it_unclipped(bundle, tmp_path, capsys):
  """--init-noise replaces --seed's noise (a (batch, frames, C) file gives each query its own), its frames set the
  length; --float writes the decoder's float32 output; a wrong shape or --seconds is a one-line error."""
  from star_jax.generate import Generator

  queries = tmp_path / "queries"
  queries.mkdir()
  for i in range(2):
    _speech(queries / f"q{i}.wav", seconds=0.5 + 0.25 * i)
  gen = Generator(bundle)
  channels = int(gen.cfg.vae.latent_channels)
  noise = np.random.default_rng(0).standard_normal((2, 6, channels)).astype(np.float32)
  np.save(tmp_path / "noise.npy", noise)
  outs = {}
  for seed in (0, 5):
    out = tmp_path / f"out{seed}"
    assert main(["generate", "--ckpt", bundle, "--speech", str(queries), "--out", str(out), "--seed", str(seed),
                 "--init-noise", str(tmp_path / "noise.npy"), "--float", "--steps", "2"]) == 0
    outs[seed] = [sf.read(str(out / f"q{i}.wav"), dtype="float32")[0] for i in range(2)]
  assert sf.info(str(tmp_path / "out0" / "q0.wav")).subtype == "FLOAT"
  assert all(w.shape == (6 * gen.hop,) for w in outs[0])
  np.testing.assert_array_equal(outs[0][0], outs[5][0])  # the noise file, not the seed, decides
  tokens = np.asarray(gen.tokens([sf.read(str(queries / "q1.wav"), dtype="float32")[0]]))
  want = gen.sample(tokens, 6 * gen.hop / gen.sample_rate_hz, steps=2, noise=noise[1:])[0]
  # The second query gets the second noise: a batch of 2 rounds differently from a batch of 1 and Griffin-Lim grows
  # that to <1 % of the peak; another noise or query would not correlate.
  assert np.corrcoef(outs[0][1], want)[0, 1] > 0.999
  np.testing.assert_allclose(outs[0][1], want, atol=1e-2 * np.abs(want).max())
  capsys.readouterr()
  np.save(tmp_path / "bad.npy", noise[:, :, :-1])
  for extra in (["--init-noise", str(tmp_path / "bad.npy")],
                ["--init-noise", str(tmp_path / "noise.npy"), "--seconds", "1.0"]):
    assert main(["generate", "--ckpt", bundle, "--speech", str(queries), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ("bad.npy" in err or "noise.npy" in err)


def test_write_wav_scales_a_loud_clip_down_rather_than_clipping_it(tmp_path):
  """16-bit PCM holds [-1, 1]: a clip peaking at 3 is written at a third of its level, shape intact; a clip
  inside [-1, 1] is written as it is."""
  from star_jax.generate import write_wav

  t = np.arange(1600) / 16000
  loud = (3.0 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
  quiet = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
  for name, wav, want in (("loud", loud, loud / np.abs(loud).max()), ("quiet", quiet, quiet)):
    write_wav(str(tmp_path / f"{name}.wav"), wav, 16000)
    got, rate = sf.read(str(tmp_path / f"{name}.wav"), dtype="float32")
    assert rate == 16000 and sf.info(str(tmp_path / f"{name}.wav")).subtype == "PCM_16"
    np.testing.assert_allclose(got, want, atol=2 / 32767)
