"""Few-step generation (DESIGN.md §2): attention through jax.nn.dot_product_attention, cross-attention K/V once
per sample, the mean-flow DiT, loss and sampler, and the `meanflow` stage from a stage-2 workdir to `generate`."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.attention_conv import einsum_attention
from star_jax import flow
from star_jax.models import layers
from star_jax.models.dit import DiT, DiTConfig, sampler_fns

CFG = DiTConfig(latent_channels=6, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2, context_dim=10,
                lora_rank=3, lora_alpha=6.0)
MF = dataclasses.replace(CFG, mean_flow=True)
B, L, S = 2, 9, 5


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("implementation", ["auto", "xla"])
def test_attention_equals_the_einsum_path(dtype, atol, masked, implementation):
  k = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k[0], (2, 7, 4, 16))
  kk, v = jax.random.normal(k[1], (2, 5, 4, 16)), jax.random.normal(k[2], (2, 5, 4, 16))
  mask = (jnp.arange(5)[None] < jnp.array([[5], [2]])) if masked else None
  got = layers.attention(q, kk, v, mask, dtype, implementation)
  assert got.dtype == jnp.float32 and layers.attention_implementation("auto", dtype, 16) == "dots"  # CPU
  np.testing.assert_allclose(got, einsum_attention(q, kk, v, mask, dtype), atol=atol)
  if masked:  # a masked key cannot matter
    moved = layers.attention(q, kk.at[1, 3:].set(9.0), v.at[1, 3:].set(-9.0), mask, dtype, implementation)
    np.testing.assert_allclose(moved, got, atol=1e-6)


def _inputs(seed=0, cfg=CFG):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (B, L, cfg.latent_channels)), jnp.array([370.0, 810.0]),
          jax.random.normal(k[1], (B, S, cfg.context_dim)))


@functools.lru_cache(maxsize=None)
def _params(cfg):
  """Init params with every leaf moved off its init, so zero-initialised paths are live."""
  x, t, ctx = _inputs(cfg=cfg)
  params = nn.unbox(jax.jit(DiT(cfg).init)(jax.random.key(1), x, t, ctx)["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_context_kv_once_per_sample_equals_the_per_step_path():
  """The guided Euler loop with the context's K/V computed once equals one that recomputes them every step."""
  for cfg in (CFG, dataclasses.replace(CFG, context_slots=S, pooled_context=True)):
    x, _, ctx = _inputs(1, cfg)
    variables = {"params": _params(cfg)}
    mask = jnp.arange(S)[None] < jnp.array([[S], [3]])
    kw = dict(num_steps=3, cfg_scale=2.5)
    per_step = flow.sample(DiT(cfg).apply, variables, x, ctx, mask, **kw)
    prepare, velocity = sampler_fns(cfg)
    once = flow.sample(velocity, variables, x, ctx, mask, prepare_context=prepare, **kw)
    np.testing.assert_allclose(once, per_step, atol=1e-5)
    assert np.abs(np.asarray(per_step - x)).max() > 1e-2


def test_mean_flow_dit_starts_as_the_flow_model_and_its_sampler_as_euler():
  """At the fine-tune's start (interval embedding zero-initialised) u(z, r, t) is the flow model's v(z, t) for
  every r, so the mean-flow sampler's steps are the flow model's Euler steps; once trained, r matters."""
  x, t, ctx = _inputs(3)
  flow_params = _params(CFG)
  mf_init = nn.unbox(jax.jit(DiT(MF).init)(jax.random.key(5), x, t, ctx)["params"])
  assert set(mf_init) - set(flow_params) == {"interval_embed_1", "interval_embed_2"}
  start = {**flow_params, "interval_embed_1": mf_init["interval_embed_1"],
           "interval_embed_2": mf_init["interval_embed_2"]}
  flow_apply, mf_apply = jax.jit(DiT(CFG).apply), jax.jit(DiT(MF).apply)
  v = flow_apply({"params": flow_params}, x, t, ctx)
  for r in (t, jnp.zeros(2), jnp.array([10.0, 500.0])):
    np.testing.assert_allclose(mf_apply({"params": start}, x, t, ctx, r_b=r), v, atol=1e-5)
  prepare, velocity = sampler_fns(MF)
  for steps in (1, 2, 4):
    euler = flow.sample(DiT(CFG).apply, {"params": flow_params}, x, ctx, num_steps=steps, sway_coef=0.0)
    mean = flow.mean_flow_sample(velocity, {"params": start}, x, ctx, num_steps=steps, prepare_context=prepare)
    np.testing.assert_allclose(mean, euler, atol=1e-5)
  trained = _params(MF)
  u = lambda r: mf_apply({"params": trained}, x, t, ctx, r_b=r)
  assert np.abs(np.asarray(u(t) - u(jnp.zeros(2)))).max() > 1e-2
  np.testing.assert_allclose(u(t), mf_apply({"params": trained}, x, t, ctx), atol=1e-6)  # r defaults to t


X0 = jax.random.normal(jax.random.key(7), (2, 7, 3))


def straight(variables, x_bld, t_b, context_bsd, context_mask_bs, x_mask_bl, r_b=None):
  """The exact average velocity towards `variables['x0']` over any [r, t]: the path is straight, so it is
  ε − x0 = (z_t − x0)/t whatever r is."""
  x0 = jnp.concatenate([variables["x0"]] * (x_bld.shape[0] // variables["x0"].shape[0]))
  return (x_bld - x0) / (t_b / 1000.0)[:, None, None]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_mean_flow_sampler_with_the_exact_average_velocity_lands_on_x0(steps):
  noise = jax.random.normal(jax.random.key(8), X0.shape)
  out = flow.mean_flow_sample(straight, {"x0": X0}, noise, jnp.zeros((2, 1, 4)), num_steps=steps)
  np.testing.assert_allclose(out, X0, atol=1e-5)


def test_mean_flow_loss_is_zero_for_the_exact_average_velocity_and_sees_the_jvp():
  """Loss 0 for the exact u on intervals (r < t always): its du/dt along (v, 0, 1) is 0. An average velocity
  that is right at r = t but wrong inside intervals costs only on intervals, through the jvp term."""
  rng, ctx = jax.random.key(9), jnp.ones((2, 3, 4))
  loss, mse = flow.mean_flow_loss(straight, {"x0": X0}, X0, ctx, rng, interval_prob=1.0)
  assert float(loss) < 1e-8 and float(mse) < 1e-8

  def bent(variables, x, t_b, c, cm, xm, r_b=None):  # adds (t - r)·x: du/dt gains x + (t - r)·v
    return straight(variables, x, t_b, c, cm, xm) + ((t_b - r_b) / 1000.0)[:, None, None] * x

  no_interval, _ = flow.mean_flow_loss(bent, {"x0": X0}, X0, ctx, rng, interval_prob=0.0)
  on_interval, _ = flow.mean_flow_loss(bent, {"x0": X0}, X0, ctx, rng, interval_prob=1.0)
  assert float(no_interval) < 1e-8 and float(on_interval) > 1e-3
  # w = 1 is no guidance; the adaptive weight 1/(mse + c) maps any loss below 1.
  plain = flow.mean_flow_loss(bent, {"x0": X0}, X0, ctx, rng, interval_prob=1.0, cfg_scale=1.0)[0]
  np.testing.assert_allclose(plain, on_interval, rtol=1e-5)
  weighted, raw = flow.mean_flow_loss(bent, {"x0": X0}, X0, ctx, rng, interval_prob=1.0, adaptive_p=1.0)
  np.testing.assert_allclose(raw, on_interval, rtol=1e-5)
  assert float(weighted) < 1.0


def test_mean_flow_loss_folds_guidance_into_the_target():
  """At r = t the target is the guided field w·v + (1 − w)·u(z, t, t | ∅): a model that returns a constant c
  for the empty condition and ε − x0 otherwise is at its target only for w = 1."""
  ctx = jnp.ones((4, 3, 4))
  x0 = jnp.concatenate([X0, X0])

  def model(variables, x, t_b, c, cm, xm, r_b=None):
    uncond = jnp.all(c == 0, axis=(1, 2))[:, None, None]
    return jnp.where(uncond, 0.5, straight({"x0": x0}, x, t_b, c, cm, xm))

  rng = jax.random.key(10)
  assert float(flow.mean_flow_loss(model, None, x0, ctx, rng, interval_prob=0.0, cfg_scale=1.0)[0]) < 1e-8
  guided, _ = flow.mean_flow_loss(model, None, x0, ctx, rng, interval_prob=0.0, cfg_scale=3.0)
  assert float(guided) > 1e-2


def test_meanflow_stage_trains_from_a_stage2_workdir_and_generates_in_one_step(tmp_path, mesh1):
  """Three `meanflow` steps through the loop from a stage-2 workdir (its DiT is the start), then export and
  `generate --steps 1/2`: the Generator picks the mean-flow sampler, and its output is that sampler + decode."""
  import soundfile as sf

  from star_jax.cli import main
  from star_jax.config import load_config
  from star_jax.export import export_bundle
  from star_jax.generate import Generator
  from star_jax import trained
  from star_jax.train import loop
  from star_jax.train.stage import build_stage
  from star_jax.train.writer import read_metrics
  from tests.test_train_stages import SMALL
  from tests.train_standin import RandomRecords, random_workdir

  stage2 = tmp_path / "stage2"
  tree = random_workdir(load_config("configs/star.py:tiny", SMALL), str(stage2))

  cfg = load_config("configs/star.py:tiny", SMALL + [f"meanflow.init_stage2={stage2}", "meanflow.steps=3",
                                                     "meanflow.batch_size=8", "meanflow.lr=3e-3"])
  data = RandomRecords(cfg, n=8)
  work = tmp_path / "meanflow"
  res = loop.train(cfg, build_stage(cfg, "meanflow", data), str(work), data, mesh=mesh1, progress=False)
  rows = read_metrics(str(work))
  assert res.step == 3 and [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["mean_flow_mse"]) and r["grad_norm"] > 0 for r in rows)

  parts, _ = trained.load_trained(str(work))
  start = tree["params"]["dit"]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       {k: parts["dit"][k] for k in start}, start)
  assert 0 < max(jax.tree.leaves(moved)) < 0.1  # the stage-2 DiT, fine-tuned (3 steps of lr 3e-3)
  for name in tree["frozen"]:  # frozen: hubert, the bridge body, the VAE when the codec has params
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), parts[name],
                        {**tree["frozen"].get(name, {}), **tree["params"].get(name, {})})
    assert all(jax.tree.leaves(same)), name

  bundle = export_bundle(str(work), str(tmp_path / "bundle"))
  gen = Generator(bundle)
  assert gen.mean_flow
  tokens = jax.random.normal(jax.random.key(0), (1, cfg.qformer.num_queries, cfg.qformer.output_size))
  wav = gen.sample(tokens, 0.32, steps=2, seed=4)
  noise = jax.random.normal(jax.random.PRNGKey(4), (1, wav.shape[1] // gen.hop, int(cfg.vae.latent_channels)))
  latents = flow.mean_flow_sample(gen.dit.apply, {"params": gen.params["dit"]}, noise, tokens, num_steps=2)
  want = np.asarray(gen._decode(gen.vae_params, latents / float(cfg.flow.latent_scale)))
  # One program (loop + decode) against the two run apart: fusion moves the last bits, the Griffin-Lim of the
  # tiny mel codec grows them.
  np.testing.assert_allclose(wav, want[:, :wav.shape[1]], atol=1e-2 * np.abs(want).max())

  speech = tmp_path / "q.wav"
  sf.write(str(speech), 0.3 * np.sin(np.linspace(0, 900, 16000)).astype(np.float32), 16000)
  for steps in ("1", "2"):
    out = tmp_path / f"out{steps}.wav"
    assert main(["generate", "--ckpt", bundle, "--speech", str(speech), "--out", str(out), "--seconds", "0.32",
                 "--steps", steps]) == 0
    got, rate = sf.read(str(out))
    assert rate == cfg.vae.sample_rate_hz and got.shape == (int(0.32 * rate),) and np.all(np.isfinite(got))


def test_meanflow_eval_scores_teacher_and_student_on_tiny_data(tmp_path):
  """scripts/meanflow_eval.py's scoring on random bundles and 8 random clips: one row for the teacher and one per
  mean-flow step count, each figure in range, and the seed table over two runs."""
  pytest.importorskip("sklearn")
  from scripts.meanflow_eval import FIGURES, score_samplers, table
  from star_jax.config import load_config
  from star_jax.export import export_bundle
  from star_jax.generate import Generator
  from tests.test_train_stages import SMALL
  from tests.train_standin import random_workdir

  bundles = {}
  cfg = load_config("configs/star.py:tiny", SMALL)
  for name in ("stage2", "meanflow"):
    random_workdir(cfg, str(tmp_path / name), kind=name)
    bundles[name] = Generator(export_bundle(str(tmp_path / name), str(tmp_path / f"{name}_bundle")))
  assert bundles["meanflow"].mean_flow and not bundles["stage2"].mean_flow
  rng = np.random.default_rng(0)
  n, samples = 8, int(0.32 * cfg.vae.sample_rate_hz)
  labels = np.eye(2, dtype=np.float32)[np.arange(n) % 2]
  tone = np.sin(np.arange(samples) * np.where(labels[:, :1] > 0, 0.05, 0.4))  # class 0 low, class 1 high
  clips = {"audio": (0.3 * tone + 0.01 * rng.standard_normal((n, samples))).astype(np.float32), "labels": labels,
           "speech": rng.uniform(-0.3, 0.3, (n, 16000)).astype(np.float32), "speech_mask": np.ones((n, 16000), bool)}
  scores = score_samplers(bundles["stage2"], bundles["meanflow"], clips, clips, [1, 2], batch_size=4)
  assert list(scores) == [f"teacher: Euler {cfg.flow.num_steps} steps + CFG {cfg.flow.cfg_scale:g}", "mean flow, 1 step",
                          "mean flow, 2 steps"]
  for row in scores.values():
    assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["accuracy_vae_aware"] <= 1.0 and row["fd"] >= 0.0
  md = table({"seed 0": scores, "seed 1": scores})
  assert md.count("\n") == 4 and all(f"{f} range" in md for f in FIGURES)
