"""`loop.train` under 2 real processes (launch/local.sh 2, 4 CPU devices each) equals 1 process on the same
global batches: losses over 6 steps spanning a checkpoint save and epoch boundaries; stage 1's validation over
an uneven split (one process has no rows in the last batch), its early stopping and best/, on gs://."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from star_jax import checkpoint
from star_jax.train import loop
from star_jax.train.writer import read_metrics
from tests import train_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(num_processes, *args, cwd, timeout_s=420, env_extra=None):
  """launch/local.sh N python tests/train_worker.py ARGS -> the completed process (output merged)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("STAR_", "SLURM_")) and k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, DEVICES="4", PYTHONPATH=ROOT, **(env_extra or {}))
  return subprocess.run([os.path.join(ROOT, "launch", "local.sh"), str(num_processes), sys.executable,
                         os.path.join(ROOT, "tests", "train_worker.py"), *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


def one_process(workdir, stage_name):
  cfg, stage, data = train_worker.make_run(stage_name)
  return loop.train(cfg, stage, str(workdir), data, progress=False)


def assert_same_losses(one, two):
  a, b = read_metrics(one), read_metrics(two)
  assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 5
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", [pytest.param("vae", marks=pytest.mark.slow),
                                   pytest.param("tta", marks=pytest.mark.slow), "stage2"])
def test_two_processes_train_like_one(stage, tmp_path):
  run = launch(2, str(tmp_path / "two"), stage, cwd=tmp_path)
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
  one_process(tmp_path / "one", stage)
  assert_same_losses(str(tmp_path / "one"), str(tmp_path / "two"))
  assert checkpoint.TrainCheckpointer(str(tmp_path / "two" / "checkpoints")).all_steps() == [4, 6]


def test_two_process_stage1_on_gcs_validates_like_one(gcs, tmp_path):
  """Validation mAP over the whole (uneven) split, early stopping and best/ equal the 1-process run's;
  best/ restores on another mesh; nothing is written under the working directory."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  two = "gs://star-test/stage1-two"
  run = launch(2, two, "stage1", cwd=cwd)
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
  assert os.listdir(cwd) == []
  one = one_process(tmp_path / "one", "stage1")
  assert_same_losses(str(tmp_path / "one"), two)

  val_one, val_two = read_metrics(str(tmp_path / "one"), "val"), read_metrics(two, "val")
  assert [r["step"] for r in val_two] == [r["step"] for r in val_one] and len(val_one) >= 2
  assert all(r["examples"] == train_worker.VALID_EXAMPLES for r in val_two)
  np.testing.assert_allclose([r["mAP"] for r in val_two], [r["mAP"] for r in val_one], rtol=0, atol=1e-6)
  results = [l for l in run.stdout.splitlines() if "RESULT" in l]
  assert len(results) == 2 and all(f'"status": "{one.status}"' in l for l in results)  # same decision everywhere

  # best/ was written once (both processes' shards of one checkpoint) and restores on one device here
  best_one, _ = checkpoint.load_params(str(tmp_path / "one" / "best"))
  best_two, meta = checkpoint.load_params(two + "/best")
  assert meta["kind"] == "stage1" and [n for n in gcs.objects("stage1-two/") if n.endswith("config.json")]
  for a, b in zip(jax.tree.leaves(best_one), jax.tree.leaves(best_two), strict=True):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
