#!/usr/bin/env bash
# Train on NNODES nodes with torchrun: run this on every node, changing only NODE_RANK
# (0 .. NNODES-1). NPROC processes per node, one per GPU (see docs/launching.md).
#
#   launch/torchrun_multi_node.sh NNODES NODE_RANK MASTER_ADDR NPROC CONFIG [key=value ...]
#   launch/torchrun_multi_node.sh 2 0 node01 4 configs/gpu_4x32_resnet50.yaml   # on node01
#   launch/torchrun_multi_node.sh 2 1 node01 4 configs/gpu_4x32_resnet50.yaml   # on node02
#
# Static rendezvous: node 0 (MASTER_ADDR, reachable from all nodes) listens on MASTER_PORT
# (default 29500) and gets global ranks 0 .. NPROC-1, so rank 0 (which writes the run folder)
# is on node 0. data.shards and run.dir must be readable on every node (a shared filesystem).
# Arguments after CONFIG go to `python -m ddp_train` unchanged. TORCHRUN overrides the launcher
# command (default: torchrun).
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

exec ${TORCHRUN:-torchrun} --nnodes="$nnodes" --node_rank="$node_rank" \
  --master_addr="$master_addr" --master_port="${MASTER_PORT:-29500}" \
  --nproc_per_node="$nproc" \
  -m ddp_train --config "$config" "$@"
