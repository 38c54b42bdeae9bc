#!/usr/bin/env bash
# Set up, then run the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/get-data.sh  # the real Fashion-MNIST files, so the tests on them run rather than skip
export PATH="$PWD/${PIPELINE_VENV:-.venv}/bin:$PATH"
python -m pytest "$@"
