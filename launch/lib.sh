# shellcheck shell=bash
# Shell helpers shared by launch/local.sh and launch/tpu_vm.sh (sourced, not run).
# gpu_slurm.sbatch keeps its own copies: SLURM runs a spooled copy of the batch
# script, from which a file beside it cannot be found.

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

# Words as a shell reads them back, in single quotes only where needed (readable, and
# what sh, bash and Python's shlex.split all parse the same way).
quote_cmd() {
  local arg v out="" sep="" sq="'\\''" safe='^[A-Za-z0-9_./:=,@%+-]+$' flag='^(--[A-Za-z0-9_.-]+=)(.*)$'
  for arg in "$@"; do
    if [[ "$arg" =~ $safe ]]; then
      out+="$sep$arg"
    elif [[ "$arg" =~ $flag ]]; then
      v=${BASH_REMATCH[2]//\'/$sq}
      out+="$sep${BASH_REMATCH[1]}'$v'"
    else
      v=${arg//\'/$sq}
      out+="$sep'$v'"
    fi
    sep=" "
  done
  printf '%s' "$out"
}
