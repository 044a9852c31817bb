#!/usr/bin/env bash
# Train on one node with the deepspeed launcher: NPROC processes, one per GPU (see
# docs/launching.md). Set engine.name: deepspeed in CONFIG (or pass engine.name=deepspeed).
#
#   launch/deepspeed_single_node.sh NPROC CONFIG [key=value ...]
#
# The launcher passes --local_rank=N to ddp_train (ignored) and sets RANK/WORLD_SIZE/LOCAL_RANK,
# which ddp_train/dist.py reads. MASTER_PORT (default 29500) must be free. Arguments after CONFIG
# go to `python -m ddp_train` unchanged.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
nproc=$1
config=$2
shift 2

exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" \
  --module ddp_train --config "$config" "$@"
