#!/usr/bin/env bash
# Submit one command as a multi-node GPU job on SLURM (one process per node, all its GPUs).
#
#   tools/launch_slurm.sh [--nodes 2] [--gpus-per-node 8] [--partition P] [--account A]
#       [--time 24:00:00] [--job-name vlaa-jax] [--port 12355] [--venv PATH] [--dry-run]
#       -- COMMAND [ARGS...]
#
# Writes an sbatch script that starts COMMAND once per node with srun, exporting
# VLAA_COORDINATOR_ADDRESS (first node:port), VLAA_NUM_PROCESSES and VLAA_PROCESS_ID, which
# vlaa_jax.distributed.initialize() reads. Run it from the repository root on a shared file system.
# --dry-run prints the sbatch script and the sbatch command instead of submitting.
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

nodes=2 gpus=8 partition="" account="" time_limit="24:00:00" job_name="vlaa-jax" port=12355
venv="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch_slurm.sh: unknown option $1 (put the command after --)" >&2; usage 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "launch_slurm.sh: no command given after --" >&2
  usage 2
fi
if ! [[ "$nodes" =~ ^[0-9]+$ && "$gpus" =~ ^[0-9]+$ && "$nodes" -ge 1 && "$gpus" -ge 1 ]]; then
  echo "launch_slurm.sh: --nodes and --gpus-per-node must be positive integers" >&2
  exit 2
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
printf -v command ' %q' "$@"
activate=""
if [[ -n "$venv" ]]; then
  printf -v activate 'source %q/bin/activate' "$venv"
fi

script="$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=${job_name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${gpus}
#SBATCH --cpus-per-task=16
#SBATCH --time=${time_limit}
#SBATCH --output=${job_name}-%j.out
${partition:+#SBATCH --partition=${partition}}
${account:+#SBATCH --account=${account}}
set -euo pipefail
cd $(printf '%q' "$repo_root")
${activate}
head_node=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
export VLAA_COORDINATOR_ADDRESS="\${head_node}:${port}"
export VLAA_NUM_PROCESSES="\$SLURM_NNODES"
srun --ntasks-per-node=1 bash -c 'VLAA_PROCESS_ID=\$SLURM_PROCID exec "\$@"' vlaa-jax${command}
SBATCH
)"

if [[ "$dry_run" -eq 1 ]]; then
  printf '%s\n' "$script"
  echo "+ sbatch <the script above>"
  exit 0
fi
script_file="$(mktemp "${TMPDIR:-/tmp}/${job_name}.XXXXXX.sbatch")"
printf '%s\n' "$script" > "$script_file"
echo "sbatch script: $script_file"
sbatch "$script_file"
