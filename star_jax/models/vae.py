"""Stable Audio's "Oobleck" VAE (DESIGN.md §2): SnakeBeta, dilated residual units, strided / transposed convs.

Same math as `diffusers.AutoencoderOobleck`, channels-last: waveforms are (B, T) (or (B, T, A) for A > 1
audio channels), latents (B, L, C). Weight norm is folded into plain kernels (K, C_in, C_out) at conversion.

  vae = OobleckVAE(cfg)
  mean_bld, std_bld = vae.apply({"params": p}, wav_bt, method="encode")
  wav_bt = vae.apply({"params": p}, latents_bld, method="decode")

Lengths: a clip of `n * hop_length(cfg)` samples encodes to exactly n latents (`latent_length`); n latents
decode to `decoded_length(cfg, n)` samples, which is `n * hop` when every stride is even (each odd stride
s loses one sample at its level, as in the reference).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from star_jax.models.layers import Dtype, SnakeBeta, as_dtype, constrain, zeros

# torch's Conv1d default (kaiming_uniform with a = sqrt(5)) is U(±1/sqrt(fan_in)).
conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
ACT = ("batch", "length", None)  # activation layout: data-parallel over batch, channels replicated


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Oobleck sizes; `models.build.vae_config(cfg)` makes one from a config's `vae` section."""
  sample_rate_hz: int = 24000
  audio_channels: int = 1
  encoder_hidden_size: int = 128
  decoder_channels: int = 128
  channel_multiples: tuple[int, ...] = (1, 2, 4, 8)
  downsampling_ratios: tuple[int, ...] = (2, 4, 6, 10)
  latent_channels: int = 128   # decoder input and posterior width
  posterior_channels: int = 0  # posterior width if it differs from latent_channels (diffusers allows it)
  dtype: str = "float32"       # compute dtype of convs (params and accumulation stay f32)

  def __post_init__(self):
    object.__setattr__(self, "channel_multiples", tuple(self.channel_multiples))
    object.__setattr__(self, "downsampling_ratios", tuple(self.downsampling_ratios))
    if len(self.channel_multiples) != len(self.downsampling_ratios):
      raise ValueError(f"vae: {len(self.channel_multiples)} channel_multiples but "
                       f"{len(self.downsampling_ratios)} downsampling_ratios; they pair up block by block")

  @property
  def encoder_latent_channels(self) -> int:
    return self.posterior_channels or self.latent_channels


def hop_length(cfg: VAEConfig) -> int:
  """Samples per latent frame: the product of the strides (480 at 24 kHz -> 50 frames/s)."""
  return math.prod(cfg.downsampling_ratios)


def _pad(stride: int) -> int:
  return math.ceil(stride / 2)


def latent_length(cfg: VAEConfig, num_samples: int) -> int:
  """Latent frames that `encode` gives for `num_samples` samples (= num_samples / hop for a multiple of hop)."""
  n = num_samples
  for s in cfg.downsampling_ratios:
    n = (n + 2 * _pad(s) - 2 * s) // s + 1
  return n


def decoded_length(cfg: VAEConfig, num_latents: int) -> int:
  """Samples that `decode` gives for `num_latents` frames: n·hop minus one per odd stride level, scaled."""
  n = num_latents
  for s in reversed(cfg.downsampling_ratios):
    n = n * s + s - 2 * _pad(s)
  return n


CONV_AXES = (None, "conv_in", "conv_out")  # kernel (K, C_in, C_out); the audio-channel side stays unsharded


def _kernel(module: nn.Module, shape: tuple[int, ...], axes=CONV_AXES) -> jax.Array:
  return module.param("kernel", nn.with_logical_partitioning(conv_init, axes), shape, jnp.float32)


def _bias(module: nn.Module, features: int, axis: str | None = "conv_out") -> jax.Array:
  return module.param("bias", nn.with_logical_partitioning(zeros, (axis,)), (features,), jnp.float32)


class Conv(nn.Module):
  """1-D conv, channels-last: (B, T, C_in) -> (B, T', features) in f32; kernel (K, C_in, C_out).

  Symmetric zero padding `padding`; inputs in `dtype`, f32 accumulation.
  """
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  axes: tuple[str | None, ...] = CONV_AXES

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = _kernel(self, (self.kernel_size, x.shape[-1], self.features), self.axes)
    # XLA's CPU convolution runs these shapes at the f32 matmul rate; an im2col matmul (shifted slices
    # + one dot) measured 1.5-2.5x slower in f32 and no faster in bf16 (bench/RESULTS.md).
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,), [(self.padding, self.padding)],
        rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
        preferred_element_type=jnp.float32)
    if self.use_bias:
      y = y + _bias(self, self.features, self.axes[2])
    return y


class ConvTransposeUp(nn.Module):
  """torch ConvTranspose1d(k=2s, stride s, padding ceil(s/2)), channels-last: (B, L, C) -> (B, L·s + s − 2p, F).

  Kernel (2s, C_in, C_out): tap j of input frame l lands on output l·s + j − p. Computed polyphase, as one
  matmul: output frame block m (s samples) = x[m] @ W[:s] + x[m−1] @ W[s:], then cropped by p on each side.
  """
  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s, (b, length, c) = self.stride, x.shape
    kernel = _kernel(self, (2 * s, c, self.features))
    # (2s, C, F) -> rows [W[:s] | W[s:]] as (2C, s·F), column r·F + f is phase r of output channel f.
    w = kernel.reshape(2, s, c, self.features).transpose(0, 2, 1, 3).reshape(2 * c, s * self.features)
    x = x.astype(self.dtype)
    x_pairs = jnp.concatenate([jnp.pad(x, ((0, 0), (0, 1), (0, 0))),   # x[m]
                               jnp.pad(x, ((0, 0), (1, 0), (0, 0)))],  # x[m - 1]
                              axis=-1)
    y = jax.lax.dot_general(x_pairs, w.astype(self.dtype), (((2,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    y = y.reshape(b, (length + 1) * s, self.features)
    p = _pad(s)
    y = y[:, p:(length + 1) * s - p]
    return y + _bias(self, self.features)


class ResidualUnit(nn.Module):
  """x + conv_k1(snake(conv_k7_dilated(snake(x)))), length-preserving."""
  dilation: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    h = SnakeBeta(name="snake1")(x)
    h = Conv(c, 7, dilation=self.dilation, padding=3 * self.dilation, dtype=self.dtype, name="conv1")(h)
    h = SnakeBeta(name="snake2")(h)
    h = Conv(c, 1, dtype=self.dtype, name="conv2")(h)
    return constrain(x + h, ACT)


class EncoderBlock(nn.Module):
  """Residual units (dilations 1, 3, 9) -> snake -> conv k=2s, stride s: (B, T, C) -> (B, T/s, features)."""
  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j, dilation in enumerate((1, 3, 9)):
      x = ResidualUnit(dilation, self.dtype, name=f"res_{j}")(x)
    x = SnakeBeta(name="snake")(x)
    x = Conv(self.features, 2 * self.stride, stride=self.stride, padding=_pad(self.stride), dtype=self.dtype,
             name="conv")(x)
    return constrain(x, ACT)


class DecoderBlock(nn.Module):
  """Snake -> transposed conv k=2s, stride s -> residual units (1, 3, 9): (B, L, C) -> (B, ~L·s, features)."""
  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = SnakeBeta(name="snake")(x)
    x = constrain(ConvTransposeUp(self.features, self.stride, self.dtype, name="conv_t")(x), ACT)
    for j, dilation in enumerate((1, 3, 9)):
      x = ResidualUnit(dilation, self.dtype, name=f"res_{j}")(x)
    return x


class Encoder(nn.Module):
  """(B, T, A) -> (B, L, 2·P) = mean ‖ scale: conv k7 -> blocks -> snake -> conv k3."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, wav_bta: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    widths = [cfg.encoder_hidden_size * m for m in (1,) + cfg.channel_multiples]
    x = Conv(widths[0], 7, padding=3, dtype=dtype, axes=(None, None, "conv_out"), name="conv_in")(wav_bta)
    for i, s in enumerate(cfg.downsampling_ratios):
      x = EncoderBlock(widths[i + 1], s, dtype, name=f"block_{i}")(x)
    x = SnakeBeta(name="snake_out")(x)
    return Conv(2 * cfg.encoder_latent_channels, 3, padding=1, dtype=dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """(B, L, C) -> (B, T, A): conv k7 -> blocks (strides reversed) -> snake -> conv k7 without bias, no tanh."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, latents_bld: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    widths = [cfg.decoder_channels * m for m in (1,) + cfg.channel_multiples]
    x = Conv(widths[-1], 7, padding=3, dtype=dtype, name="conv_in")(latents_bld)
    n = len(cfg.downsampling_ratios)
    for i, s in enumerate(reversed(cfg.downsampling_ratios)):
      x = DecoderBlock(widths[n - 1 - i], s, dtype, name=f"block_{i}")(x)
    x = SnakeBeta(name="snake_out")(x)
    return Conv(cfg.audio_channels, 7, padding=3, use_bias=False, dtype=dtype, axes=(None, "conv_in", None),
                name="conv_out")(x)


class OobleckVAE(nn.Module):
  """The VAE: `encode` (wav -> posterior mean, std), `decode` (latents -> wav), `__call__` = both."""
  cfg: VAEConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def encode(self, wav_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, T) or (B, T, A) waveform -> posterior (mean, std), each (B, L, P); std = softplus(scale) + 1e-4."""
    if wav_bt.ndim == 2:
      wav_bt = wav_bt[..., None]
    h = self.encoder(constrain(wav_bt, ACT))
    mean, scale = jnp.split(h, 2, axis=-1)
    return mean, jax.nn.softplus(scale) + 1e-4

  def decode(self, latents_bld: jax.Array) -> jax.Array:
    """(B, L, C) latents -> waveform (B, decoded_length(cfg, L)), or (B, T, A) when A > 1, f32."""
    wav = self.decoder(constrain(latents_bld, ACT))
    return wav[..., 0] if self.cfg.audio_channels == 1 else wav

  def __call__(self, wav_bt: jax.Array, rng: jax.Array | None = None):
    """Reconstruct: encode, sample the posterior (its mean without `rng`), decode -> (wav, mean, std)."""
    mean, std = self.encode(wav_bt)
    latents = mean if rng is None else sample_posterior(rng, mean, std)
    return self.decode(latents), mean, std


def sample_posterior(rng: jax.Array, mean_bld: jax.Array, std_bld: jax.Array) -> jax.Array:
  """A draw mean + std · ε from the diagonal Gaussian posterior (DESIGN.md: encoding samples it)."""
  return mean_bld + std_bld * jax.random.normal(rng, mean_bld.shape, mean_bld.dtype)


def posterior_kl(mean_bld: jax.Array, std_bld: jax.Array) -> jax.Array:
  """KL(posterior ‖ N(0, I)) as diffusers computes it: sum over channels, mean over batch and frames."""
  var = jnp.square(std_bld)
  return jnp.mean(jnp.sum(jnp.square(mean_bld) + var - jnp.log(var) - 1.0, axis=-1))
