"""Building blocks of the evaluation CNNs (CNN14, VGGish): 3x3 Conv2d, frozen BatchNorm, 2x2 pooling.

Layout is NHWC with H = time frames and W = mel bins; kernels are (kh, kw, in, out). Inputs are cast to
the compute dtype and accumulate in f32, as the models' Dense (DESIGN.md §3).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from star_jax.models.layers import Dtype, xavier_uniform, zeros, ones


class Conv2d(nn.Module):
  """'Same' 3x3 (by default) convolution, stride 1: (B, H, W, Cin) -> (B, H, W, features) f32."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(xavier_uniform, (None, None, "conv_in", "conv_out")),
                        (*self.kernel_size, x_bhwc.shape[-1], self.features), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x_bhwc.astype(self.dtype), kernel.astype(self.dtype), window_strides=(1, 1),
        padding=[(k // 2, k // 2) for k in self.kernel_size],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.with_logical_partitioning(zeros, ("conv_out",)), (self.features,), jnp.float32)
    return y


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm over the last axis with stored running statistics (PyTorch's eval mode)."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(ones, ("conv_out",)), (d,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(zeros, ("conv_out",)), (d,), jnp.float32)
    mean = self.param("mean", nn.with_logical_partitioning(zeros, ("conv_out",)), (d,), jnp.float32)
    var = self.param("var", nn.with_logical_partitioning(ones, ("conv_out",)), (d,), jnp.float32)
    return (x.astype(jnp.float32) - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


def pool2d(x_bhwc: jax.Array, size: tuple[int, int], kind: str) -> jax.Array:
  """Non-overlapping 'avg' or 'max' pooling with window = stride = size; a remainder is dropped (floor)."""
  b, h, w, c = x_bhwc.shape
  ph, pw = size
  x = x_bhwc[:, :h // ph * ph, :w // pw * pw].reshape(b, h // ph, ph, w // pw, pw, c)
  return x.mean((2, 4)) if kind == "avg" else x.max((2, 4))
