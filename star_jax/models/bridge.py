"""Bridges from HuBERT frames to the DiT's semantic tokens, and the stage-1 classifier head (DESIGN.md §2).

    tokens_bqd = QFormer(cfg).apply({"params": p}, speech_btd, speech_mask_bt)              # (B, 32, 1024)
    tokens_b1d, upd = MLPBridge(cfg).apply({"params": p, "batch_stats": s}, speech_btd, speech_mask_bt,
                                           deterministic=False, rngs={"dropout": key}, mutable=["batch_stats"])
    logits_bc = Classifier(num_classes).apply({"params": p}, tokens_bqd)

The Q-Former is the BLIP-2 layout, the same math as `transformers.Blip2QFormerModel` called with
`query_embeds` (learned queries -> LayerNorm -> layers of self-attention, cross-attention to the speech
every `cross_attention_frequency`-th layer, FFN; post-LN) followed by a Linear projection.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from star_jax.models.layers import Dense, LayerNorm, as_dtype, attention, constrain, masked_mean


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  num_queries: int = 32
  hidden_size: int = 768
  num_heads: int = 12
  intermediate_size: int = 3072
  num_layers: int = 2
  cross_attention_frequency: int = 2  # layer i cross-attends when i % frequency == 0
  encoder_hidden_size: int = 1024  # width of the speech frames
  output_size: int = 1024  # 0: no output projection (tokens stay hidden_size wide)
  layer_norm_eps: float = 1e-12
  query_layer_norm: bool = True  # LayerNorm on the query embeddings before layer 0 (BLIP-2)
  dropout_rate: float = 0.1  # BERT hidden dropout, active only with deterministic=False
  dtype: str = "float32"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"qformer: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.cross_attention_frequency < 1:
      raise ValueError("qformer: cross_attention_frequency must be >= 1")


@dataclasses.dataclass(frozen=True)
class MLPBridgeConfig:
  input_size: int = 1024
  hidden_size: int = 1024
  num_layers: int = 2
  dropout: float = 0.1
  dtype: str = "float32"


class MultiHeadAttention(nn.Module):
  """BERT attention block: softmax(q k^T) v -> Linear -> dropout -> LayerNorm(x + .) (post-LN)."""
  cfg: QFormerConfig

  @nn.compact
  def __call__(self, x_bqd: jax.Array, kv_bkd: jax.Array, mask_bk: jax.Array | None,
               deterministic: bool) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    h = cfg.hidden_size
    dh = h // cfg.num_heads
    q = Dense(h, ("embed", "heads"), dtype=dtype, name="query")(x_bqd)
    k = Dense(h, ("kv", "heads"), dtype=dtype, name="key")(kv_bkd)
    v = Dense(h, ("kv", "heads"), dtype=dtype, name="value")(kv_bkd)
    split = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, dh)  # noqa: E731
    out = attention(split(q), split(k), split(v), mask_bk, dtype).reshape(x_bqd.shape)
    out = Dense(h, ("heads", "embed"), dtype=dtype, name="output")(out)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    return LayerNorm(cfg.layer_norm_eps, name="norm")(out + x_bqd)


class QFormerLayer(nn.Module):
  cfg: QFormerConfig
  cross_attention: bool

  @nn.compact
  def __call__(self, x_bqd: jax.Array, speech_btd: jax.Array, speech_mask_bt: jax.Array | None,
               deterministic: bool) -> jax.Array:
    cfg, dtype = self.cfg, as_dtype(self.cfg.dtype)
    x_bqd = MultiHeadAttention(cfg, name="self_attention")(x_bqd, x_bqd, None, deterministic)
    if self.cross_attention:
      x_bqd = MultiHeadAttention(cfg, name="cross_attention")(x_bqd, speech_btd, speech_mask_bt, deterministic)
    h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dtype, name="intermediate")(x_bqd)
    h = jax.nn.gelu(h, approximate=False)
    h = Dense(cfg.hidden_size, ("mlp", "embed"), dtype=dtype, name="output")(h)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return LayerNorm(cfg.layer_norm_eps, name="output_norm")(h + x_bqd)


class QFormer(nn.Module):
  """Speech frames (B, T, D_enc) [+ frame mask (B, T)] -> tokens (B, Q, output_size or hidden_size) f32."""
  cfg: QFormerConfig

  @nn.compact
  def __call__(self, speech_btd: jax.Array, speech_mask_bt: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    queries = self.param("query_tokens", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), (cfg.num_queries, cfg.hidden_size), jnp.float32)
    x = jnp.broadcast_to(queries, (speech_btd.shape[0], *queries.shape))
    if cfg.query_layer_norm:
      x = LayerNorm(cfg.layer_norm_eps, name="query_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    speech_btd = constrain(speech_btd, ("batch", "length", "kv"))
    for i in range(cfg.num_layers):
      layer = QFormerLayer(cfg, i % cfg.cross_attention_frequency == 0, name=f"layer_{i}")
      x = constrain(layer(x, speech_btd, speech_mask_bt, deterministic), ("batch", None, "embed"))
    if cfg.output_size:
      x = Dense(cfg.output_size, ("embed", "mlp"), dtype=as_dtype(cfg.dtype), name="projection")(x)
    return x


class MLPBridge(nn.Module):
  """Time-mean-pooled frames -> num_layers x [Linear -> BatchNorm -> Dropout -> ReLU] -> (B, 1, hidden).

  BatchNorm statistics live in the `batch_stats` collection; training passes `deterministic=False`,
  a `dropout` rng and `mutable=["batch_stats"]`.
  """
  cfg: MLPBridgeConfig

  @nn.compact
  def __call__(self, speech_btd: jax.Array, speech_mask_bt: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    x = masked_mean(speech_btd, speech_mask_bt)
    for i in range(cfg.num_layers):
      x = Dense(cfg.hidden_size, ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"), dtype=as_dtype(cfg.dtype),
                name=f"dense_{i}")(x)
      x = nn.BatchNorm(use_running_average=deterministic, momentum=0.9, epsilon=1e-5, name=f"norm_{i}")(x)
      x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
      x = jax.nn.relu(x)
    return x[:, None, :]


class Classifier(nn.Module):
  """Stage-1 head: tokens (B, Q, D) -> mean over tokens -> Linear -> logits (B, num_classes) f32 (BCE).

  `prior_prob` > 0 starts every logit at log(p / (1 - p)) (the prior-probability init of Lin et al. 2017,
  "Focal loss") instead of 0, i.e. at a sigmoid of p instead of 0.5. With zero biases the first ~50 steps
  only push all logits down to the label prior; their large gradients fill AdamW's second moments (β2 =
  0.999), which then shrink the encoder's updates ~100x for hundreds of steps: a tiny HuBERT from scratch sat
  on the prior for 10 epochs, and with the prior init it fits a batch in 60 steps (docs/notes/tiny_demo.md).

  `cosine_scale` > 0 (not STAR's head; the tiny config uses 16): logits = scale · cos(pooled token, w_c) + b_c, a
  cosine classifier. It spreads the classes over more directions of the pooled token: on the demo corpus a
  width-128 tiny bridge's 63 class means span a participation rank of 15.4 with it at scale 16, 8.8 without.
  """
  num_classes: int
  dtype: str = "float32"
  prior_prob: float = 0.0
  cosine_scale: float = 0.0

  @nn.compact
  def __call__(self, tokens_bqd: jax.Array) -> jax.Array:
    if self.num_classes < 1:
      raise ValueError("Classifier: num_classes must be the dataset's label count (config 0 means 'ask the data')")
    if not 0.0 <= self.prior_prob < 1.0:
      raise ValueError(f"Classifier: prior_prob must be in [0, 1), got {self.prior_prob}")
    bias_init = nn.initializers.zeros
    if self.prior_prob > 0:
      bias_init = nn.initializers.constant(math.log(self.prior_prob / (1.0 - self.prior_prob)))
    pooled = tokens_bqd.astype(jnp.float32).mean(1)
    if self.cosine_scale > 0:
      pooled = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True).clip(1e-6)
      w = self.param("cosine_kernel", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "vocab")),
                     (pooled.shape[-1], self.num_classes), jnp.float32)
      b = self.param("cosine_bias", nn.with_logical_partitioning(bias_init, ("vocab",)), (self.num_classes,),
                     jnp.float32)
      return self.cosine_scale * pooled @ (w / jnp.linalg.norm(w, axis=0, keepdims=True)) + b
    return Dense(self.num_classes, ("embed", "vocab"), dtype=as_dtype(self.dtype), bias_init=bias_init,
                 name="projection")(pooled)
