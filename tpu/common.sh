#!/usr/bin/env bash
# shellcheck shell=bash
# Shared helpers for the tpu/ scripts: settings, flag parsing, dry-run aware `run`, remote quoting.
#
# Sourced, never run. Every script reads its settings from the environment first, then lets flags
# override them, so `export TPU_NAME=... TPU_ZONE=...` once and the flags carry only what changes.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "common.sh is sourced by the other tpu/ scripts, not run" >&2
  exit 2
fi

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: the tpu/ scripts need bash 4.4 or newer, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi

# Settings shared by all scripts (environment first; flags parsed by parse_common_flag win).
TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_PROJECT=${TPU_PROJECT:-}
TPU_DRY_RUN=${TPU_DRY_RUN:-0}
# Where install.sh puts the virtual environment on each worker, and launch.sh finds `mistral-jax`.
# The ~ is the worker's home: it is expanded there, not here.
# shellcheck disable=SC2088
MISTRAL_JAX_VENV=${MISTRAL_JAX_VENV:-'~/mistral-jax-venv'}
# Set by parse_common_flag: how many arguments the caller's flag loop should shift.
# shellcheck disable=SC2034
COMMON_SHIFT=0
# A literal ~, for paths in the workers' home: remote_path "$HOME_TILDE/file".
# shellcheck disable=SC2034
HOME_TILDE='~'

die() {
  # Print "error: ..." and exit 2 (bad settings or arguments) unless another status is given.
  echo "error: $1" >&2
  exit "${2:-2}"
}

note() {
  echo "# $*" >&2
}

is_true() {
  case "${1,,}" in
    1 | true | yes | y | on) return 0 ;;
    *) return 1 ;;
  esac
}

dry_run() {
  is_true "$TPU_DRY_RUN"
}

require() {
  # require VALUE MESSAGE: die with MESSAGE when VALUE is empty.
  [[ -n "$1" ]] || die "$2"
}

require_name_zone() {
  require "$TPU_NAME" "TPU name not set: pass --name or set TPU_NAME"
  require "$TPU_ZONE" "TPU zone not set: pass --zone or set TPU_ZONE (e.g. us-east5-a)"
}

need_value() {
  # need_value "$@" inside a flag loop: the flag in $1 must be followed by a value in $2.
  [[ $# -ge 2 ]] || die "$1 needs a value"
  [[ "$2" != --* ]] || die "$1 needs a value, got the flag $2"
}

# shellcheck disable=SC2034  # COMMON_SHIFT is read by the caller
parse_common_flag() {
  # The flags every script takes. Returns 1 when $1 is not one of them; otherwise sets
  # COMMON_SHIFT to the number of arguments consumed.
  case "$1" in
    --name) need_value "$@"; TPU_NAME=$2; COMMON_SHIFT=2 ;;
    --zone) need_value "$@"; TPU_ZONE=$2; COMMON_SHIFT=2 ;;
    --project) need_value "$@"; TPU_PROJECT=$2; COMMON_SHIFT=2 ;;
    --dry-run) TPU_DRY_RUN=1; COMMON_SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# shellcheck disable=SC2034  # printed by each script's usage
COMMON_FLAGS_HELP="Common flags (environment variable in brackets; flags win):
  --name NAME       TPU VM / slice name [TPU_NAME]
  --zone ZONE       zone, e.g. us-east5-a [TPU_ZONE]
  --project ID      Google Cloud project; default: gcloud's configured project [TPU_PROJECT]
  --dry-run         print every command instead of running it [TPU_DRY_RUN=1]
  -h, --help        this help
  --flag=VALUE works as well as --flag VALUE."

quote_arg() {
  # One word, quoted for a POSIX shell: bare when safe, else in single quotes; words with control
  # characters (newline, tab, ...) fall back to bash's printf %q ($'...').
  local word=$1
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  elif [[ "$word" =~ [[:cntrl:]] ]]; then
    printf '%q' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  # All arguments as one shell-safe command line.
  local out="" word
  for word in "$@"; do
    out+="$(quote_arg "$word") "
  done
  printf '%s' "${out% }"
}

remote_path() {
  # A path for the worker's shell: a leading ~ stays unquoted so the worker expands it to its home.
  local path=$1
  # shellcheck disable=SC2088  # the literal ~ is the point: the worker's shell expands it
  if [[ "$path" == "~" ]]; then
    printf '~'
  elif [[ "$path" == "~/"* ]]; then
    printf '~/%s' "$(quote_arg "${path#\~/}")"
  else
    quote_arg "$path"
  fi
}

run() {
  # Dry run: print the command (stdout, one line, copy-pasteable). Otherwise echo it to stderr
  # with a "+ " prefix and run it.
  if dry_run; then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

gcloud_location_flags() {
  # Print --zone=... and (when set) --project=..., one per line, for mapfile.
  printf '%s\n' "--zone=$TPU_ZONE"
  if [[ -n "$TPU_PROJECT" ]]; then
    printf '%s\n' "--project=$TPU_PROJECT"
  fi
}

tpu_ssh() {
  # tpu_ssh WORKER COMMAND: run COMMAND (a shell string) on worker WORKER ("all" or an index).
  local worker=$1 command=$2 location
  mapfile -t location < <(gcloud_location_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" "--worker=$worker" "--command=$command"
}

check_worker() {
  [[ "$1" == all || "$1" =~ ^[0-9]+$ ]] || die "worker must be 'all' or a worker index, got '$1'"
}
