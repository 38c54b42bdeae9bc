"""`pipeline reproduce RUN_ID`: the verdict logic, bad input in one line, and real reruns against real stores."""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import hardware
from pipeline.errors import PipelineError
from pipeline.config import absolute_uri
from pipeline.reproduce import compare, config_of, format_comparison, judge, kernels_env, param_value, reproduce
from tests.conftest import BIN, ROOT, make_project, run, stop_group
from tests.test_hardware import OURS


# --- plain functions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, verdict", [
    ([("1", "loss", 0.5, 0.5), ("final", "test_accuracy", 0.9, 0.9)], "identical"),
    ([("1", "loss", math.nan, math.nan)], "identical"),
    ([("1", "loss", 0.5, 0.5 + 1e-9), ("2", "loss", 0.4, 0.405)], "within tolerance"),
    ([("1", "loss", 0.5, 0.52)], "different"),
    ([("1", "loss", 0.5, math.nan)], "different"),
    ([("1", "loss", 0.5, 0.5), ("2", "loss", 0.4, None)], "different"),  # the rerun stopped an epoch early
    ([], "different"),
])
def test_verdict(rows, verdict):
    assert judge(rows, tolerance=0.01)[0] == verdict


def test_verdict_names_the_largest_difference_and_the_tolerance():
    verdict, reason = judge([("1", "loss", 0.5, 0.501), ("2", "val_loss", 0.4, 0.403)], tolerance=0.01)
    assert verdict == "within tolerance"
    assert reason == "largest difference 0.003 (val_loss at epoch 2); tolerance 0.01"


@pytest.mark.parametrize("tag, environ, expected", [
    ("on", {}, "1"), ("on", {hardware.ONEDNN_VARIABLE: "0"}, "1"), ("off", OURS, "0"),
    (None, OURS, None),  # a run older than the tag ran TensorFlow's default for its CPU
    ("unknown", OURS, None), (None, {hardware.ONEDNN_VARIABLE: "0"}, "0"),  # a user's own setting stays
])
def test_the_rerun_runs_tensorflows_cpu_kernels_as_the_original_did(tag, environ, expected):
    env = kernels_env(tag, {"PATH": "/bin", **environ})
    assert env.get(hardware.ONEDNN_VARIABLE) == expected and env["PATH"] == "/bin"
    assert hardware.ONEDNN_SET_BY not in env  # the rerun's own `pipeline` keeps what it is given


def test_relative_store_uris_are_made_absolute_for_the_worktree(tmp_path):
    assert absolute_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri(f"sqlite:///{tmp_path}/a.db", Path("/elsewhere")) == f"sqlite:///{tmp_path}/a.db"
    assert absolute_uri("mlruns", tmp_path) == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"


@pytest.mark.parametrize("text, value", [("0.005", 0.005), ("True", True), ("None", None), ("[[8], [16]]", [[8], [16]]),
                                         ("adam", "adam"), ("~/.cache/x", "~/.cache/x")])
def test_logged_params_back_to_values(text, value):
    assert param_value(text) == value


def test_comparison_of_two_logged_runs_names_what_differs_between_them(tmp_path):
    from mlflow.entities import Metric

    store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = store.create_experiment("tests")
    ids = []
    for device, numpy, onednn, drift in [("cpu:A", "2.1.0", "off", 0.0), ("cpu:B", "2.2.0", "on", 0.004)]:
        run_id = store.create_run(experiment_id, tags={"device": device, "versions.numpy": numpy,
                                                       "versions.keras": "3.15.0", "tensorflow.onednn": onednn,
                                                       "cpu.cores": "2"}).info.run_id
        store.log_batch(run_id, metrics=[Metric(key, value + drift, 0, step) for step in (1, 2)
                                         for key, value in [("loss", 1.0 / step), ("val_accuracy", 0.5 * step)]])
        store.log_metric(run_id, "test_accuracy", 0.9)
        ids.append(run_id)

    comparison = compare(store, *ids, tolerance=0.01)

    assert comparison.verdict == "within tolerance" and comparison.exit_code == 3
    assert [row[:2] for row in comparison.rows] == [("1", "loss"), ("1", "val_accuracy"), ("2", "loss"),
                                                    ("2", "val_accuracy"), ("final", "test_accuracy")]
    assert comparison.environment == ["device: cpu:A != cpu:B", "tensorflow.onednn: off != on",
                                      "versions.numpy: 2.1.0 != 2.2.0"]
    text = format_comparison(comparison)
    assert "verdict: within tolerance (largest difference 0.004 (loss at epoch 1); tolerance 0.01)" in text
    assert ("the runs differ in: device: cpu:A != cpu:B; tensorflow.onednn: off != on; "
            "versions.numpy: 2.1.0 != 2.2.0") in text
    assert compare(store, *ids, tolerance=0.001).exit_code == 4
    assert compare(store, ids[0], ids[0], tolerance=0.0).exit_code == 0


def test_a_run_without_config_json_is_rebuilt_from_its_logged_params(tmp_path):
    from pipeline.config import load_config, validate

    cfg = load_config(ROOT / "params.yaml", ["model.name=resnet", "optimizer.name=sgd", "optimizer.momentum=0.9",
                                             "train.epochs=2", "callbacks.reduce_lr.min_lr=1e-5"])
    store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = store.create_run(store.create_experiment("tests")).info.run_id
    for key, value in cfg.flat().items():  # as train.main logs them, derived facts included
        store.log_param(run_id, key, value)
    store.log_param(run_id, "derived.num_classes", 10)

    tree, source = config_of(store, run_id, tmp_path / "artifacts")

    assert source == "the logged params"
    assert validate(tree) == cfg


# --- bad input: one line, exit 1, nothing left behind ----------------------------------------------------------


def reproduce_cli(repo: Path, run_id: str, uri: str, *args: str, tmp: Path | None = None):
    env = {"MLFLOW_TRACKING_URI": uri}
    if tmp is not None:  # the rerun's temporary folder and worktree go here, so a test can see that none is left
        tmp.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmp)
    return run(["pipeline", "reproduce", run_id, *args], repo, check=False, env=env)


CLEAN = {"git.dirty": "false", "data.digest": "0123456789abcdef"}  # digits' real digest is another
BAD_RUNS = {  # case -> the run's tags ("HEAD": the project's commit)
    "no commit tag": CLEAN,
    "commit not here": {**CLEAN, "mlflow.source.git.commit": "1" * 40},
    "dirty run": {**CLEAN, "git.dirty": "true", "mlflow.source.git.commit": "HEAD"},
    "digest mismatch": {**CLEAN, "mlflow.source.git.commit": "HEAD"},
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """A project whose sqlite store holds one finished run per bad case, logged as train.main logs them."""
    from pipeline.config import load_config

    repo = make_project(tmp_path_factory.mktemp("bad") / "repo")
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    store = MlflowClient(tracking_uri=uri)
    experiment_id = store.create_experiment("tests")
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    config = load_config(repo / "params.yaml").model_dump(mode="json")
    ids = {}
    for case, tags in BAD_RUNS.items():
        tags = {k: commit if v == "HEAD" else v for k, v in tags.items()}
        ids[case] = store.create_run(experiment_id, tags=tags).info.run_id
        store.log_dict(ids[case], config, "provenance/config.json")
        store.set_terminated(ids[case])
    ids["unknown run"] = "f00d" * 8
    return repo, uri, store, experiment_id, ids


@pytest.mark.parametrize("case, expected", [
    ("unknown run", "run 'f00df00df00df00df00df00df00df00d' not found in the tracking store sqlite:///"),
    ("no commit tag", "has no git commit (tag mlflow.source.git.commit): it was not made from a git checkout"),
    ("commit not here", "commit 1111111111111111111111111111111111111111 of run"),
    ("dirty run", "was made from a dirty working tree (git.dirty=true) at commit"),
    ("digest mismatch", "data digest mismatch: run"),
])
def test_bad_input_is_one_error_and_leaves_nothing_behind(bad_runs, tmp_path, monkeypatch, case, expected):
    repo, uri, store, experiment_id, ids = bad_runs
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the rerun's folder and worktree would go
    runs_before = len(store.search_runs([experiment_id]))
    with pytest.raises(PipelineError, match=re.escape(expected)):
        reproduce(ids[case], uri, repo, echo=lambda line: None)
    assert len(store.search_runs([experiment_id])) == runs_before  # no new run
    assert list(tmp_path.iterdir()) == []  # no temporary folder or worktree left
    assert len(run(["git", "worktree", "list"], repo).stdout.splitlines()) == 1
    assert run(["git", "status", "--porcelain"], repo).stdout == ""  # the user's checkout untouched


def test_cli_says_a_dirty_run_in_one_line_exit_1_and_allow_dirty_goes_on(bad_runs, tmp_path):
    repo, uri, store, experiment_id, ids = bad_runs
    done = reproduce_cli(repo, ids["dirty run"], uri)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: run {ids['dirty run']} was made from a dirty working tree (git.dirty=true) at commit "
        f"{head(repo)[:12]}: its uncommitted changes are in no commit; --allow-dirty reruns the commit without them"]
    # --allow-dirty warns and goes on, as far as the data: this run's recorded digest is not digits'
    done = reproduce_cli(repo, ids["dirty run"], uri, "--allow-dirty", tmp=tmp_path / "tmp")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith(f"warning: run {ids['dirty run']} was made from a dirty working tree")
    assert done.stderr.strip().splitlines()[-1].startswith("error: data digest mismatch")
    assert list((tmp_path / "tmp").iterdir()) == []


def head(repo: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


# --- real reruns: an MLflow server over HTTP, a fresh clone with the DVC remote ----------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, backend_store_uri: str):
    """A real `mlflow server` on 127.0.0.1 that stores artifacts itself (clients upload over HTTP); its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri, "--serve-artifacts",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: its workers end with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise AssertionError(f"mlflow server exited {server.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not answer {url}/health in 120 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(server)


def assert_reproduced_identically(store: MlflowClient, original_id: str, done) -> None:
    assert done.returncode == 0, done.stderr
    assert "verdict: identical (every metric is bitwise equal)" in done.stdout
    [new] = store.search_runs([store.get_run(original_id).info.experiment_id],
                              filter_string=f"tags.reproduces = '{original_id}'")
    original = store.get_run(original_id)
    assert new.info.status == "FINISHED" and new.data.tags["reproduce.verdict"] == "identical"
    assert new.data.tags["mlflow.source.git.commit"] == original.data.tags["mlflow.source.git.commit"]
    assert new.data.tags["git.dirty"] == "false" and new.data.tags["data.digest"] == original.data.tags["data.digest"]
    for key in ("loss", "val_accuracy"):
        history = [(m.step, m.value) for m in store.get_metric_history(original_id, key)]
        assert [(m.step, m.value) for m in store.get_metric_history(new.info.run_id, key)] == history
        assert f"3      {key:<20} {history[-1][1]!r:<22} {history[-1][1]!r:<22} 0" in done.stdout
    assert new.data.metrics["test_accuracy"] == original.data.metrics["test_accuracy"]


def assert_checkout_untouched(repo: Path) -> None:
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout == ""
    assert len(run(["git", "worktree", "list"], repo).stdout.splitlines()) == 1


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's initdb, pg_ctl and postgres: Debian's newest, else the ones on PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0)
    on_path = [Path(found).parent for found in [shutil.which("initdb")] if found]
    for folder in [*reversed(debian), *on_path]:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres", "createdb")):
            return folder
    return None


def postgres_missing() -> str | None:
    """Why postgres_database() cannot start a cluster here, or None when it can."""
    if postgres_bin() is None:
        return "PostgreSQL's initdb, pg_ctl and postgres are not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0:  # postgres refuses to run as root: it runs as the account Debian's package created
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` account to run PostgreSQL as"
    return None


@contextlib.contextmanager
def postgres_database():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with an empty database `mlflow`; its SQLAlchemy URI."""
    if why := postgres_missing():
        pytest.skip(why)
    bindir = postgres_bin()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses to run as root
    folder = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))  # not in tmp_path: pytest's folders are root's alone
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()

    def pg(*args):
        done = subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)
        log = folder / "log"
        assert done.returncode == 0, f"{args}: {done.stderr}{log.read_text() if log.exists() else ''}"

    try:
        pg(bindir / "initdb", "-D", data, "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        pg(bindir / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "start",
           "-o", f"-k {folder} -p {port} -c listen_addresses=127.0.0.1")
        try:
            pg(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "mlflow", "mlflow")
            yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
        finally:
            pg(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# One server test, not one per backend store (each is a run and its reproduction, 150 s of the suite): what the
# pipeline does over HTTP is the same whatever the server keeps its runs in. PostgreSQL, as README's shared server
# has it, where a throwaway cluster can start (.ci/run installs it); else SQLite, the test's id saying why.
SERVER_BACKEND = f"sqlite (no PostgreSQL: {why})" if (why := postgres_missing()) else "postgresql"


@pytest.mark.slow
@pytest.mark.parametrize("backend", [SERVER_BACKEND])
def test_run_and_reproduce_against_an_mlflow_server_over_http(project, tmp_path, backend):
    server = tmp_path / "server"
    with contextlib.ExitStack() as stack:
        backend_store_uri = (f"sqlite:///{server / 'mlflow.db'}" if backend.startswith("sqlite")
                             else stack.enter_context(postgres_database()))
        url = stack.enter_context(mlflow_server(server, backend_store_uri))
        run(["pipeline", "run"], project, env={"MLFLOW_TRACKING_URI": url})
        store = MlflowClient(tracking_uri=url)
        [original] = store.search_runs([store.get_experiment_by_name("tests").experiment_id])

        done = reproduce_cli(project, original.info.run_id, url, tmp=tmp_path / "tmp")

        assert_reproduced_identically(store, original.info.run_id, done)
        assert "refetching from the recorded source" in done.stderr  # no DVC remote in this project
    # both runs' artifacts went over HTTP into the server's artifact root
    assert len(list((server / "artifacts").rglob("provenance/config.json"))) == 2
    assert list((tmp_path / "tmp").iterdir()) == []
    assert_checkout_untouched(project)


@pytest.mark.slow
def test_a_teammates_run_reproduces_from_a_fresh_clone_with_the_data_from_the_dvc_remote(project, tmp_path):
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "dvc-storage")], project)
    run(["git", "commit", "-qam", "DVC remote"], project)
    uri = f"sqlite:///{project / 'mlflow.db'}"  # the team's store; a server's URL works the same (test above)
    run(["dvc", "repro"], project, env={"MLFLOW_TRACKING_URI": uri})
    run(["dvc", "push"], project)
    store = MlflowClient(tracking_uri=uri)
    [original] = store.search_runs([store.get_experiment_by_name("tests").experiment_id])
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)

    done = reproduce_cli(clone, original.info.run_id, uri, tmp=tmp_path / "tmp")

    assert_reproduced_identically(store, original.info.run_id, done)
    assert f"data {original.data.tags['data.digest']} pulled from the DVC remote" in done.stderr
    assert list((tmp_path / "tmp").iterdir()) == []
    assert_checkout_untouched(clone)
    assert not (clone / "data" / "raw").exists()  # the data went to the worktree, not the clone
