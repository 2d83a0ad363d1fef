"""Run state on gs:// against a real GCS API (tests/gcs_emulator.py on 127.0.0.1): train, SIGTERM, resume
bit-exact; best/, export and generate through URLs; nothing lands under the working directory."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import soundfile as sf

from star_jax import checkpoint
from star_jax.cli import main
from star_jax.train.writer import read_metrics
from tests.reliability_child import TRAIN_ARGS, use_standin
from tests.train_standin import random_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(str(workdir))]


def test_train_sigterm_resume_on_gcs(gcs, tmp_path, monkeypatch, capsys):
  """A child trains into gs://, is SIGTERMed, saves and exits 0; the same command resumes bit-exact."""
  use_standin(monkeypatch.setattr, STEPS)
  assert main(["train", "--workdir", str(tmp_path / "ref"), *TRAIN_ARGS]) == 0
  reference = _losses(tmp_path / "ref")

  work, cwd = "gs://star-test/sigterm", tmp_path / "cwd"
  cwd.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  child = subprocess.Popen([sys.executable, "-m", "tests.reliability_child", work, str(STEPS), "--step-delay", "0.5"],
                           cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not any(r["step"] >= 3 for r in read_metrics(work)):
    assert child.poll() is None and time.time() < deadline, child.communicate()[1][-3000:]
    time.sleep(0.2)
  child.send_signal(signal.SIGTERM)
  out, err = child.communicate(timeout=120)
  assert child.returncode == 0 and "preempted at step" in out, err[-3000:]
  stopped = int(out.split("preempted at step ")[1].split()[0])
  assert 3 <= stopped < STEPS
  assert checkpoint.TrainCheckpointer(work + "/checkpoints").latest_step() == stopped
  assert os.listdir(cwd) == [] and not os.path.exists(os.path.join(ROOT, "gs:"))

  assert main(["train", "--workdir", work, *TRAIN_ARGS]) == 0
  assert f"done at step {STEPS}" in capsys.readouterr().out
  assert _losses(work) == reference
  names = gcs.objects("sigterm/")
  assert "sigterm/config.json" in names and "sigterm/metrics.jsonl" in names
  assert any(n.startswith(f"sigterm/checkpoints/{STEPS}/state/") for n in names)


def test_export_to_and_generate_from_gcs(gcs, tmp_path):
  """A stage-2 workdir on gs:// (best/ + config.json) -> export to gs:// -> generate reads the bundle there."""
  from star_jax.config import load_config
  from star_jax.export import export_bundle, load_bundle

  cfg = load_config("configs/star.py:tiny", ["dit.depth=2", "hubert.num_layers=1", "flow.num_steps=2"])
  work = "gs://star-test/stage2"
  tree = random_workdir(cfg, work)
  bundle = export_bundle(work, "gs://star-test/bundle")
  assert bundle == "gs://star-test/bundle" and "bundle/config.json" in gcs.objects("bundle/")

  _, params = load_bundle(bundle)
  for got, want in zip(jax.tree.leaves(params["dit"]), jax.tree.leaves(tree["params"]["dit"]), strict=True):
    np.testing.assert_array_equal(got, np.asarray(want))
  speech = tmp_path / "q.wav"
  sf.write(str(speech), (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32), 16000)
  out = tmp_path / "out.wav"
  assert main(["generate", "--ckpt", bundle, "--speech", str(speech), "--out", str(out), "--seconds", "0.5",
               "--steps", "2"]) == 0
  wav, rate = sf.read(str(out))
  assert wav.shape == (int(0.5 * rate),) and np.all(np.isfinite(wav))
