#!/usr/bin/env bash
# Create (or reuse) the virtual environment with the locked dependencies and this package.
# Reused as is when pyproject.toml and requirements.lock are unchanged; uv's cache makes a rebuild quick.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PIPELINE_VENV:-.venv}
python=${PYTHON:-python3}
stamp=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.installed" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "setup: creating $venv with the locked dependencies (first time: a few minutes)" >&2
"$python" -m venv "$venv"
if "$venv/bin/python" -m pip install -q --disable-pip-version-check "uv>=0.5,<1"; then
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" -r requirements.lock -e ".[test]"
else  # no uv wheel for this platform: plain pip, slower
  "$venv/bin/python" -m pip install -q -r requirements.lock -e ".[test]"
fi
echo "$stamp" > "$venv/.installed"
