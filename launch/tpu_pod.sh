#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod (v4/v5p/v5e/v6e slices with several hosts),
# detached from this ssh session, with one log per worker. See docs/pod.md for a worked example.
#
#   launch/tpu_pod.sh --tpu star-v5p-64 --zone us-east5-a --data gs://BUCKET/opensfx --name s2 -- \
#     .venv/bin/star-jax train --config configs/star.py:paper --stage stage2 --workdir gs://BUCKET/star/stage2 \
#       --set data.path=data/opensfx
#
# 1. setup (skip with --no-setup): copies this checkout (tracked and untracked, non-ignored files) to
#    ~/star-jax on each worker and makes ~/star-jax/.venv with jax[tpu] there (skipped when it matches).
# 2. data: --data gs://BUCKET/PATH copies the dataset to ~/star-jax/data/<basename> on every worker
#    (`gcloud storage rsync`, only what changed); --data LOCAL_DIR copies a local folder the same way (scp);
#    --gcsfuse BUCKET mounts the bucket at ~/gcs/BUCKET on every worker instead (no copy; reads go to GCS).
# 3. run: starts the command in ~/star-jax on all workers with setsid + nohup (a dropped ssh connection does
#    not stop it), output to ~/star-jax/logs/NAME.<worker hostname>.log, and prints how to follow, stop
#    (SIGTERM: every process saves the same step and exits 0) and resume (the same command again).
#
# JAX reads the pod's worker list from the TPU metadata, so star_jax.distributed.initialize() needs no
# flags. The workdir must be one place all workers see (a gs:// bucket): orbax writes checkpoints from
# every worker. Environment forwarded to the workers: variables named in FORWARD_ENV (space-separated).
set -euo pipefail

usage() {
  echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--no-setup] [--data gs://B/PATH|DIR | --gcsfuse BUCKET]" \
       "[--name RUN] -- COMMAND [ARGS...]" >&2
  exit 2
}

tpu="" zone="" project="" setup=1 data="" bucket="" name="run"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --no-setup) setup=0; shift ;;
    --data) data=${2%/}; shift 2 ;;
    --gcsfuse) bucket=${2#gs://}; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || usage
[[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "tpu_pod.sh: --name must be letters, digits, _ . -" >&2; exit 2; }
command -v gcloud >/dev/null || { echo "tpu_pod.sh: gcloud is not installed" >&2; exit 2; }

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("$tpu" --zone "$zone")
[[ -n "$project" ]] && where+=(--project "$project")
on_all() { "${gcloud_tpu[@]}" ssh "${where[@]}" --worker=all --command "$1"; }
repo=$(cd "$(dirname "$0")/.." && pwd)
JAX_VERSION=$(cd "$repo" && ${PYTHON:-python3} -c 'import jax; print(jax.__version__)' 2>/dev/null || echo 0.10.2)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ((setup)); then
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar -czf "$tmp/code.tar.gz" --null -T -)
  echo "tpu_pod.sh: copying $(du -h "$tmp/code.tar.gz" | cut -f1) of code to every worker of $tpu"
  "${gcloud_tpu[@]}" scp "$tmp/code.tar.gz" "$tpu:/tmp/star-jax.tar.gz" --worker=all "${where[@]:1}"
  on_all "
    set -e
    mkdir -p ~/star-jax && tar -xzf /tmp/star-jax.tar.gz -C ~/star-jax && cd ~/star-jax
    test -x .venv/bin/python || python3 -m venv .venv
    if ! .venv/bin/python -c 'import jax, star_jax, gcsfs; assert jax.__version__ == \"$JAX_VERSION\"' 2>/dev/null; then
      .venv/bin/pip install -q --upgrade pip
      .venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -e '.[gcs]'
    fi
    echo \"worker \$(hostname): \$(.venv/bin/python -c 'import jax; print(jax.__version__)') ready\""
fi

# The dataset: every worker reads its own shard of the records (grain's per-process sharding) from a
# local path, so each needs the data under the same path.
if [[ "$data" == gs://* ]]; then
  echo "tpu_pod.sh: copying $data to ~/star-jax/data/$(basename "$data") on every worker"
  on_all "mkdir -p ~/star-jax/data/$(basename "$data") &&
          gcloud storage rsync --recursive $(printf '%q' "$data") ~/star-jax/data/$(basename "$data")"
elif [[ -n "$data" ]]; then
  [[ -d "$data" ]] || { echo "tpu_pod.sh: --data $data is neither gs://... nor a folder" >&2; exit 2; }
  tar -czf "$tmp/data.tar.gz" -C "$(dirname "$data")" "$(basename "$data")"
  echo "tpu_pod.sh: copying $(du -h "$tmp/data.tar.gz" | cut -f1) of data to every worker"
  "${gcloud_tpu[@]}" scp "$tmp/data.tar.gz" "$tpu:/tmp/star-jax-data.tar.gz" --worker=all "${where[@]:1}"
  on_all "mkdir -p ~/star-jax/data && tar -xzf /tmp/star-jax-data.tar.gz -C ~/star-jax/data"
fi
if [[ -n "$bucket" ]]; then
  echo "tpu_pod.sh: mounting gs://$bucket at ~/gcs/$bucket on every worker (gcsfuse)"
  on_all "mkdir -p ~/gcs/$bucket && (mountpoint -q ~/gcs/$bucket || gcsfuse --implicit-dirs $bucket ~/gcs/$bucket)"
fi

env_prefix=""
for var in ${FORWARD_ENV:-}; do
  env_prefix+="$var=$(printf '%q' "${!var-}") "
done
log="logs/$name.\$(hostname).log"
command=$(printf '%q ' "$@")
on_all "cd ~/star-jax && mkdir -p logs &&
  if [ -f logs/$name.pid ] && kill -0 -- -\$(cat logs/$name.pid) 2>/dev/null; then
    echo \"worker \$(hostname): run '$name' is still running (logs/$name.pid)\" >&2; exit 1; fi
  $env_prefix setsid nohup bash -c $(printf '%q' "exec $command") > $log 2>&1 < /dev/null &
  echo \$! > logs/$name.pid
  echo \"worker \$(hostname): started '$name', log ~/star-jax/$log\""

ssh_cmd="${gcloud_tpu[*]} ssh ${where[*]}"
cat <<MSG
tpu_pod.sh: '$name' runs detached on every worker of $tpu.
  follow:  $ssh_cmd --worker=0 --command 'tail -f ~/star-jax/logs/$name.*.log'
  stop:    $ssh_cmd --worker=all --command 'kill -TERM -- -\$(cat ~/star-jax/logs/$name.pid)'
           (every process saves the same step and exits 0)
  resume:  the same launch/tpu_pod.sh command with --no-setup (and without --data once it is copied)
MSG
