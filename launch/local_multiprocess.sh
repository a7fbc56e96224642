#!/usr/bin/env bash
# Try multi-host training on one machine: N local processes, each with D fake CPU devices, joined
# through jax.distributed on 127.0.0.1 (gloo collectives). The same global mesh, data sharding,
# process-0-only writing and multi-process checkpoints as a pod, at toy scale.
#
#   launch/local_multiprocess.sh -n 2 -d 4 -- --config toy2d:tiny --workdir runs/toy_mp
#   launch/local_multiprocess.sh -n 4 -d 2 -- --config toy2d:tiny --workdir runs/toy_mp --set optim.steps=200
#
# Everything after `--` goes to `unclip-jax train` unchanged, in every process. Each process
# learns its place from UNCLIP_COORDINATOR / UNCLIP_NUM_PROCESSES / UNCLIP_PROCESS_ID
# (unclip_jax.parallel.distributed). Logs: <workdir>/launch/process_<i>.log (process 0's also
# on the terminal). A rerun with the same workdir resumes. Ctrl-C stops all processes.
# UNCLIP_JAX overrides the command (default: unclip-jax; e.g. UNCLIP_JAX="python -m unclip_jax.cli").
set -euo pipefail

procs=2
devices=4
port=""
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) procs="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (train flags go after --)" >&2; usage 2 ;;
  esac
done
[[ $# -gt 0 ]] || usage 2

workdir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[i]}" == "--workdir" ]] && workdir="${args[i + 1]:-}"
  [[ "${args[i]}" == --workdir=* ]] && workdir="${args[i]#--workdir=}"
done
[[ -n "$workdir" ]] || { echo "pass --workdir after --" >&2; exit 2; }
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
read -r -a cmd <<< "${UNCLIP_JAX:-unclip-jax}"
mkdir -p "$workdir/launch"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for ((i = 0; i < procs; i++)); do
  log="$workdir/launch/process_$i.log"
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
  UNCLIP_COORDINATOR="127.0.0.1:$port" UNCLIP_NUM_PROCESSES="$procs" UNCLIP_PROCESS_ID="$i" \
    "${cmd[@]}" -v train "$@" > "$log" 2>&1 &
  pids+=("$!")
done
echo "started $procs processes x $devices CPU devices (coordinator 127.0.0.1:$port); logs in $workdir/launch"
tail -n +1 -f "$workdir/launch/process_0.log" --pid "${pids[0]}" &
tailer=$!

status=0
for ((i = 0; i < procs; i++)); do
  if ! wait "${pids[i]}"; then
    echo "process $i failed; see $workdir/launch/process_$i.log" >&2
    status=1
    cleanup  # the others would wait forever in a collective
  fi
done
wait "$tailer" 2>/dev/null || true
pids=()
exit "$status"
