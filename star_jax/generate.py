"""Speech in, sound out: HuBERT -> bridge -> flow-matching DiT (Euler, sway, CFG) -> VAE decoder.

  star-jax generate --ckpt outputs/tiny/bundle --speech query.wav --out sound.wav [--steps 20 --cfg 5
      --sway -1 --seed 0 --seconds 10]
  star-jax generate --ckpt BUNDLE --speech queries/ --out sounds/        # every audio file in a folder

Any sample rate and channel count is accepted (resampled to 16 kHz, mixed down). Unreadable, empty,
silent or over-long input is an error naming the file (exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from star_jax.constants import SPEECH_RATE_HZ
from star_jax.errors import UserError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif", ".opus")
log = logging.getLogger("star_jax.generate")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--ckpt", required=True, help="inference bundle written by `star-jax export`")
  p.add_argument("--speech", required=True, help="a speech recording, or a folder of them")
  p.add_argument("--out", required=True, help="output wav (or folder, when --speech is a folder)")
  p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's flow.num_steps)")
  p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: config)")
  p.add_argument("--sway", type=float, default=None, help="sway sampling coefficient (default: config, -1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--seconds", type=float, default=None, help="output length (default: the training clips')")
  p.add_argument("--batch-size", type=int, default=8, help="queries generated together in folder mode")
  p.add_argument("--max-speech-seconds", type=float, default=60.0, help="longer speech input is an error")


def read_speech(path: str, max_seconds: float = 60.0) -> np.ndarray:
  """A speech file -> mono float32 at 16 kHz, or a UserError saying what is wrong with it."""
  from star_jax.data.audio import AudioError, load_audio

  if not os.path.exists(path):
    raise UserError(f"{path}: no such file")
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder; pass a folder --out to generate for every file in it")
  try:
    import soundfile as sf
    seconds = sf.info(path).duration
  except Exception:  # noqa: BLE001 - not a soundfile format; load_audio tries other decoders
    seconds = None
  if seconds is not None and seconds > max_seconds:
    raise UserError(f"{path}: {seconds:.1f} s of speech is longer than {max_seconds:g} s; trim it to the spoken "
                    f"query (e.g. `sox in.wav out.wav trim 0 10`) or raise --max-speech-seconds")
  try:
    wave = load_audio(path, SPEECH_RATE_HZ)
  except AudioError as e:
    raise UserError(f"{path}: {e}; give a speech recording (wav, flac, ogg or mp3)") from None
  if wave.size < SPEECH_RATE_HZ // 10:
    raise UserError(f"{path}: {wave.size / SPEECH_RATE_HZ:.3f} s is too short or empty; record the spoken query")
  if wave.size > max_seconds * SPEECH_RATE_HZ:  # formats whose length soundfile could not tell up front
    raise UserError(f"{path}: longer than {max_seconds:g} s; trim it or raise --max-speech-seconds")
  if float(np.max(np.abs(wave))) < 1e-4:
    raise UserError(f"{path}: the recording is silent (peak below 1e-4); check the microphone or the file")
  return wave


class Generator:
  """A loaded bundle: `tokens(speech list)` -> (B, Q, D), `sample(tokens, ...)` -> list of waveforms."""

  def __init__(self, bundle_dir: str):
    import jax

    from star_jax.export import load_bundle
    from star_jax.models import build

    self.cfg, params = load_bundle(bundle_dir)
    self.params = jax.device_put(params)
    cfg = self.cfg
    self.hubert, self.bridge = build.hubert(cfg), build.bridge(cfg)
    self.dit, self.vae = build.dit(cfg), build.vae(cfg)
    self.sample_rate_hz = int(cfg.vae.sample_rate_hz)
    self.hop = build.vae_hop(cfg)
    self.latent_scale = build.latent_scale(cfg)
    modules = (self.hubert, self.bridge)
    self._tokens = jax.jit(lambda p, speech, mask: build.speech_tokens(
        cfg, p, {"speech": speech, "speech_mask": mask}, modules=modules))
    self._bridge_tokens = jax.jit(lambda p, feats, mask: build.speech_tokens(
        cfg, p, {"hubert": feats, "hubert_mask": mask}, modules=modules))
    self._decode = jax.jit(lambda p, z: self.vae.apply({"params": p}, z, method="decode"))
    self._encode = jax.jit(lambda p, a: self.vae.apply({"params": p}, a, method="encode")[0])

  def tokens_from_features(self, feats_ntd: np.ndarray, frame_mask_nt: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """HuBERT frames (cached by `prepare cache` from this bundle's HuBERT) -> bridge tokens (N, Q, D), in
    batches of `batch_size`, as numpy."""
    return np.concatenate([np.asarray(self._bridge_tokens(self.params, feats_ntd[i:i + batch_size],
                                                          frame_mask_nt[i:i + batch_size]))
                           for i in range(0, len(feats_ntd), batch_size)])

  def tokens(self, speech: list[np.ndarray]):
    """Speech waveforms at 16 kHz -> bridge tokens (B, Q, D); padded to whole seconds, and for a GroupNorm
    front end (tiny) to at least the training window, as training padded it (`hubert.min_input_length`)."""
    from star_jax.models.hubert import min_input_length

    window = round(float(self.cfg.data.get("speech_duration_s", 0.0)) * SPEECH_RATE_HZ)
    length = max(min_input_length(self.hubert.cfg, window),
                 SPEECH_RATE_HZ * math.ceil(max(len(s) for s in speech) / SPEECH_RATE_HZ))
    batch = np.zeros((len(speech), length), np.float32)
    mask = np.zeros((len(speech), length), bool)
    for i, s in enumerate(speech):
      batch[i, :len(s)], mask[i, :len(s)] = s, True
    return self._tokens(self.params, batch, mask)

  def latents(self, tokens, seconds: float, *, steps: int | None = None, cfg_scale: float | None = None,
              sway: float | None = None, seed: int | Sequence[int] = 0):
    """Bridge tokens (B, Q, D) -> latents (B, L, C) in the VAE's space for `seconds` of audio. `seed` is one int
    for the batch, or one per row: row i then starts from the noise a batch of one with seed[i] starts from."""
    import jax
    import jax.numpy as jnp

    from star_jax import flow

    f = self.cfg.flow
    frames = math.ceil(int(round(seconds * self.sample_rate_hz)) / self.hop)
    shape = (frames, int(self.cfg.vae.latent_channels))
    if np.ndim(seed) == 0:
      noise = jax.random.normal(jax.random.PRNGKey(int(seed)), (tokens.shape[0], *shape))
    else:
      noise = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(int(s)), (1, *shape)) for s in seed])
    latents = flow.sample(self.dit.apply, {"params": self.params["dit"]}, noise, tokens,
                          num_steps=int(steps or f.num_steps),
                          cfg_scale=float(f.cfg_scale if cfg_scale is None else cfg_scale),
                          sway_coef=float(f.sway_coef if sway is None else sway))
    return latents / self.latent_scale  # the DiT's space -> the VAE's

  def decode(self, latents, seconds: float) -> np.ndarray:
    """Latents (B, L, C) from `latents` -> waveforms (B, round(seconds * rate)) at the VAE rate, float32."""
    num_samples = int(round(seconds * self.sample_rate_hz))
    wav = np.asarray(self._decode(self.params["vae"], latents), np.float32)
    if wav.shape[1] < num_samples:
      wav = np.pad(wav, ((0, 0), (0, num_samples - wav.shape[1])))
    return wav[:, :num_samples]

  def sample(self, tokens, seconds: float, **kw) -> np.ndarray:
    """Bridge tokens (B, Q, D) -> waveforms (B, round(seconds * rate)) at the VAE rate, float32; `kw` as `latents`."""
    return self.decode(self.latents(tokens, seconds, **kw), seconds)

  def reconstruct(self, audio_bt: np.ndarray) -> np.ndarray:
    """Audio (B, T) at the VAE rate -> decode(posterior mean of encode): what the VAE alone keeps."""
    wav = np.asarray(self._decode(self.params["vae"], self._encode(self.params["vae"], audio_bt)), np.float32)
    if wav.shape[1] < audio_bt.shape[1]:
      wav = np.pad(wav, ((0, 0), (0, audio_bt.shape[1] - wav.shape[1])))
    return wav[:, :audio_bt.shape[1]]

  def __call__(self, speech: list[np.ndarray], seconds: float, **kw) -> np.ndarray:
    return self.sample(self.tokens(speech), seconds, **kw)


def write_wav(path: str, wav: np.ndarray, rate_hz: int) -> None:
  """16-bit PCM; samples beyond [-1, 1] are clipped (with a warning)."""
  import soundfile as sf
  if np.max(np.abs(wav)) > 1.0:
    log.warning("%s: clipping samples beyond [-1, 1] (peak %.2f)", path, float(np.max(np.abs(wav))))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sf.write(path, np.clip(wav, -1.0, 1.0), rate_hz, subtype="PCM_16")


def _inputs(speech: str, out: str) -> list[tuple[str, str]]:
  """(input, output) pairs: one file, or every audio file of a folder into the --out folder."""
  if not os.path.isdir(speech):
    if os.path.isdir(out):
      out = os.path.join(out, os.path.splitext(os.path.basename(speech))[0] + ".wav")
    return [(speech, out)]
  files = sorted(f for f in os.listdir(speech) if f.lower().endswith(AUDIO_EXTENSIONS))
  if not files:
    raise UserError(f"{speech}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in the folder")
  if os.path.splitext(out)[1].lower() == ".wav":
    raise UserError(f"--speech is a folder, so --out must be a folder, not the file {out}")
  return [(os.path.join(speech, f), os.path.join(out, os.path.splitext(f)[0] + ".wav")) for f in files]


def run(args: argparse.Namespace) -> int:
  from tqdm.auto import tqdm

  pairs = _inputs(args.speech, args.out)
  speech = [read_speech(p, args.max_speech_seconds) for p, _ in pairs]  # all inputs checked before any work
  gen = Generator(args.ckpt)
  seconds = float(args.seconds or gen.cfg.data.audio_duration_s)
  if not 0 < seconds <= 600:
    raise UserError(f"--seconds {seconds:g}: choose a length between 0 and 600 s")
  bs = max(1, int(args.batch_size))
  for i in tqdm(range(0, len(pairs), bs), desc="generate", unit="batch", disable=len(pairs) <= bs,
                file=sys.stderr):
    wavs = gen(speech[i:i + bs], seconds, steps=args.steps, cfg_scale=args.cfg, sway=args.sway,
               seed=args.seed + i)
    for (_, out), wav in zip(pairs[i:i + bs], wavs):
      write_wav(out, wav, gen.sample_rate_hz)
      print(f"star-jax generate: wrote {out} ({seconds:g} s at {gen.sample_rate_hz} Hz)")
  return 0
