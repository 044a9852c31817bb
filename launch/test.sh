#!/usr/bin/env bash
# The test suite: set up .venv, then run pytest (CPU only; distributed tests start real torchrun
# processes). Extra args go to pytest, e.g. `bash launch/test.sh -k data -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/venv.sh
# --timeout: a hung test (e.g. a DDP deadlock) fails after 15 min instead of eating CI time.
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --timeout=900 "$@"
