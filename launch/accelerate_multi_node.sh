#!/usr/bin/env bash
# Train on NNODES nodes with `accelerate launch`: run this on every node, changing only
# NODE_RANK (0 .. NNODES-1). NPROC processes per node; --num_processes is the total.
#
#   launch/accelerate_multi_node.sh NNODES NODE_RANK MASTER_ADDR NPROC CONFIG [key=value ...]
#
# Static rendezvous like launch/torchrun_multi_node.sh: node 0 (MASTER_ADDR) listens on
# MASTER_PORT (default 29500) and holds global rank 0. data.shards and run.dir must be readable
# on every node (a shared filesystem).
set -euo pipefail

if [[ $# -lt 5 ]]; then
  echo "usage: $0 NNODES NODE_RANK MASTER_ADDR NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
nnodes=$1
node_rank=$2
master_addr=$3
nproc=$4
config=$5
shift 5

exec accelerate launch --multi_gpu --num_machines "$nnodes" --machine_rank "$node_rank" \
  --main_process_ip "$master_addr" --main_process_port "${MASTER_PORT:-29500}" \
  --num_processes "$((nnodes * nproc))" --mixed_precision no --dynamo_backend no \
  -m ddp_train --config "$config" "$@"
