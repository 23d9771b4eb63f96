#!/usr/bin/env bash
# Train (or evaluate) clevr_jax on a Cloud TPU VM or pod slice.
#
# Steps, each one gcloud command (printed as it runs; --dry-run prints them only):
#   1. reuse the TPU VM NAME if it exists (starting it if stopped), else create it;
#   2. ship this checkout to every worker (tar + scp), or git-clone --repo-url there;
#   3. install the project with its TPU extra into ~/clevr_jax/.venv on every worker;
#   4. build the dataset if it is not built yet, once, on worker 0 alone;
#   5. run clevr_jax.main on all workers at once with --distributed;
#   6. optionally delete the TPU VM (--delete-after).
#
# On a multi-host slice every host runs one process, and all of them read one dataset
# and write one checkpoint directory: --workdir and --data-dir must be on gs://.
# Re-running the same command resumes from the newest checkpoint in --workdir.
#
# Written for bash 3.2 too (macOS's /bin/bash), since this runs on laptops.
set -euo pipefail

readonly PROG="launch/tpu_vm.sh"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_DIR
readonly DRY="[dry-run]"
readonly REMOTE_DIR="clevr_jax" # on each worker, relative to the login directory

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config CONFIG --workdir DIR [options] [-- extra main flags]

Required (flag, or the environment variable in brackets):
  --name NAME               TPU VM name; reused if it exists            [TPU_NAME]
  --zone ZONE               e.g. us-central2-b                           [TPU_ZONE]
  --config CONFIG           e.g. configs/unet_rgb.py or ...:synthetic    [CONFIG]
  --workdir DIR             checkpoints and results; gs://... on a
                            multi-host slice                             [WORKDIR]

Options:
  --accelerator-type TYPE   v4-8 (default), v4-32, v5litepod-8, v5p-16, v6e-8, ...
                            Multi-host when the number is above 8.       [TPU_ACCELERATOR_TYPE]
  --version RUNTIME         TPU software version; default by family:
                            v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e      [TPU_VERSION]
  --project PROJECT         GCP project (default: gcloud's)              [TPU_PROJECT]
  --data-dir DIR            TFDS data_dir, gs://... on a multi-host slice [DATA_DIR]
  --mode MODE               train (default), evaluate, baselines, report  [MODE]
  --no-prepare              skip the --mode=prepare step on worker 0 that otherwise
                            runs first (quick when the data is already built)
  --repo-url URL            git clone URL on the workers instead of copying this checkout
  --ref REF                 branch or tag for --repo-url (default main)
  --delete-after            delete the TPU VM when the run ends, failed or not
                            (requires a gs:// workdir: nothing else survives)
  --dry-run                 print every command, prefixed "$DRY", and run nothing
  -h, --help                this text

Arguments after -- go to clevr_jax.main, e.g. -- --config.batch_size=16
EOF
}

# die and quote_cmd
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

note() { echo "# $*"; }

dry_run=0

# Prints the command; runs it unless this is a dry run.
run() {
  if ((dry_run)); then
    echo "$DRY $(quote_cmd "$@")"
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
accelerator_type="${TPU_ACCELERATOR_TYPE:-v4-8}"
version="${TPU_VERSION:-}"
project="${TPU_PROJECT:-}"
config="${CONFIG:-}"
workdir="${WORKDIR:-}"
data_dir="${DATA_DIR:-}"
mode="${MODE:-train}"
repo_url=""
ref="main"
prepare=1
delete_after=0
extra=()

while (($# > 0)); do
  case "$1" in
    --name | --zone | --accelerator-type | --version | --project | --config | --workdir | \
      --data-dir | --mode | --repo-url | --ref)
      (($# >= 2)) || die "$1 needs a value"
      opt="$1" val="$2"
      shift 2
      ;;
    --*=*)
      opt="${1%%=*}" val="${1#*=}"
      shift
      ;;
    --no-prepare) prepare=0; shift; continue ;;
    --delete-after) delete_after=1; shift; continue ;;
    --dry-run) dry_run=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
  case "$opt" in
    --name) name="$val" ;;
    --zone) zone="$val" ;;
    --accelerator-type) accelerator_type="$val" ;;
    --version) version="$val" ;;
    --project) project="$val" ;;
    --config) config="$val" ;;
    --workdir) workdir="$val" ;;
    --data-dir) data_dir="$val" ;;
    --mode) mode="$val" ;;
    --repo-url) repo_url="$val" ;;
    --ref) ref="$val" ;;
    *) die "unknown option: $opt" ;;
  esac
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$config" ]] || die "--config is required"
[[ -n "$workdir" ]] || die "--workdir is required"
case "$mode" in
  train | evaluate | baselines | report) ;;
  *) die "--mode must be train|evaluate|baselines|report, not '$mode' (the data is prepared first anyway)" ;;
esac

[[ "$accelerator_type" =~ ^([a-z0-9]+)-([0-9]+)$ ]] ||
  die "--accelerator-type '$accelerator_type' is not of the form FAMILY-NUMBER (e.g. v4-8)"
family="${BASH_REMATCH[1]}"
size="${BASH_REMATCH[2]}"
if [[ -z "$version" ]]; then
  case "$family" in
    v2 | v3 | v4) version="tpu-ubuntu2204-base" ;;
    v5litepod) version="v2-alpha-tpuv5-lite" ;;
    v5p) version="v2-alpha-tpuv5" ;;
    v6e) version="v2-alpha-tpuv6e" ;;
    *) die "no default --version for '$family'; give the TPU software version" ;;
  esac
fi

# One host holds 8 TensorCores (v2-v4, v5p count cores) or up to 8 chips (v5litepod,
# v6e count chips), so in every family a number above 8 spans several hosts.
multi_host=0
((10#$size <= 8)) || multi_host=1

if ((multi_host)) && [[ "$workdir" != gs://* ]]; then
  die "$accelerator_type is a multi-host slice: every host runs one process and all of them
  must write the same checkpoint directory, so --workdir must be a gs:// path
  (got '$workdir'). A host-local directory would hold only that host's part of each
  checkpoint, and copying those parts together afterwards does not give a checkpoint."
fi
if ((multi_host)) && [[ -n "$data_dir" && "$data_dir" != gs://* ]]; then
  die "$accelerator_type is a multi-host slice: every host must read the same dataset,
  so --data-dir must be a gs:// path (got '$data_dir')."
fi
if ((delete_after)) && [[ "$workdir" != gs://* ]]; then
  die "--delete-after with a workdir on the VM ('$workdir') would delete the results with it;
  use a gs:// workdir."
fi
if ((!dry_run)); then
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found (install the Google Cloud SDK)"
fi

# gcloud compute tpus tpu-vm SUBCOMMAND NAME ... with the location flags every call needs.
tpu() {
  local sub="$1"
  shift
  run gcloud compute tpus tpu-vm "$sub" "$name" "$@" "--zone=$zone" ${project:+"--project=$project"}
}

# Runs a shell command line on all workers (or the one given by --worker=...).
on_workers() {
  local workers="$1"
  shift
  tpu ssh "--worker=$workers" "--command=$*"
}

tmp_dir=""
vm_up=0
on_exit() {
  local rc=$?
  if [[ -n "$tmp_dir" ]] && ((!dry_run)); then rm -rf "$tmp_dir"; fi
  if ((delete_after && vm_up && !dry_run)); then
    echo "$PROG: deleting $name (--delete-after)" >&2
    tpu delete --quiet || echo "$PROG: WARNING: could not delete $name; delete it by hand" >&2
  fi
  exit "$rc"
}
trap on_exit EXIT

# --- 1. the TPU VM ---------------------------------------------------------------
if ((multi_host)); then hosts="multi-host: one process per host"; else hosts="single host"; fi
note "$name: $accelerator_type ($hosts), runtime $version"
if ((dry_run)); then
  tpu describe "--format=value(state,acceleratorType)"
  note "if describe finds no TPU VM (a stopped one is started instead):"
  tpu create "--accelerator-type=$accelerator_type" "--version=$version"
elif info="$(gcloud compute tpus tpu-vm describe "$name" "--zone=$zone" ${project:+"--project=$project"} \
  "--format=value(state,acceleratorType)" 2>/dev/null)"; then
  state="$(printf '%s' "$info" | cut -f1)"
  existing_type="$(printf '%s' "$info" | cut -f2)"
  if [[ -n "$existing_type" && "$existing_type" != "$accelerator_type" ]]; then
    die "TPU VM $name exists as $existing_type, not $accelerator_type: pass --accelerator-type=$existing_type or another --name"
  fi
  case "$state" in
    READY) echo "$PROG: reusing TPU VM $name" >&2 ;;
    STOPPED) tpu start ;;
    *) die "TPU VM $name is in state $state; wait for it, or delete it and run again" ;;
  esac
else
  tpu create "--accelerator-type=$accelerator_type" "--version=$version"
fi
vm_up=1

# --- 2. the code on every worker ---------------------------------------------------
if [[ -n "$repo_url" ]]; then
  q_url="$(quote_cmd "$repo_url")"
  q_ref="$(quote_cmd "$ref")"
  on_workers all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --depth=1 origin $q_ref && git -C $REMOTE_DIR checkout --force FETCH_HEAD; else rm -rf $REMOTE_DIR && git clone --depth=1 --branch $q_ref $q_url $REMOTE_DIR; fi"
else
  # What git would see: tracked files (with uncommitted edits) and untracked files that
  # are not ignored, so .venv, runs/ and caches stay behind.
  if ((dry_run)); then
    tmp_dir="${TMPDIR:-/tmp}/clevr_jax_launch.XXXXXX"
  else
    git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO_DIR is not a git checkout; use --repo-url"
    tmp_dir="$(mktemp -d "${TMPDIR:-/tmp}/clevr_jax_launch.XXXXXX")"
    git -C "$REPO_DIR" ls-files --cached --others --exclude-standard |
      while IFS= read -r f; do
        # A tracked file deleted in the working tree is not shipped.
        if [[ -e "$REPO_DIR/$f" ]]; then printf '%s\n' "$f"; fi
      done >"$tmp_dir/files.txt"
  fi
  note "files.txt: git ls-files --cached --others --exclude-standard in $REPO_DIR"
  run tar -czf "$tmp_dir/clevr_jax.tar.gz" -C "$REPO_DIR" -T "$tmp_dir/files.txt"
  run gcloud compute tpus tpu-vm scp "$tmp_dir/clevr_jax.tar.gz" "$name:clevr_jax.tar.gz" \
    --worker=all "--zone=$zone" ${project:+"--project=$project"}
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf clevr_jax.tar.gz -C $REMOTE_DIR && rm clevr_jax.tar.gz"
fi

# --- 3. install, with the TPU extra ------------------------------------------------
# The project needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10, so take a newer
# interpreter if present, else install python3.11 (apt may be busy with unattended
# upgrades on a fresh VM: wait for its lock instead of failing).
on_workers all "set -e; cd $REMOTE_DIR; py=; for c in python3 python3.13 python3.12 python3.11; do if command -v \$c >/dev/null && \$c -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then py=\$c; break; fi; done; if [ -z \"\$py\" ]; then sudo apt-get -o DPkg::Lock::Timeout=600 update -q && sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q python3.11 python3.11-venv; py=python3.11; fi; [ -x .venv/bin/python ] || \$py -m venv .venv; .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -e '.[tpu]'"

# --- 4. the dataset, once ------------------------------------------------------------
# Extra flags go last so that they win over ours (absl keeps the last value).
main_cmd() { # $@: flags of this invocation
  echo "cd $REMOTE_DIR && .venv/bin/python -m clevr_jax.main $(quote_cmd "--config=$config" \
    "--workdir=$workdir" ${data_dir:+"--config.data.data_dir=$data_dir"} "$@" \
    ${extra[@]+"${extra[@]}"})"
}

if ((prepare)); then
  # One writer, before the run: all hosts building into one data_dir at once would race.
  on_workers 0 "$(main_cmd --mode=prepare)"
fi

# --- 5. the run, on all hosts together -----------------------------------------------
on_workers all "$(main_cmd "--mode=$mode" --distributed)"

# --- 6. cleanup ----------------------------------------------------------------------
if ((dry_run && delete_after)); then
  tpu delete --quiet
fi
