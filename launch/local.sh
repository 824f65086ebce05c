#!/usr/bin/env bash
# Runs one training as N processes on this machine, talking over loopback (127.0.0.1), each with
# D simulated CPU devices: the multi-host program on one host, for tests and for trying a pod's
# mesh before renting it.
#
#   launch/local.sh --num_processes=2 --devices_per_process=4 -- \
#       --config=configs/default.py --workdir=/tmp/run --config.mesh.expert=4
#
# Options (before --): --num_processes=N (2), --devices_per_process=D (4), --port=P (a free
# one), --grace=SECONDS (600: how long stopped processes get to exit before SIGKILL), --sweep
# (run mixtral-sweep instead: a sweep whose every trial spans the processes), --dry-run
# (print the commands, run nothing). Everything after -- goes to every mixtral-train process;
# --workdir= is required. Logs: WORKDIR/logs/process_<i>.log (process 0's also on the
# console); WORKDIR/logs/pids lists "<index> <pid>". If a process exits non-zero the others
# are stopped and the launcher exits with that process's code, naming it. SIGTERM to the
# launcher goes to every process (each saves at a common step); Ctrl-C reaches them directly.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
num_processes=2 devices=4 port="" grace=600 dry_run=0 module=mixtral_jax.main

die() { echo "local.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --num_processes=*) num_processes=${1#*=} ;;
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --grace=*) grace=${1#*=} ;;
    --sweep) module=mixtral_jax.cli.sweep ;;
    --dry-run) dry_run=1 ;;
    --help|-h) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (mixtral-train flags go after --)" ;;
  esac
  shift
done
for value in "$num_processes" "$devices" "$grace" ${port:+"$port"}; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got '$value'"
done

workdir=""
for flag in "$@"; do
  case "$flag" in --workdir=*) workdir=${flag#*=} ;; esac
done
[ -n "$workdir" ] || die "give --workdir=DIR among the mixtral-train flags (logs go there)"

python=${PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
if [ -z "$port" ]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
# Each process simulates its own devices: drop any device count inherited from the caller.
inherited=$(echo ${XLA_FLAGS:-} | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
inherited=$(echo $inherited)  # whitespace collapsed
xla_flags="${inherited:+$inherited }--xla_force_host_platform_device_count=$devices"
logs="$workdir/logs"

command_of() {  # sets `command` to the command line of process $1
  command=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags"
           "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_processes"
           "JAX_PROCESS_ID=$1" "$python" -u -m "$module" "${@:2}")
}

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i" "$@"
    printf '+'; printf ' %q' "${command[@]}"; printf ' > %q 2>&1\n' "$logs/process_$i.log"
  done
  exit 0
fi

mkdir -p "$logs"
: > "$logs/pids"
pids=()
for ((i = 0; i < num_processes; i++)); do
  command_of "$i" "$@"
  (cd "$here" && exec "${command[@]}") > "$logs/process_$i.log" 2>&1 &
  pids+=($!)
  echo "$i $!" >> "$logs/pids"
done
tail -n +1 -f --pid="${pids[0]}" "$logs/process_0.log" &
tail_pid=$!

stop_all() {  # SIGTERM to every running process, SIGKILL to any left after the grace period
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + grace))
  while [ $SECONDS -lt $deadline ]; do
    local running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    [ $running = 0 ] && return
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all' TERM
trap ':' INT  # Ctrl-C reaches the processes themselves; wait for them to save and exit

codes=() first=""
remaining=$num_processes
while [ "$remaining" -gt 0 ]; do
  failed=()  # the processes found ended with an error in this round
  for ((i = 0; i < num_processes; i++)); do
    [ -n "${codes[$i]:-}" ] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    code=0; wait "${pids[$i]}" || code=$?
    codes[$i]=$code
    remaining=$((remaining - 1))
    [ "$code" != 0 ] && failed+=("$i")
  done
  if [ -z "$first" ] && [ ${#failed[@]} -gt 0 ]; then
    # Of processes that ended together, one killed by a signal (kill -9, the OOM killer, a
    # crash) is the likely cause; one that aborted (134) or exited 1 after losing it, not.
    first=${failed[0]}
    for i in "${failed[@]}"; do [ "${codes[$i]}" != 134 ] && { first=$i; break; }; done
    for i in "${failed[@]}"; do
      [ "${codes[$i]}" -gt 128 ] && [ "${codes[$i]}" != 134 ] && { first=$i; break; }
    done
    [ "$remaining" -gt 0 ] && stop_all
  fi
  sleep 0.2
done
wait "$tail_pid" 2>/dev/null || true
if [ -n "$first" ]; then
  echo "local.sh: process $first exited with code ${codes[$first]} first (log: $logs/process_$first.log); exit codes by process: ${codes[*]}" >&2
  exit "${codes[$first]}"
fi
