#!/usr/bin/env bash
# Create or refresh ./.venv with ddp-train and everything its demo and tests need.
# Sourced by launch/demo.sh and launch/test.sh; safe to run again (it only installs what changed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch/torchvision first and pinned: on this project's machines these exact builds lie on local
# disk; letting a later requirement pick torch would download a multi-GB CUDA build instead.
stamp=.venv/.ddp-train-installed
want="torch==2.14.1 torchvision==0.29.1 | $(cat setup.py launch/venv.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  # test: pytest and what the tests exercise; sweep/postgres/dashboard: ddp-train sweep with a
  # journal or PostgreSQL study, and optuna-dashboard to browse it (docs/sweeps.md); onnx:
  # ddp-train export --format onnx and its onnxruntime check.
  .venv/bin/python -m pip install -q -e ".[test,sweep,postgres,dashboard,onnx]"
  echo "$want" > "$stamp"
fi
