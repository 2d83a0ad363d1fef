"""Training-side faults through `star-jax train` (stand-in stage): SIGKILL mid-save and SIGTERM from outside
(real child processes), NaN/Inf at a known step, bad configs, bad records; `generate` on bad input."""

import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import soundfile as sf

from star_jax import checkpoint
from star_jax.cli import main
from star_jax.train.writer import read_metrics
from tests.reliability_child import TRAIN_ARGS, PoisonData, use_standin
from tests.train_standin import standin_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(str(workdir))]


def _train(workdir, *extra):
  return main(["train", "--workdir", str(workdir), *TRAIN_ARGS, *extra])


def _child(workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-m", "tests.reliability_child", str(workdir), str(STEPS), *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Losses of an uninterrupted in-process run of STEPS steps."""
  work = tmp_path_factory.mktemp("ref")
  with pytest.MonkeyPatch.context() as mp:
    use_standin(mp.setattr, STEPS)
    assert _train(work) == 0
  return _losses(work)


# --- Kills and preemption.

@pytest.mark.parametrize("where", ["finalize", pytest.param("write", marks=pytest.mark.slow)])
def test_sigkill_during_save_resumes_from_last_complete_checkpoint(where, tmp_path, reference, monkeypatch):
  work = tmp_path / "run"
  child = _child(work, "--kill-in-save", f"4:{where}")  # killed while saving step 4
  _, err = child.communicate(timeout=300)
  assert child.returncode == -signal.SIGKILL, err
  ckpts = sorted(os.listdir(work / "checkpoints"))
  assert "2" in ckpts and "4" not in ckpts and any(c.startswith("4.") for c in ckpts)  # 4 left unfinished
  assert checkpoint.TrainCheckpointer(str(work / "checkpoints")).latest_step() == 2

  use_standin(monkeypatch.setattr, STEPS)
  assert _train(work) == 0  # restores step 2 (state and data position), saves 4 again over the leftover
  assert _losses(work) == reference


def test_sigterm_from_outside_checkpoints_exits_0_and_resumes_bit_exact(tmp_path, reference, monkeypatch, capsys):
  work = tmp_path / "run"
  child = _child(work, "--step-delay", "0.3")
  deadline = time.time() + 240
  while not any(r["step"] >= 3 for r in read_metrics(str(work))):
    assert child.poll() is None and time.time() < deadline, child.communicate()[1]
    time.sleep(0.05)
  child.send_signal(signal.SIGTERM)
  out, err = child.communicate(timeout=120)
  assert child.returncode == 0, err
  assert "Traceback" not in err and "tta preempted at step" in out
  stopped = int(out.split("preempted at step ")[1].split()[0])
  assert 3 <= stopped < STEPS
  assert checkpoint.TrainCheckpointer(str(work / "checkpoints")).latest_step() == stopped

  use_standin(monkeypatch.setattr, STEPS)
  assert _train(work) == 0
  assert f"done at step {STEPS}" in capsys.readouterr().out
  assert _losses(work) == reference


# --- NaN / Inf.

@pytest.mark.parametrize("kind", [pytest.param("nan_loss", marks=pytest.mark.slow), "inf_grad"])
def test_nonfinite_stops_naming_the_step_and_keeps_last_good_checkpoint(kind, tmp_path, monkeypatch, capsys):
  use_standin(monkeypatch.setattr, 8, PoisonData(poison_step=5, kind=kind))
  # logs every 100 steps: the check still runs before every save, so step 6 is never saved
  code = _train(tmp_path, "--set", "train.log_every_steps=100")
  err = capsys.readouterr().err
  assert code == 1
  line, = [ln for ln in err.splitlines() if ln.startswith("star-jax train:")]
  assert "NaN/Inf at step 5" in line and "last good checkpoint is step 4" in line and "Traceback" not in err
  assert checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints")).all_steps() == [2, 4]


@pytest.mark.parametrize("kind", ["nan_loss", pytest.param("inf_grad", marks=pytest.mark.slow)])
def test_nonfinite_skip_policy_skips_exactly_that_batch(kind, tmp_path, monkeypatch):
  use_standin(monkeypatch.setattr, 5, PoisonData(poison_step=3, kind=kind))
  assert _train(tmp_path, "--set", "train.nan_policy='skip'", "--set", "train.checkpoint_every_steps=1",
                "--set", "train.keep_checkpoints=10") == 0
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints"))
  states = {s: ckpt.restore_numpy(s)[0] for s in (2, 3, 4)}
  ckpt.close()
  flat = lambda s: jax.tree.leaves((states[s]["params"], states[s]["opt_state"]))
  assert all(np.array_equal(a, b) for a, b in zip(flat(2), flat(3)))  # step 3 changed nothing
  assert not all(np.array_equal(a, b) for a, b in zip(flat(3), flat(4)))  # step 4 trained again
  rows = read_metrics(str(tmp_path))
  assert rows[-1]["step"] == 5 and rows[-1]["skipped_steps"] == 1
  assert all(np.isfinite(r["loss"]) for r in rows if r["step"] != 3)


# --- Configs: one line, exit 2, before data is opened or anything compiled.

@pytest.mark.parametrize("overrides,message", [
    (["train.no_such_key=1"], "config has no key 'train.no_such_key'"),
    (["mesh.data=3"], "needs 3 devices but 8 are present"),
    (["tta.batch_size=6"], "batch size 6 is not divisible by the data axes"),
])
def test_bad_config_fails_before_any_work(overrides, message, tmp_path, monkeypatch, capsys):
  from star_jax.train import loop, stage

  def no_work(*a, **kw):
    raise AssertionError("reached data or compilation")
  for name in ("RecordData", "build_stage"):
    monkeypatch.setattr(stage, name, no_work)
  monkeypatch.setattr(loop, "train", no_work)
  args = ["train", "--stage", "tta", "--workdir", str(tmp_path)]
  for o in overrides:
    args += ["--set", o]
  assert main(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err and err.startswith("star-jax train: error:")


# --- Bad records.

def _records(path, n=16, bad=5):
  """One shard of n records (speech 0.25 s, 4 labels) whose record `bad` fails its chunk hash."""
  from tests.dataset_writer import shard_path, write_split

  recs = []
  for i in range(n):
    r = np.random.default_rng(i)
    recs.append(dict(id=f"r{i:02d}", caption="a dog barks", speech=r.standard_normal(4000).astype(np.float32),
                     audio=r.standard_normal(4000).astype(np.float32), labels=np.eye(4, dtype=np.uint8)[i % 4]))
  write_split(path, "train", recs, shard_size=n, options="group_size:1,uncompressed", label_names=list("abcd"),
              speech_sample_rate_hz=16000, audio_sample_rate_hz=16000, text_dim=0)
  shard = shard_path(path, "train", 0, 1)
  data = bytearray(open(shard, "rb").read())
  offset = bytes(data).find(np.random.default_rng(bad).standard_normal(4000).astype(np.float32)[50:60].tobytes())
  assert offset > 0
  data[offset] ^= 0xFF
  open(shard, "wb").write(bytes(data))
  return os.path.basename(shard)


def _record_stage(cfg, name, data=None):
  """The stand-in stage reading records: x = the first 16 speech samples, y = the labels."""
  import dataclasses
  base = standin_stage(steps=4)

  def loss(params, frozen, batch, rng):
    return base.loss(params, frozen, {"x": batch["speech"][:, :16], "y": batch["labels"]}, rng)
  return dataclasses.replace(base, loss=loss, batch_keys=("speech", "labels"))


def test_bad_record_is_one_line_or_skipped_with_the_flag(tmp_path, monkeypatch, capsys):
  from star_jax.train import stage
  shard = _records(str(tmp_path / "ds"))
  monkeypatch.setattr(stage, "build_stage", _record_stage)
  data_args = ["--set", f"data.path={tmp_path / 'ds'}", "--set", "data.speech_duration_s=0.25",
               "--set", "data.audio_duration_s=0.25"]

  assert _train(tmp_path / "strict", *data_args) == 2
  err = capsys.readouterr().err
  line, = [ln for ln in err.splitlines() if ln.startswith("star-jax train:")]
  assert shard in line and "record 5" in line and "--skip-bad-records" in line and "Traceback" not in err

  assert _train(tmp_path / "skip", *data_args, "--skip-bad-records") == 0
  out = capsys.readouterr().out
  rows = read_metrics(str(tmp_path / "skip"))
  assert rows[-1]["step"] == 4 and rows[-1]["bad_records"] >= 1
  assert f"skipped {rows[-1]['bad_records']} bad records" in out


# --- generate on bad input (the cases tests/test_generate.py does not already cover).

def _hour_long_wav(path, rate=8000):
  """A valid one-hour 16-bit wav, written sparse (the header says an hour; the data is zeros)."""
  size = 3600 * rate * 2
  with open(path, "wb") as f:
    f.write(b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", size))
    f.truncate(44 + size)


@pytest.mark.parametrize("case", ["hour_long", "some_nan", "inf", "missing_ckpt", "not_a_bundle"])
def test_generate_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
  """Speech is checked before the bundle is loaded, so no bundle is built here: the speech cases never
  reach it, the --ckpt cases point at a missing folder or one that is not a bundle."""
  speech, ckpt = tmp_path / "in.wav", str(tmp_path / "bundle_not_reached")
  wave = 0.3 * np.sin(np.arange(16000) / 10).astype(np.float32)
  if case == "hour_long":
    _hour_long_wav(speech)
  elif case in ("some_nan", "inf"):
    wave[100:110] = np.nan if case == "some_nan" else np.inf
  if case != "hour_long":
    sf.write(str(speech), wave, 16000, subtype="FLOAT")
  if case == "missing_ckpt":
    ckpt = str(tmp_path / "no_bundle")
  elif case == "not_a_bundle":
    ckpt = str(tmp_path)
  code = main(["generate", "--ckpt", ckpt, "--speech", str(speech), "--out", str(tmp_path / "o.wav")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
  assert {"hour_long": "3600.0 s of speech is longer than 60 s", "some_nan": "non-finite samples",
          "inf": "non-finite samples", "missing_ckpt": "no_bundle", "not_a_bundle": "star-jax export"}[case] in err


def test_generate_real_process_prints_one_line(tmp_path):
  """The installed command, not `main()`: exit 2, one stderr line, no traceback, before JAX starts."""
  bad = tmp_path / "noise.wav"
  bad.write_bytes(np.random.default_rng(0).bytes(4096))
  proc = subprocess.run([sys.executable, "-m", "star_jax.cli", "generate", "--ckpt", str(tmp_path), "--speech",
                         str(bad), "--out", str(tmp_path / "o.wav")], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("star-jax generate: error:")
  assert "noise.wav" in proc.stderr and "Traceback" not in proc.stderr
