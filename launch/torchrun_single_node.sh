#!/usr/bin/env bash
# Train on one node with torchrun: NPROC processes, one per GPU (see docs/launching.md).
#
#   launch/torchrun_single_node.sh NPROC CONFIG [key=value ...] [--resume auto]
#   launch/torchrun_single_node.sh 4 configs/gpu_4x32_resnet50.yaml data.shards=/data/my_shards
#
# Run from the repository root (or with ddp_train installed). Arguments after CONFIG go to
# `python -m ddp_train` unchanged. --standalone lets torchrun pick a free port, so two jobs can
# share a node. TORCHRUN overrides the launcher command (default: torchrun).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
nproc=$1
config=$2
shift 2

exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node="$nproc" \
  -m ddp_train --config "$config" "$@"
