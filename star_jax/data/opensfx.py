"""The built-in corpus: OpenTTD's OpenSFX recordings with spoken captions (DESIGN.md §4).

`opensfx.cat` holds 73 entries (71 RIFF WAVs, 2 empty), each named by a description such as
`"Cow". Original "Cow - Moan 2.wav" by "Jarred Gib". Edited by "Wuzzy". License: Creative Commons Zero 1.0.`
Each quoted label becomes a sound-event class; captions come from templates over the class names and from
two-event mixtures ("X and Y" overlaid, "X followed by Y" in sequence); espeak-ng speaks each caption in
voices drawn per record from a pool of accents x variants x speeds x pitches (`train_voice`). Splits:
  train  single clips (3 templates) x 4 pool voices + train mixtures x 2 pool voices
  valid  single clips with an unseen template, a pool voice
  test   single clips x the held-out voice + held-out mixtures (class pairs never in train) x (a pool voice,
         the held-out voice)
The held-out voice's accent (Caribbean) and variant (f2) never speak in train or valid.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
from typing import Any, Sequence

import numpy as np

from star_jax.data import audio as audio_lib
from star_jax.data import text as text_lib
from star_jax.data.tts import DEFAULT_VOICES, ESPEAK_POOL, EspeakTTS, Voice

CAT_PATH = "/usr/share/games/openttd/baseset/opensfx/opensfx.cat"
TRAIN_TEMPLATES = ("{a}", "the sound of {a}", "a recording of {a}")
VALID_TEMPLATE = "you can hear {a}"
TEST_VOICE = DEFAULT_VOICES[4]  # en-029+f2: held out, its accent and variant never speak in train or valid
# Train and valid voices come from `tts.ESPEAK_POOL` (no held-out accent or variant). Four fixed voices let the
# tiny stage 1 learn the four voices rather than the words: held-out-voice mAP 0.607 against 0.833 on valid,
# 0.627 with the pool (scripts/research/stage1_voice_check.py).
VOICE_SEED = 4321
NUM_MIXTURES = 120
TEST_MIXTURE_FRACTION = 0.2
MIX_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Clip:
  index: int  # entry number in opensfx.cat
  label: str  # the quoted label, e.g. "Tropical: Bird (1)"
  credit: str  # original file, author and editor as the description gives them
  license: str
  wave: np.ndarray  # (T,) float32 mono
  rate_hz: int


def parse_description(desc: str) -> tuple[str, str, str]:
  """'"Label". Credit. License: L.' -> (label, credit, licence)."""
  m = re.match(r'\s*"([^"]*)"\.?\s*(.*)$', desc, re.S)
  label, rest = (m.group(1), m.group(2)) if m else (desc, "")
  credit, _, lic = rest.partition("License:")
  return label.strip(), credit.strip(), lic.strip().rstrip(".")


def read_cat(path: str = CAT_PATH) -> list[Clip]:
  """Parses opensfx.cat (DESIGN.md §4): uint32 (offset, size) table, then [len][name][RIFF WAV] entries."""
  import soundfile as sf

  with open(path, "rb") as f:
    data = f.read()
  count = (struct.unpack_from("<I", data, 0)[0] & 0x7FFFFFFF) // 8
  clips = []
  for i in range(count):
    offset, size = struct.unpack_from("<II", data, 8 * i)
    offset &= 0x7FFFFFFF  # the top bit is a flag, not part of the offset
    name_len = data[offset]
    name = data[offset + 1:offset + 1 + name_len].rstrip(b"\0").decode("utf-8", "replace")
    body = data[offset + 1 + name_len:offset + size]
    if body[:4] != b"RIFF":
      continue  # the two empty "Unused/Nothing" entries
    wave, rate = sf.read(io.BytesIO(body), dtype="float32", always_2d=False)
    label, credit, lic = parse_description(name)
    clips.append(Clip(i, label, credit, lic, audio_lib.to_mono(wave), int(rate)))
  return clips


def class_name(label: str) -> str:
  """'Tropical: Bird (1)' -> 'bird'; 'Toyland: Bubble plop' -> 'cartoon bubble plop'; parentheses dropped."""
  name = re.sub(r"\([^)]*\)?", "", label)  # "(1)", "(rail builds)", and one unclosed "(terraform..."
  prefix, sep, rest = name.partition(":")
  if sep:
    name = rest
    if prefix.strip().lower() == "toyland" and not re.search(r"\b(toy|comedy|cartoon)\b", rest.lower()):
      name = "cartoon " + rest
  name = name.replace("/", " or ").replace("+", " plus ")
  return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9' ]", " ", name.lower())).strip()


def article(name: str) -> str:
  """A noun phrase for the caption: 'a cow', 'an explosion', 'applause'."""
  uncountable = ("applause", "wind", "heavy wind", "steam", "morse", "electric sparking", "mining machinery")
  if name in uncountable or (name.endswith("s") and not name.endswith("ss")):  # "monkeys"
    return name
  return ("an " if name[0] in "aeiou" else "a ") + name


@dataclasses.dataclass(frozen=True)
class Spec:
  """One record to render: which clips, how they combine, the caption and the voice."""
  id: str
  clips: tuple[int, ...]  # positions in the read_cat() list
  mode: str  # "single" | "overlay" | "sequence"
  caption: str
  voice: Voice
  seed: int


def train_voice(*key: int) -> Voice:
  """The pool voice for a record, drawn deterministically from its key (clip, template, copy, split...)."""
  return ESPEAK_POOL.draw(np.random.default_rng([VOICE_SEED, *key]))


def plan(clips: Sequence[Clip]) -> tuple[list[str], dict[str, list[Spec]]]:
  """The class list and, per split, the records to render; deterministic."""
  names = [class_name(c.label) for c in clips]
  classes = sorted(set(names))
  specs: dict[str, list[Spec]] = {"train": [], "valid": [], "test": []}
  for k, name in enumerate(names):
    for t, template in enumerate(TRAIN_TEMPLATES):
      caption = template.format(a=article(name))
      for j in range(4):
        v = train_voice(0, k, t, j)
        specs["train"].append(Spec(f"sfx{clips[k].index:02d}-t{t}-{v.tag}", (k,), "single", caption, v, 0))
      specs["test"].append(Spec(f"sfx{clips[k].index:02d}-t{t}-{TEST_VOICE.tag}", (k,), "single", caption,
                                TEST_VOICE, 0))
    v = train_voice(1, k)
    specs["valid"].append(Spec(f"sfx{clips[k].index:02d}-tv-{v.tag}", (k,), "single",
                               VALID_TEMPLATE.format(a=article(name)), v, 0))
  # Two-event mixtures over distinct classes; a fraction of the class pairs appears only in test.
  rng = np.random.default_rng(MIX_SEED)
  pairs, seen = [], set()
  while len(pairs) < NUM_MIXTURES:
    a, b = (int(x) for x in rng.choice(len(clips), size=2, replace=False))
    key = frozenset((names[a], names[b]))
    if names[a] != names[b] and key not in seen:
      seen.add(key)
      pairs.append((a, b))
  num_test = int(round(TEST_MIXTURE_FRACTION * NUM_MIXTURES))
  for m, (a, b) in enumerate(pairs):
    mode = "overlay" if m % 2 == 0 else "sequence"
    joint = " and " if mode == "overlay" else " followed by "
    caption = article(names[a]) + joint + article(names[b])
    split = "test" if m < num_test else "train"
    voices = [train_voice(2, m, 0), TEST_VOICE if split == "test" else train_voice(2, m, 1)]
    for v in voices:
      specs[split].append(Spec(f"mix{m:03d}-{mode}-{v.tag}", (a, b), mode, caption, v, m))
  return classes, specs


# Per-worker state filled by `init_worker`: the clips at the audio rate and the class list.
_STATE: dict[str, Any] = {}


def init_worker(cat_path: str, audio_rate_hz: int, speech_rate_hz: int, text_dim: int) -> None:
  clips = read_cat(cat_path)
  _STATE.update(
      names=[class_name(c.label) for c in clips],
      classes=sorted({class_name(c.label) for c in clips}),
      waves=[audio_lib.peak_normalize(audio_lib.resample(c.wave, c.rate_hz, audio_rate_hz)) for c in clips],
      credits=[c.index for c in clips], audio_rate_hz=audio_rate_hz, text_dim=text_dim,
      tts=EspeakTTS(DEFAULT_VOICES, speech_rate_hz))


def _mix(spec: Spec) -> np.ndarray:
  waves = [_STATE["waves"][k] for k in spec.clips]
  if spec.mode == "single":
    return waves[0]
  rng = np.random.default_rng(spec.seed)
  rate = _STATE["audio_rate_hz"]
  a, b = waves
  if spec.mode == "sequence":
    gap = np.zeros(int(rng.uniform(0.1, 0.3) * rate), np.float32)
    return audio_lib.peak_normalize(np.concatenate([a, gap, b]))
  start = int(rng.uniform(0.0, 0.5) * a.shape[0])  # b enters during the first half of a
  out = np.zeros(max(a.shape[0], start + b.shape[0]), np.float32)
  out[:a.shape[0]] += a
  out[start:start + b.shape[0]] += b
  return audio_lib.peak_normalize(out)


def build_records(specs: Sequence[Spec]) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[dict[str, str]]]:
  """Renders specs to records (a `shards.Builder`); nothing here is skipped."""
  classes = _STATE["classes"]
  records = []
  for spec in specs:
    speech = _STATE["tts"].speak(spec.caption, spec.voice)
    labels = np.zeros(len(classes), np.uint8)
    for k in spec.clips:
      labels[classes.index(_STATE["names"][k])] = 1
    records.append(dict(
        id=spec.id, caption=spec.caption, speech=speech.wave, audio=_mix(spec), labels=labels,
        voice=speech.voice, sources="opensfx.cat#" + ",".join(str(_STATE["credits"][k]) for k in spec.clips),
        text_emb=text_lib.hash_embed(spec.caption, _STATE["text_dim"])))
  return records, [], []


def credits(clips: Sequence[Clip]) -> list[dict[str, Any]]:
  """Per clip: entry, label, class, credit and licence (for the dataset metadata and opensfx_credits.tsv)."""
  return [dict(entry=c.index, label=c.label, cls=class_name(c.label), credit=c.credit, license=c.license,
               duration_s=round(c.wave.shape[0] / c.rate_hz, 3)) for c in clips]
