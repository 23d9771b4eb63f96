#!/usr/bin/env bash
# Run clevr_jax.main as N cooperating JAX processes on this one machine.
#
# What it is for: exercising the multi-process code paths (per-host input shards,
# cross-process collectives, multi-host checkpointing) without a cluster, on CPU, or
# using one process per local GPU. Each process gets explicit coordinator flags, so
# this never relies on cluster auto-detection.
#
#   launch/local.sh --num-processes 2 --devices-per-process 2 \
#       --config configs/unet_rgb.py:quick --workdir runs/local2x2
#   launch/local.sh --platform gpu --config configs/unet_rgb.py --workdir runs/gpu \
#       -- --config.batch_size=16
#
# Run with --help for every option. See launch/README.md.
set -euo pipefail

readonly PROG="launch/local.sh"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_DIR
readonly DRY="[dry-run]"

usage() {
  cat <<EOF
Usage: $PROG --config CONFIG --workdir DIR [options] [-- extra clevr_jax.main flags]

Required:
  --config CONFIG            e.g. configs/unet_rgb.py:quick (relative to the repo root)
  --workdir DIR              run directory; per-process logs go to DIR/launch_logs/

Options:
  --num-processes N          processes to start (cpu default: 2; gpu default: one per
                             visible GPU divided by --devices-per-process)
  --devices-per-process M    cpu: fake host devices per process (default 1);
                             gpu: GPUs per process (default 1)
  --platform cpu|gpu         default cpu
  --data-dir DIR             passed as --config.data.data_dir=DIR
  --mode MODE                train|evaluate|baselines|report|prepare (default train)
  --python PY                interpreter (default: the repo's .venv/bin/python, else python3)
  --port PORT                coordinator port (default: a free port picked now)
  --log-dir DIR              default: WORKDIR/launch_logs (required for a gs:// workdir)
  --dry-run                  print the commands, prefixed "$DRY", and run nothing
  -h, --help                 this text

Environment: XLA_FLAGS is kept and extended; on GPU, CUDA_VISIBLE_DEVICES (if set)
is the pool of GPUs that processes are carved from.
EOF
}

# die and quote_cmd
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Relative paths are taken from the caller's directory, because the processes run
# from the repo root (so that configs/... and -m clevr_jax.main resolve).
abspath() {
  case "$1" in
    gs://* | /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

num_processes=""
devices_per_process=1
platform=cpu
config=""
workdir=""
data_dir=""
mode=train
python_bin=""
port=""
log_dir=""
dry_run=0
extra=()

while (($# > 0)); do
  case "$1" in
    --num-processes | --devices-per-process | --platform | --config | --workdir | \
      --data-dir | --mode | --python | --port | --log-dir)
      (($# >= 2)) || die "$1 needs a value"
      opt="$1" val="$2"
      shift 2
      ;;
    --*=*)
      opt="${1%%=*}" val="${1#*=}"
      shift
      ;;
    --dry-run) dry_run=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
  case "$opt" in
    --num-processes) num_processes="$val" ;;
    --devices-per-process) devices_per_process="$val" ;;
    --platform) platform="$val" ;;
    --config) config="$val" ;;
    --workdir) workdir="$val" ;;
    --data-dir) data_dir="$val" ;;
    --mode) mode="$val" ;;
    --python) python_bin="$val" ;;
    --port) port="$val" ;;
    --log-dir) log_dir="$val" ;;
    *) die "unknown option: $opt" ;;
  esac
done

[[ -n "$config" ]] || die "--config is required"
[[ -n "$workdir" ]] || die "--workdir is required"
[[ "$devices_per_process" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer"
[[ -z "$num_processes" || "$num_processes" =~ ^[1-9][0-9]*$ ]] ||
  die "--num-processes must be a positive integer"
[[ -z "$port" || "$port" =~ ^[1-9][0-9]*$ ]] || die "--port must be a number"
case "$mode" in
  train | evaluate | baselines | report | prepare) ;;
  *) die "--mode must be train|evaluate|baselines|report|prepare, not '$mode'" ;;
esac

workdir="$(abspath "$workdir")"
[[ -z "$data_dir" ]] || data_dir="$(abspath "$data_dir")"
# A config given relative to the caller that exists there wins over the repo-relative one.
config_file="${config%%:*}"
if [[ "$config_file" != /* && -f "$PWD/$config_file" && "$PWD" != "$REPO_DIR" ]]; then
  config="$PWD/$config"
fi
if [[ -z "$log_dir" ]]; then
  [[ "$workdir" != gs://* ]] || die "a gs:// workdir needs --log-dir (a local directory for the process logs)"
  log_dir="$workdir/launch_logs"
fi
log_dir="$(abspath "$log_dir")"

if [[ -z "$python_bin" ]]; then
  if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
    python_bin="$REPO_DIR/.venv/bin/python"
  else
    python_bin=python3
  fi
fi

# Per-platform environment. common_env applies to every process; gpu_sets[i] is the
# CUDA_VISIBLE_DEVICES of process i.
common_env=()
gpu_sets=()
case "$platform" in
  cpu)
    num_processes="${num_processes:-2}"
    # Fake M host devices per process so that pmap/data-parallel code sees several devices;
    # gloo is the cross-process collective backend on CPU (the default in jax 0.10, named
    # here so that an older or changed default cannot silently break collectives).
    common_env=(
      JAX_PLATFORMS=cpu
      "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process"
      JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    )
    ;;
  gpu)
    # The GPU pool: what the caller already restricted us to, else every GPU nvidia-smi lists.
    pool=()
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      IFS=, read -r -a pool <<<"$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1; then
      n_gpus="$(nvidia-smi -L | grep -c '^GPU ' || true)"
      for ((g = 0; g < n_gpus; g++)); do pool+=("$g"); done
    fi
    if [[ -z "$num_processes" ]]; then
      ((${#pool[@]} > 0)) || die "no GPUs found (no CUDA_VISIBLE_DEVICES, no nvidia-smi): give --num-processes"
      num_processes=$((${#pool[@]} / devices_per_process))
      ((num_processes > 0)) || die "${#pool[@]} GPU(s) cannot give $devices_per_process per process"
    fi
    needed=$((num_processes * devices_per_process))
    if ((${#pool[@]} == 0)); then
      # Nothing to inspect (e.g. a dry run on a laptop): assume GPUs 0..needed-1.
      for ((g = 0; g < needed; g++)); do pool+=("$g"); done
    fi
    ((needed <= ${#pool[@]})) ||
      die "$num_processes processes x $devices_per_process GPU(s) need $needed GPUs; only ${#pool[@]} visible"
    for ((i = 0; i < num_processes; i++)); do
      set_i="$(IFS=,; echo "${pool[*]:i*devices_per_process:devices_per_process}")"
      gpu_sets+=("$set_i")
    done
    ;;
  *) die "--platform must be cpu or gpu, not '$platform'" ;;
esac

if [[ -z "$port" ]]; then
  if ((dry_run)); then
    port=12345 # placeholder: a dry run binds nothing
  else
    # Bind port 0 and let the kernel choose; the tiny window before process 0 binds it is
    # an accepted race on a workstation. Any Python 3 can do this, not only the run's.
    picker="$(command -v python3 || echo "$python_bin")"
    port="$("$picker" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    [[ "$port" =~ ^[1-9][0-9]*$ ]] || die "could not pick a free port (got '$port'); give --port"
  fi
fi

base_args=(-m clevr_jax.main "--config=$config" "--workdir=$workdir" "--mode=$mode")
[[ -z "$data_dir" ]] || base_args+=("--config.data.data_dir=$data_dir")

process_cmd() { # $1: process id; fills the global array cmd
  local i="$1"
  # ${a[@]+"${a[@]}"}: an empty array is an unbound variable to bash < 4.4 under set -u.
  cmd=(env ${common_env[@]+"${common_env[@]}"})
  [[ "$platform" != gpu ]] || cmd+=("CUDA_VISIBLE_DEVICES=${gpu_sets[i]}")
  cmd+=("$python_bin" "${base_args[@]}"
    "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes" "--process_id=$i"
    ${extra[@]+"${extra[@]}"})
}

log_of() { printf '%s/process_%d.log' "$log_dir" "$1"; }

if ((dry_run)); then
  echo "# $num_processes process(es) on $platform, coordinator 127.0.0.1:$port"
  echo "$DRY cd $(quote_cmd "$REPO_DIR")"
  echo "$DRY mkdir -p $(quote_cmd "$log_dir")"
  for ((i = 0; i < num_processes; i++)); do
    process_cmd "$i"
    echo "$DRY $(quote_cmd "${cmd[@]}") > $(quote_cmd "$(log_of "$i")") 2>&1 &"
  done
  echo "$DRY wait  # for all; the first failure stops the others"
  exit 0
fi

cd "$REPO_DIR"
mkdir -p "$log_dir"

pids=()
tail_pid=""

stop_all() {
  local pid alive _
  for pid in "${pids[@]}"; do
    [[ -z "$pid" ]] || kill -TERM "$pid" 2>/dev/null || true
  done
  # Give them time to exit cleanly, then insist: a process blocked in a collective
  # whose peer died may never return on its own.
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    alive=0
    for pid in "${pids[@]}"; do
      if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    sleep 1
  done
  for pid in "${pids[@]}"; do
    [[ -z "$pid" ]] || kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do # reap, so that nothing lingers as a zombie
    [[ -z "$pid" ]] || wait "$pid" 2>/dev/null || true
  done
}

stop_tail() {
  [[ -z "$tail_pid" ]] || kill "$tail_pid" 2>/dev/null || true
  tail_pid=""
}

# Background jobs of a non-interactive shell ignore SIGINT, so Ctrl-C must be forwarded.
on_signal() {
  echo "$PROG: interrupted; stopping all processes" >&2
  stop_tail
  stop_all
  exit 130
}
trap on_signal INT TERM

echo "$PROG: $num_processes process(es) on $platform, coordinator 127.0.0.1:$port, logs in $log_dir" >&2
for ((i = 0; i < num_processes; i++)); do
  process_cmd "$i"
  echo "$PROG: process $i: $(quote_cmd "${cmd[@]}")" >&2
  "${cmd[@]}" >"$(log_of "$i")" 2>&1 &
  pids+=("$!")
done

# Show process 0 live; the others are in their logs.
tail -n +1 -F "$(log_of 0)" 2>/dev/null &
tail_pid=$!

remaining=$num_processes
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    pid="${pids[i]}"
    [[ -n "$pid" ]] || continue
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    if wait "$pid"; then rc=0; else rc=$?; fi
    pids[i]=""
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      stop_tail
      echo "$PROG: process $i failed with exit code $rc; stopping the others" >&2
      echo "---- last lines of $(log_of "$i") ----" >&2
      tail -n 30 "$(log_of "$i")" >&2 || true
      stop_all
      exit "$rc"
    fi
  done
  ((remaining == 0)) || sleep 1
done
stop_tail
echo "$PROG: all $num_processes process(es) finished; logs in $log_dir" >&2
