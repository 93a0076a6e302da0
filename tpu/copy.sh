#!/usr/bin/env bash
# Copy data (JSONL, tokenizers, HF checkpoints) between a gs:// bucket, this machine and the workers.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU_COPY_FROM=${TPU_COPY_FROM:-}
TPU_COPY_TO=${TPU_COPY_TO:-}
TPU_COPY_FROM_WORKERS=${TPU_COPY_FROM_WORKERS:-0}
TPU_WORKER=${TPU_WORKER:-}

usage() {
  cat <<EOF
Usage: tpu/copy.sh --from SRC --to DIR [flags]

Copies the file or directory SRC into the directory DIR (created when missing), like cp -r:
  gs://...     -> PATH      on every worker:  gcloud storage cp -r SRC DIR  (the usual way to get
                            data/train.jsonl onto all hosts of a pod)
  PATH         -> PATH      from this machine to every worker:  gcloud compute tpus tpu-vm scp --recurse
  PATH         -> gs://...  from this machine:  gcloud storage cp -r SRC DIR
                            with --from-workers: from worker 0's disk (e.g. files the job wrote locally)
Worker paths are relative to the workers' home directory (quote a leading ~).

Checkpoints: orbax checkpoints need no copying. mistral-jax reads and writes them on gs://
directly (--checkpoint gs://BUCKET/model, --output gs://BUCKET/run), and every worker reads just
its own shards. Only copy what is read from local disk: data (JSONL) and, when you start from
one, a Hugging Face / GGUF checkpoint (or convert that once to orbax on gs:// and skip the copy).

Flags (environment variable in brackets; flags win):
  --from SRC        what to copy: gs://..., or a path here / on the workers [TPU_COPY_FROM]
  --to DIR          the directory to copy into: gs://... or a path [TPU_COPY_TO]
  --from-workers    PATH -> gs://: take PATH from the workers, not this machine [TPU_COPY_FROM_WORKERS=1]
  --worker W        which workers: "all" or an index; default all when copying to the workers,
                    0 with --from-workers [TPU_WORKER]

$COMMON_FLAGS_HELP

Examples:
  gcloud storage cp train.jsonl gs://BUCKET/data/         # or: tpu/copy.sh --from train.jsonl --to gs://BUCKET/data
  tpu/copy.sh --name my-tpu --zone us-east5-a --from gs://BUCKET/data/train.jsonl --to data
EOF
}

while (($#)); do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --from) need_value "$@"; TPU_COPY_FROM=$2; shift 2 ;;
    --to) need_value "$@"; TPU_COPY_TO=$2; shift 2 ;;
    --from-workers) TPU_COPY_FROM_WORKERS=1; shift ;;
    --worker) need_value "$@"; TPU_WORKER=$2; shift 2 ;;
    *)
      if parse_common_flag "$@"; then shift "$COMMON_SHIFT"; else die "unknown argument: $1 (see --help)"; fi ;;
  esac
done

require "$TPU_COPY_FROM" "source not set: pass --from or set TPU_COPY_FROM (gs://BUCKET/data/train.jsonl or a path)"
require "$TPU_COPY_TO" "destination not set: pass --to or set TPU_COPY_TO (a directory: gs://BUCKET/data or a worker path like data)"

looks_like_checkpoint() {
  # A path hinting at a checkpoint (not a data file): worth the reminder in --help.
  local path=${1,,}
  [[ "$path" =~ (checkpoint|ckpt|orbax) && ! "${path%/}" =~ \.(jsonl|json|txt)$ ]]
}
for path in "$TPU_COPY_FROM" "$TPU_COPY_TO"; do
  if [[ "$path" == gs://* ]] && looks_like_checkpoint "$path"; then
    note "note: orbax checkpoints need no copy: mistral-jax reads and writes gs:// paths directly" \
      "(--checkpoint $path); copying anyway (Hugging Face / GGUF checkpoints are read from local disk)"
  fi
done

SRC=$TPU_COPY_FROM
DST=${TPU_COPY_TO%/}
DST=${DST:-/}
if [[ "$SRC" == gs://* && "$DST" == gs://* ]]; then
  die "both --from and --to are gs:// paths: use gcloud storage cp directly"
elif [[ "$SRC" == gs://* ]]; then
  # Bucket -> every worker, each downloading for itself.
  require_name_zone
  worker=${TPU_WORKER:-all}
  check_worker "$worker"
  dir=$(remote_path "$DST")
  tpu_ssh "$worker" "mkdir -p $dir && gcloud storage cp -r $(quote_arg "$SRC") $dir/ && echo \"\$(hostname): copied\" $(quote_arg "$(basename "$SRC") into $DST")"
elif [[ "$DST" == gs://* ]]; then
  if is_true "$TPU_COPY_FROM_WORKERS"; then
    require_name_zone
    worker=${TPU_WORKER:-0}
    check_worker "$worker"
    tpu_ssh "$worker" "gcloud storage cp -r $(remote_path "$SRC") $(quote_arg "$DST")/"
  else
    [[ -e "$SRC" ]] || dry_run || die "no such file or directory here: $SRC (add --from-workers to copy from the workers)"
    run gcloud storage cp -r "$SRC" "$DST/"
  fi
else
  # This machine -> every worker.
  is_true "$TPU_COPY_FROM_WORKERS" && die "--from-workers copies to a gs:// bucket; to fetch logs use tpu/logs.sh"
  require_name_zone
  worker=${TPU_WORKER:-all}
  check_worker "$worker"
  [[ -e "$SRC" ]] || dry_run || die "no such file or directory here: $SRC"
  tpu_ssh "$worker" "mkdir -p $(remote_path "$DST")"
  mapfile -t LOCATION < <(gcloud_location_flags)
  run gcloud compute tpus tpu-vm scp --recurse "$SRC" "$TPU_NAME:${DST%/}/" "${LOCATION[@]}" "--worker=$worker"
fi
