#!/usr/bin/env bash
# The bundled demo: set up .venv, pack scikit-learn's digits to shards/digits on first use, and
# train resnet10t on 2 ranks (torchrun, gloo on CPU / nccl on GPU). Extra args are overrides,
# e.g. `bash launch/demo.sh train.epochs=2`. NPROC=4 bash launch/demo.sh for 4 ranks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/venv.sh
# One thread per rank: two ranks on a 2-core CPU must not oversubscribe it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --nproc_per_node="${NPROC:-2}" --standalone -m ddp_train "$@"
