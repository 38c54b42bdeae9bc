"""Shared fixtures: a throwaway copy of the project in a real git + DVC repo, tiny params."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline import hardware

hardware.prefer_onednn()  # as the `pipeline` command does before TensorFlow loads: the tests run its kernels

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `pipeline`, `dvc`, `mlflow`
PROJECT_FILES = ["pipeline", "dvc.yaml", "params.yaml", "MLproject", "conda.yaml", "pyproject.toml", ".gitignore"]

# Small enough to train in seconds on 2 cores, big enough to learn digits.
TINY_PARAMS = {
    "data": {"source": "digits"},
    "model": {"filters": [[8], [16]], "kernel_sizes": [3, 3], "dense": [32], "dropout": 0.1},
    "optimizer": {"name": "adam", "learning_rate": 0.005},
    "train": {"epochs": 3, "batch_size": 64},
    "callbacks": {"early_stopping": {"enabled": False}, "reduce_lr": {"enabled": False}},
    "mlflow": {"experiment_name": "tests"},
}


tempfile.gettempdir()  # this process keeps the system's temporary folder (PostgreSQL's account must reach it)


@pytest.fixture(scope="session", autouse=True)
def subprocess_temp_folder(tmp_path_factory):
    """The commands the tests start make their temporary files in a folder of pytest's, which pytest prunes after
    a few sessions: a process that a test kills (SIGKILL) leaves its TemporaryDirectory and TensorFlow's autograph
    files behind, and `mlflow models serve` its copy of the model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("TMPDIR")))
        yield


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def isolated_mlflow_state(monkeypatch):
    """Each test starts and ends with MLflow unconfigured.

    MLflow keeps the tracking URI and the experiment in module globals and mirrors them into environment
    variables that subprocesses inherit (set_tracking_uri, set_experiment): one test's store would
    otherwise become the next test's, in process and in the `pipeline`/`dvc`/`mlflow` commands it runs.
    """
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    yield
    if "mlflow" in sys.modules:  # only if a test imported it: importing it here would cost every test seconds
        import mlflow
        from mlflow.tracking import fluent

        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI
        fluent._active_experiment_id = None
        # MLflow caches one store object per URI string for the process: drop them, so no test gets another's
        # (Config.tracking_uri makes SQLite paths absolute for the same reason: MLflow's engines are per URI too)
        from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
        from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

        TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
        ModelRegistryStoreRegistry._get_store_with_resolved_uri.cache_clear()
    for name in MLFLOW_ENV:
        os.environ.pop(name, None)


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None, timeout: int = 600,
        unset: tuple[str, ...] = ()):
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    for name in ("MLFLOW_RUN_ID", *unset):
        full_env.pop(name, None)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def make_project(repo: Path) -> Path:
    """A copy of the project at `repo` as a git repo with DVC initialised, params set to TINY_PARAMS."""
    repo.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "tests@example.com"], repo)
    run(["git", "config", "user.name", "tests"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project"], repo)
    return repo


@pytest.fixture(scope="session")
def project_template(tmp_path_factory) -> Path:
    """make_project once per test process: its git and dvc commands take 1.7 s, a copy of the result 0.015 s."""
    return make_project(tmp_path_factory.mktemp("template") / "repo")


@pytest.fixture
def project(tmp_path, monkeypatch, project_template) -> Path:
    """A copy of make_project's repo in this test's tmp_path, with no tracking URI or run id inherited from the
    environment. DVC's .dvc/tmp is left out: DVC makes its own there (its `btime` marks the repo as new)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    repo = tmp_path / "repo"
    shutil.copytree(project_template, repo, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [])
    return repo


def set_params(repo: Path, extra: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), extra), sort_keys=False))


def client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def stop_group(proc: subprocess.Popen, wait_s: float = 30) -> None:
    """End a process started with start_new_session=True and its children: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
