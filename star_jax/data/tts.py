"""Text-to-speech behind one interface: `synthesize(texts, seed) -> [Utterance]` at a fixed output rate.

- `VitsTTS`: a `transformers.VitsModel` from a local directory (e.g. an LJSpeech VITS in transformers
  format, as STAR used), batched, seeded, with STAR's noise scales 0.667 / 0.8.
- `EspeakTTS`: espeak-ng (offline, no model), varying voice, speed and pitch: its command, or its C library
  through a server that loads it once and speaks each caption in a fork (`in_process=True`; no process start
  and voice-data load per caption, see espeak_server.py).
- `ESPEAK_POOL`: the accents x variants x speeds x pitches that training voices are drawn from.
Data prep uses them to speak captions; `star_jax.data.speak` speaks them as the pipeline reads each record.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import sys
import threading
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


@dataclasses.dataclass(frozen=True)
class VoicePool:
  """espeak-ng voices `accent + variant` at a speed in [speeds_wpm) and a pitch in [pitches)."""
  accents: tuple[str, ...]
  variants: tuple[str, ...]
  speeds_wpm: tuple[int, int]  # [low, high)
  pitches: tuple[int, int]

  def draw(self, rng: np.random.Generator) -> Voice:
    accent = self.accents[int(rng.integers(len(self.accents)))]
    variant = self.variants[int(rng.integers(len(self.variants)))]
    return Voice(accent + variant, int(rng.integers(*self.speeds_wpm)), int(rng.integers(*self.pitches)))


# espeak-ng's English accents bar the held-out voice's (DEFAULT_VOICES[4], Caribbean) x its voice variants bar
# the held-out one (f2). "en" is British English ("en-gb" would drop the variant).
ESPEAK_POOL = VoicePool(
    accents=("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc"),
    variants=("", "+f1", "+f3", "+f4", "+f5", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7"),
    speeds_wpm=(130, 186), pitches=(25, 86))


def _parse_wav_stream(data: bytes) -> tuple[np.ndarray, int]:
  """espeak-ng --stdout writes a WAV whose size fields are unset; read the PCM after the 'data' tag."""
  if data[:4] != b"RIFF" or b"data" not in data[:256]:
    raise RuntimeError("espeak-ng did not return a WAV stream")
  rate = int.from_bytes(data[24:28], "little")
  start = data.index(b"data", 12) + 8
  pcm = np.frombuffer(data[start:start + (len(data) - start) // 2 * 2], dtype="<i2")
  return pcm.astype(np.float32) / 32768.0, rate


class _EspeakServer:
  """A client of `espeak_server.py` (one server per process; one utterance at a time)."""

  _running: dict[int, "_EspeakServer"] = {}  # by process id: a forked grain worker starts its own
  _start_lock = threading.Lock()

  def __init__(self):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "espeak_server.py")
    # -S -E: no site packages or environment, so the server starts in milliseconds and loads nothing else.
    self._process = subprocess.Popen([sys.executable, "-S", "-E", script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
    self.lock = threading.Lock()
    header = self._process.stdout.read(4)
    self.rate_hz = struct.unpack("<i", header)[0] if len(header) == 4 else -1
    if self.rate_hz <= 0:
      self._process.kill()
      raise UserError("espeak-ng's library (libespeak-ng.so.1) did not start: install espeak-ng "
                      "(apt-get install espeak-ng)")

  @classmethod
  def get(cls) -> "_EspeakServer":
    with cls._start_lock:
      server = cls._running.get(os.getpid())
      if server is None or server._process.poll() is not None:
        server = cls._running[os.getpid()] = cls()
      return server

  def speak(self, text: str, voice: Voice) -> np.ndarray:
    """-> int16 PCM at rate_hz."""
    data, name = text.encode("utf-8"), voice.name.encode()
    with self.lock:
      try:
        self._process.stdin.write(struct.pack("<4i", len(data), len(name), voice.speed_wpm, voice.pitch) + data
                                  + name)
        self._process.stdin.flush()
        header = self._process.stdout.read(4)
        size = struct.unpack("<i", header)[0]
        body = self._process.stdout.read(abs(size))
      except (OSError, struct.error):
        raise RuntimeError(f"the espeak-ng server stopped (exit code {self._process.poll()})") from None
    if size < 0:
      raise RuntimeError(body.decode(errors="replace"))
    return np.frombuffer(body, "<i2")


class EspeakTTS:
  """espeak-ng; text i is spoken by a voice drawn from `voices` with a generator seeded by `seed`."""

  def __init__(self, voices: Sequence[Voice] = DEFAULT_VOICES, sample_rate_hz: int = 16000,
               executable: str = "espeak-ng", in_process: bool = False):
    self.executable = shutil.which(executable)
    if self.executable is None and not in_process:
      raise UserError(f"{executable} not found: install it (apt-get install espeak-ng) or use --tts vits")
    self.voices = tuple(voices)
    self.sample_rate_hz = sample_rate_hz
    self.in_process = in_process

  def speak(self, text: str, voice: Voice) -> Utterance:
    if not text.strip():
      return Utterance(np.zeros((0,), np.float32), voice.tag)
    if self.in_process:
      server = _EspeakServer.get()
      wave, rate = server.speak(text, voice).astype(np.float32) / 32768.0, server.rate_hz
    else:
      # "--" ends options, so a caption starting with "-" is read as text.
      cmd = [self.executable, "-v", voice.name, "-s", str(voice.speed_wpm), "-p", str(voice.pitch),
             "--stdout", "--", text]
      wave, rate = _parse_wav_stream(subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout)
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

  @property
  def num_speakers(self) -> int:
    return int(self.model.config.num_speakers)

  def synthesize(self, texts: Sequence[str], seed: int = 0, speaker_id: int | None = None) -> list[Utterance]:
    """`speaker_id` picks a voice of a multi-speaker model (None: speaker 0)."""
    torch = self._torch
    if speaker_id is not None and not 0 <= speaker_id < max(self.num_speakers, 1):
      raise ValueError(f"speaker {speaker_id} of a {self.num_speakers}-speaker model")
    use_speaker = self.num_speakers > 1
    voice = self.voice + (f"#{speaker_id or 0}" if use_speaker else "")
    out: list[Utterance] = []
    for start in range(0, len(texts), self.batch_size):
      batch = list(texts[start:start + self.batch_size])
      inputs = self.tokenizer(batch, padding=True, return_tensors="pt")
      speakable = inputs["attention_mask"].sum(-1) > 0
      waves = [np.zeros((0,), np.float32)] * len(batch)
      if bool(speakable.any()):
        keep = speakable.nonzero().flatten()
        torch.manual_seed(seed * 1_000_003 + start)
        extra = dict(speaker_id=int(speaker_id or 0)) if use_speaker else {}
        with torch.no_grad():
          result = self.model(input_ids=inputs["input_ids"][keep].to(self.device),
                              attention_mask=inputs["attention_mask"][keep].to(self.device), **extra)
        wave_bt = result.waveform.float().cpu().numpy()
        for row, i in enumerate(keep.tolist()):
          length = int(result.sequence_lengths[row])
          waves[i] = resample(wave_bt[row, :length], self.model.config.sampling_rate, self.sample_rate_hz)
      out.extend(Utterance(w, voice) for w in waves)
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
