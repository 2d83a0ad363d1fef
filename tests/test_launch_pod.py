"""launch/tpu_pod.sh against a stand-in `gcloud` that plays two TPU workers on this machine (each its own
HOME): code and data reach every worker, the run starts detached with one log per worker, and the
printed stop command's process group is the run's."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `gcloud compute tpus tpu-vm scp SRC TPU:DEST --worker=all ...` copies SRC to DEST under each worker's HOME;
# `... ssh TPU --worker=all --command CMD` runs CMD with bash once per worker, HOME and hostname its own.
FAKE_GCLOUD = r'''#!/usr/bin/env bash
set -e
args=("$@"); cmd=""; files=()
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --command) cmd=${args[i+1]}; i=$((i + 1)) ;;
    --zone|--project) i=$((i + 1)) ;;
    --*|compute|tpus|tpu-vm|scp|ssh) ;;
    *) files+=("${args[i]}") ;;
  esac
done
for w in 0 1; do
  home=$FAKE_PODS/worker$w
  mkdir -p "$home"
  if [[ " $* " == *" scp "* ]]; then
    dest=${files[1]#*:}; cp "${files[0]}" "$home/${dest##*/}"
  else
    (cmd=${cmd//\/tmp\/star-jax/$home\/star-jax}; export HOME=$home FAKE_HOSTNAME=worker$w; cd "$home"; bash -c "$cmd")
  fi
done
'''


def test_tpu_pod_launcher_stages_data_and_runs_detached(tmp_path):
  bin_dir, pods, data = tmp_path / "bin", tmp_path / "pods", tmp_path / "mydata"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "hostname").write_text('#!/bin/sh\necho "$FAKE_HOSTNAME"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  data.mkdir()
  (data / "info.json").write_text("{}")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_PODS=str(pods), PYTHON=sys.executable,
             RUN_TAG="forwarded", FORWARD_ENV="RUN_TAG")
  script = "import os, time; print('started', os.environ['RUN_TAG'], os.listdir('data/mydata'), flush=True); time.sleep(60)"
  out = subprocess.run([os.path.join(ROOT, "launch", "tpu_pod.sh"), "--tpu", "pod", "--zone", "z", "--no-setup",
                        "--data", str(data), "--name", "t1", "--", sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "follow:" in out.stdout and "kill -TERM -- -$(cat ~/star-jax/logs/t1.pid)" in out.stdout
  pgids = []
  try:
    for w in (0, 1):
      log = pods / f"worker{w}" / "star-jax" / "logs" / f"t1.worker{w}.log"
      deadline = time.time() + 60
      while "started" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline, f"no log from worker {w}"
        time.sleep(0.2)
      assert "started forwarded ['info.json']" in log.read_text()
      pgid = int((pods / f"worker{w}" / "star-jax" / "logs" / "t1.pid").read_text())
      assert os.getpgid(pgid) == pgid and os.getsid(pgid) == pgid  # its own session: ssh hang-ups miss it
      pgids.append(pgid)
  finally:
    for pgid in pgids:
      os.killpg(pgid, 15)


# Stand-ins for srun / scancel / scontrol and a `star-jax` that saves on SIGTERM: enough of Slurm to run
# launch/slurm_gpu.sbatch's preemption path on this machine.
FAKE_SLURM = {
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n"$@" &\necho $! > "$FAKE_SLURM/task.pid"\nwait $!\n',
    "scancel": '#!/usr/bin/env bash\necho "scancel $*" >> "$FAKE_SLURM/calls"\nkill -TERM "$(cat "$FAKE_SLURM/task.pid")"\n',
    "scontrol": '#!/usr/bin/env bash\necho "scontrol $*" >> "$FAKE_SLURM/calls"\n',
    "star-jax": ('#!/usr/bin/env bash\ntrap \'echo "saved step 7"; exit 0\' TERM\necho "training $*"\n'
                 'while true; do sleep 0.1; done\n'),
}


def test_slurm_script_checkpoints_and_requeues_before_the_time_limit(tmp_path):
  """SIGTERM to the batch script (what --signal=B:TERM@300 sends): the tasks get SIGTERM, save and exit 0,
  and the script requeues the job and exits 0."""
  venv_bin = tmp_path / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  for name, text in FAKE_SLURM.items():
    path = (venv_bin if name == "star-jax" else tmp_path) / name
    path.write_text(text)
    path.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE_SLURM=str(tmp_path),
             STAR_VENV=str(tmp_path / "venv"), SLURM_JOB_ID="42", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
             SLURM_JOB_NODELIST="n1")
  job = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"), "train", "--workdir", "w"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 30
  while not (tmp_path / "task.pid").exists():
    assert job.poll() is None and time.time() < deadline
    time.sleep(0.1)
  time.sleep(0.5)
  job.send_signal(15)
  out, _ = job.communicate(timeout=30)
  assert job.returncode == 0, out
  assert "training train --workdir w" in out and "saved step 7" in out
  assert (tmp_path / "calls").read_text().splitlines() == ["scancel --signal=TERM 42", "scontrol requeue 42"]
