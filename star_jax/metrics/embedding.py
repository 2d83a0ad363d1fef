"""The interface every audio embedding model plugs into, and reading a folder of clips for it.

A model (CNN14, VGGish, or one you add) says its sample rate and maps one mono clip to a set of
embedding rows plus, when it is a classifier, one row of class logits per embedding row.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np

from star_jax.errors import UserError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class EmbeddingModel(Protocol):
  name: str
  sample_rate_hz: int

  def embed(self, wav_t: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Mono clip (T,) at sample_rate_hz -> (embeddings (N, D), class logits (N, C) or None)."""
    ...


def list_audio(directory: str) -> list[str]:
  """Sorted audio file names (not paths) in `directory`; an error if there are none."""
  if not os.path.isdir(directory):
    raise UserError(f"'{directory}' is not a directory")
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(AUDIO_EXTENSIONS))
  if not names:
    raise UserError(f"'{directory}' holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
  return names


def resample(wav_t: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
  """Polyphase (Kaiser-windowed sinc) resampling of a mono clip, float64 -> float32."""
  if from_hz == to_hz:
    return np.asarray(wav_t, np.float32)
  from scipy.signal import resample_poly
  g = math.gcd(int(from_hz), int(to_hz))
  return resample_poly(np.asarray(wav_t, np.float64), to_hz // g, from_hz // g).astype(np.float32)


def read_audio(path: str) -> tuple[np.ndarray, int]:
  """An audio file -> (mono float32 (T,) with channels averaged, its sample rate)."""
  import soundfile as sf
  try:
    wav, rate = sf.read(path, dtype="float32", always_2d=True)
  except Exception as e:  # noqa: BLE001 - any decode failure is a bad input file
    raise UserError(f"cannot read audio '{path}': {e}") from e
  if wav.shape[0] == 0:
    raise UserError(f"'{path}' is empty")
  return wav.mean(axis=1), int(rate)
