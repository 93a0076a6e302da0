#!/usr/bin/env bash
# Delete a TPU VM / pod slice, or the queued resource that holds it, after confirmation.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU_QUEUED=${TPU_QUEUED:-0}
TPU_QUEUED_NAME=${TPU_QUEUED_NAME:-}
TPU_YES=${TPU_YES:-0}

usage() {
  cat <<EOF
Usage: tpu/delete.sh [flags]

Deletes the TPU VM / slice NAME:
  gcloud compute tpus tpu-vm delete NAME --zone=ZONE --quiet
or, with --queued, the queued resource and the TPU it holds:
  gcloud compute tpus queued-resources delete QR --zone=ZONE --force --quiet
Everything on the workers' disks is lost (checkpoints written to gs:// are not). Asks first
(y/N on standard input) unless --yes.

Flags (environment variable in brackets; flags win):
  --queued          delete the queued resource (and its TPU) [TPU_QUEUED=1]
  --queued-name QR  the queued resource's name; default: the TPU name [TPU_QUEUED_NAME]
  -y, --yes         do not ask [TPU_YES=1]

$COMMON_FLAGS_HELP
EOF
}

while (($#)); do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --queued) TPU_QUEUED=1; shift ;;
    --queued-name) need_value "$@"; TPU_QUEUED_NAME=$2; shift 2 ;;
    -y | --yes) TPU_YES=1; shift ;;
    *)
      if parse_common_flag "$@"; then shift "$COMMON_SHIFT"; else die "unknown argument: $1 (see --help)"; fi ;;
  esac
done

require_name_zone
mapfile -t LOCATION < <(gcloud_location_flags)
if is_true "$TPU_QUEUED"; then
  what="queued resource ${TPU_QUEUED_NAME:-$TPU_NAME} (and its TPU)"
  command=(gcloud compute tpus queued-resources delete "${TPU_QUEUED_NAME:-$TPU_NAME}" "${LOCATION[@]}" --force --quiet)
else
  what="TPU $TPU_NAME"
  command=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet)
fi

if ! is_true "$TPU_YES" && ! dry_run; then
  answer=""
  read -r -p "Delete $what in zone $TPU_ZONE${TPU_PROJECT:+ (project $TPU_PROJECT)}? [y/N] " answer || true
  case "${answer,,}" in
    y | yes) ;;
    *) die "not deleted (answer y to delete, or pass --yes)" 1 ;;
  esac
fi
run "${command[@]}"
