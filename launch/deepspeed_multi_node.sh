#!/usr/bin/env bash
# Train on every node of HOSTFILE with the deepspeed launcher; run it once, on the first node.
#
#   launch/deepspeed_multi_node.sh HOSTFILE CONFIG [key=value ...]
#
# HOSTFILE has one line per node, `hostname slots=GPUS` (e.g. `node01 slots=8`). The launcher
# starts the ranks on every node over passwordless ssh (pdsh when installed), with the first
# host as MASTER_ADDR on MASTER_PORT (default 29500). The repository, the venv, data.shards and
# run.dir must be at the same paths on every node (run.dir on a shared filesystem: DeepSpeed
# checkpoints are written by every rank). Without ssh between nodes, use torchrun or accelerate
# on each node instead (launch/torchrun_multi_node.sh, launch/accelerate_multi_node.sh).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 HOSTFILE CONFIG [key=value ...]" >&2
  exit 2
fi
hostfile=$1
config=$2
shift 2
master_addr=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")

exec deepspeed --hostfile "$hostfile" --master_addr "$master_addr" \
  --master_port "${MASTER_PORT:-29500}" --module ddp_train --config "$config" "$@"
