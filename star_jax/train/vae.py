"""The `vae` stage: the Oobleck VAE trained on audio with a multi-resolution STFT loss plus a small KL
to N(0, I) (DESIGN.md §1; the adversarial and feature-matching terms of Stable Audio are not used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from star_jax.errors import UserError
from star_jax.models import build as build_lib
from star_jax.models import mel_codec
from star_jax.train.stage import Stage


def stft_magnitude(wav_bt: jax.Array, n_fft: int) -> jax.Array:
  """|STFT| with a Hann window, hop n_fft/4, frames centred on every hop -> (B, 1 + T // hop, n_fft/2+1)."""
  hop = n_fft // 4
  return jnp.abs(mel_codec.stft(wav_bt.astype(jnp.float32), n_fft, hop, 1 + wav_bt.shape[1] // hop))


def multi_resolution_stft_loss(pred_bt: jax.Array, target_bt: jax.Array, windows=(512, 256, 128, 64),
                               eps: float = 1e-5) -> jax.Array:
  """Mean over resolutions of spectral convergence + L1 of log magnitudes (Yamamoto et al. 2020)."""
  total = 0.0
  for n_fft in windows:
    p, t = stft_magnitude(pred_bt, n_fft), stft_magnitude(target_bt, n_fft)
    convergence = jnp.linalg.norm((t - p).reshape(-1)) / (jnp.linalg.norm(t.reshape(-1)) + eps)
    log_mag = jnp.mean(jnp.abs(jnp.log(t + eps) - jnp.log(p + eps)))
    total = total + convergence + log_mag
  return total / len(windows)


def fit_length(x_bt: jax.Array, length: int) -> jax.Array:
  """Crop or zero-pad the time axis to `length` (the decoder's output can be a few samples short)."""
  if x_bt.shape[1] >= length:
    return x_bt[:, :length]
  return jnp.pad(x_bt, ((0, 0), (0, length - x_bt.shape[1])))


def random_crop(wav_bt: jax.Array, mask_bt: jax.Array, length: int, rng: jax.Array):
  """A window of `length` samples per example, starting inside its valid part -> (wav, mask), (B, length)."""
  valid = mask_bt.sum(-1).astype(jnp.int32)
  starts = jax.random.randint(rng, valid.shape, 0, jnp.maximum(valid - length, 0) + 1)
  starts = jnp.minimum(starts, wav_bt.shape[1] - length)
  cut = jax.vmap(lambda x, s: jax.lax.dynamic_slice(x, (s,), (length,)))
  return cut(wav_bt, starts), cut(mask_bt, starts)


def build(cfg, data=None) -> Stage:
  from star_jax.models.vae import posterior_kl

  hp = cfg.vae_stage
  if not build_lib.vae_trained(cfg):
    raise UserError(f"vae.kind is '{build_lib.vae_kind(cfg)}': a fixed codec with nothing to train; the flow "
                    f"stages use it as it is (set vae.kind=oobleck to train a VAE)")
  vae = build_lib.vae(cfg)
  windows = tuple(int(w) for w in hp.stft_windows)
  hop = build_lib.vae_hop(cfg)
  # Train on short random windows (the VAE is convolutional): whole-clip steps cost crop/clip times more.
  crop = int(round(float(hp.get("crop_s", 0.0)) * cfg.vae.sample_rate_hz / hop)) * hop

  def init(rng):
    return {"params": {"vae": vae.init(rng, jnp.zeros((1, 4 * build_lib.vae_hop(cfg))))["params"]},
            "frozen": {}}

  def loss(params, frozen, batch, rng):
    r_crop, r_posterior = jax.random.split(rng)
    wav, mask = batch["audio"], batch["audio_mask"]
    if not hp.get("mask_padding", True):  # padding is the clip's silence: reconstruct it too
      mask = jnp.ones_like(mask)
    if 0 < crop < wav.shape[1]:
      wav, mask = random_crop(wav, mask, crop, r_crop)
    mask = mask.astype(jnp.float32)
    wav = wav * mask
    recon, mean, std = vae.apply({"params": params["vae"]}, wav, r_posterior)
    recon = fit_length(recon, wav.shape[1]) * mask
    stft = multi_resolution_stft_loss(recon, wav, windows, eps=float(hp.get("log_mag_eps", 1e-5)))
    kl = posterior_kl(mean, std)
    return stft + float(hp.kl_weight) * kl, {"stft": stft, "kl": kl}

  return Stage(name="vae", hparams=hp, init=init, loss=loss, batch_keys=("audio", "audio_mask"))
