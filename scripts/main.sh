#!/usr/bin/env bash
# The main job: set up, get the data, rebuild everything with `dvc repro` on params.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/get-data.sh
export PATH="$PWD/${PIPELINE_VENV:-.venv}/bin:$PATH"
dvc repro "$@"
dvc metrics show
echo "predictions: data/predictions.csv; runs: mlflow ui --backend-store-uri sqlite:///mlflow.db"
