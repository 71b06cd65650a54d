#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice (e.g. v5p-32 = 4 hosts x 4 chips).
#
#   tools/launch_tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--dir vlaa-jax]
#       [--no-copy] [--no-install] [--dry-run] -- COMMAND [ARGS...]
#
# Steps: (1) pack the tracked files of this checkout and copy them to every worker, (2) install the
# package with JAX for TPU on every worker, (3) run COMMAND on every worker at once. Each worker runs
# the same command; vlaa_jax.distributed detects the slice (TPU_WORKER_HOSTNAMES) and calls
# jax.distributed.initialize(), so no coordinator address is needed. Only process 0 writes logs.
# --dir is relative to the remote home directory unless absolute.
# --dry-run prints the commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

tpu="" zone="" project="" remote_dir="vlaa-jax" copy=1 install=1 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --dir) remote_dir="$2"; shift 2 ;;
    --no-copy) copy=0; shift ;;
    --no-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch_tpu_pod.sh: unknown option $1 (put the command after --)" >&2; usage 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "launch_tpu_pod.sh: --tpu and --zone are required" >&2
  usage 2
fi
if [[ $# -eq 0 ]]; then
  echo "launch_tpu_pod.sh: no command given after --" >&2
  usage 2
fi

run() {
  if [[ "$dry_run" -eq 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

gcloud_args=(--zone "$zone")
if [[ -n "$project" ]]; then
  gcloud_args+=(--project "$project")
fi
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tarball="/tmp/vlaa-jax-${tpu}.tar.gz"
# The command, quoted once for the remote shell.
printf -v remote_cmd ' %q' "$@"

if [[ "$copy" -eq 1 ]]; then
  run git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "${gcloud_args[@]}" --worker=all "$tarball" "${tpu}:/tmp/vlaa-jax.tar.gz"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all \
    --command "mkdir -p ${remote_dir} && tar -xzf /tmp/vlaa-jax.tar.gz -C ${remote_dir}"
fi
if [[ "$install" -eq 1 ]]; then
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all \
    --command "cd ${remote_dir} && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ."
fi
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all \
  --command "cd ${remote_dir} &&${remote_cmd}"
