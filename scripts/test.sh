#!/usr/bin/env bash
# The test command: set-up, the standalone C++/CUDA build and its unit tests, then the Python suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k cpu -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
bash scripts/build_csrc.sh
python -m pytest -q -ra --durations=15 "$@"
