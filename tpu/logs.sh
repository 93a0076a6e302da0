#!/usr/bin/env bash
# Fetch the per-worker logs of launch.sh jobs to a local directory, or follow one worker's log live.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU_JOB=${TPU_JOB:-}
TPU_WORKERS=${TPU_WORKERS:-}
TPU_WORKER=${TPU_WORKER:-}
TPU_LOGS_DIR=${TPU_LOGS_DIR:-}
FOLLOW=0

usage() {
  cat <<EOF
Usage: tpu/logs.sh [flags]
       tpu/logs.sh --follow [--job JOB] [--worker W] [flags]

Copies ~/mistral-jax-JOB.log (every job's log without --job) from each worker into
DIR/worker-I/, one gcloud compute tpus tpu-vm scp per worker. The number of workers comes from
  gcloud compute tpus tpu-vm describe NAME --zone=ZONE --format='value(networkEndpoints.len())'
unless --workers says it (a v5litepod-8 or v5p-8 has 1 worker; a v5p-64 has 8, a v4-32 has 4).
With --follow, streams one worker's log instead (tail -F; Ctrl-C to stop: the job keeps running).

Flags (environment variable in brackets; flags win):
  --job JOB       job name given to launch.sh (default there: sft or generate) [TPU_JOB];
                  default: all jobs' logs (and for --follow, the newest log)
  --workers N     number of workers, skipping the describe call [TPU_WORKERS]
  --worker I      only this worker (fetch), or the one to follow (default 0) [TPU_WORKER]
  --dir DIR       local directory for the logs [TPU_LOGS_DIR, default tpu-logs/NAME]
  --follow        follow the log live on one worker

$COMMON_FLAGS_HELP

Example:
  tpu/logs.sh --name my-tpu --zone us-east5-a --job sft    # -> tpu-logs/my-tpu/worker-0/mistral-jax-sft.log, ...
EOF
}

while (($#)); do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --job) need_value "$@"; TPU_JOB=$2; shift 2 ;;
    --workers) need_value "$@"; TPU_WORKERS=$2; shift 2 ;;
    --worker) need_value "$@"; TPU_WORKER=$2; shift 2 ;;
    --dir) need_value "$@"; TPU_LOGS_DIR=$2; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    *)
      if parse_common_flag "$@"; then shift "$COMMON_SHIFT"; else die "unknown argument: $1 (see --help)"; fi ;;
  esac
done

require_name_zone
[[ -z "$TPU_JOB" || "$TPU_JOB" =~ ^[A-Za-z0-9_.-]+$ ]] || die "job name '$TPU_JOB' may only hold letters, digits, '_', '.' and '-'"
[[ -z "$TPU_WORKERS" || "$TPU_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive number, got '$TPU_WORKERS'"
[[ -z "$TPU_WORKER" || "$TPU_WORKER" =~ ^[0-9]+$ ]] || die "--worker must be a worker index, got '$TPU_WORKER'"
mapfile -t LOCATION < <(gcloud_location_flags)
pattern="mistral-jax-${TPU_JOB:-*}.log"

if is_true "$FOLLOW"; then
  if [[ -n "$TPU_JOB" ]]; then
    target=$(remote_path "$HOME_TILDE/$pattern")
  else
    target="\"\$(ls -t ~/mistral-jax-*.log | head -n 1)\""
  fi
  tpu_ssh "${TPU_WORKER:-0}" "tail -n 200 -F $target"
  exit 0
fi

if [[ -n "$TPU_WORKER" ]]; then
  workers=("$TPU_WORKER")
else
  count=$TPU_WORKERS
  if [[ -z "$count" ]]; then
    describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" "--format=value(networkEndpoints.len())")
    if dry_run; then
      run "${describe[@]}"
      note "dry run: the number of workers comes from the describe command above; showing worker 0 (pass --workers N to show all)"
      count=1
    else
      count=$(run "${describe[@]}")
      [[ "$count" =~ ^[1-9][0-9]*$ ]] || die "could not read the number of workers of $TPU_NAME (got '$count'): pass --workers N" 1
    fi
  fi
  mapfile -t workers < <(seq 0 $((count - 1)))
fi

dir=${TPU_LOGS_DIR:-tpu-logs/$TPU_NAME}
failed=()
for worker in "${workers[@]}"; do
  run mkdir -p "$dir/worker-$worker"
  if ! run gcloud compute tpus tpu-vm scp "$TPU_NAME:$pattern" "$dir/worker-$worker/" "${LOCATION[@]}" "--worker=$worker"; then
    failed+=("$worker")
  fi
done
if ((${#failed[@]})); then
  die "could not copy $pattern from worker(s) ${failed[*]} (did the job start there? see tpu/launch.sh)" 1
fi
dry_run || note "logs of ${#workers[@]} worker(s) in $dir/worker-*/"
