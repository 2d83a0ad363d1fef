"""Speech in, sound out: HuBERT -> bridge -> flow-matching DiT (Euler, sway, CFG) -> VAE decoder.

  star-jax generate --ckpt outputs/tiny/bundle --speech query.wav --out sound.wav [--steps 20 --cfg 5
      --sway -1 --seed 0 --seconds 10]
  star-jax generate --ckpt outputs/tiny/meanflow_bundle --speech query.wav --out sound.wav --steps 1
  star-jax generate --ckpt BUNDLE --speech queries/ --out sounds/        # every audio file in a folder
  star-jax generate --ckpt BUNDLE --speech q.wav --out s.wav --init-noise z1.npy --float   # reproduce a sample

A bundle whose DiT was fine-tuned by the `meanflow` stage samples with the mean-flow sampler (1, 2 or 4 steps of
one pass each, guidance folded in by training; `--cfg` does not apply); any other with Euler + CFG. The sampler
loop and the VAE decode run as one compiled program.

Any sample rate and channel count is accepted (resampled to 16 kHz, mixed down). Unreadable, empty,
silent or over-long input is an error naming the file (exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
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
  p.add_argument("--steps", type=int, default=None,
                 help="sampler steps (default: flow.num_steps, or meanflow.num_steps for a mean-flow bundle)")
  p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: config)")
  p.add_argument("--sway", type=float, default=None, help="sway sampling coefficient (default: config, -1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--seconds", type=float, default=None, help="output length (default: the training clips')")
  p.add_argument("--batch-size", type=int, default=8, help="queries generated together in folder mode")
  p.add_argument("--max-speech-seconds", type=float, default=60.0, help="longer speech input is an error")
  p.add_argument("--init-noise", default=None,
                 help="a .npy of the starting latent noise, (frames, channels) for every query or (queries, frames, "
                      "channels), instead of --seed's; its frames set the length (to reproduce another run's sample)")
  p.add_argument("--float", action="store_true",
                 help="write float32 wav: the VAE decoder's output as it is (default: 16-bit PCM, clipped to [-1, 1])")


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


def generation_programs(dit, vae, latent_scale: float):
  """Two jitted programs over one sampler loop (mean-flow when `dit.cfg.mean_flow`, else Euler + CFG):
  `latents(dit_params, noise (B, L, C), tokens (B, Q, D), num_steps, guided, cfg_scale, sway)` -> latents in the
  VAE's space, and `generate(dit_params, vae_params, noise, tokens, num_steps, guided, cfg_scale, sway)` ->
  waveforms (B, T), the loop and the VAE decode in one program. Each compiles once per (shapes, num_steps, guided)."""
  import jax

  from star_jax import flow
  from star_jax.models.dit import sampler_fns

  prepare, velocity = sampler_fns(dit.cfg)

  def latents(dit_params, noise_bld, tokens_bqd, num_steps, guided, cfg_scale, sway):
    variables = {"params": dit_params}
    if dit.cfg.mean_flow:
      z = flow.mean_flow_sample(velocity, variables, noise_bld, tokens_bqd, num_steps=num_steps,
                                sway_coef=sway, prepare_context=prepare)
    else:
      z = flow.sample(velocity, variables, noise_bld, tokens_bqd, num_steps=num_steps,
                      cfg_scale=cfg_scale if guided else None, sway_coef=sway, prepare_context=prepare)
    return z / latent_scale  # the DiT's space -> the VAE's

  def generate(dit_params, vae_params, noise_bld, tokens_bqd, num_steps, guided, cfg_scale, sway):
    z = latents(dit_params, noise_bld, tokens_bqd, num_steps, guided, cfg_scale, sway)
    return vae.apply({"params": vae_params}, z, method="decode")

  return jax.jit(latents, static_argnums=(3, 4)), jax.jit(generate, static_argnums=(4, 5))


class Generator:
  """A loaded bundle: `tokens(speech list)` -> (B, Q, D), `sample(tokens, ...)` -> waveforms, or its two halves
  `latents` and `decode`. `mean_flow`: the DiT is a mean-flow one (trained by the `meanflow` stage)."""

  def __init__(self, bundle_dir: str):
    import jax

    from star_jax.export import load_bundle
    from star_jax.models import build
    from star_jax.models.dit import DiT
    from star_jax.models.layers import cast_kernels

    self.cfg, params = load_bundle(bundle_dir)
    self.params = jax.device_put(params)
    cfg = self.cfg
    self.hubert, self.bridge = build.hubert(cfg), build.bridge(cfg)
    self.mean_flow = "interval_embed_1" in self.params["dit"]
    self.dit = DiT(dataclasses.replace(build.dit_config(cfg), mean_flow=self.mean_flow))
    self.params["dit"] = cast_kernels(self.params["dit"], self.dit.cfg.dtype)  # no per-call cast
    self.vae = build.vae(cfg)  # Oobleck, or the fixed mel codec (no params)
    self.vae_params = self.params.get("vae", {})
    if self.vae_params:  # Oobleck: its kernels held in its compute dtype too
      self.vae_params = self.params["vae"] = cast_kernels(self.vae_params, self.vae.cfg.dtype)
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
    self._latents, self._generate = generation_programs(self.dit, self.vae, self.latent_scale)

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

  def _options(self, steps, cfg_scale, sway) -> tuple[int, bool, float, float]:
    """(steps, guided, cfg_scale, sway) for the sampler. A mean-flow bundle: `steps` default meanflow.num_steps, a
    uniform grid unless `sway`, no `cfg_scale` (its guidance w was fixed in training; a given one is ignored)."""
    f = self.cfg.flow
    if self.mean_flow:
      if cfg_scale is not None:
        log.warning("cfg_scale %g ignored: this bundle's mean-flow DiT has its guidance (w = %g) from training",
                    cfg_scale, self.cfg.meanflow.cfg_scale)
      return int(steps or self.cfg.meanflow.num_steps), False, 1.0, 0.0 if sway is None else float(sway)
    return (int(steps or f.num_steps), True, float(f.cfg_scale if cfg_scale is None else cfg_scale),
            float(f.sway_coef if sway is None else sway))

  def noise(self, batch: int, seconds: float, seed: int | Sequence[int] = 0, noise: np.ndarray | None = None):
    """The sampler's start (B, L, C): `noise` when given (L = the frames `seconds` needs), else N(0, I) from `seed`,
    one int for the batch or one per row (row i then starts where a batch of one with seed[i] starts)."""
    import jax
    import jax.numpy as jnp

    shape = (batch, math.ceil(int(round(seconds * self.sample_rate_hz)) / self.hop), int(self.cfg.vae.latent_channels))
    if noise is not None:
      if tuple(noise.shape) != shape:
        raise UserError(f"initial noise of shape {tuple(noise.shape)}; {seconds:g} s for {batch} queries needs {shape}")
      return jnp.asarray(noise, jnp.float32)
    if np.ndim(seed) == 0:
      return jax.random.normal(jax.random.PRNGKey(int(seed)), shape)
    return jnp.concatenate([jax.random.normal(jax.random.PRNGKey(int(s)), (1, *shape[1:])) for s in seed])

  def latents(self, tokens, seconds: float, *, steps: int | None = None, cfg_scale: float | None = None,
              sway: float | None = None, seed: int | Sequence[int] = 0, noise: np.ndarray | None = None):
    """Bridge tokens (B, Q, D) -> latents (B, L, C) in the VAE's space for `seconds` of audio."""
    import jax.numpy as jnp

    steps, guided, guidance, sway = self._options(steps, cfg_scale, sway)
    return self._latents(self.params["dit"], self.noise(tokens.shape[0], seconds, seed, noise), tokens, steps,
                         guided, jnp.float32(guidance), jnp.float32(sway))

  def decode(self, latents, seconds: float) -> np.ndarray:
    """Latents (B, L, C) from `latents` -> waveforms (B, round(seconds * rate)) at the VAE rate, float32."""
    return _fit(np.asarray(self._decode(self.vae_params, latents), np.float32), round(seconds * self.sample_rate_hz))

  def sample(self, tokens, seconds: float, *, steps: int | None = None, cfg_scale: float | None = None,
             sway: float | None = None, seed: int | Sequence[int] = 0, noise: np.ndarray | None = None) -> np.ndarray:
    """Bridge tokens (B, Q, D) -> waveforms (B, round(seconds * rate)) at the VAE rate, float32: `latents` then
    `decode` as one program. The start is `noise` (B, L, C) when given, else N(0, I) from `seed`."""
    import jax.numpy as jnp

    steps, guided, guidance, sway = self._options(steps, cfg_scale, sway)
    wav = self._generate(self.params["dit"], self.vae_params, self.noise(tokens.shape[0], seconds, seed, noise),
                         tokens, steps, guided, jnp.float32(guidance), jnp.float32(sway))
    return _fit(np.asarray(wav, np.float32), round(seconds * self.sample_rate_hz))

  def reconstruct(self, audio_bt: np.ndarray) -> np.ndarray:
    """Audio (B, T) at the VAE rate -> decode(posterior mean of encode): what the VAE alone keeps."""
    wav = np.asarray(self._decode(self.vae_params, self._encode(self.vae_params, audio_bt)), np.float32)
    return _fit(wav, audio_bt.shape[1])

  def __call__(self, speech: list[np.ndarray], seconds: float, **kw) -> np.ndarray:
    return self.sample(self.tokens(speech), seconds, **kw)


def _fit(wav_bt: np.ndarray, num_samples: int) -> np.ndarray:
  """Zero-pad or cut waveforms to `num_samples`."""
  if wav_bt.shape[1] < num_samples:
    wav_bt = np.pad(wav_bt, ((0, 0), (0, num_samples - wav_bt.shape[1])))
  return wav_bt[:, :num_samples]


def fit_to_pcm(wav: np.ndarray) -> np.ndarray:
  """A clip whose peak exceeds 1 scaled down to peak 1, others as they are: 16-bit PCM holds [-1, 1], and
  clipping a loud clip (high guidance overshoots the level) would distort it where scaling keeps its shape."""
  peak = float(np.max(np.abs(wav))) if np.size(wav) else 0.0
  return np.asarray(wav, np.float32) / peak if peak > 1.0 else np.asarray(wav, np.float32)


def write_wav(path: str, wav: np.ndarray, rate_hz: int, as_float: bool = False) -> None:
  """16-bit PCM, a clip peaking beyond [-1, 1] scaled down to fit (`fit_to_pcm`); or `as_float`: float32, as
  they are."""
  import soundfile as sf
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if as_float:
    sf.write(path, np.asarray(wav, np.float32), rate_hz, subtype="FLOAT")
    return
  sf.write(path, fit_to_pcm(wav), rate_hz, subtype="PCM_16")


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


def read_init_noise(path: str, num_queries: int, channels: int) -> np.ndarray:
  """--init-noise: a .npy of (frames, channels), used for every query, or (queries, frames, channels) -> (N, L, C)."""
  try:
    noise = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable .npy array ({e})") from e
  if noise.ndim == 2:
    noise = np.broadcast_to(noise, (num_queries,) + noise.shape)
  if noise.ndim != 3 or noise.shape[0] != num_queries or noise.shape[2] != channels:
    raise UserError(f"{path}: noise of shape {noise.shape}; expected (frames, {channels}) or ({num_queries}, frames, "
                    f"{channels}) for {num_queries} queries and a VAE of {channels} latent channels")
  return np.asarray(noise, np.float32)


def run(args: argparse.Namespace) -> int:
  from tqdm.auto import tqdm

  pairs = _inputs(args.speech, args.out)
  speech = [read_speech(p, args.max_speech_seconds) for p, _ in pairs]  # all inputs checked before any work
  gen = Generator(args.ckpt)
  noise = None
  if args.init_noise:
    noise = read_init_noise(args.init_noise, len(pairs), int(gen.cfg.vae.latent_channels))
    frames_s = noise.shape[1] * gen.hop / gen.sample_rate_hz
    if args.seconds and math.ceil(args.seconds * gen.sample_rate_hz / gen.hop) != noise.shape[1]:
      raise UserError(f"--seconds {args.seconds:g} needs {math.ceil(args.seconds * gen.sample_rate_hz / gen.hop)} "
                      f"latent frames; {args.init_noise} has {noise.shape[1]} ({frames_s:g} s)")
  seconds = float(args.seconds or (frames_s if noise is not None else gen.cfg.data.audio_duration_s))
  if not 0 < seconds <= 600:
    raise UserError(f"--seconds {seconds:g}: choose a length between 0 and 600 s")
  bs = max(1, int(args.batch_size))
  for i in tqdm(range(0, len(pairs), bs), desc="generate", unit="batch", disable=len(pairs) <= bs,
                file=sys.stderr):
    wavs = gen(speech[i:i + bs], seconds, steps=args.steps, cfg_scale=args.cfg, sway=args.sway,
               seed=args.seed + i, noise=None if noise is None else noise[i:i + bs])
    for (_, out), wav in zip(pairs[i:i + bs], wavs):
      write_wav(out, wav, gen.sample_rate_hz, as_float=args.float)
      print(f"star-jax generate: wrote {out} ({seconds:g} s at {gen.sample_rate_hz} Hz)")
  return 0
