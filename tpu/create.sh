#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice (directly, or as a queued resource) for mistral-jax.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU_ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
TPU_VERSION=${TPU_VERSION:-}
TPU_SPOT=${TPU_SPOT:-0}
TPU_PREEMPTIBLE=${TPU_PREEMPTIBLE:-0}
TPU_QUEUED=${TPU_QUEUED:-0}
TPU_QUEUED_NAME=${TPU_QUEUED_NAME:-}

usage() {
  cat <<EOF
Usage: tpu/create.sh [flags] [-- extra gcloud flags]

Create a TPU VM (one host, e.g. v5litepod-8, v5p-8) or a pod slice (several hosts, e.g. v5p-64,
v4-32) with:
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME
or, with --queued, a queued resource that Cloud TPU fills when capacity frees up:
  gcloud compute tpus queued-resources create QR --node-id=NAME --zone=ZONE \\
    --accelerator-type=TYPE --runtime-version=RUNTIME
Arguments after -- go to gcloud unchanged (e.g. -- --network=my-net --reserved).

Flags (environment variable in brackets; flags win):
  --accelerator-type TYPE  e.g. v5litepod-8, v5p-8, v5p-64, v4-32, v6e-8 [TPU_ACCELERATOR_TYPE]
  --version RUNTIME        TPU software version; default by generation [TPU_VERSION]:
                             v2, v3, v4: tpu-ubuntu2204-base   v5litepod (v5e): v2-alpha-tpuv5-lite
                             v5p: v2-alpha-tpuv5                v6e: v2-alpha-tpuv6e
  --spot                   Spot capacity: cheaper, may be reclaimed at any time [TPU_SPOT=1]
  --preemptible            preemptible VM (older form of --spot; not with --queued) [TPU_PREEMPTIBLE=1]
  --queued                 create a queued resource instead of the VM directly [TPU_QUEUED=1]
  --queued-name QR         the queued resource's name; default: the TPU name [TPU_QUEUED_NAME]

$COMMON_FLAGS_HELP

Example:
  tpu/create.sh --name my-tpu --zone us-east5-a --accelerator-type v5p-64 --spot --queued
EOF
}

default_version() {
  # The runtime (TPU VM image) for a generation, from the Cloud TPU docs' JAX instructions.
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

EXTRA=()
while (($#)); do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --accelerator-type) need_value "$@"; TPU_ACCELERATOR_TYPE=$2; shift 2 ;;
    --version) need_value "$@"; TPU_VERSION=$2; shift 2 ;;
    --spot) TPU_SPOT=1; shift ;;
    --preemptible) TPU_PREEMPTIBLE=1; shift ;;
    --queued) TPU_QUEUED=1; shift ;;
    --queued-name) need_value "$@"; TPU_QUEUED_NAME=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *)
      if parse_common_flag "$@"; then shift "$COMMON_SHIFT"; else die "unknown argument: $1 (see --help)"; fi ;;
  esac
done

require_name_zone
require "$TPU_ACCELERATOR_TYPE" \
  "accelerator type not set: pass --accelerator-type or set TPU_ACCELERATOR_TYPE (e.g. v5litepod-8, v5p-64, v4-32)"
[[ "$TPU_ACCELERATOR_TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "accelerator type '$TPU_ACCELERATOR_TYPE' does not look like GENERATION-SIZE (e.g. v5litepod-8, v5p-64, v4-32)"
if [[ -z "$TPU_VERSION" ]]; then
  TPU_VERSION=$(default_version "$TPU_ACCELERATOR_TYPE") ||
    die "no default runtime version for '$TPU_ACCELERATOR_TYPE': pass --version or set TPU_VERSION (gcloud compute tpus tpu-vm versions list)"
fi
if is_true "$TPU_SPOT" && is_true "$TPU_PREEMPTIBLE"; then
  die "--spot and --preemptible exclude each other: pick one"
fi
if is_true "$TPU_QUEUED" && is_true "$TPU_PREEMPTIBLE"; then
  die "queued resources take --spot, not --preemptible"
fi

mapfile -t LOCATION < <(gcloud_location_flags)
CAPACITY=()
if is_true "$TPU_SPOT"; then CAPACITY=(--spot); fi
if is_true "$TPU_PREEMPTIBLE"; then CAPACITY=(--preemptible); fi

if is_true "$TPU_QUEUED"; then
  run gcloud compute tpus queued-resources create "${TPU_QUEUED_NAME:-$TPU_NAME}" "--node-id=$TPU_NAME" \
    "${LOCATION[@]}" "--accelerator-type=$TPU_ACCELERATOR_TYPE" "--runtime-version=$TPU_VERSION" \
    "${CAPACITY[@]}" "${EXTRA[@]}"
  note "queued: watch it with 'gcloud compute tpus queued-resources describe ${TPU_QUEUED_NAME:-$TPU_NAME} --zone=$TPU_ZONE';" \
    "the TPU is ready when its state is ACTIVE"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    "--accelerator-type=$TPU_ACCELERATOR_TYPE" "--version=$TPU_VERSION" \
    "${CAPACITY[@]}" "${EXTRA[@]}"
fi
