"""MLflow: one run per training, reopened by evaluate and predict; the per-epoch callback.

DVC decides what runs; MLflow records what ran (STYLE 2). A run does not stay
RUNNING: `run_scope` ends it FINISHED, FAILED (with the error as a tag) or
KILLED (Ctrl-C / SIGTERM). A process killed outright (SIGKILL, out of memory,
a machine that stopped) cannot end its run, so every run records the host and
process that opened it (tags `pipeline.host`, `pipeline.pid`), and each
`run_scope` first marks FAILED the experiment's RUNNING runs that this host
opened from a process that no longer exists, with an `error` tag saying so,
except the run it is about to reopen: a killed training that resumes from its
backup continues its own run (see train.py), whose epochs then follow on from
the last one logged.

The store is checked up front (`connect`) with MLflow's HTTP retries turned
off, so an unreachable tracking server fails the stage in seconds, in one line
naming its URI, before any work; later requests keep MLflow's own retries.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

from pipeline import interrupts
from pipeline.config import Config
from pipeline.errors import PipelineError, count, first_line

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds")


# For the up-front check only: one try, no back-off, a short wait (MLflow's defaults retry for minutes).
QUICK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # seconds
}


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in QUICK_HTTP}
    os.environ.update(QUICK_HTTP)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connect(cfg: Config):
    """Point MLflow at the configured store; fail early, in one line naming it, when it cannot be used.

    The check (set_experiment) makes one HTTP try with a 10 s timeout: an unreachable server fails at
    once instead of after MLflow's retries.
    """
    import mlflow

    uri = cfg.tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with _quick_http(), _opening_database(uri):
            experiment = mlflow.set_experiment(cfg.mlflow.experiment_name)
    except Exception as exc:  # any store error: unreachable server, bad URI, locked database
        raise store_error(uri, exc) from None
    return experiment


def open_store(uri: str, must_exist: bool = False):
    """A client of the store at `uri`, checked like `connect` but creating no experiment (for commands
    that read runs: compare, register). must_exist: a SQLite file that does not exist is an error, not a
    new empty store."""
    from mlflow.tracking import MlflowClient

    if must_exist and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise PipelineError(f"MLflow tracking store {uri!r}: no such file (set MLFLOW_TRACKING_URI or "
                            f"mlflow.tracking_uri to the store the runs are in)")
    client = MlflowClient(tracking_uri=uri)
    try:
        with _quick_http(), _opening_database(uri):
            client.search_experiments(max_results=1)
    except Exception as exc:  # any store error: unreachable server, bad URI, not an MLflow database
        raise store_error(uri, exc) from None
    return client


def get_run(client, run_id: str):
    """The run `run_id` from the client's store; one PipelineError when it is unknown or the store fails."""
    from mlflow.exceptions import MlflowException

    uri = client._tracking_client.tracking_uri
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise PipelineError(f"run {run_id!r} not found in the tracking store {uri}") from None
        raise PipelineError(f"run {run_id!r}: the tracking store {uri} failed: {first_line(exc)}") from None


def store_error(uri: str, exc: Exception) -> PipelineError:
    """One line for a store that failed its first request: a refused or timed-out connection's reason
    (not urllib3's paragraph about retries), else the error's first line."""
    first = first_line(exc)
    reason = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out|timed out", first)
    first = f"cannot be reached ({reason.group(0)})" if reason else f"cannot be used: {first}"
    return PipelineError(f"MLflow tracking store {uri!r} {first}")


@contextlib.contextmanager
def _opening_database(uri: str) -> Iterator[None]:
    """For a SQLite store: one process at a time, working from the database's folder, while MLflow opens it.

    - Processes that start together (`dvc queue start -j 2`, parallel sweep trials) would otherwise race
      to create the schema or the experiment ("table ... already exists", a unique-constraint error). An
      exclusive lock on the database's folder (flock works on a directory) serialises the opening.
    - MLflow resolves a SQLite store's default artifact root, `./mlruns`, against the working directory
      when it first opens the store, and an experiment created then keeps that location. Opening it from
      the database's folder keeps the artifacts beside the database, also for a stage that DVC runs in a
      temporary copy of the project (`dvc exp run --queue`), which is deleted afterwards.
    """
    import fcntl

    prefix = "sqlite:///"
    folder = os.path.dirname(os.path.abspath(uri[len(prefix):])) if uri.startswith(prefix) else ""
    if not folder or not os.path.isdir(folder) or uri == prefix + ":memory:":
        yield
        return
    here = os.getcwd()
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.chdir(folder)
        yield
    finally:
        os.chdir(here)
        os.close(descriptor)  # releases the lock


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment that runs this stage (`dvc exp run`, queued or not), as run tags; {} outside one."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and has not ended (a zombie has ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    try:  # the state letter follows the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fail_abandoned_runs(experiment_id: str, keep: str | None = None) -> list[str]:
    """Mark FAILED the experiment's RUNNING runs that this host opened from a process that no longer exists.

    `keep` (the run about to be reopened) is left alone, as are runs of other hosts (their processes
    cannot be checked from here) and runs without the `pipeline.pid` tag. Returns the ids marked.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    running = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`pipeline.host` = '{host}'",
        max_results=1000,
    )
    marked = []
    for run in running:
        pid = run.data.tags.get("pipeline.pid", "")
        if run.info.run_id == keep or not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "error",
                       f"process {pid} on {host} ended without closing the run (killed, or its machine stopped)")
        client.set_terminated(run.info.run_id, "FAILED")
        marked.append(run.info.run_id)
    return marked


def run_in_experiment(run_id: str, experiment_id: str) -> bool:
    """Whether the configured store has run `run_id`, in that experiment (and not deleted)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"


def clear_error(run_id: str) -> None:
    """Remove the `error` tag of a run that continues (a resumed training's, once FAILED or KILLED)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if "error" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "error")


def last_logged_epoch(run_id: str) -> int:
    """The highest step (epoch) of the run's `loss` metric; 0 when none is logged."""
    from mlflow.tracking import MlflowClient

    return max((m.step for m in MlflowClient().get_metric_history(run_id, "loss")), default=0)


def minimised(metric: str) -> bool:
    """Whether lower is better: losses; everything else (accuracies, images per second) is better high.
    The one rule by which sweep, compare and register rank runs."""
    return metric.endswith("loss")


def default_run_name(cfg: Config) -> str:
    """mlflow.run_name, else `<model>-<optimizer>-lr<rate>-bs<batch>`, after the DVC experiment's name in one."""
    if cfg.mlflow.run_name:
        return cfg.mlflow.run_name
    name = f"{cfg.model.name}-{cfg.optimizer.name}-lr{cfg.optimizer.learning_rate:g}-bs{cfg.train.batch_size}"
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{experiment}: {name}" if experiment else name


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


def environment_tags(device: str | None = None) -> dict[str, str]:
    """Versions and hardware; `device`: the `device` tag as the training placed it (distribute.Placement.tag),
    else the GPUs TensorFlow sees or the CPU."""
    import keras
    import mlflow
    import tensorflow as tf

    from importlib.metadata import PackageNotFoundError, version

    from pipeline.hardware import ONEDNN_TAG, cpu_info, onednn_state

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
        "device": device or ("gpu:" + ",".join(d.name for d in gpus) if gpus else f"cpu:{cpu['model']}"),
        "cpu.model": str(cpu["model"]),
        "cpu.flags": " ".join(cpu["flags"]),  # those that decide speed: AVX2, AVX-512, BF16, AMX
        "cpu.cores": str(cpu["cores"]),
        # TensorFlow's CPU kernels: oneDNN's or Eigen's (pipeline.hardware.prefer_onednn); their sums round apart
        ONEDNN_TAG: onednn_state(),
    }


@contextlib.contextmanager
def run_scope(cfg: Config, run_id: str | None = None, tags: dict | None = None) -> Iterator[str]:
    """Start (or reopen) a run and always end it: FINISHED, FAILED with the error, or KILLED.

    Reopens `run_id` when given, else the run `mlflow run` created
    (MLFLOW_RUN_ID), else starts a new one named after its key params. First
    marks FAILED the runs that killed processes of this host left RUNNING
    (fail_abandoned_runs), and tags the run with this host and process.
    """
    import mlflow

    experiment = connect(cfg)
    current = mlflow.active_run()
    if current is not None and run_id in (None, current.info.run_id):
        yield current.info.run_id  # nested in an outer scope (`pipeline run`), which ends the run
        return
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    fail_abandoned_runs(experiment.experiment_id, keep=run_id)
    owner = {"pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid()), **dvc_experiment_tags()}
    if run_id:
        try:
            active = mlflow.start_run(run_id=run_id)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise PipelineError(f"MLflow run {run_id} is not in the tracking store {mlflow.get_tracking_uri()!r} "
                                "(another store, or one deleted since the run was made); use the store it is "
                                "in, or rerun the training (`dvc repro --force train`)") from None
        mlflow.set_tags(owner)
    else:
        active = mlflow.start_run(run_name=default_run_name(cfg), tags={**(tags or {}), **owner})
    run_id = active.info.run_id
    try:
        yield run_id
        interrupts.raise_if_interrupted()  # a Ctrl-C that Python dropped: the run ends KILLED, not FINISHED
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


# The tag the MLflow UI shows, and lets one edit, as a run's description (Markdown, a newline is a line break).
DESCRIPTION_TAG = "mlflow.note.content"
RESULT_PREFIX = "result: "

SCHEDULE_WORDS = {"constant": "constant rate", "exponential": "exponential decay", "step": "step decay",
                  "cosine": "cosine decay"}


def run_description(cfg: Config, input_shape, precision: str) -> str:
    """A run's key params in two lines, for its description in the MLflow UI, e.g.

        cnn · adam, lr 0.002, cosine decay · batch 128 · 5 epochs, early stopping
        fashion_mnist, 28x28x1 · precision float32

    input_shape: the network's input (height, width, channels) after preprocessing; precision: the Keras
    policy trained in (train.precision, or what `auto` resolved to).
    """
    opt = cfg.optimizer
    # Keras 2's `decay` is a schedule of its own (config.py allows it with the constant schedule only)
    schedule = f"inverse-time decay {opt.decay:g}" if opt.decay else SCHEDULE_WORDS[opt.schedule.name]
    rate = [opt.name, f"lr {opt.learning_rate:g}", schedule]
    if opt.schedule.warmup_epochs:
        rate.append(f"{opt.schedule.warmup_epochs:g}-epoch warm-up")
    if cfg.callbacks.reduce_lr.enabled:
        rate.append(f"x{cfg.callbacks.reduce_lr.factor:g} on {cfg.callbacks.reduce_lr.monitor} plateau")
    epochs = count(cfg.train.epochs, "epoch")
    if cfg.callbacks.early_stopping.enabled:
        epochs += ", early stopping"
    return (f"{cfg.model.name} · {', '.join(rate)} · batch {cfg.train.batch_size} · {epochs}\n"
            f"{cfg.data.source}, {'x'.join(map(str, input_shape))} · precision {precision}")


def describe_result(run_id: str, headline: dict[str, float]) -> str:
    """Append the evaluation's result (test accuracy, else validation accuracy) to the run's description,
    replacing the line an earlier evaluation of the run wrote. Returns the new description."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    split = "test" if "test_accuracy" in headline else "val"
    line = f"{RESULT_PREFIX}{split} accuracy {headline[f'{split}_accuracy']:.2%}"
    if split == "test" and "val_accuracy" in headline:
        line += f" (val {headline['val_accuracy']:.2%})"
    before = client.get_run(run_id).data.tags.get(DESCRIPTION_TAG, "")
    kept = [text for text in before.splitlines() if not text.startswith(RESULT_PREFIX)]
    description = "\n".join([*kept, line])
    client.set_tag(run_id, DESCRIPTION_TAG, description)
    return description
