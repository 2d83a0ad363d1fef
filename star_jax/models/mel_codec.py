"""A fixed log-mel codec in the VAE's slot: waveform -> normalised log-mel "latents" -> Griffin-Lim -> waveform.

Nothing to train. The tiny config uses it: a tiny Oobleck trained for minutes on one CPU machine kept the event of
7 % of the test clips by the demo's real-clip evaluator, this codec about 90 % (docs/notes/demo.md). Same calls as
`OobleckVAE`, so the flow stages and `generate` take either:

  codec = MelCodec(MelConfig(...))
  mean_bld, std_bld = codec.apply({}, wav_bt, method="encode")   # std is zeros: a deterministic code
  wav_bt = codec.apply({}, latents_bld, method="decode")

STFT and ISTFT follow librosa's (`center=True`, zero padding, periodic Hann window, window-sum-square
normalisation); the filterbank is `librosa.filters.mel` (Slaney); decoding maps mel power back to linear power
with a few non-negative least-squares steps and runs librosa's fast Griffin-Lim (momentum 0.99, zero-phase start),
in JAX so it compiles with the sampler. A clip of `n * hop` samples has exactly n frames; frame i is centred on
sample i * hop.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MelConfig:
  """The codec's fixed settings; `codec_config(cfg.vae)` builds it from a config section with kind "mel"."""
  sample_rate_hz: int = 16000
  latent_channels: int = 64     # mel bands
  n_fft: int = 1024
  hop_length: int = 320         # 16 kHz / 320 = 50 frames/s, the Oobleck VAE's latent rate
  fmin_hz: float = 0.0
  fmax_hz: float = 0.0          # 0: the Nyquist frequency
  log_floor: float = 1e-5       # mel power floor before the log (silence)
  log_mean: float = -5.0        # latents = (log(max(mel, floor)) - log_mean) / log_std
  log_std: float = 4.0
  log_ceiling: float = 8.0      # decode clips the log-mel to this (the demo corpus peaks at 6.5): generated
                                # latents overshoot under guidance, and exp() of them overflowed to inf
  griffin_lim_iters: int = 32
  griffin_lim_momentum: float = 0.99
  nnls_iters: int = 8           # projected-gradient steps from mel power back to linear power


@functools.lru_cache(maxsize=8)
def mel_filterbank(cfg: MelConfig) -> np.ndarray:
  """(n_mels, n_fft // 2 + 1) Slaney mel filterbank, librosa's."""
  import librosa
  return librosa.filters.mel(sr=cfg.sample_rate_hz, n_fft=cfg.n_fft, n_mels=cfg.latent_channels,
                             fmin=cfg.fmin_hz, fmax=cfg.fmax_hz or cfg.sample_rate_hz / 2).astype(np.float32)


def hann(n: int) -> np.ndarray:
  """Periodic Hann window (scipy's `get_window("hann", n)`, librosa's STFT window)."""
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def stft(wav_bt: jax.Array, n_fft: int, hop: int, num_frames: int) -> jax.Array:
  """(B, T) -> (B, num_frames, n_fft // 2 + 1) complex; frame i centred on sample i * hop, zeros outside."""
  pad = n_fft // 2
  need = (num_frames - 1) * hop + n_fft
  padded = jnp.pad(wav_bt, ((0, 0), (pad, max(0, need - pad - wav_bt.shape[1]))))
  idx = np.arange(num_frames)[:, None] * hop + np.arange(n_fft)[None, :]
  return jnp.fft.rfft(padded[:, idx] * hann(n_fft), axis=-1)


def istft(spec_bfk: jax.Array, n_fft: int, hop: int, length: int) -> jax.Array:
  """(B, F, n_fft // 2 + 1) complex -> (B, length): windowed overlap-add over the window's summed square."""
  num_frames = spec_bfk.shape[1]
  window = hann(n_fft)
  frames = jnp.fft.irfft(spec_bfk, n=n_fft, axis=-1) * window
  total = (num_frames - 1) * hop + n_fft
  idx = np.arange(num_frames)[:, None] * hop + np.arange(n_fft)[None, :]
  out = jnp.zeros((spec_bfk.shape[0], total), frames.dtype).at[:, idx].add(frames)
  norm = np.zeros(total, np.float32)
  np.add.at(norm, idx, np.broadcast_to(window ** 2, idx.shape))
  out = out / np.where(norm > 1e-10, norm, 1.0)
  out = out[:, n_fft // 2:n_fft // 2 + length]
  return jnp.pad(out, ((0, 0), (0, length - out.shape[1])))


def griffin_lim(magnitude_bfk: jax.Array, n_fft: int, hop: int, length: int, iters: int,
                momentum: float) -> jax.Array:
  """librosa's fast Griffin-Lim from zero phase: magnitudes (B, F, K) -> waveform (B, length)."""
  coef = momentum / (1 + momentum)

  def body(_, carry):
    angles, rebuilt = carry
    new = stft(istft(magnitude_bfk * angles, n_fft, hop, length), n_fft, hop, magnitude_bfk.shape[1])
    angles = new - coef * rebuilt
    return angles / (jnp.abs(angles) + 1e-16), new

  angles = jnp.ones(magnitude_bfk.shape, jnp.complex64)
  angles, _ = jax.lax.fori_loop(0, iters, body, (angles, jnp.zeros_like(angles)))
  return istft(magnitude_bfk * angles, n_fft, hop, length)


def mel_to_power(mel_bfm: jax.Array, fb_mk: np.ndarray, iters: int) -> jax.Array:
  """Mel power (B, F, M) -> non-negative linear power (B, F, K) with fb @ power ≈ mel: projected gradient steps
  from the clipped pseudo-inverse (librosa's `mel_to_stft` solves the same problem with L-BFGS-B)."""
  fb = jnp.asarray(fb_mk)
  power = jnp.maximum(mel_bfm @ jnp.asarray(np.linalg.pinv(fb_mk)).T, 0.0)
  step = 1.0 / float(np.linalg.norm(fb_mk, 2) ** 2)
  for _ in range(iters):
    power = jnp.maximum(power - step * ((power @ fb.T - mel_bfm) @ fb), 0.0)
  return power


class MelCodec(nn.Module):
  """Waveforms (B, T) <-> normalised log-mel latents (B, T // hop, n_mels); no parameters."""
  cfg: MelConfig

  def encode(self, wav_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.cfg
    spec = stft(wav_bt.astype(jnp.float32), c.n_fft, c.hop_length, wav_bt.shape[1] // c.hop_length)
    mel = (jnp.abs(spec) ** 2) @ jnp.asarray(mel_filterbank(c)).T
    latents = (jnp.log(jnp.maximum(mel, c.log_floor)) - c.log_mean) / c.log_std
    return latents, jnp.zeros_like(latents)

  def decode(self, latents_bld: jax.Array) -> jax.Array:
    c = self.cfg
    log_mel = jnp.clip(latents_bld.astype(jnp.float32) * c.log_std + c.log_mean, None, c.log_ceiling)
    mel = jnp.where(log_mel > np.log(c.log_floor) + 1e-4, jnp.exp(log_mel), 0.0)  # the floor is silence
    power = mel_to_power(mel, mel_filterbank(c), c.nnls_iters)
    length = latents_bld.shape[1] * c.hop_length
    return griffin_lim(jnp.sqrt(power), c.n_fft, c.hop_length, length, c.griffin_lim_iters,
                       c.griffin_lim_momentum)

  def __call__(self, wav_bt: jax.Array, rng: jax.Array | None = None):
    latents, std = self.encode(wav_bt)
    return self.decode(latents), latents, std
