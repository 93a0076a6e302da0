#!/usr/bin/env bash
# Run `mistral-jax sft ...` or `mistral-jax generate ...` on every worker of a TPU VM / pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU_MESH=${TPU_MESH:-}
TPU_JOB=${TPU_JOB:-}
TPU_FOREGROUND=${TPU_FOREGROUND:-0}
TPU_WORKER=${TPU_WORKER:-all}
# Extra environment for the job on the workers: space-separated KEY=VALUE words.
TPU_LAUNCH_ENV=${TPU_LAUNCH_ENV:-}
STOP=0

usage() {
  cat <<EOF
Usage: tpu/launch.sh [flags] sft|generate [-- mistral-jax arguments]
       tpu/launch.sh [flags] --stop [--job JOB]

Runs MISTRAL_JAX_VENV/bin/mistral-jax COMMAND --mesh MESH ARGUMENTS on every worker at once
(gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...), in the workers' home directory.
On a pod slice every worker runs the same command: jax.distributed.initialize() finds the
coordinator from the TPU environment, so no --coordinator / --process-id flags are needed.

By default the job runs in the background on each worker (nohup), logging to
~/mistral-jax-JOB.log with its pid in ~/mistral-jax-JOB.pid; watch it with tpu/logs.sh --follow,
fetch the logs with tpu/logs.sh, stop it with tpu/launch.sh --stop. A job still running under the
same name is not started twice (the TPU chips take one process at a time).
Give paths after -- relative to the workers' home (data/train.jsonl), as gs:// URLs, or as '~/...'
in quotes (a bare ~ would be expanded by your local shell).

Flags (environment variable in brackets; flags win):
  --mesh SPEC       device mesh, required: e.g. fsdp=8, or data=2,fsdp=16 (axes data, fsdp, expert,
                    tensor; fsdp takes the devices the others leave) [TPU_MESH]
  --job JOB         job name for the log and pid files; default: the command (sft, generate) [TPU_JOB]
  --foreground      run attached: output streams here (and to the log file); Ctrl-C may leave
                    the job running on the workers, so stop it with --stop [TPU_FOREGROUND=1]
  --env KEY=VALUE   extra environment for the job, repeatable [TPU_LAUNCH_ENV="K1=V1 K2=V2"]
  --stop            stop the job JOB (SIGTERM to the pid in ~/mistral-jax-JOB.pid) on every worker
  --venv DIR        virtual environment made by install.sh [MISTRAL_JAX_VENV, default ~/mistral-jax-venv]
  --worker W        "all" or one worker index [TPU_WORKER, default all]

$COMMON_FLAGS_HELP

Examples:
  tpu/launch.sh --name my-tpu --zone us-east5-a --mesh fsdp=8 sft -- \\
    --checkpoint gs://BUCKET/mistral-7b-orbax --data data/train.jsonl --steps 1000 --output gs://BUCKET/runs/sft-1
  tpu/launch.sh --name my-tpu --zone us-east5-a --mesh fsdp=8 --foreground generate -- \\
    --checkpoint gs://BUCKET/runs/sft-1 --prompt "What is the capital of France?"
EOF
}

COMMAND=""
ARGS=()
ENV_WORDS=()
if [[ -n "$TPU_LAUNCH_ENV" ]]; then
  read -r -a ENV_WORDS <<<"$TPU_LAUNCH_ENV"
fi
while (($#)); do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --mesh) need_value "$@"; TPU_MESH=$2; shift 2 ;;
    --job) need_value "$@"; TPU_JOB=$2; shift 2 ;;
    --foreground) TPU_FOREGROUND=1; shift ;;
    --env) need_value "$@"; ENV_WORDS+=("$2"); shift 2 ;;
    --stop) STOP=1; shift ;;
    --venv) need_value "$@"; MISTRAL_JAX_VENV=$2; shift 2 ;;
    --worker) need_value "$@"; TPU_WORKER=$2; shift 2 ;;
    --) shift; ARGS=("$@"); break ;;
    sft | generate)
      [[ -z "$COMMAND" ]] || die "give one command, got '$COMMAND' and '$1'"
      COMMAND=$1; shift ;;
    -*)
      if parse_common_flag "$@"; then shift "$COMMON_SHIFT"; else die "unknown argument: $1 (see --help)"; fi ;;
    *) die "unknown command '$1': expected sft or generate (mistral-jax's own arguments go after --)" ;;
  esac
done

require_name_zone
check_worker "$TPU_WORKER"
TPU_JOB=${TPU_JOB:-$COMMAND}
if is_true "$STOP"; then
  require "$TPU_JOB" "job not set: pass --job JOB (or the command, sft or generate) to say which job to stop"
fi
[[ -z "$TPU_JOB" || "$TPU_JOB" =~ ^[A-Za-z0-9_.-]+$ ]] || die "job name '$TPU_JOB' may only hold letters, digits, '_', '.' and '-'"
log=$(remote_path "$HOME_TILDE/mistral-jax-$TPU_JOB.log")
pidfile=$(remote_path "$HOME_TILDE/mistral-jax-$TPU_JOB.pid")

if is_true "$STOP"; then
  tpu_ssh "$TPU_WORKER" "if [ -f $pidfile ] && kill \"\$(cat $pidfile)\" 2>/dev/null; then echo \"\$(hostname): stopped job $TPU_JOB\"; else echo \"\$(hostname): job $TPU_JOB is not running\"; fi; rm -f $pidfile"
  exit 0
fi

require "$COMMAND" "command not set: give sft or generate before -- (e.g. tpu/launch.sh --mesh fsdp=8 sft -- ...)"
require "$TPU_MESH" "mesh not set: pass --mesh or set TPU_MESH (e.g. fsdp=8 on a v5e-8, data=2,fsdp=16 on a v5p-64)"
require "$MISTRAL_JAX_VENV" "virtual environment not set: pass --venv or set MISTRAL_JAX_VENV"
for arg in "${ARGS[@]}"; do
  [[ "$arg" != --mesh && "$arg" != --mesh=* ]] || die "give the mesh once, with launch.sh's --mesh, not after --"
done
for word in "${ENV_WORDS[@]}"; do
  [[ "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$word'"
done

# The command line as the workers' shell will read it.
job="$(remote_path "$MISTRAL_JAX_VENV")/bin/mistral-jax $COMMAND --mesh $(quote_arg "$TPU_MESH")"
for arg in "${ARGS[@]}"; do
  job+=" $(remote_path "$arg")"
done
if ((${#ENV_WORDS[@]})); then
  job="env $(quote_cmd "${ENV_WORDS[@]}") $job"
fi

if is_true "$TPU_FOREGROUND"; then
  remote="cd ~ && set -o pipefail && $job 2>&1 | tee $log"
else
  running="[ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null"
  remote="cd ~ && if $running; then echo \"\$(hostname): job $TPU_JOB is still running (pid \$(cat $pidfile)); stop it with tpu/launch.sh --stop --job $TPU_JOB\" >&2; exit 1; fi"
  remote+="; nohup $job > $log 2>&1 < /dev/null & echo \$! > $pidfile"
  remote+="; echo \"\$(hostname): started mistral-jax $COMMAND (pid \$(cat $pidfile)), log $log\""
fi
tpu_ssh "$TPU_WORKER" "$remote"
if ! is_true "$TPU_FOREGROUND" && ! dry_run; then
  note "running in the background; follow worker 0 with: tpu/logs.sh --follow --job $TPU_JOB (same --name/--zone)"
fi
