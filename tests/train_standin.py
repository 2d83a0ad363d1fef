"""A stand-in stage and in-memory data for the loop tests (tiny Linen modules, no real models), random records
with every batch field of the real stages, and a finished run's workdir on random weights."""

from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from star_jax import checkpoint, paths
from star_jax.config import load_config
from star_jax.models.layers import Dense
from star_jax.train.stage import Stage, build_stage


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(Dense(32, axes=("embed", "mlp"))(x))


class Head(nn.Module):
  @nn.compact
  def __call__(self, h):
    h = nn.gelu(Dense(32, axes=("mlp", "embed"))(h))
    return Dense(4, axes=("embed", None))(h)


class ArrayData:
  """`Data` over in-memory numpy examples via grain (checkpointable iterators)."""

  def __init__(self, n=64, seed=0, nan_at=()):
    r = np.random.default_rng(seed)
    self.x = r.standard_normal((n, 16)).astype(np.float32)
    self.y = np.tanh(self.x[:, :4] * 2).astype(np.float32)
    for i in nan_at:
      self.x[i] = np.nan

  def iterator(self, split, *, batch_size, shuffle, num_epochs, seed, drop_remainder=True, random_crop=None):
    ds = grain.MapDataset.range(len(self.x))
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(lambda i: {"x": self.x[i], "y": self.y[i], "id": i})
    return iter(ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset())

  def num_examples(self, split):
    return len(self.x)


def standin_stage(steps=6, batch_size=8, nan_policy="stop", **hp):
  """A stage with a frozen encoder and a trainable head fitting y from x, plus input noise (rng use)."""
  section = ml_collections.ConfigDict(dict(lr=3e-3, weight_decay=0.01, warmup_steps=2, steps=steps,
                                           batch_size=batch_size, grad_clip=1.0, ema_decay=0.0, **hp))

  def init(rng):
    r1, r2 = jax.random.split(rng)
    return {"params": {"head": Head().init(r2, jnp.zeros((1, 32)))["params"]},
            "frozen": {"encoder": Encoder().init(r1, jnp.zeros((1, 16)))["params"]}}

  def loss(params, frozen, batch, rng):
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    h = Encoder().apply({"params": frozen["encoder"]}, x)
    pred = Head().apply({"params": params["head"]}, h)
    mse = jnp.mean((pred - batch["y"]) ** 2)
    return mse, {"mse": mse}

  return Stage(name="standin", hparams=section, init=init, loss=loss, batch_keys=("x", "y"))


def standin_config(*overrides):
  return load_config("configs/star.py:tiny", ["train.log_every_steps=1", "train.checkpoint_every_steps=2",
                                              *overrides])


class RandomRecords:
  """`Data` with every batch field of star_jax.data.pipeline, random but fixed: speech, audio, labels,
  text embeddings (with masks); `label_names` as the records' info gives them. `cached`: HuBERT frames and VAE
  latents (`star-jax prepare cache`'s fields) in place of speech and audio, so a stage skips the frozen models."""

  def __init__(self, cfg, n=16, num_classes=5, seed=0, cached=False):
    r = np.random.default_rng(seed)
    ts = int(cfg.data.speech_duration_s * cfg.data.speech_sample_rate_hz)
    ta = int(cfg.data.audio_duration_s * cfg.vae.sample_rate_hz)
    self.label_names = [f"class{i}" for i in range(num_classes)]
    self.random_crops = []
    lengths = r.integers(ta // 2, ta + 1, n)
    lt = int(cfg.data.text_max_tokens)  # 6 caption rows, zero-padded to the window as the pipeline pads them
    fit = lambda x: np.pad(x, ((0, lt - len(x)), (0, 0)))[:lt]
    self.examples = [dict(
        speech=(0.1 * r.standard_normal(ts)).astype(np.float32), speech_mask=np.arange(ts) < ts - 400 * (i % 3),
        audio=(0.1 * r.standard_normal(ta)).astype(np.float32), audio_mask=np.arange(ta) < lengths[i],
        labels=(r.random(num_classes) < 0.4).astype(np.float32),
        text_emb=fit(r.standard_normal((6, cfg.tta.text_dim)).astype(np.float32)), text_mask=np.arange(lt) < 3 + i % 4,
    ) for i in range(n)]
    if cached:
      from star_jax.models import build, hubert
      th, tl = int(hubert.frame_lengths(build.hubert_config(cfg), ts)), ta // build.vae_hop(cfg)
      for i, e in enumerate(self.examples):
        del e["speech"], e["speech_mask"], e["audio"], e["audio_mask"]
        e.update(hubert=r.standard_normal((th, cfg.hubert.hidden_size)).astype(np.float32),
                 hubert_mask=np.arange(th) < th - 2 * (i % 3),
                 latents=r.standard_normal((tl, cfg.vae.latent_channels)).astype(np.float32),
                 latents_mask=np.arange(tl) < tl * lengths[i] // ta)

  def iterator(self, split, *, batch_size, shuffle, num_epochs, seed, drop_remainder=True, random_crop=None):
    self.random_crops.append((split, random_crop))  # what the loop asked for (these records are never cropped)
    ds = grain.MapDataset.source(self.examples)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    return iter(ds.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset())

  def num_examples(self, split):
    return len(self.examples)


class GlobalBatches:
  """`Data` whose batches do not depend on the process count: each split is batched globally (batch_size ×
  processes rows) and every process keeps the rows its devices hold, so an N-process run trains on exactly
  the global batches of a one-process run (grain's own per-process sharding splits records, not batches).
  A short last batch (drop_remainder=False) leaves some processes fewer rows, or none."""

  def __init__(self, splits: dict, mesh, label_names=()):
    self.splits, self.mesh, self.label_names = splits, mesh, list(label_names)

  def iterator(self, split, *, batch_size, shuffle, num_epochs, seed, drop_remainder=True, random_crop=None):
    from star_jax import sharding

    global_bs = batch_size * jax.process_count()
    rows = sharding.process_batch_rows(self.mesh, global_bs)
    ds = grain.MapDataset.source(self.splits[split])
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).batch(global_bs, drop_remainder=drop_remainder)
    return iter(ds.map(lambda b: {k: v[rows] for k, v in b.items()}).to_iter_dataset())

  def num_examples(self, split):
    return len(self.splits[split])


def random_workdir(cfg, workdir: str, kind: str = "stage2") -> dict:
  """A finished `kind` run on random weights: `workdir`/best (the stage's init, as one compiled program: eager
  init dispatches and compiles every initialiser apart, ~2x slower) and config.json -> the saved tree."""
  tree = nn.unbox(jax.jit(build_stage(cfg, kind).init)(jax.random.PRNGKey(0)))
  checkpoint.save_params(f"{workdir}/best", tree, cfg, kind=kind)
  paths.write_text(f"{workdir}/config.json", cfg.to_json())
  return tree
