"""`pipeline run`: every stage inside one MLflow run, for `mlflow run .`.

The data stages come from DVC's cache (`dvc repro preprocess`) when the run's
data params equal params.yaml's, so DVC, not us, decides whether they rerun
(STYLE 2). With other data params they run here, into the run's own folder.
Train, evaluate and predict always run, into `<out>/<run id>/`, never touching
params.yaml or the DVC-tracked outputs.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

DATA_KEYS = ("seed", "data", "preprocess")  # what fetch and preprocess read (see dvc.yaml)
DVC_RAW, DVC_PREPARED = Path("data/raw"), Path("data/prepared")


def data_params(cfg: Config) -> dict:
    return {key: cfg.model_dump(mode="json")[key] for key in DATA_KEYS}


def dvc_data(cfg: Config, base: Config | None) -> tuple[Path, Path] | None:
    """(raw, prepared) from `dvc repro preprocess`, or None when the run needs other data.

    base: the config of params.yaml, which the DVC stages read (not a `--params` file given instead).
    """
    if base is None or data_params(cfg) != data_params(base) or not Path("dvc.yaml").is_file():
        return None
    dvc = shutil.which("dvc")
    if dvc is None:
        raise PipelineError("dvc: command not found; install the project (pip install -e .) or activate its venv")
    done = subprocess.run([dvc, "repro", "preprocess"], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise PipelineError(f"dvc repro preprocess failed: {lines[-1] if lines else done.returncode}")
    return DVC_RAW, DVC_PREPARED


def build_data(cfg: Config, raw_dir: Path, prepared_dir: Path) -> tuple[Path, Path]:
    """The fetch and preprocess stages for `cfg`, outside DVC, into raw_dir and prepared_dir."""
    from pipeline import fetch, preprocess

    fetch.save_raw(fetch.fetch_dataset(cfg.data), raw_dir)
    prepared = preprocess.preprocess(fetch.load_raw(raw_dir), cfg.preprocess, cfg.seed)
    preprocess.save_prepared(prepared, prepared_dir)
    return raw_dir, prepared_dir


def run_all(cfg: Config, base: Config | None, out, data: tuple[Path, Path] | None = None) -> str:
    """Every stage in one run; `data`: (raw, prepared) folders made for this config (a sweep prepares
    them once for its trials), else they come from DVC or are built in the run's folder."""
    from pipeline import evaluate, predict, train, tracking

    with tracking.run_scope(cfg) as run_id:
        folder = Path(out) / run_id
        if data is None:
            data = dvc_data(cfg, base)
        if data is None:
            data = build_data(cfg, folder / "raw", folder / "prepared")
        raw_dir, prepared_dir = data
        train_dir = folder / "train"
        train.main(cfg, prepared_dir, raw_dir, train_dir)
        evaluate.main(cfg, prepared_dir, train_dir, folder / "metrics.json", folder / "plots", folder / "figures")
        predict.main(cfg, raw_dir, train_dir, folder / "predictions.csv")
    return run_id
