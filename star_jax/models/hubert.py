"""HuBERT speech encoder, the same math as `transformers.HubertModel` (DESIGN.md §2).

Both variants: base (post-LN, GroupNorm on conv 0, no conv bias) and large (`do_stable_layer_norm`:
pre-LN with a final LayerNorm, LayerNorm on every conv, conv bias). Output = `last_hidden_state`.

    hidden_btd, frame_mask_bt = Hubert(cfg).apply({"params": p}, waveform_bt, mask_bt)

Params stay f32; matmuls and convolutions take compute-dtype inputs with f32 accumulation. With bf16
inputs the strided feature-extractor convolutions run as matmuls over stride-sized sample blocks, which
XLA CPU runs faster than its bf16 convolution (see `strided_conv`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from star_jax.models.layers import Dense, LayerNorm, as_dtype, attention, constrain, mp_matmul, ones, zeros

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class HubertConfig:
  """Field names follow `transformers.HubertConfig` (`num_layers`/`num_heads` shortened)."""
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  conv_dim: Sequence[int] = (512,) * 7
  conv_kernel: Sequence[int] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: Sequence[int] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = "group"  # "group": GroupNorm on conv 0 only; "layer": LayerNorm on every conv
  feat_extract_activation: str = "gelu"
  feat_proj_layer_norm: bool = True
  do_stable_layer_norm: bool = False
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"
  normalize_waveform: bool = False  # STAR feeds the raw waveform (DESIGN.md §2)
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("conv_dim", "conv_kernel", "conv_stride"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
      raise ValueError(f"hubert: conv_dim, conv_kernel and conv_stride must have equal lengths, got "
                       f"{self.conv_dim}, {self.conv_kernel}, {self.conv_stride}")
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(f"hubert: feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
    for act in (self.hidden_act, self.feat_extract_activation):
      if act not in ACTIVATIONS:
        raise ValueError(f"hubert: unsupported activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_heads or self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError("hubert: hidden_size must be divisible by num_heads and num_conv_pos_embedding_groups")


def frame_lengths(cfg: HubertConfig, sample_lengths: jax.Array) -> jax.Array:
  """Valid samples per utterance -> valid frames after the conv stack (the torch conv length formula)."""
  n = sample_lengths
  for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
    n = (n - k) // s + 1
  return jnp.maximum(n, 0)


def min_input_length(cfg: HubertConfig, window_samples: int) -> int:
  """Samples an utterance is padded to at least: its training window rounded up to whole frames when conv 0
  has GroupNorm (statistics over time include the padding, as in transformers), else 0 (the frame mask makes
  any padding exact)."""
  if cfg.feat_extract_norm != "group":
    return 0
  hop = math.prod(cfg.conv_stride)
  return -(-int(window_samples) // hop) * hop


def normalize_waveform(waveform_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Zero-mean, unit-variance per utterance over its valid samples, as `Wav2Vec2FeatureExtractor`."""
  n = jnp.maximum(mask_bt.sum(-1, keepdims=True), 1.0)
  mean = (waveform_bt * mask_bt).sum(-1, keepdims=True) / n
  var = (jnp.square(waveform_bt - mean) * mask_bt).sum(-1, keepdims=True) / n
  return (waveform_bt - mean) * jax.lax.rsqrt(var + 1e-7)


def strided_conv(x_btc: jax.Array, kernel_kcd: jax.Array, stride: int, dtype) -> jax.Array:
  """Valid 1-D conv `out[t] = sum_j x[s t + j] @ W[j]` -> (B, T_out, D) f32.

  In f32 it is `lax.conv`. With bf16 inputs (f32 accumulation) it runs as matmuls, which XLA CPU runs
  ~1.5x faster than its bf16 conv: the input is cut into blocks of `stride` samples, so output frame t reads ceil(k/s) consecutive blocks
  (the last one cut to the kernel). Wide blocks take one matmul per block offset, summed (no im2col
  copy); narrow ones (the 1-channel waveform) are concatenated into a single im2col matmul.
  """
  if jnp.dtype(dtype) == jnp.float32:  # XLA CPU's f32 conv kernel beats the matmul form (bench/RESULTS.md)
    return jax.lax.conv_general_dilated(x_btc.astype(dtype), kernel_kcd.astype(dtype), (stride,), "VALID",
                                        dimension_numbers=("NWC", "WIO", "NWC"))
  b, t, c = x_btc.shape
  k = kernel_kcd.shape[0]
  t_out = (t - k) // stride + 1
  num_blocks = -(-k // stride)
  need = (t_out - 1 + num_blocks) * stride
  x_btc = x_btc[:, :need] if t >= need else jnp.pad(x_btc, ((0, 0), (0, need - t), (0, 0)))
  blocks = x_btc.astype(dtype).reshape(b, need // stride, stride * c)
  taps = [min(stride, k - i * stride) for i in range(num_blocks)]
  cols = [blocks[:, i:i + t_out, :n * c] for i, n in enumerate(taps)]
  if stride * c < 256:  # too narrow a contraction for an efficient matmul per block
    return mp_matmul(jnp.concatenate(cols, axis=-1), kernel_kcd.reshape(k * c, -1), dtype)
  out = None
  for i, (col, n) in enumerate(zip(cols, taps)):
    y = mp_matmul(col, kernel_kcd[i * stride:i * stride + n].reshape(n * c, -1), dtype)
    out = y if out is None else out + y
  return out


def torch_conv_bias_init(fan_in: int):
  """torch's Conv1d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which transformers' HuBERT keeps.

  Not zeros: digital silence (exact zeros, common in TTS speech) then gives every conv layer a constant
  input, and LayerNorm over a constant has a 1/sqrt(eps) gradient that compounds over the 7 layers.
  """
  bound = 1.0 / fan_in ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ChannelGroupNorm(nn.Module):
  """GroupNorm with one group per channel (hubert-base conv 0): statistics over time per utterance."""

  @nn.compact
  def __call__(self, x_btc: jax.Array) -> jax.Array:
    c = x_btc.shape[-1]
    mean = x_btc.mean(1, keepdims=True)
    var = jnp.square(x_btc - mean).mean(1, keepdims=True)
    y = (x_btc - mean) * jax.lax.rsqrt(var + 1e-5)
    scale = self.param("scale", nn.with_logical_partitioning(ones, ("conv_out",)), (c,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(zeros, ("conv_out",)), (c,), jnp.float32)
    return y * scale + bias


class ConvLayer(nn.Module):
  """Strided conv (kernel (k, C_in, C_out)) [+ bias] [-> LayerNorm | GroupNorm] -> activation."""
  features: int
  kernel_size: int
  stride: int
  use_bias: bool
  norm: str | None  # "layer" | "group" | None
  activation: str
  dtype: str
  in_axis: str | None = "conv_in"

  @nn.compact
  def __call__(self, x_btc: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.he_normal(in_axis=(0, 1), out_axis=2), (None, self.in_axis, "conv_out")),
        (self.kernel_size, x_btc.shape[-1], self.features), jnp.float32)
    x = strided_conv(x_btc, kernel, self.stride, as_dtype(self.dtype))
    if self.use_bias:
      x = x + self.param("bias", nn.with_logical_partitioning(torch_conv_bias_init(kernel.shape[0] * kernel.shape[1]),
                                                              ("conv_out",)), (self.features,), jnp.float32)
    if self.norm == "layer":
      x = LayerNorm(eps=1e-5, axis="conv_out", name="norm")(x)  # torch nn.LayerNorm's default eps
    elif self.norm == "group":
      x = ChannelGroupNorm(name="norm")(x)
    return constrain(ACTIVATIONS[self.activation](x), ("batch", "length", "conv_out"))


class FeatureEncoder(nn.Module):
  """Waveform (B, T) -> conv features (B, T', C) f32 through `conv_0` ... `conv_{n-1}`."""
  cfg: HubertConfig

  @nn.compact
  def __call__(self, waveform_bt: jax.Array) -> jax.Array:
    cfg = self.cfg
    x = waveform_bt[..., None]
    for i, (c_out, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
      norm = "layer" if cfg.feat_extract_norm == "layer" else ("group" if i == 0 else None)
      x = ConvLayer(c_out, k, s, cfg.conv_bias, norm, cfg.feat_extract_activation, cfg.dtype,
                    in_axis="conv_in" if i else None, name=f"conv_{i}")(x)
    return x


class PositionalConv(nn.Module):
  """Grouped conv over time (k, padding k//2, last frame dropped for even k) -> GELU. Weight norm folded."""
  cfg: HubertConfig

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    d, k, groups = cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.he_normal(in_axis=(0, 1), out_axis=2), (None, None, "embed")),
        (k, d // groups, d), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(zeros, ("embed",)), (d,), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x_btd.astype(dtype), kernel.astype(dtype), window_strides=(1,), padding=[(k // 2, k - 1 - k // 2)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
        preferred_element_type=jnp.float32)
    return ACTIVATIONS[cfg.feat_extract_activation](y + bias)


class SelfAttention(nn.Module):
  cfg: HubertConfig

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array | None) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    b, t, d = x_btd.shape
    heads = (b, t, cfg.num_heads, d // cfg.num_heads)
    q, k, v = (Dense(d, ("embed", "heads"), dtype=dtype, name=n)(x_btd).reshape(heads)
               for n in ("q_proj", "k_proj", "v_proj"))
    out = attention(q, k, v, mask_bt, dtype).reshape(b, t, d)
    return Dense(d, ("heads", "embed"), dtype=dtype, name="out_proj")(out)


class FeedForward(nn.Module):
  cfg: HubertConfig

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dtype, name="intermediate_dense")(x_btd)
    h = constrain(ACTIVATIONS[cfg.hidden_act](h), ("batch", "length", "mlp"))
    return Dense(cfg.hidden_size, ("mlp", "embed"), dtype=dtype, name="output_dense")(h)


class EncoderLayer(nn.Module):
  """Post-LN (base) or pre-LN (`do_stable_layer_norm`, large) transformer layer."""
  cfg: HubertConfig

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    attn = SelfAttention(cfg, name="attention")
    ffn = FeedForward(cfg, name="feed_forward")
    norm1 = LayerNorm(cfg.layer_norm_eps, name="layer_norm")
    norm2 = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")
    if cfg.do_stable_layer_norm:
      x_btd = x_btd + attn(norm1(x_btd), mask_bt)
      x_btd = x_btd + ffn(norm2(x_btd))
    else:
      x_btd = norm1(x_btd + attn(x_btd, mask_bt))
      x_btd = norm2(x_btd + ffn(x_btd))
    return constrain(x_btd, ("batch", "length", "embed"))


class Hubert(nn.Module):
  """Waveform (B, T) f32 at 16 kHz [+ sample mask (B, T)] -> (hidden (B, T', D) f32, frame mask (B, T')).

  Padded frames of the output are zero. With `normalize_waveform` each utterance is normalised over its
  valid samples first (what hubert-large was pretrained on; STAR feeds the raw waveform).
  """
  cfg: HubertConfig

  @nn.compact
  def __call__(self, waveform_bt: jax.Array, mask_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    waveform_bt = constrain(waveform_bt.astype(jnp.float32), ("batch", "length"))
    sample_mask = (jnp.ones_like(waveform_bt) if mask_bt is None else mask_bt.astype(jnp.float32))
    if cfg.normalize_waveform:
      waveform_bt = normalize_waveform(waveform_bt, sample_mask)
    waveform_bt = waveform_bt * sample_mask  # padding is silence, as the HF feature extractor pads

    feats = FeatureEncoder(cfg, name="feature_extractor")(waveform_bt)
    frames = feats.shape[1]
    lengths = frame_lengths(cfg, sample_mask.sum(-1).astype(jnp.int32))
    frame_mask = jnp.arange(frames)[None, :] < lengths[:, None]

    if cfg.feat_proj_layer_norm:
      feats = LayerNorm(cfg.layer_norm_eps, axis="conv_out", name="feature_projection_norm")(feats)
    x = Dense(cfg.hidden_size, ("conv_in", "embed"), dtype=as_dtype(cfg.dtype), name="feature_projection")(feats)
    x = constrain(x * frame_mask[..., None], ("batch", "length", "embed"))

    x = x + PositionalConv(cfg, name="pos_conv")(x)
    attn_mask = None if mask_bt is None else frame_mask
    if not cfg.do_stable_layer_norm:
      x = LayerNorm(cfg.layer_norm_eps, name="encoder_norm")(x)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layer_{i}")(x, attn_mask)
    if cfg.do_stable_layer_norm:
      x = LayerNorm(cfg.layer_norm_eps, name="encoder_norm")(x)
    return x * frame_mask[..., None], frame_mask
