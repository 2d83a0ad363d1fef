"""The shared training loop on a stand-in stage: resume, preemption, NaN policy, cross-mesh restore."""

import os
import signal

import jax
import numpy as np
import pytest

from star_jax import checkpoint
from star_jax.train import loop
from star_jax.train.writer import read_metrics
from tests.train_standin import ArrayData, standin_config, standin_stage


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(workdir)]


def test_runs_and_writes_metrics(tmp_path, mesh222):
  res = loop.train(standin_config(), standin_stage(steps=4), str(tmp_path), ArrayData(), mesh=mesh222,
                   progress=False)
  assert res.status == "done" and res.step == 4
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
  assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(3e-3)  # warm-up of 2 steps
  assert checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints")).all_steps() == [2, 4]


def test_sigterm_then_resume_matches_uninterrupted(tmp_path, mesh222):
  cfg = standin_config()
  ref = str(tmp_path / "ref")
  loop.train(cfg, standin_stage(steps=6), ref, ArrayData(), mesh=mesh222, progress=False)

  run = str(tmp_path / "run")

  def preempt(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  first = loop.train(cfg, standin_stage(steps=6), run, ArrayData(), mesh=mesh222, progress=False,
                     on_step=preempt)
  assert first.status == "preempted" and first.step == 3
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
  second = loop.train(cfg, standin_stage(steps=6), run, ArrayData(), mesh=mesh222, progress=False)
  assert second.status == "done" and second.step == 6
  assert _losses(run) == _losses(ref)  # bit-exact: same data order, same rng, same params


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, mesh222):
  data = ArrayData(n=64, nan_at=range(64))  # every batch is NaN
  cfg = standin_config("train.checkpoint_every_steps=1")
  with pytest.raises(loop.TrainingDiverged, match="at step 1"):
    loop.train(cfg, standin_stage(steps=4), str(tmp_path), data, mesh=mesh222, progress=False)
  assert checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints")).latest_step() is None


def test_nan_skip_policy_skips_batch(tmp_path, mesh1):
  bad = ArrayData(n=8, nan_at=[3])  # batch 8 of 8 examples: every step has the NaN example
  cfg = standin_config("train.nan_policy='skip'")
  stage = standin_stage(steps=3, batch_size=4)
  res = loop.train(cfg, stage, str(tmp_path), bad, mesh=mesh1, progress=False)
  assert res.status == "done"
  rows = read_metrics(str(tmp_path))
  assert rows[-1]["skipped_steps"] >= 1
  assert all(np.isfinite(r["loss"]) for r in rows if r.get("skipped_steps", 0) == 0)


def test_checkpoint_restores_on_another_mesh(tmp_path, mesh222, mesh1, rules):
  from star_jax import sharding
  from star_jax.train import state as state_lib

  cfg, stage = standin_config(), standin_stage(steps=2)
  loop.train(cfg, stage, str(tmp_path), ArrayData(), mesh=mesh222, progress=False)
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints"))
  tx = state_lib.make_optimizer(stage.hparams, state_lib.make_schedule(stage.hparams, 8, 2))
  rng = jax.random.PRNGKey(0)
  saved, _ = ckpt.restore(checkpoint.abstract_tree(*state_lib.state_layout(stage.init, tx, mesh222, rules,
                                                                            rng, False)).replace(frozen=None))
  mesh412 = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
  for mesh in (mesh1, mesh412):
    shapes, shards = state_lib.state_layout(stage.init, tx, mesh, rules, rng, False)
    restored, meta = ckpt.restore(checkpoint.abstract_tree(shapes, shards).replace(frozen=None))  # frozen/
    assert int(restored.step) == 2 and meta["stage"] == "standin"
    for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(shards)):
      assert a.sharding == s
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
