#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod (v4/v5p/v5e/v6e slices with several hosts).
# Copies this checkout (tracked and untracked, non-ignored files) to ~/star-jax on each worker, sets up
# ~/star-jax/.venv with jax[tpu] there (skipped when it already matches), then runs the command in
# ~/star-jax on all workers at once. JAX reads the pod's worker list from the TPU metadata, so
# star_jax.distributed.initialize() needs no flags.
#
#   launch/tpu_pod.sh --tpu star-v5p-64 --zone us-east5-a [--project P] [--no-setup] -- \
#     .venv/bin/star-jax train --config configs/star.py:paper --stage stage2 --workdir gs://bucket/star
#
# Environment forwarded to the workers: variables named in FORWARD_ENV (space-separated), e.g.
#   FORWARD_ENV="WANDB_API_KEY XLA_FLAGS" launch/tpu_pod.sh ...
# The workdir must be shared by all workers (a gs:// bucket): orbax writes checkpoints collectively.
set -euo pipefail

usage() {
  echo "usage: $0 --tpu NAME --zone ZONE [--project PROJECT] [--no-setup] -- COMMAND [ARGS...]" >&2
  exit 2
}

tpu="" zone="" project="" setup=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --no-setup) setup=0; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || usage
command -v gcloud >/dev/null || { echo "tpu_pod.sh: gcloud is not installed" >&2; exit 2; }

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("$tpu" --zone "$zone")
[[ -n "$project" ]] && where+=(--project "$project")
repo=$(cd "$(dirname "$0")/.." && pwd)
JAX_VERSION=$(cd "$repo" && ${PYTHON:-python3} -c 'import jax; print(jax.__version__)' 2>/dev/null || echo 0.10.2)

if ((setup)); then
  archive=$(mktemp --suffix=.tar.gz)
  trap 'rm -f "$archive"' EXIT
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -)
  echo "tpu_pod.sh: copying $(du -h "$archive" | cut -f1) of code to every worker of $tpu"
  "${gcloud_tpu[@]}" scp "$archive" "$tpu:/tmp/star-jax.tar.gz" --worker=all "${where[@]:1}"
  "${gcloud_tpu[@]}" ssh "${where[@]}" --worker=all --command "
    set -e
    mkdir -p ~/star-jax && tar -xzf /tmp/star-jax.tar.gz -C ~/star-jax && cd ~/star-jax
    test -x .venv/bin/python || python3 -m venv .venv
    if ! .venv/bin/python -c 'import jax, star_jax; assert jax.__version__ == \"$JAX_VERSION\"' 2>/dev/null; then
      .venv/bin/pip install -q --upgrade pip
      .venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -e .
    fi
    echo \"worker \$(hostname): \$(.venv/bin/python -c 'import jax; print(jax.__version__)') ready\""
fi

env_prefix=""
for name in ${FORWARD_ENV:-}; do
  env_prefix+="$name=$(printf '%q' "${!name-}") "
done
"${gcloud_tpu[@]}" ssh "${where[@]}" --worker=all --command "cd ~/star-jax && $env_prefix$(printf '%q ' "$@")"
