#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice (e.g. v5p-32 = 4 hosts x 4 chips).
#
#   tools/launch_tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--dir vlaa-jax] [--python python3]
#       [--head] [--no-copy] [--no-install] [--dry-run] -- COMMAND [ARGS...]
#
# Steps: (1) pack this checkout's working tree (tracked files with their uncommitted edits, and
# untracked files git does not ignore; --head: the last commit only) and copy it to every worker,
# (2) install the package with jax[tpu] in setup.py's range, with --python (default python3), on every
# worker, (3) run COMMAND on every worker at once (use the same interpreter name in it). Each worker runs
# the same command; vlaa_jax.distributed detects the slice (TPU_WORKER_HOSTNAMES) and calls
# jax.distributed.initialize(), so no coordinator address is needed. Only process 0 writes logs.
# --dir is relative to the remote home directory unless absolute.
# --dry-run prints the commands instead of running them.
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

tpu="" zone="" project="" remote_dir="vlaa-jax" copy=1 install=1 dry_run=0 head=0 py=python3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --dir) remote_dir="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --head) head=1; shift ;;
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

# jax[tpu] within the range setup.py allows (e.g. ">=0.10.2,<0.13").
jax_range="$(sed -n 's/^ *"jax\([<>=!~][^"]*\)",.*/\1/p' "$repo_root/setup.py" | head -n 1)"
if [[ -z "$jax_range" ]]; then
  echo "launch_tpu_pod.sh: no \"jax...\" requirement found in $repo_root/setup.py" >&2
  exit 2
fi

pack_working_tree() {  # tracked files as they are on disk (edits included) + untracked, not ignored
  if [[ "$dry_run" -eq 1 ]]; then
    echo "+ git -C $repo_root ls-files -z --cached --others --exclude-standard | tar -C $repo_root --null" \
      "--ignore-failed-read -czf $tarball -T -"
    return
  fi
  git -C "$repo_root" ls-files -z --cached --others --exclude-standard \
    | tar -C "$repo_root" --null --ignore-failed-read -czf "$tarball" -T -
}

if [[ "$copy" -eq 1 ]]; then
  if [[ "$head" -eq 1 ]]; then
    echo "launch_tpu_pod.sh: shipping HEAD ($(git -C "$repo_root" rev-parse --short HEAD)) ONLY: uncommitted" \
      "edits and untracked files are NOT shipped" >&2
    run git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
  else
    echo "launch_tpu_pod.sh: shipping the working tree of $repo_root (uncommitted edits and untracked," \
      "non-ignored files included)" >&2
    pack_working_tree
  fi
  run gcloud compute tpus tpu-vm scp "${gcloud_args[@]}" --worker=all "$tarball" "${tpu}:/tmp/vlaa-jax.tar.gz"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all \
    --command "mkdir -p ${remote_dir} && tar -xzf /tmp/vlaa-jax.tar.gz -C ${remote_dir}"
fi
if [[ "$install" -eq 1 ]]; then
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all \
    --command "cd ${remote_dir} && ${py} -m pip install -q -U 'jax[tpu]${jax_range}' && ${py} -m pip install -q -e ."
fi
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all \
  --command "cd ${remote_dir} &&${remote_cmd}"
