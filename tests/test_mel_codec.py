"""The fixed mel codec against librosa: STFT, ISTFT, log-mel encoding, Griffin-Lim; and its place in the config."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from star_jax.models.mel_codec import MelCodec, MelConfig, griffin_lim, istft, stft

N_FFT, HOP, RATE = 1024, 320, 16000


def _signal(seconds=1.0, seed=0):
  """A decaying chirp over noise: tonal and broadband parts, like the corpus's sound effects."""
  t = np.arange(int(seconds * RATE)) / RATE
  rng = np.random.default_rng(seed)
  chirp = np.sin(2 * np.pi * (300 + 900 * t) * t) * np.exp(-2 * t)
  return (0.5 * chirp + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _spectral_convergence(wav, magnitude_kf):
  got = np.abs(librosa.stft(wav, n_fft=N_FFT, hop_length=HOP))[..., :magnitude_kf.shape[-1]]
  return float(np.linalg.norm(got - magnitude_kf) / np.linalg.norm(magnitude_kf))


def test_stft_and_istft_equal_librosa():
  wav = np.random.default_rng(1).standard_normal((2, 10 * HOP)).astype(np.float32)
  ref = librosa.stft(wav, n_fft=N_FFT, hop_length=HOP)  # (2, K, 11): center=True, zero padding, periodic Hann
  ours = np.asarray(stft(jnp.asarray(wav), N_FFT, HOP, 10))
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 1)[:, :10], atol=1e-4 * np.abs(ref).max())
  back = np.asarray(istft(jnp.asarray(ref.transpose(0, 2, 1)), N_FFT, HOP, wav.shape[1]))
  np.testing.assert_allclose(back, librosa.istft(ref, n_fft=N_FFT, hop_length=HOP, length=wav.shape[1]),
                             atol=1e-5)
  np.testing.assert_allclose(back, wav, atol=1e-5)  # a perfect-reconstruction window


def test_griffin_lim_matches_librosa():
  wav = _signal()[None]
  mag = np.abs(librosa.stft(wav, n_fft=N_FFT, hop_length=HOP))
  ref = librosa.griffinlim(mag, n_iter=32, n_fft=N_FFT, hop_length=HOP, init=None, length=wav.shape[1])
  ours = np.asarray(griffin_lim(jnp.asarray(mag.transpose(0, 2, 1)), N_FFT, HOP, wav.shape[1], 32, 0.99))
  sc_ref, sc_ours = _spectral_convergence(ref[0], mag[0]), _spectral_convergence(ours[0], mag[0])
  assert sc_ours < 0.2 and abs(sc_ours - sc_ref) < 0.01, (sc_ours, sc_ref)
  np.testing.assert_allclose(ours, ref, atol=1e-3)  # same algorithm, same zero-phase start


def test_encode_is_librosa_log_mel():
  cfg = MelConfig()
  wav = _signal(0.64)[None]
  latents, std = MelCodec(cfg).apply({}, jnp.asarray(wav), method="encode")
  mel = librosa.feature.melspectrogram(y=wav, sr=RATE, n_fft=N_FFT, hop_length=HOP, n_mels=64, pad_mode="constant")
  want = (np.log(np.maximum(mel, cfg.log_floor)) - cfg.log_mean) / cfg.log_std
  assert latents.shape == (1, wav.shape[1] // HOP, 64) and not np.any(np.asarray(std))
  np.testing.assert_allclose(np.asarray(latents), want.transpose(0, 2, 1)[:, :latents.shape[1]], atol=1e-3)


def test_decode_keeps_the_mel_spectrogram():
  """decode -> encode returns the latents closely (the mel codec's round trip), and silence stays silent."""
  codec = MelCodec(MelConfig())
  encode = jax.jit(lambda w: codec.apply({}, w, method="encode")[0])
  decode = jax.jit(lambda z: codec.apply({}, z, method="decode"))
  wav = jnp.asarray(np.stack([_signal(1.0, 0), np.zeros(RATE, np.float32)]))
  latents = encode(wav)
  out = decode(latents)
  assert out.shape == wav.shape and bool(jnp.all(jnp.isfinite(out)))
  mel = np.exp(np.asarray(latents[0]) * 4.0 - 5.0)
  mel_back = np.exp(np.asarray(encode(out)[0]) * 4.0 - 5.0)
  assert np.linalg.norm(mel_back - mel) / np.linalg.norm(mel) < 0.25
  assert float(jnp.max(jnp.abs(out[1]))) == 0.0


def test_config_selects_the_codec():
  from star_jax.config import load_config
  from star_jax.errors import UserError
  from star_jax.models import build
  from star_jax.train.stage import build_stage

  tiny = load_config("configs/star.py:tiny")
  assert isinstance(build.vae(tiny), MelCodec) and not build.vae_trained(tiny)
  assert build.vae_hop(tiny) == 320 and build.vae_config(tiny).latent_channels == tiny.dit.latent_channels
  assert build.init_vae(tiny, jax.random.key(0)) == {}
  with pytest.raises(UserError, match="nothing to train"):
    build_stage(tiny, "vae")
  paper = load_config("configs/star.py:paper")
  assert build.vae_kind(paper) == "oobleck" and build.vae_trained(paper)
  with pytest.raises(UserError, match="vae.kind"):
    build.vae_kind(load_config("configs/star.py:tiny", ["vae.kind=wavenet"]))
