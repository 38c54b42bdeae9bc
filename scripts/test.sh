#!/usr/bin/env bash
# Set up, then run the test suite (arguments go to pytest).
# The suite runs on min(CPUs, 4) pytest-xdist processes, PIPELINE_TEST_WORKERS to choose (0: in this process):
# most of its time is end-to-end tests waiting on subprocesses that import TensorFlow on one core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/get-data.sh  # the real Fashion-MNIST files, so the tests on them run rather than skip
export PATH="$PWD/${PIPELINE_VENV:-.venv}/bin:$PATH"
cpus=$(nproc 2>/dev/null || echo 1)
workers=${PIPELINE_TEST_WORKERS:-$(( cpus < 4 ? cpus : 4 ))}
python -m pytest -n "$workers" --dist worksteal "$@"
