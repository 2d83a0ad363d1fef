"""Text-to-speech behind one interface: `synthesize(texts, seed) -> [Utterance]` at a fixed output rate.

- `VitsTTS`: a `transformers.VitsModel` from a local directory (e.g. an LJSpeech VITS in transformers
  format, as STAR used), batched, seeded, with STAR's noise scales 0.667 / 0.8.
- `EspeakTTS`: the espeak-ng command (offline, no model), varying voice, speed and pitch.
Data prep uses them to speak captions; a pipeline transform may call them to synthesise on the fly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from typing import Protocol, Sequence

import numpy as np

from star_jax.data.audio import resample
from star_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Utterance:
  wave: np.ndarray  # (T,) float32 at the TTS's sample_rate_hz; empty when the text gave no speech
  voice: str


class TTS(Protocol):
  sample_rate_hz: int

  def synthesize(self, texts: Sequence[str], seed: int = 0) -> list[Utterance]:
    """One utterance per text, at `sample_rate_hz`; the same (texts, seed) gives the same audio."""


@dataclasses.dataclass(frozen=True)
class Voice:
  """An espeak-ng voice variant: `-v name -s speed_wpm -p pitch` (pitch 0..99)."""
  name: str
  speed_wpm: int = 160
  pitch: int = 50

  @property
  def tag(self) -> str:
    return f"{self.name}/s{self.speed_wpm}/p{self.pitch}"


DEFAULT_VOICES = (
    Voice("en-us", 160, 50),
    Voice("en+f3", 150, 65),  # "en" is British English; espeak-ng ignores a variant after "en-gb"
    Voice("en-us+m3", 175, 40),
    Voice("en-gb-scotland", 140, 55),
    Voice("en-029+f2", 165, 72),
)


def _parse_wav_stream(data: bytes) -> tuple[np.ndarray, int]:
  """espeak-ng --stdout writes a WAV whose size fields are unset; read the PCM after the 'data' tag."""
  if data[:4] != b"RIFF" or b"data" not in data[:256]:
    raise RuntimeError("espeak-ng did not return a WAV stream")
  rate = int.from_bytes(data[24:28], "little")
  start = data.index(b"data", 12) + 8
  pcm = np.frombuffer(data[start:start + (len(data) - start) // 2 * 2], dtype="<i2")
  return pcm.astype(np.float32) / 32768.0, rate


class EspeakTTS:
  """espeak-ng; text i is spoken by a voice drawn from `voices` with a generator seeded by `seed`."""

  def __init__(self, voices: Sequence[Voice] = DEFAULT_VOICES, sample_rate_hz: int = 16000,
               executable: str = "espeak-ng"):
    self.executable = shutil.which(executable)
    if self.executable is None:
      raise UserError(f"{executable} not found: install it (apt-get install espeak-ng) or use --tts vits")
    self.voices = tuple(voices)
    self.sample_rate_hz = sample_rate_hz

  def speak(self, text: str, voice: Voice) -> Utterance:
    if not text.strip():
      return Utterance(np.zeros((0,), np.float32), voice.tag)
    # "--" ends options, so a caption starting with "-" is read as text.
    cmd = [self.executable, "-v", voice.name, "-s", str(voice.speed_wpm), "-p", str(voice.pitch),
           "--stdout", "--", text]
    data = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout
    wave, rate = _parse_wav_stream(data)
    return Utterance(resample(wave, rate, self.sample_rate_hz), voice.tag)

  def synthesize(self, texts: Sequence[str], seed: int = 0) -> list[Utterance]:
    picks = np.random.default_rng(seed).integers(len(self.voices), size=len(texts))
    return [self.speak(t, self.voices[p]) for t, p in zip(texts, picks)]


class VitsTTS:
  """A local `transformers.VitsModel`; batches of `batch_size`, torch seeded per batch from `seed`."""

  def __init__(self, model_dir: str, sample_rate_hz: int = 16000, *, noise_scale: float = 0.667,
               noise_scale_duration: float = 0.8, speaking_rate: float = 1.0, batch_size: int = 8,
               device: str = "cpu"):
    if not os.path.isdir(model_dir):
      raise UserError(f"--tts-model {model_dir}: not a directory (a transformers VitsModel save)")
    import torch
    from transformers import AutoTokenizer, VitsModel

    self._torch = torch
    try:
      self.model = VitsModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
      self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
      first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise UserError(f"--tts-model {model_dir}: cannot load a transformers VitsModel and tokenizer "
                      f"({first_line}); pass a directory written by VitsModel.save_pretrained") from None
    self.model.noise_scale = noise_scale
    self.model.noise_scale_duration = noise_scale_duration
    self.model.speaking_rate = speaking_rate
    self.device = device
    self.batch_size = batch_size
    self.sample_rate_hz = sample_rate_hz
    self.voice = "vits:" + os.path.basename(os.path.normpath(model_dir))

  def synthesize(self, texts: Sequence[str], seed: int = 0) -> list[Utterance]:
    torch = self._torch
    out: list[Utterance] = []
    for start in range(0, len(texts), self.batch_size):
      batch = list(texts[start:start + self.batch_size])
      inputs = self.tokenizer(batch, padding=True, return_tensors="pt")
      speakable = inputs["attention_mask"].sum(-1) > 0
      waves = [np.zeros((0,), np.float32)] * len(batch)
      if bool(speakable.any()):
        keep = speakable.nonzero().flatten()
        torch.manual_seed(seed * 1_000_003 + start)
        with torch.no_grad():
          result = self.model(input_ids=inputs["input_ids"][keep].to(self.device),
                              attention_mask=inputs["attention_mask"][keep].to(self.device))
        wave_bt = result.waveform.float().cpu().numpy()
        for row, i in enumerate(keep.tolist()):
          length = int(result.sequence_lengths[row])
          waves[i] = resample(wave_bt[row, :length], self.model.config.sampling_rate, self.sample_rate_hz)
      out.extend(Utterance(w, self.voice) for w in waves)
    return out


def make_tts(kind: str, *, model_dir: str | None = None, sample_rate_hz: int = 16000,
             voices: Sequence[Voice] = DEFAULT_VOICES, **vits_kwargs) -> TTS:
  """`kind` is 'vits' (needs model_dir) or 'espeak'."""
  if kind == "vits":
    if not model_dir:
      raise UserError("--tts vits needs --tts-model DIR (a local transformers VitsModel directory)")
    return VitsTTS(model_dir, sample_rate_hz, **vits_kwargs)
  if kind == "espeak":
    return EspeakTTS(voices, sample_rate_hz)
  raise UserError(f"unknown TTS '{kind}'; choose vits or espeak")
