"""Speech spoken as the pipeline reads a record: a fresh voice per example and epoch (`data.speech_source`).

`SpeakCaption` is a grain RandomMap ahead of the crop (`pipeline.FitRecord`). It draws a voice with the
record's generator, which grain seeds from the sampler seed and the record's position in the endless index
sequence, so every epoch of an example gets its own voice and a restored iterator replays the same audio. The
pool (`data.synth`): espeak-ng voices (`tts.ESPEAK_POOL`: accent, variant, speed, pitch; the held-out voice's
accent and variant are not in it) and the speakers of local transformers VitsModel directories (a random
speaker of a multi-speaker model, noise scales 0.667 / 0.8 as STAR), VITS with probability `vits_share`.
The pipeline joins no cached HuBERT frames then (they belong to the stored voice): the stage runs HuBERT in the step.
A caption that cannot be spoken (empty, no Latin letter or digit, over `max_caption_chars`) or a synthesiser
that fails keeps the record's stored speech (every record has one); the element is tagged, and
`pipeline.BatchIterator` counts it and logs a line naming the record.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import unicodedata
from typing import Any

import grain
import numpy as np

from star_jax.data import tts as tts_lib
from star_jax.errors import UserError

SPEECH_SOURCES = ("stored", "synthesized")
WHY_CHARS = 200

# Synthesisers by (process id, kind, model): each grain worker process loads its own, once.
_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.Lock()


def speakable(caption: str, max_chars: int) -> tuple[str | None, str]:
  """-> (text to speak, "") or (None, why not). Letters of other scripts and control characters become spaces:
  the voices are English, and espeak-ng would read a CJK caption as a list of character names."""
  if len(caption) > max_chars:
    return None, f"caption of {len(caption)} characters (data.synth.max_caption_chars {max_chars})"
  kept = []
  for c in unicodedata.normalize("NFKC", caption):
    category = unicodedata.category(c)
    latin = c.isascii() or "LATIN" in unicodedata.name(c, "")
    kept.append(" " if category[0] == "C" or (category[0] == "L" and not latin) else c)
  text = " ".join("".join(kept).split())
  if not text:
    return None, "empty caption"
  if not any(c.isalnum() and (c.isascii() or "LATIN" in unicodedata.name(c, "")) for c in text):
    return None, "no Latin letter or digit to speak"
  return text, ""


def _synthesiser(kind: str, model_dir: str, sample_rate_hz: int):
  key = (os.getpid(), kind, model_dir, sample_rate_hz)
  with _LOAD_LOCK:
    if key not in _LOADED:
      if kind == "vits":
        import torch

        # One torch thread per reader: the pipeline's parallelism is grain's worker processes.
        torch.set_num_threads(1)
        _LOADED[key] = tts_lib.VitsTTS(model_dir, sample_rate_hz, batch_size=1)
      else:
        _LOADED[key] = tts_lib.EspeakTTS((), sample_rate_hz, in_process=True)
    return _LOADED[key]


@dataclasses.dataclass(frozen=True)
class Pool:
  """Where voices come from (`data.synth`)."""
  espeak: bool = True
  vits_models: tuple[str, ...] = ()
  vits_share: float = 0.5  # probability of a VITS voice when both kinds are in the pool
  max_caption_chars: int = 500

  @classmethod
  def from_config(cls, synth) -> "Pool":
    synth = synth.to_dict() if hasattr(synth, "to_dict") else dict(synth or {})
    unknown = sorted(set(synth) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise UserError(f"data.synth: unknown keys {unknown}; it takes espeak, vits_models, vits_share, "
                      "max_caption_chars")
    models = synth.get("vits_models") or ()
    pool = cls(espeak=bool(synth.get("espeak", True)),
               vits_models=tuple(os.path.abspath(m) for m in ([models] if isinstance(models, str) else models)),
               vits_share=float(synth.get("vits_share", 0.5)),
               max_caption_chars=int(synth.get("max_caption_chars", 500)))
    if not pool.espeak and not pool.vits_models:
      raise UserError("data.synth: the voice pool is empty; set espeak=True or give vits_models")
    if not 0.0 <= pool.vits_share <= 1.0:
      raise UserError(f"data.synth.vits_share {pool.vits_share} is not a probability in [0, 1]")
    for m in pool.vits_models:
      if not os.path.isfile(os.path.join(m, "config.json")):
        raise UserError(f"data.synth.vits_models: {m} is not a transformers VitsModel directory "
                        "(no config.json); pass a directory written by VitsModel.save_pretrained")
    return pool


class SpeakCaption(grain.transforms.RandomMap):
  """Record -> the record with `speech` spoken anew at `sample_rate_hz`, `voice`, `_tts_fallback`, `_tts_why`."""

  def __init__(self, pool: Pool, sample_rate_hz: int):
    self.pool = pool
    self.sample_rate_hz = int(sample_rate_hz)

  def _speak(self, text: str, rng: np.random.Generator) -> tts_lib.Utterance:
    pool = self.pool
    if pool.vits_models and (not pool.espeak or rng.random() < pool.vits_share):
      model_dir = pool.vits_models[int(rng.integers(len(pool.vits_models)))]
      vits = _synthesiser("vits", model_dir, self.sample_rate_hz)
      speaker = int(rng.integers(max(vits.num_speakers, 1)))
      return vits.synthesize([text], seed=int(rng.integers(2**31)), speaker_id=speaker)[0]
    voice = tts_lib.ESPEAK_POOL.draw(rng)
    return _synthesiser("espeak", "", self.sample_rate_hz).speak(text, voice)

  def random_map(self, r: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    # One draw from grain's generator whatever happens below, so the crops drawn after it never depend on it.
    voice_rng = np.random.default_rng(int(rng.integers(2**63)))
    out = dict(r)
    text, why = speakable(str(r["caption"]), self.pool.max_caption_chars)
    if text is not None:
      try:
        utt = self._speak(text, voice_rng)
      except Exception as e:  # noqa: BLE001 - a synthesiser failing on one caption must not stop training
        why = f"synthesis failed: {type(e).__name__}: {str(e)[:WHY_CHARS]}"
      else:
        wave = np.asarray(utt.wave, np.float32)
        if wave.size == 0 or not np.all(np.isfinite(wave)) or not np.abs(wave).max() > 0:
          why = f"{utt.voice} gave no finite speech"
        else:
          out.update(speech=wave, voice=np.str_(utt.voice), _tts_fallback=np.int32(0), _tts_why=np.str_(""))
          return out
    out.update(voice=np.str_(str(r.get("voice", ""))), _tts_fallback=np.int32(1),
               _tts_why=np.str_(f"record {r['id']}: {why}"))
    return out
