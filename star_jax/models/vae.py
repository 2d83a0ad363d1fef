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
import functools
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

  Symmetric zero padding `padding`; inputs in `dtype`, f32 accumulation. `taps_as_dots` (stride 1 only)
  computes it as one matmul per kernel tap over shifted slices, summed: the time-tiled residual units' form
  on CPU, where XLA's convolution runs bf16 at the f32 rate but its matmuls run at the bf16 rate.
  """
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  axes: tuple[str | None, ...] = CONV_AXES
  taps_as_dots: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = _kernel(self, (self.kernel_size, x.shape[-1], self.features), self.axes)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.taps_as_dots and self.stride == 1:
      x = jnp.pad(x, ((0, 0), (self.padding, self.padding), (0, 0)))
      length = x.shape[1] - self.dilation * (self.kernel_size - 1)
      shifted = lambda a, k: a[:, k * self.dilation:k * self.dilation + length]
      if self.kernel_size * self.features <= 64:  # a few outputs (the last conv): one dot, then shifted sums
        z = jax.lax.dot_general(x, kernel, (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        y = sum(shifted(z[:, :, k], k) for k in range(self.kernel_size))  # z: (B, T, K, F)
      else:
        y = sum(jax.lax.dot_general(shifted(x, k), kernel[k], (((2,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32) for k in range(self.kernel_size))
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.stride,), [(self.padding, self.padding)], rhs_dilation=(self.dilation,),
          dimension_numbers=("NWC", "WIO", "NWC"), preferred_element_type=jnp.float32)
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
  def __call__(self, x: jax.Array, crop: bool = True) -> jax.Array:
    """crop=False: x holds input frames m0−1 … m0+n−1 and the result is output blocks m0 … m0+n−1, uncropped
    ((B, n·s, F); block m is output m·s − p …); the time-tiled decoder block reads it one window at a time."""
    s, c = self.stride, x.shape[-1]
    kernel = _kernel(self, (2 * s, c, self.features))
    # (2s, C, F) -> rows [W[:s] | W[s:]] as (2C, s·F), column r·F + f is phase r of output channel f.
    w = kernel.reshape(2, s, c, self.features).transpose(0, 2, 1, 3).reshape(2 * c, s * self.features)
    x = x.astype(self.dtype)
    if crop:
      x = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))  # frames −1 … L: blocks 0 … L
    x_pairs = jnp.concatenate([x[:, 1:], x[:, :-1]], axis=-1)  # x[m] ‖ x[m − 1]
    y = jax.lax.dot_general(x_pairs, w.astype(self.dtype), (((2,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    y = y.reshape(x.shape[0], x_pairs.shape[1] * s, self.features)
    if crop:
      p = _pad(s)
      y = y[:, p:y.shape[1] - p]
    return y + _bias(self, self.features)


class ResidualUnit(nn.Module):
  """x + conv_k1(snake(conv_k7_dilated(snake(x)))), length-preserving.

  With `with_halo` (a time tile, on CPU), x carries 3·dilation extra frames on each side (the neighbours, or
  zeros past the ends) and the result is the unit over the frames between them: (B, L + 6·dilation, C) ->
  (B, L, C), its convs as matmuls (`Conv.taps_as_dots`).
  """
  dilation: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, with_halo: bool = False) -> jax.Array:
    c, halo = x.shape[-1], 3 * self.dilation
    h = SnakeBeta(name="snake1")(x)
    h = Conv(c, 7, dilation=self.dilation, padding=0 if with_halo else halo, dtype=self.dtype,
             taps_as_dots=with_halo, name="conv1")(h)
    h = SnakeBeta(name="snake2")(h)
    h = Conv(c, 1, dtype=self.dtype, taps_as_dots=with_halo, name="conv2")(h)
    if with_halo:
      return x[:, halo:x.shape[1] - halo] + h
    return constrain(x + h, ACT)


@functools.cache
def cpu_has_bf16_dot(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this host's CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read
  from Linux's `cpuinfo`; False where that cannot be read. Without them XLA's CPU matmuls convert bf16 to f32 and
  run below their f32 rate, and the VAE's time tiles are slower than XLA's convolution (bench/RESULTS.md)."""
  try:
    with open(cpuinfo) as f:
      words = set(f.read().split())
  except OSError:
    return False
  return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def residual_tile(requested: int | None, length: int, channels: int, stride: int = 1,
                  dtype: Dtype = jnp.bfloat16) -> int:
  """Frames per tile of a block's residual units over `length` frames of `channels`, a multiple of the block's
  upsampling `stride`: `requested` (rounded up to one; 0 = untiled), else in bf16 on a CPU with bf16 dot
  instructions (`cpu_has_bf16_dot`), for activations of 8 MB and more, 1025-2048 frames (the tile's activations
  stay in cache and its 2 x 39 halo frames cost a few percent; the best measured at every level of the paper
  decoder, bench/RESULTS.md), a divisor of `length` where there is one; else 0. (In f32, and in bf16 on a CPU
  without those instructions, XLA's convolution is faster than the tiles.)"""
  if requested is not None:
    return -(-requested // stride) * stride
  if (jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.bfloat16
      or length * channels * 4 < 2 ** 23 or not cpu_has_bf16_dot()):
    return 0
  target = 2048
  near = (t for t in range(target, target // 2, -1) if length % t == 0 and t % stride == 0)
  return next(near, target - target % stride)


DILATIONS = (1, 3, 9)  # each block's residual units
HALO = 3 * sum(DILATIONS)  # frames on each side that a block's three units read: 39


def _residual_units(block: nn.Module, x: jax.Array) -> jax.Array:
  """`block.res` in turn over (B, T, C), untiled."""
  for unit in block.res:
    x = unit(x)
  return x


def _tiled_units(block: nn.Module, window, length: int) -> jax.Array:
  """`block.res` over a sequence of `length` frames, one time tile of `block.tile` frames at a time, all three
  units per tile, so that the tile's activations stay in cache between the units. `window(mdl, i)` gives the
  units' input at frames i·tile − HALO … i·tile + tile + HALO (any values past the ends: they are zeroed here,
  as the convs' zero padding would make them, and again between the units). Same math as untiled."""
  tile = block.tile

  def zero_past_ends(w, start):  # start: the sequence position of w's first frame
    pos = start + jnp.arange(w.shape[1])
    return jnp.where(((pos >= 0) & (pos < length))[None, :, None], w, 0.0)

  def one_tile(mdl, carry, i):
    start = i * tile - HALO
    w = zero_past_ends(window(mdl, i), start)
    for j, unit in enumerate(mdl.res):
      w, start = unit(w, with_halo=True), start + 3 * unit.dilation
      if j < len(mdl.res) - 1:  # the last unit's frames past the end are cropped below
        w = zero_past_ends(w, start)
    return carry, w

  n = -(-length // tile)
  scan = nn.scan(one_tile, variable_broadcast="params", split_rngs={"params": False}, length=n)
  _, tiles = scan(block, None, jnp.arange(n))  # (n, B, tile, C)
  b, c = tiles.shape[1], tiles.shape[3]
  if b > 1:  # at batch 1 the tiles are already in time order (XLA copies even a size-1 transpose here)
    tiles = tiles.transpose(1, 0, 2, 3)
  return constrain(tiles.reshape(b, n * tile, c)[:, :length], ACT)


class EncoderBlock(nn.Module):
  """Residual units (dilations 1, 3, 9) -> snake -> conv k=2s, stride s: (B, T, C) -> (B, T/s, features)."""
  features: int
  stride: int
  dtype: Dtype = jnp.float32
  tile: int = 0  # time tile of the residual units (`residual_tile`); 0: untiled

  def setup(self):
    self.res = [ResidualUnit(d, self.dtype) for d in DILATIONS]
    self.snake = SnakeBeta()
    self.conv = Conv(self.features, 2 * self.stride, stride=self.stride, padding=_pad(self.stride),
                     dtype=self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    length = x.shape[1]
    if self.tile and length > self.tile:
      n = -(-length // self.tile)
      x_padded = jnp.pad(x, ((0, 0), (HALO, HALO + n * self.tile - length), (0, 0)))
      window = lambda mdl, i: jax.lax.dynamic_slice_in_dim(x_padded, i * self.tile, self.tile + 2 * HALO, 1)
      x = _tiled_units(self, window, length)
    else:
      x = _residual_units(self, x)
    return constrain(self.conv(self.snake(x)), ACT)


class DecoderBlock(nn.Module):
  """Snake -> transposed conv k=2s, stride s -> residual units (1, 3, 9): (B, L, C) -> (B, ~L·s, features)."""
  features: int
  stride: int
  dtype: Dtype = jnp.float32
  tile: int = 0  # time tile of the residual units (`residual_tile`); 0: untiled

  def setup(self):
    self.snake = SnakeBeta()
    self.conv_t = ConvTransposeUp(self.features, self.stride, self.dtype)
    self.res = [ResidualUnit(d, self.dtype) for d in DILATIONS]

  def __call__(self, x: jax.Array) -> jax.Array:
    s, p, frames = self.stride, _pad(self.stride), x.shape[1]
    length = frames * s + s - 2 * p
    if not (self.tile and length > self.tile):
      return _residual_units(self, constrain(self.conv_t(self.snake(x)), ACT))
    # Tiled: each tile upsamples its own window. Output u is uncropped u + p, in block (u + p) // s; the
    # window of tile i starts at u = i·tile − HALO, in block i·tile/s + first, `offset` samples in.
    first, offset = divmod(p - HALO, s)
    blocks = -(-(offset + self.tile + 2 * HALO) // s)
    n = -(-length // self.tile)
    front = 1 - first  # zero frames before frame 0, so that the first window's frame m0 − 1 exists
    back = max(0, (n - 1) * self.tile // s + first + blocks - frames)
    x_padded = jnp.pad(self.snake(x), ((0, 0), (front, back), (0, 0)))

    def window(mdl, i):
      frames_i = jax.lax.dynamic_slice_in_dim(x_padded, i * (self.tile // s) + first - 1 + front, blocks + 1, 1)
      return mdl.conv_t(frames_i, crop=False)[:, offset:offset + self.tile + 2 * HALO]

    return _tiled_units(self, window, length)


class Encoder(nn.Module):
  """(B, T, A) -> (B, L, 2·P) = mean ‖ scale: conv k7 -> blocks -> snake -> conv k3."""
  cfg: VAEConfig
  time_tile: int | None = None  # see `residual_tile`

  @nn.compact
  def __call__(self, wav_bta: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    widths = [cfg.encoder_hidden_size * m for m in (1,) + cfg.channel_multiples]
    x = Conv(widths[0], 7, padding=3, dtype=dtype, axes=(None, None, "conv_out"), name="conv_in")(wav_bta)
    for i, s in enumerate(cfg.downsampling_ratios):
      tile = residual_tile(self.time_tile, x.shape[1], widths[i], dtype=dtype)
      x = EncoderBlock(widths[i + 1], s, dtype, tile, name=f"block_{i}")(x)
    x = SnakeBeta(name="snake_out")(x)
    return Conv(2 * cfg.encoder_latent_channels, 3, padding=1, dtype=dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """(B, L, C) -> (B, T, A): conv k7 -> blocks (strides reversed) -> snake -> conv k7 without bias, no tanh."""
  cfg: VAEConfig
  time_tile: int | None = None  # see `residual_tile`

  @nn.compact
  def __call__(self, latents_bld: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    widths = [cfg.decoder_channels * m for m in (1,) + cfg.channel_multiples]
    x = Conv(widths[-1], 7, padding=3, dtype=dtype, name="conv_in")(latents_bld)
    n = len(cfg.downsampling_ratios)
    for i, s in enumerate(reversed(cfg.downsampling_ratios)):
      width = widths[n - 1 - i]
      tile = residual_tile(self.time_tile, x.shape[1] * s + s - 2 * _pad(s), width, s, dtype)
      x = DecoderBlock(width, s, dtype, tile, name=f"block_{i}")(x)
    x = SnakeBeta(name="snake_out")(x)
    # With the last block tiled (CPU), the last conv is one matmul to its 7 taps too (XLA's conv: 84 ms, 10 s).
    return Conv(cfg.audio_channels, 7, padding=3, use_bias=False, dtype=dtype, axes=(None, "conv_in", None),
                taps_as_dots=tile > 0, name="conv_out")(x)


class OobleckVAE(nn.Module):
  """The VAE: `encode` (wav -> posterior mean, std), `decode` (latents -> wav), `__call__` = both.

  `time_tile`: frames per tile of the residual units (`residual_tile`): None picks by backend, dtype and size;
  0 turns tiling off.
  """
  cfg: VAEConfig
  time_tile: int | None = None

  def setup(self):
    self.encoder = Encoder(self.cfg, self.time_tile)
    self.decoder = Decoder(self.cfg, self.time_tile)

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
