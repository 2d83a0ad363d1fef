"""Multi-host start-up: process-group resolution, and a real two-process CPU run equal to one process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from star_jax import distributed
from star_jax.errors import UserError

import distributed_worker  # tests/distributed_worker.py
from conftest import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_single_process_by_default(monkeypatch):
  for name in list(os.environ):
    if name.startswith(("STAR_", "SLURM_", "TPU_")):
      monkeypatch.delenv(name)
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda env: False)
  monkeypatch.setattr(distributed, "_joined", None)
  g = distributed.resolve()
  assert g.source == "single" and g.num_processes == 1
  assert distributed.resolve(num_processes=1).source == "single"
  # nothing to join: jax.distributed is left alone (devices are already up in this process)
  assert distributed.initialize() == g
  assert distributed.initialize(num_processes=2) == g  # idempotent: the first call decided


def test_explicit_arguments_beat_environment():
  env = {"STAR_COORDINATOR": "h0:1234", "STAR_NUM_PROCESSES": "4", "STAR_PROCESS_ID": "3"}
  g = distributed.resolve(environ=env)
  assert (g.source, g.coordinator, g.num_processes, g.process_id) == ("env", "h0:1234", 4, 3)
  g = distributed.resolve(coordinator="h1:99", process_id=1, environ=env)
  assert (g.source, g.coordinator, g.num_processes, g.process_id) == ("explicit", "h1:99", 4, 1)


def test_bad_arguments_are_user_errors():
  with pytest.raises(UserError, match="--coordinator"):
    distributed.resolve(num_processes=2, process_id=0, environ={})
  with pytest.raises(UserError, match="outside"):
    distributed.resolve("h:1", 2, 2, environ={})
  with pytest.raises(UserError, match="host:port"):
    distributed.resolve("h", 2, 0, environ={})
  with pytest.raises(UserError, match="--num-processes"):
    distributed.resolve(coordinator="h:1", environ={})
  with pytest.raises(UserError, match="not an integer"):
    distributed.resolve(environ={"STAR_NUM_PROCESSES": "two"})


def _slurm(**extra):
  env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "gpu[003-004,010],cpu1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
  env.update(extra)
  return env


def test_slurm_one_process_per_gpu():
  g = distributed.resolve(environ=_slurm())
  assert (g.source, g.num_processes, g.process_id) == ("slurm", 16, 5)
  assert g.coordinator == f"gpu003:{4242 % 4096 + 61440}"
  assert g.local_device_ids == (1,)  # task 1 of its node takes GPU 1
  assert distributed.resolve(environ=_slurm(JAX_COORDINATOR_PORT="7777")).coordinator == "gpu003:7777"
  # Slurm already bound one GPU to the task (--gpus-per-task=1): use all that is visible
  assert distributed.resolve(environ=_slurm(CUDA_VISIBLE_DEVICES="3")).local_device_ids is None


def test_slurm_one_process_per_node_and_single_task():
  g = distributed.resolve(environ=_slurm(SLURM_NTASKS="2", SLURM_LOCALID="0",
                                         SLURM_STEP_TASKS_PER_NODE="1(x2)"))
  assert g.num_processes == 2 and g.local_device_ids is None  # the process drives all GPUs of its node
  assert distributed.resolve(environ=_slurm(SLURM_NTASKS="1")).source == "single"


def test_first_slurm_host():
  assert distributed.first_slurm_host("node001") == "node001"
  assert distributed.first_slurm_host("node001,host2") == "node001"
  assert distributed.first_slurm_host("node[001-015],host2") == "node001"
  assert distributed.first_slurm_host("node[007,009-015]") == "node007"


def test_cli_flags():
  import argparse
  p = argparse.ArgumentParser()
  distributed.add_distributed_arguments(p)
  a = p.parse_args(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
  assert (a.coordinator, a.num_processes, a.process_id) == ("h:1", 2, 1)
  assert p.parse_args([]).num_processes is None


def _run_together(commands_envs, timeout_s: float = 240) -> list[str]:
  """Start every (argv, env) at once, wait with a timeout, kill leftovers -> outputs; all must exit 0."""
  procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
           for argv, env in commands_envs]
  outputs = []
  try:
    outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _free_port() -> int:
  return pytest.importorskip("portpicker").pick_unused_port()


def _run_workers(num_processes: int, *extra: str, timeout_s: float = 240) -> list[dict]:
  port = _free_port()
  env = worker_env(PYTHONPATH=REPO)
  worker = os.path.join(REPO, "tests", "distributed_worker.py")
  outputs = _run_together(
      [([sys.executable, worker, "--coordinator", f"localhost:{port}", "--num-processes", str(num_processes),
         "--process-id", str(i), *extra], env) for i in range(num_processes)], timeout_s)
  return [json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
          for out in outputs]


def test_two_processes_equal_one():
  """jax.distributed on localhost, gloo CPU collectives, FSDP across the processes."""
  results = _run_workers(2)
  assert sorted(r["process_id"] for r in results) == [0, 1]
  n = distributed_worker.DEVICES_PER_PROCESS * 2
  reference = distributed_worker.mlp_losses(jax.devices()[:n])  # one process, the same global batch
  for r in results:
    np.testing.assert_allclose(r["losses"], reference, rtol=0, atol=1e-5)
  assert reference[-1] < reference[0]



@pytest.mark.slow
def test_two_processes_train_stage2_like_one():
  """3 stage-2 steps of the tiny config, batch split over two processes == one process."""
  pytest.importorskip("star_jax.train.stage2")
  results = _run_workers(2, "--model", "stage2", timeout_s=900)
  n = distributed_worker.DEVICES_PER_PROCESS * 2
  reference = distributed_worker.stage_losses(jax.devices()[:n])
  for r in results:
    np.testing.assert_allclose(r["losses"], reference, rtol=0, atol=1e-5)


PROBE = ("from star_jax import distributed; g = distributed.initialize(); import jax; "
         "print('PROBE', g.source, jax.process_count(), jax.process_index(), len(jax.devices()), flush=True)")


def test_local_launcher_runs_a_process_group():
  """launch/local.sh: N processes, STAR_* environment, distinct ids, a free port."""
  env = dict(os.environ, PYTHON=sys.executable, DEVICES="1", PYTHONPATH=REPO)
  out = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "2", sys.executable, "-c", PROBE],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
  assert out.returncode == 0, out.stdout + out.stderr
  probes = sorted(l for l in out.stdout.splitlines() if "PROBE" in l)
  assert probes == ["[0] PROBE env 2 0 2", "[1] PROBE env 2 1 2"], out.stdout


def test_local_launcher_stops_the_rest_on_failure():
  script = 'if [ "$STAR_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 60'
  out = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "2", "bash", "-c", script],
                       capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHON=sys.executable))
  assert out.returncode == 3 and "stopping the others" in out.stderr


def test_slurm_environment_joins_without_flags():
  """What srun gives each task (launch/slurm_gpu.sbatch), on localhost with the CPU backend."""
  port = str(_free_port())
  runs = []
  for i in range(2):
    env = worker_env(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", JAX_COORDINATOR_PORT=port,
                     SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                     SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="2")
    runs.append(([sys.executable, "-c", PROBE], env))
  for i, out in enumerate(_run_together(runs, timeout_s=120)):
    assert f"PROBE slurm 2 {i} 2" in out, out[-2000:]


def test_tpu_launcher_usage():
  out = subprocess.run([os.path.join(REPO, "launch", "tpu_pod.sh")], capture_output=True, text=True, timeout=30)
  assert out.returncode == 2 and "usage" in out.stderr
