#!/usr/bin/env bash
# Train on one node with `accelerate launch` (torchrun underneath): NPROC processes.
#
#   launch/accelerate_single_node.sh NPROC CONFIG [key=value ...]
#
# ddp_train does not use accelerate's Accelerator: accelerate only starts the processes and
# sets RANK/WORLD_SIZE/LOCAL_RANK, which ddp_train/dist.py reads; the engine (engine.name: ddp
# or deepspeed) and precision come from CONFIG, so --mixed_precision stays "no". --multi_gpu is
# what makes accelerate start NPROC processes, also on a CPU-only machine (`--cpu
# --num_processes 2` starts one).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
nproc=$1
config=$2
shift 2

exec accelerate launch --multi_gpu --num_machines 1 --num_processes "$nproc" \
  --mixed_precision no --dynamo_backend no --main_process_port "${MASTER_PORT:-29500}" \
  -m ddp_train --config "$config" "$@"
