"""MLflow: one run per training, reopened by evaluate and predict; the per-epoch callback.

DVC decides what runs; MLflow records what ran (STYLE 2). A run never stays
RUNNING: `run_scope` ends it FINISHED, FAILED (with the error as a tag) or
KILLED (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from typing import Callable, Iterator

from pipeline.config import Config
from pipeline.errors import PipelineError

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds")


def connect(cfg: Config):
    """Point MLflow at the configured store; fail early, in one line, when it cannot be reached."""
    import mlflow

    uri = cfg.tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.set_experiment(cfg.mlflow.experiment_name)
    except Exception as exc:  # any store error: unreachable server, bad URI, locked database
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"MLflow tracking store {uri!r} cannot be used: {first}") from None
    return experiment


def default_run_name(cfg: Config) -> str:
    return cfg.mlflow.run_name or (
        f"{cfg.model.name}-{cfg.optimizer.name}-lr{cfg.optimizer.learning_rate:g}-bs{cfg.train.batch_size}"
    )


def git_state(cwd: str | None = None) -> dict[str, str]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if head.returncode != 0:
        return {}
    # dvc.lock is rewritten by `dvc repro` itself as stages finish: a record of outputs, not an input
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock").stdout.strip() != ""
    return {"mlflow.source.git.commit": head.stdout.strip(), "git.dirty": str(dirty).lower()}


def environment_tags() -> dict[str, str]:
    import keras
    import mlflow
    import tensorflow as tf

    from importlib.metadata import PackageNotFoundError, version

    from pipeline.hardware import cpu_info

    gpus = tf.config.list_physical_devices("GPU")
    cpu = cpu_info()
    others = {}
    for package in ("numpy", "pandas", "dvc", "scikit-learn"):
        try:
            others[f"versions.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    return {
        "versions.tensorflow": tf.__version__,
        "versions.keras": keras.__version__,
        "versions.mlflow": mlflow.__version__,
        "versions.python": platform.python_version(),
        **others,
        "device": "gpu:" + ",".join(d.name for d in gpus) if gpus else f"cpu:{cpu['model']}",
        "cpu.model": str(cpu["model"]),
        "cpu.flags": " ".join(cpu["flags"]),  # those that decide speed: AVX2, AVX-512, BF16, AMX
        "cpu.cores": str(cpu["cores"]),
    }


@contextlib.contextmanager
def run_scope(cfg: Config, run_id: str | None = None, tags: dict | None = None) -> Iterator[str]:
    """Start (or reopen) a run and always end it: FINISHED, FAILED with the error, or KILLED.

    Reopens `run_id` when given, else the run `mlflow run` created
    (MLFLOW_RUN_ID), else starts a new one named after its key params.
    """
    import mlflow

    connect(cfg)
    current = mlflow.active_run()
    if current is not None and run_id in (None, current.info.run_id):
        yield current.info.run_id  # nested in an outer scope (`pipeline run`), which ends the run
        return
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        active = mlflow.start_run(run_id=run_id)
    else:
        active = mlflow.start_run(run_name=default_run_name(cfg), tags=tags)
    run_id = active.info.run_id
    try:
        yield run_id
    except KeyboardInterrupt:
        mlflow.set_tag("error", "interrupted")
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_epoch(run_id: str, epoch: int, row: dict[str, float]) -> None:
    """All of one epoch's metrics in one call, step = epoch (1-based)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, epoch) for key, value in row.items() if key != "epoch"]
    MlflowClient().log_batch(run_id, metrics=metrics, synchronous=True)


def epoch_callback(on_epoch: Callable[[dict], None] | None = None):
    """A Keras callback that records each epoch's logs, learning rate and wall seconds.

    The learning rate is the one the epoch's first step used: read when the epoch begins, where
    Keras evaluates a schedule at the current iteration (and after ReduceLROnPlateau's changes).

    `rows` holds the history (one dict per epoch, `epoch` 1-based); `on_epoch`
    (e.g. MLflow logging) is called with each row as it completes.
    """
    import keras
    import numpy as np

    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch must be callable, got {type(on_epoch).__name__}")

    class EpochRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows: list[dict] = []
            self._start = 0.0
            self._rate = float("nan")

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._start
            row = {"epoch": epoch + 1}
            row.update({k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0})
            row["learning_rate"] = self._rate
            row["epoch_seconds"] = seconds
            self.rows.append(row)
            if on_epoch is not None:
                on_epoch(row)

    return EpochRecorder()
