"""Reading, checking and resampling audio for data prep and the input pipeline."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np


class AudioError(ValueError):
  """A clip that cannot be used; the message is the skip reason written to the prep report."""


def resample(wave: np.ndarray, src_rate_hz: int, dst_rate_hz: int) -> np.ndarray:
  """(T,) float32 at src_rate_hz -> (round(T * dst / src),) float32 at dst_rate_hz (soxr, high quality)."""
  wave = np.asarray(wave, np.float32)
  if src_rate_hz == dst_rate_hz or wave.size == 0:
    return wave
  import soxr

  out = soxr.resample(wave, src_rate_hz, dst_rate_hz, quality="HQ")
  return np.asarray(out, np.float32)


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
  """Crops or zero-pads the first axis of `wave` to `length`."""
  if wave.shape[0] >= length:
    return wave[:length]
  pad = [(0, length - wave.shape[0])] + [(0, 0)] * (wave.ndim - 1)
  return np.pad(wave, pad)


def to_mono(wave: np.ndarray) -> np.ndarray:
  """(T,) or (T, channels) -> (T,) float32 by averaging channels."""
  wave = np.asarray(wave, np.float32)
  return wave.mean(axis=1) if wave.ndim == 2 else wave


def read_audio(path: str, rate_hz: int, *, max_duration_s: float | None = None) -> tuple[np.ndarray, float]:
  """Any soundfile/librosa-readable file -> (mono float32 at rate_hz cut at max_duration_s, the file's duration
  in s). Reads only the frames it keeps (an hour-long file costs what 10 s cost); raises AudioError if unusable."""
  if not os.path.isfile(path):
    raise AudioError("missing file")
  if os.path.getsize(path) == 0:
    raise AudioError("unreadable: empty file")
  try:
    import soundfile as sf

    with sf.SoundFile(path) as f:
      src_rate, duration_s = f.samplerate, f.frames / f.samplerate
      keep = -1 if max_duration_s is None else int(math.ceil(max_duration_s * src_rate))
      wave = f.read(keep, dtype="float32", always_2d=True)
  except Exception as sf_error:  # noqa: BLE001 - any decoder failure is a skip reason, not a crash
    try:  # mp3/m4a and other formats soundfile lacks
      import librosa

      with warnings.catch_warnings():  # librosa warns on every fallback to audioread
        warnings.simplefilter("ignore")
        wave, src_rate = librosa.load(path, sr=None, mono=True, duration=max_duration_s)
      duration_s = wave.shape[0] / src_rate
    except Exception:  # noqa: BLE001
      raise AudioError(f"unreadable: {type(sf_error).__name__}: {str(sf_error)[:120]}") from None
  wave = to_mono(wave)  # mixes any number of channels down
  if not np.all(np.isfinite(wave)):
    raise AudioError("unreadable: non-finite samples (NaN or Inf)")
  return resample(wave, int(src_rate), rate_hz), float(duration_s)


def load_audio(path: str, rate_hz: int, *, max_duration_s: float | None = None) -> np.ndarray:
  """Reads any soundfile/librosa-readable file as mono float32 at rate_hz; raises AudioError if unreadable."""
  return read_audio(path, rate_hz, max_duration_s=max_duration_s)[0]


def check_audio(wave: np.ndarray, rate_hz: int, *, min_duration_s: float, silence_peak: float = 1e-4) -> None:
  """Raises AudioError('too short' / 'silent') for clips unfit for training."""
  duration_s = wave.shape[0] / rate_hz
  if duration_s < min_duration_s:
    raise AudioError(f"too short: {duration_s:.2f} s < {min_duration_s} s")
  if wave.size == 0 or float(np.max(np.abs(wave))) < silence_peak:
    raise AudioError(f"silent: peak below {silence_peak}")


def peak_normalize(wave: np.ndarray, peak: float = 0.9) -> np.ndarray:
  """Scales so that max |x| = peak (silence stays silence)."""
  top = float(np.max(np.abs(wave))) if wave.size else 0.0
  return (wave * (peak / top)).astype(np.float32) if top > 0 else wave.astype(np.float32)
