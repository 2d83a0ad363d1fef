"""PANNs CNN14 (Kong et al. 2020), the audio classifier behind FD, KL and IS, with its log-mel front end.

Same math as `panns_inference.models.Cnn14` / audioldm_eval's copy in eval mode: torchlibrosa's STFT
(periodic Hann, centred, reflect padding) -> power -> Slaney mel filters -> 10·log10(max(·, 1e-10)) ->
BatchNorm over mel bins -> 6 conv blocks (two 3x3 conv + BN + ReLU, 2x2 average pooling) -> mean over
mel -> max + mean over time -> fc1 + ReLU (the 2048-d embedding) -> fc_audioset (527 logits).
STAR's evaluation uses the 16 kHz checkpoint `Cnn14_16k_mAP=0.438.pth` (`convert/cnn14.py` reads it).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from star_jax.metrics.conv import Conv2d, FrozenBatchNorm, pool2d
from star_jax.models.layers import Dense, as_dtype


@dataclasses.dataclass(frozen=True)
class Cnn14Config:
  sample_rate_hz: int = 16000
  window_size: int = 512        # n_fft = window length, samples
  hop_size: int = 160           # samples; 100 frames/s at 16 kHz
  mel_bins: int = 64
  fmin_hz: float = 50.0
  fmax_hz: float = 8000.0
  classes_num: int = 527
  widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  min_duration_s: float = 2.0   # audioldm_eval zero-pads shorter clips to 2 s
  dtype: str = "float32"


def cnn14_config(sample_rate_hz: int = 16000, **overrides) -> Cnn14Config:
  """The released PANNs front ends: 16 kHz (n_fft 512, hop 160, 50-8000 Hz) or 32 kHz (1024, 320, 50-14000 Hz)."""
  presets = {16000: dict(window_size=512, hop_size=160, fmax_hz=8000.0),
             32000: dict(window_size=1024, hop_size=320, fmax_hz=14000.0)}
  if sample_rate_hz not in presets:
    raise ValueError(f"CNN14 checkpoints exist for 16000 and 32000 Hz, not {sample_rate_hz}")
  return Cnn14Config(sample_rate_hz=sample_rate_hz, **{**presets[sample_rate_hz], **overrides})


@functools.lru_cache(maxsize=8)
def mel_filters(sample_rate_hz: int, n_fft: int, mel_bins: int, fmin_hz: float, fmax_hz: float) -> np.ndarray:
  """librosa's Slaney mel filter bank, transposed: (n_fft // 2 + 1, mel_bins) float32 (torchlibrosa's melW)."""
  import librosa
  return librosa.filters.mel(sr=sample_rate_hz, n_fft=n_fft, n_mels=mel_bins, fmin=fmin_hz,
                             fmax=fmax_hz).T.astype(np.float32)


def frame(wav_bt: jax.Array, length: int, hop: int) -> jax.Array:
  """(B, T) -> (B, 1 + (T - length) // hop, length) overlapping frames, no padding."""
  n = 1 + (wav_bt.shape[-1] - length) // hop
  if n < 1:
    raise ValueError(f"{wav_bt.shape[-1]} samples are fewer than one {length}-sample frame")
  idx = np.arange(n)[:, None] * hop + np.arange(length)[None, :]
  return wav_bt[:, idx]


def logmel(wav_bt: jax.Array, cfg: Cnn14Config) -> jax.Array:
  """(B, T) waveform at cfg.sample_rate_hz -> (B, 1 + T // hop, mel_bins) log-mel power in dB, f32."""
  n_fft = cfg.window_size
  x = jnp.pad(wav_bt.astype(jnp.float32), ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
  spec = jnp.fft.rfft(frame(x, n_fft, cfg.hop_size) * window.astype(np.float32), axis=-1)
  power = jnp.square(spec.real) + jnp.square(spec.imag)
  mel = power @ mel_filters(cfg.sample_rate_hz, n_fft, cfg.mel_bins, cfg.fmin_hz, cfg.fmax_hz)
  return 10.0 * jnp.log10(jnp.maximum(mel, 1e-10))  # ref 1.0, amin 1e-10, no top_db


class ConvBlock(nn.Module):
  features: int
  pool: tuple[int, int]
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    dtype = as_dtype(self.dtype)
    x = nn.relu(FrozenBatchNorm(name="bn1")(Conv2d(self.features, use_bias=False, dtype=dtype, name="conv1")(x_bhwc)))
    x = nn.relu(FrozenBatchNorm(name="bn2")(Conv2d(self.features, use_bias=False, dtype=dtype, name="conv2")(x)))
    return pool2d(x, self.pool, "avg")


class Cnn14(nn.Module):
  """(B, T) waveform -> (embedding (B, widths[-1]) after fc1 + ReLU, class logits (B, classes_num))."""
  config: Cnn14Config

  @nn.compact
  def __call__(self, wav_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    dtype = as_dtype(cfg.dtype)
    x = FrozenBatchNorm(name="bn0")(logmel(wav_bt, cfg))[..., None]  # BN over mel bins; 1 channel
    for i, width in enumerate(cfg.widths):
      pool = (1, 1) if i == len(cfg.widths) - 1 else (2, 2)
      x = ConvBlock(width, pool, cfg.dtype, name=f"conv_block{i + 1}")(x)
    x = x.mean(axis=2)                      # over mel: (B, T', C)
    x = x.max(axis=1) + x.mean(axis=1)      # over time: (B, C)
    emb = nn.relu(Dense(cfg.widths[-1], axes=("embed", "mlp"), dtype=dtype, name="fc1")(x))
    logits = Dense(cfg.classes_num, axes=("mlp", None), dtype=dtype, name="fc_audioset")(emb)
    return emb, logits


class Cnn14Embedder:
  """CNN14 as an `EmbeddingModel`: one clip -> its 2048-d embedding (1, D) and 527 logits (1, C)."""
  name = "cnn14"

  def __init__(self, params: dict, config: Cnn14Config):
    self.config = config
    self.sample_rate_hz = config.sample_rate_hz
    self.params = jax.tree.map(jnp.asarray, params)
    self._apply = jax.jit(lambda p, w: Cnn14(config).apply({"params": p}, w))

  def embed(self, wav_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mono clip at sample_rate_hz -> (emb (1, D), logits (1, C)); zero-mean, zero-padded to min_duration_s."""
    wav = np.asarray(wav_t, np.float32)
    wav = wav - wav.mean()                  # audioldm_eval's WaveDataset
    min_len = int(round(self.config.min_duration_s * self.sample_rate_hz))
    if wav.shape[0] < min_len:
      wav = np.pad(wav, (0, min_len - wav.shape[0]))
    emb, logits = self._apply(self.params, wav[None])
    return np.asarray(emb), np.asarray(logits)
