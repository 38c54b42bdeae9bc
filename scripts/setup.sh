#!/usr/bin/env bash
# Create (or reuse) the virtual environment with the locked dependencies and this package.
# Reused as is when pyproject.toml and requirements.lock are unchanged; uv's cache makes a rebuild quick.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PIPELINE_VENV:-.venv}
python=${PYTHON:-python3}
# "+pyc": venvs made before the bytecode was compiled at install time get rebuilt once
stamp="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)+pyc"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.installed" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "setup: creating $venv with the locked dependencies (first time: a few minutes)" >&2
"$python" -m venv "$venv"
if "$venv/bin/python" -m pip install -q --disable-pip-version-check "uv>=0.5,<1"; then
  # --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (as in our development shells)
  # nothing ever does, so every process compiled TensorFlow, MLflow and Keras from source: an import of the
  # four went from 16 s to 5.5 s of CPU with the bytecode (Xeon, 2 cores). It adds about a minute here.
  "$venv/bin/uv" pip install -q --compile-bytecode --python "$venv/bin/python" -r requirements.lock -e ".[test,bench]"
else  # no uv wheel for this platform: plain pip, slower
  "$venv/bin/python" -m pip install -q -r requirements.lock -e ".[test,bench]"
fi
echo "$stamp" > "$venv/.installed"
