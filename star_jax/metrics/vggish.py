"""VGGish (Hershey et al. 2017), the embedding behind FAD, with its own log-mel front end.

Same math as `torchvggish` (`vggish_input.waveform_to_examples` + `VGG`): 25 ms periodic-Hann frames
every 10 ms, |rfft| with n_fft 512, 64 HTK mel bands 125-7500 Hz (DC bin zeroed), log(mel + 0.01),
cut into non-overlapping 0.96 s examples (96 x 64) -> VGG (64, M, 128, M, 256, 256, M, 512, 512, M) ->
fc 4096 -> 4096 -> 128. FAD as audioldm_eval computes it uses the 128-d output without its final ReLU
and without the PCA post-processing (`final_relu=False`); every 0.96 s example is one embedding.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from star_jax.metrics.cnn14 import frame
from star_jax.metrics.conv import Conv2d, pool2d
from star_jax.models.layers import Dense, as_dtype


@dataclasses.dataclass(frozen=True)
class VggishConfig:
  sample_rate_hz: int = 16000
  window_s: float = 0.025
  hop_s: float = 0.010
  mel_bins: int = 64
  fmin_hz: float = 125.0
  fmax_hz: float = 7500.0
  log_offset: float = 0.01
  example_frames: int = 96       # 0.96 s per example, no overlap
  layers: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
  fc_sizes: tuple[int, ...] = (4096, 4096, 128)
  final_relu: bool = False       # audioldm_eval's FAD drops it (use_activation=False)
  dtype: str = "float32"


def _hz_to_mel(f):
  return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


@functools.lru_cache(maxsize=4)
def mel_matrix(num_spec_bins: int, sample_rate_hz: int, mel_bins: int, fmin_hz: float, fmax_hz: float) -> np.ndarray:
  """VGGish's HTK triangular filters (num_spec_bins, mel_bins), float64, with the DC bin zeroed."""
  bins_mel = _hz_to_mel(np.linspace(0.0, sample_rate_hz / 2, num_spec_bins))
  edges = np.linspace(_hz_to_mel(fmin_hz), _hz_to_mel(fmax_hz), mel_bins + 2)
  lower = (bins_mel[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
  upper = (edges[None, 2:] - bins_mel[:, None]) / (edges[2:] - edges[1:-1])
  weights = np.maximum(0.0, np.minimum(lower, upper))
  weights[0, :] = 0.0
  return weights


def examples(wav_t: jax.Array, cfg: VggishConfig) -> jax.Array:
  """(T,) waveform at 16 kHz -> (N, 96, 64) log-mel examples; a remainder shorter than 0.96 s is dropped."""
  win = int(round(cfg.sample_rate_hz * cfg.window_s))
  hop = int(round(cfg.sample_rate_hz * cfg.hop_s))
  n_fft = 2 ** int(np.ceil(np.log2(win)))
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann
  frames = frame(wav_t.astype(jnp.float32)[None], win, hop)[0] * window.astype(np.float32)
  magnitude = jnp.abs(jnp.fft.rfft(frames, n=n_fft, axis=-1))
  mel = magnitude @ mel_matrix(n_fft // 2 + 1, cfg.sample_rate_hz, cfg.mel_bins, cfg.fmin_hz,
                               cfg.fmax_hz).astype(np.float32)
  log_mel = jnp.log(mel + cfg.log_offset)
  n = log_mel.shape[0] // cfg.example_frames
  if n < 1:
    raise ValueError(f"a VGGish example needs {cfg.example_frames} frames (~0.975 s), got {log_mel.shape[0]}")
  return log_mel[:n * cfg.example_frames].reshape(n, cfg.example_frames, cfg.mel_bins)


class Vggish(nn.Module):
  """(N, 96, 64) log-mel examples -> (N, 128) embeddings."""
  config: VggishConfig

  @nn.compact
  def __call__(self, examples_nhw: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = as_dtype(cfg.dtype)
    x = examples_nhw[..., None]
    conv_index = 0
    for layer in cfg.layers:
      if layer == "M":
        x = pool2d(x, (2, 2), "max")
      else:
        x = nn.relu(Conv2d(layer, dtype=dtype, name=f"conv{conv_index}")(x))
        conv_index += 1
    x = x.reshape(x.shape[0], -1)  # (time, mel, channel) order, as torchvggish's transposes give
    for i, size in enumerate(cfg.fc_sizes):
      x = Dense(size, axes=("embed", "mlp"), dtype=dtype, name=f"fc{i}")(x)
      if i < len(cfg.fc_sizes) - 1 or cfg.final_relu:
        x = nn.relu(x)
    return x


class VggishEmbedder:
  """VGGish as an `EmbeddingModel`: one clip -> one 128-d embedding per 0.96 s example (N, 128), no logits."""
  name = "vggish"

  def __init__(self, params: dict, config: VggishConfig):
    self.config = config
    self.sample_rate_hz = config.sample_rate_hz
    self.params = jax.tree.map(jnp.asarray, params)
    self._apply = jax.jit(lambda p, w: Vggish(config).apply({"params": p}, examples(w, config)))

  def embed(self, wav_t: np.ndarray) -> tuple[np.ndarray, None]:
    """Mono clip at 16 kHz -> (emb (N, 128), None); N = 0 for a clip shorter than one example, as torchvggish."""
    cfg = self.config
    hop = int(round(cfg.sample_rate_hz * cfg.hop_s))
    win = int(round(cfg.sample_rate_hz * cfg.window_s))
    if len(wav_t) < win + (cfg.example_frames - 1) * hop:
      return np.zeros((0, cfg.fc_sizes[-1]), np.float32), None
    return np.asarray(self._apply(self.params, np.asarray(wav_t, np.float32))), None
