"""Each stage's real step on the tiny config (random records), and stage 2 sharded == single device."""

import jax
import numpy as np
import pytest

from star_jax.config import load_config
from star_jax.train import loop
from star_jax.train.stage import build_stage
from star_jax.train.writer import read_metrics
from tests.train_standin import RandomRecords

# The tiny config made smaller still (fewer layers and blocks: compile time dominates these tests).
SMALL = ["data.speech_duration_s=0.5", "data.audio_duration_s=0.32", "train.log_every_steps=1",
         "train.checkpoint_every_steps=100", "hubert.num_layers=1", "hubert.conv_dim=(16,16)",
         "dit.depth=2", "vae.channel_multiples=(1,2)", "vae.downsampling_ratios=(16,20)", "qformer.num_layers=1"]


def _cfg(stage, *extra):
  section = {"vae": "vae_stage"}.get(stage, stage)
  steps = [] if stage == "stage1" else [f"{section}.steps=3"]
  return load_config("configs/star.py:tiny", SMALL + steps + [f"{section}.batch_size=8", *extra])


@pytest.mark.parametrize("name", [pytest.param("vae", marks=pytest.mark.slow), "tta", "stage1", "stage2"])
def test_three_steps(name, tmp_path, mesh1):
  extra = {"stage1": ["stage1.max_epochs=3"], "vae": ["vae.kind=oobleck"],  # tiny's mel codec: fixed
           "stage2": ["stage2.ema_decay=0.5"]}.get(name, [])
  cfg = _cfg(name, *extra)
  data = RandomRecords(cfg, n=8)  # stage 1: one step per epoch, so 3 steps = 3 validations
  res = loop.train(cfg, build_stage(cfg, name, data), str(tmp_path), data, mesh=mesh1, progress=False)
  rows = read_metrics(str(tmp_path))
  assert res.step == 3 and [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
  if name == "stage1":
    val = read_metrics(str(tmp_path), "val")
    assert len(val) == 3 and all(0.0 <= r["mAP"] <= 1.0 for r in val)
    # tiny: `stage1.keep_best=False`: the best epoch is recorded but not written, so loaders read the last one.
    assert not cfg.stage1.keep_best and res.best is not None and not (tmp_path / "best").exists()
    from star_jax.metrics.scores import mean_average_precision
    from star_jax import trained
    from star_jax.train import stage1
    parts, kind = trained.load_trained(str(tmp_path))
    assert kind == "stage1"
    # stage1.classify (the demo's test mAP, scripts/research/stage1_voice_check.py) is the model the last validation ran;
    # batches of 5 leave a padded last batch.
    ex = data.examples
    _, probs = stage1.classify(cfg, parts, np.stack([e["speech"] for e in ex]),
                               np.stack([e["speech_mask"] for e in ex]), len(data.label_names), batch_size=5)
    assert probs.shape == (len(ex), len(data.label_names))
    assert mean_average_precision(np.stack([e["labels"] for e in ex]), probs) == pytest.approx(val[-1]["mAP"],
                                                                                              abs=1e-6)
  if name == "stage2":
    # tiny: `stage2.train_projection=False` keeps stage 1's tokens as they are (the paper trains the bridge's
    # last projection too), and the loop reads the training split with the stage's own `random_crop` (False).
    from star_jax import checkpoint, trained
    assert not cfg.stage2.train_projection and not cfg.stage2.random_crop
    state, _ = checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints")).restore_numpy()
    frozen, _ = checkpoint.load_params(str(tmp_path / "frozen"))  # written once, not into each checkpoint
    assert not state["params"]["bridge"] and "projection" in frozen["bridge"] and not state.get("frozen")
    assert data.random_crops == [("train", False)]
    # ema_decay > 0: the EMA starts as a copy of the loaded params (one buffer cannot be donated twice to the
    # step), moves with them, and is what loaders and bundles read.
    gaps = jax.tree.leaves(jax.tree.map(lambda e, p: float(np.abs(e - p).max()), state["ema"]["dit"],
                                        state["params"]["dit"]))
    assert all(np.isfinite(g) for g in gaps) and max(gaps) > 0
    jax.tree.map(np.testing.assert_array_equal, trained.component(str(tmp_path), "dit"), state["ema"]["dit"])


def test_stage1_keeps_the_best_epoch_and_stops_after_patience(tmp_path, mesh1):
  import dataclasses

  from star_jax import trained
  cfg = _cfg("stage1", "stage1.max_epochs=6", "stage1.patience_epochs=2", "stage1.keep_best=True")
  data = RandomRecords(cfg, n=8)  # one step per epoch
  stage = build_stage(cfg, "stage1", data)
  scores = iter([0.3, 0.5, 0.4, 0.45, 0.9, 0.9])  # best at epoch 2; epochs 3 and 4 do not beat it
  seen = {}

  def evaluate(state, data, mesh):
    seen[int(state.step)] = jax.tree.map(np.asarray, state.params)
    return {"score": next(scores)}

  res = loop.train(cfg, dataclasses.replace(stage, evaluate=evaluate), str(tmp_path), data, mesh=mesh1,
                   progress=False)
  assert res.status == "early_stopped" and res.step == 4 and res.best["step"] == 2
  best, _ = trained.load_trained(str(tmp_path))  # best/ wins over the later checkpoints
  for a, b in zip(jax.tree.leaves(best["bridge"]), jax.tree.leaves(seen[2]["bridge"])):
    np.testing.assert_array_equal(a, b)


# With kernels split over `fsdp` on their input axis while the batch is too, XLA's SPMD partitioner computes a
# wrong DiT loss on 2x2x2 (1-5 %; docs/notes/yardsticks.md). Dense gathers its kernel over `fsdp` for compute
# (sharding.gather_fsdp, ZeRO-3), which this test pins.
@pytest.mark.parametrize("shape", [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["data8", "mesh222"])
def test_stage2_loss_sharded_equals_single_device(shape, stage2_one_device_loss, tmp_path):
  from star_jax import sharding
  np.testing.assert_allclose(_stage2_first_loss(sharding.make_mesh(shape), tmp_path), stage2_one_device_loss,
                             rtol=0, atol=1e-5)


def _stage2_first_loss(mesh, workdir):
  cfg = _cfg("stage2", "stage2.steps=1")
  data = RandomRecords(cfg, n=8)
  loop.train(cfg, build_stage(cfg, "stage2", data), str(workdir), data, mesh=mesh, progress=False)
  return read_metrics(str(workdir))[0]["loss"]


@pytest.fixture(scope="module")
def stage2_one_device_loss(mesh1, tmp_path_factory):
  """The single-device reference of both meshes above, trained once."""
  return _stage2_first_loss(mesh1, tmp_path_factory.mktemp("stage2_one_device"))


@pytest.mark.parametrize("train_hubert", [True, False])
def test_stage1_reads_cached_hubert_frames_only_when_hubert_is_frozen(train_hubert):
  # A stage 1 that trains HuBERT must run it on the waveform even when the records carry cached frames (from
  # `prepare cache`, i.e. from some other HuBERT): reading them trained the bridge on stale features while
  # validation, uncached, ran the untrained HuBERT (stage 1 on the demo's cached data: valid mAP 0.08 vs 0.66).
  import jax
  from flax.core import meta
  cfg = _cfg("stage1", f"stage1.train_hubert={train_hubert}")
  data = RandomRecords(cfg, n=4)
  stage = build_stage(cfg, "stage1", data)
  state = meta.unbox(jax.jit(stage.init)(jax.random.PRNGKey(0)))
  batch = {k: np.stack([e[k] for e in data.examples]) for k in ("speech", "speech_mask", "labels")}
  cached = dict(batch, hubert=np.random.default_rng(1).standard_normal((4, 7, cfg.hubert.hidden_size)).astype(
      np.float32), hubert_mask=np.ones((4, 7), bool))
  step_loss = jax.jit(stage.loss)
  loss = lambda b: float(step_loss(state["params"], state["frozen"], b, jax.random.PRNGKey(2))[0])
  if train_hubert:
    assert loss(cached) == loss(batch)
  else:
    assert loss(cached) != loss(batch)



def test_mlp_bridge_trains_in_stage1_and_stage2_and_generates(tmp_path, mesh1):
  """bridge.kind=mlp (STAR Table 2's other bridge): stage 1 trains it, its BatchNorm running statistics written by
  the step (not by the optimizer); stage 2 starts from that workdir with the MLP frozen; the export generates."""
  from star_jax import trained
  from star_jax.export import export_bundle
  from star_jax.generate import Generator

  mlp = ["bridge.kind=mlp", "dit.context_slots=0"]
  cfg1 = _cfg("stage1", "stage1.max_epochs=3", *mlp)
  data = RandomRecords(cfg1, n=8)
  stage = build_stage(cfg1, "stage1", data)
  init = jax.jit(stage.init)(jax.random.PRNGKey(cfg1.seed))
  res = loop.train(cfg1, stage, str(tmp_path / "s1"), data, mesh=mesh1, progress=False)
  assert res.step == 3 and all(np.isfinite(r["loss"]) for r in read_metrics(str(tmp_path / "s1")))
  parts, _ = trained.load_trained(str(tmp_path / "s1"))
  assert sorted(parts["bridge"]) == ["batch_stats", "params"]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       parts["bridge"]["batch_stats"], init["frozen"]["bridge"]["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 0  # every running mean and variance left its init

  cfg2 = _cfg("stage2", *mlp, f"stage2.init_bridge={tmp_path / 's1'}")
  res = loop.train(cfg2, build_stage(cfg2, "stage2", data), str(tmp_path / "s2"), data, mesh=mesh1, progress=False)
  assert res.step == 3
  s2, _ = trained.load_trained(str(tmp_path / "s2"))
  jax.tree.map(np.testing.assert_array_equal, s2["bridge"], parts["bridge"])  # frozen whole in stage 2
  gen = Generator(export_bundle(str(tmp_path / "s2"), str(tmp_path / "bundle")))
  wav = gen([np.random.default_rng(0).uniform(-0.3, 0.3, 8000).astype(np.float32)], 0.32, steps=2)
  assert wav.shape == (1, int(0.32 * gen.sample_rate_hz)) and np.all(np.isfinite(wav))

