"""Layers shared by the star-jax models: mixed-precision Dense, LayerNorm and attention.

Mixed precision follows DESIGN.md §3: params stay f32; matmul inputs are cast to the compute dtype and
accumulate in f32 (`preferred_element_type=jnp.float32`), the fast and numerically sound choice on CPU,
GPU and TPU alike.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from star_jax import sharding

Dtype = Any
Initializer = Callable[..., jax.Array]

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def as_dtype(name: str | Dtype) -> Dtype:
  """'float32' / 'bfloat16' (config strings) or a dtype -> a jnp dtype."""
  return jnp.dtype(name) if isinstance(name, str) else name


def _dot_f32(a: jax.Array, b: jax.Array, contract_a: tuple, contract_b: tuple) -> jax.Array:
  return jax.lax.dot_general(a, b, ((contract_a, contract_b), ((), ())), preferred_element_type=jnp.float32)


def mp_matmul(x: jax.Array, kernel: jax.Array, dtype: Dtype) -> jax.Array:
  """x[..., k] @ kernel[k, n] with inputs in `dtype` and an f32 accumulator/result.

  In 16-bit, the gradient's two matmuls take 16-bit inputs too (the f32 cotangent cast to `dtype`, as autocast
  does) with f32 accumulators and results: JAX's own transpose pairs the f32 cotangent with the 16-bit operand,
  which XLA runs as an f32 matmul at half the bf16 rate (two thirds of a training step's FLOPs).
  """
  if jnp.dtype(dtype) == jnp.float32:
    return _dot_f32(x.astype(dtype), kernel.astype(dtype), (x.ndim - 1,), (0,))
  return _mp_matmul_16(x, kernel, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mp_matmul_16(x, kernel, dtype):
  return _mp_matmul_16_fwd(x, kernel, dtype)[0]


def _mp_matmul_16_fwd(x, kernel, dtype):
  xc, kc = x.astype(dtype), kernel.astype(dtype)
  # The input dtypes ride along as empty arrays (residuals must be arrays).
  return _dot_f32(xc, kc, (x.ndim - 1,), (0,)), (xc, kc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))


def _mp_matmul_16_bwd(dtype, residuals, g):
  xc, kc, x_like, kernel_like = residuals
  g = g.astype(dtype)
  lead = tuple(range(g.ndim - 1))
  return (_dot_f32(g, kc, (g.ndim - 1,), (1,)).astype(x_like.dtype),
          _dot_f32(xc, g, lead, lead).astype(kernel_like.dtype))


_mp_matmul_16.defvjp(_mp_matmul_16_fwd, _mp_matmul_16_bwd)


def cast_kernels(params: Any, dtype: Dtype) -> Any:
  """Every `kernel` leaf cast to `dtype`, the rest as it is. Dense and the convs cast their kernels to the compute
  dtype at every call (`mp_matmul`), so the outputs are bit-identical and an inference program reads bf16 weights
  instead of converting the f32 ones on each call (0.36 s of a 1-step DiT-L generation on CPU)."""
  if jnp.dtype(dtype) == jnp.float32:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x, params)


class Dense(nn.Module):
  """Linear layer over the last axis: (..., in) -> (..., features), result in f32.

  `axes` names the kernel's (in, out) logical axes; the bias takes the out axis.
  """
  features: int
  axes: tuple[str | None, str | None] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = xavier_uniform
  bias_init: Initializer = zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
        (x.shape[-1], self.features), jnp.float32)
    y = mp_matmul(x, sharding.gather_fsdp(kernel, self.axes), self.dtype)
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(self.bias_init, (self.axes[1],)),
          (self.features,), jnp.float32)
      y = y + bias
    return y


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in f32; optional affine named on `axis`."""
  eps: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  axis: str | None = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    d = x.shape[-1]
    if self.use_scale:
      y = y * self.param("scale", nn.with_logical_partitioning(ones, (self.axis,)), (d,), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.with_logical_partitioning(zeros, (self.axis,)), (d,), jnp.float32)
    return y


ATTENTION_IMPLEMENTATIONS = ("auto", "dots", "xla", "cudnn")


def attention_implementation(name: str, dtype: Dtype, head_dim: int) -> str:
  """'auto' -> 'cudnn' (fused flash attention) on NVIDIA GPUs for 16-bit inputs and head sizes cuDNN takes
  (a multiple of 8, at most 128), 'dots' on CPU, else 'xla'; the others as given."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation '{name}' is not one of {ATTENTION_IMPLEMENTATIONS}")
  if name != "auto":
    return name
  backend = jax.default_backend()
  if backend == "cpu":
    return "dots"
  fits = jnp.dtype(dtype).itemsize == 2 and head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if fits and backend == "gpu" else "xla"


def _attention_dots(q_bqhd, k_bkhd, v_bkhd, mask_bk, dtype):
  """Attention as two batched dots over heads-major (B, H, L, Dh) operands, scores and softmax in f32. On CPU
  this runs the DiT-L self-attention 2x faster than `jax.nn.dot_product_attention`'s XLA path (bench/RESULTS.md),
  whose batch dimensions sit between the others."""
  heads_major = lambda x: x.astype(dtype).transpose(0, 2, 1, 3)
  q = heads_major(q_bqhd * q_bqhd.shape[-1] ** -0.5)
  scores = jax.lax.dot_general(q, heads_major(k_bkhd), (((3,), (3,)), ((0, 1), (0, 1))),
                               preferred_element_type=jnp.float32)
  if mask_bk is not None:
    scores = jnp.where(mask_bk[:, None, None, :].astype(bool), scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jax.lax.dot_general(probs, heads_major(v_bkhd), (((3,), (2,)), ((0, 1), (0, 1))),
                            preferred_element_type=jnp.float32)
  return out.transpose(0, 2, 1, 3)


def attention(q_bqhd: jax.Array, k_bkhd: jax.Array, v_bkhd: jax.Array,
              mask_bk: jax.Array | None = None, dtype: Dtype = jnp.float32, implementation: str = "auto"
              ) -> jax.Array:
  """Scaled dot-product attention with an optional key padding mask -> (B, Q, H, Dh) f32.

  q, k, v enter in `dtype`; scores and softmax are f32. `implementation` is one of ATTENTION_IMPLEMENTATIONS:
  'dots' (our two batched dots; CPU's choice), or `jax.nn.dot_product_attention` with 'xla' or 'cudnn' (cuDNN
  flash attention, which keeps them in f32 too).
  """
  impl = attention_implementation(implementation, dtype, q_bqhd.shape[-1])
  if impl == "dots":
    return _attention_dots(q_bqhd, k_bkhd, v_bkhd, mask_bk, dtype)
  mask = None if mask_bk is None else mask_bk[:, None, None, :].astype(bool)
  out = jax.nn.dot_product_attention(q_bqhd.astype(dtype), k_bkhd.astype(dtype), v_bkhd.astype(dtype),
                                     mask=mask, implementation=impl)
  return out.astype(jnp.float32)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh / rules context)."""
  return nn.with_logical_constraint(x, tuple(names))


# π split so that n·_PI_HI is exact in f32 for |n| < 2^16 (Cody-Waite range reduction).
_PI_HI, _PI_MID = 3.140625, 9.670257568359375e-04
_PI_LO = float(np.pi - _PI_HI - _PI_MID)


def sin_squared(y: jax.Array) -> jax.Array:
  """sin²(y) in f32 to ≈5e-7 absolute: sin²(y) = sin²(y − nπ), n = round(y/π), then an odd Taylor polynomial.

  XLA's CPU `sin` is a scalar call (≈20 ns per element, 13× slower than this measured on the VAE's
  activations), and SnakeBeta runs on every activation of the VAE.
  """
  n = jnp.round(y * (1 / np.pi))
  r = ((y - n * _PI_HI) - n * _PI_MID) - n * _PI_LO  # |r| <= π/2
  r2 = r * r
  p = -1 / 39916800  # sin r = r (1 - r²/3! + r⁴/5! - ... - r¹⁰/11!), error < 6e-8 on |r| <= π/2
  for c in (1 / 362880, -1 / 5040, 1 / 120, -1 / 6, 1.0):
    p = p * r2 + c
  return jnp.square(r * p)


class SnakeBeta(nn.Module):
  """SnakeBeta over the last (channel) axis: x + 1/(β + 1e-9) · sin²(α x), α = exp(α_log), β = exp(β_log).

  Params are the per-channel logs (`alpha`, `beta`, zero-initialised, i.e. α = β = 1), as in Stable Audio's
  and diffusers' `logscale` form (DESIGN.md §2). Computed in f32.
  """
  axis: str | None = "conv_out"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    alpha = jnp.exp(self.param("alpha", nn.with_logical_partitioning(zeros, (self.axis,)), (c,), jnp.float32))
    beta = jnp.exp(self.param("beta", nn.with_logical_partitioning(zeros, (self.axis,)), (c,), jnp.float32))
    x = x.astype(jnp.float32)
    return x + (1.0 / (beta + 1e-9)) * sin_squared(alpha * x)


def masked_mean(x_btd: jax.Array, mask_bt: jax.Array | None) -> jax.Array:
  """Mean over time of the valid frames: (B, T, D) -> (B, D) f32."""
  x_btd = x_btd.astype(jnp.float32)
  if mask_bt is None:
    return x_btd.mean(1)
  m = mask_bt.astype(jnp.float32)[..., None]
  return (x_btd * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
