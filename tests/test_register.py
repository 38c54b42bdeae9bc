"""`pipeline register` on a real SQLite MLflow store: which run it picks, where the alias goes, its error lines.

The runs here are made with MLflow's client (metrics, status, a logged model named `model` linked to the run),
not trained: what register reads is the store, and training is tests/test_serve.py's part.
"""

from __future__ import annotations

import json
import signal
import sys

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipeline import register
from pipeline.errors import PipelineError
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def experiment(store_uri, request) -> tuple[MlflowClient, str, str]:
    """(client, experiment name, its id), the experiment named after the test."""
    client = MlflowClient(tracking_uri=store_uri)
    name = request.node.name
    return client, name, client.create_experiment(name)


def make_run(client: MlflowClient, experiment_id: str, metrics: dict[str, float], *, model: str | None = "READY",
             status: str = "FINISHED", params: dict[str, str] | None = None) -> str:
    """A run with these metrics and status; model: its logged model's status (None: no model)."""
    run_id = client.create_run(experiment_id).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    if model is not None:
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        if model != "PENDING":  # a log_model that never finished leaves its model PENDING
            client.finalize_logged_model(logged.model_id, LoggedModelStatus(model))
    client.set_terminated(run_id, status)
    return run_id


def test_best_run_skips_unfinished_runs_runs_without_the_metric_or_a_ready_model(experiment, store_uri):
    client, name, exp = experiment
    make_run(client, exp, {"test_accuracy": 0.99}, status="FAILED")
    make_run(client, exp, {"test_accuracy": 0.98}, model=None)
    make_run(client, exp, {"test_accuracy": 0.97}, model="PENDING")
    make_run(client, exp, {"test_accuracy": 0.96}, model="FAILED")
    make_run(client, exp, {"val_loss": 0.01})
    make_run(client, exp, {"test_accuracy": float("nan")})
    low = make_run(client, exp, {"test_accuracy": 0.80, "test_loss": 0.30})
    best = make_run(client, exp, {"test_accuracy": 0.90, "test_loss": 0.50})

    done = register.main(store_uri, f"{name}-acc", experiment=name)
    assert (done.run_id, done.metric, done.value, done.version, done.created) == (best, "test_accuracy", 0.90, "1", True)
    # a loss is minimised: the run with the lower test_loss, though its accuracy is lower
    done = register.main(store_uri, f"{name}-loss", metric="test_loss", experiment=name)
    assert (done.run_id, done.value) == (low, 0.30)

    version = client.get_model_version_by_alias(f"{name}-acc", "champion")
    assert str(version.version) == "1" and version.run_id == best
    assert version.source == f"models:/{register.logged_model(client, client.get_run(best)).model_id}"
    assert version.tags["run_id"] == best
    assert (version.tags["metric"], float(version.tags["metric_value"])) == ("test_accuracy", 0.90)


def test_filter_limits_the_runs_chosen_among(experiment, store_uri):
    client, name, exp = experiment
    make_run(client, exp, {"test_accuracy": 0.9}, params={"model.name": "resnet"})
    cnn = make_run(client, exp, {"test_accuracy": 0.7}, params={"model.name": "cnn"})
    done = register.main(store_uri, name, experiment=name, filter_string="params.`model.name` = 'cnn'")
    assert done.run_id == cnn


def test_alias_moves_to_a_better_run_and_a_registered_model_is_not_registered_twice(experiment, store_uri):
    client, name, exp = experiment
    first = make_run(client, exp, {"test_accuracy": 0.8})
    assert register.main(store_uri, name, experiment=name).version == "1"
    again = register.main(store_uri, name, experiment=name)
    assert (again.version, again.created) == ("1", False)

    better = make_run(client, exp, {"test_accuracy": 0.9})
    moved = register.main(store_uri, name, experiment=name)
    assert (moved.run_id, moved.version, moved.created) == (better, "2", True)
    assert client.get_model_version_by_alias(name, "champion").run_id == better

    # naming the first run again: its version (1) gets the alias back, no third version
    back = register.main(store_uri, name, run_id=first)
    assert (back.version, back.created, back.value) == ("1", False, 0.8)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    # another alias leaves champion where it was
    register.main(store_uri, name, run_id=better, alias="challenger")
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_class_names_from_the_runs_manifest_are_tagged(experiment, store_uri):
    import mlflow

    client, name, exp = experiment
    run_id = make_run(client, exp, {"test_accuracy": 0.5})
    mlflow.set_tracking_uri(store_uri)
    with mlflow.start_run(run_id=run_id):  # as train.log_inputs logs it
        mlflow.log_dict({"class_names": ["cat", "dog"]}, "provenance/data_manifest.json")
    register.main(store_uri, name, experiment=name)
    assert json.loads(client.get_model_version(name, "1").tags["class_names"]) == ["cat", "dog"]


def pipeline_cli(monkeypatch, capsys, *args: str, store_uri: str | None = None,
                 params=ROOT / "params.yaml") -> tuple[int, str, str]:
    """`pipeline --params PARAMS ARGS` through cli.main in this process (the command's own code path, without
    a Python start-up per case), MLFLOW_TRACKING_URI set to store_uri if given: (exit status, stdout, stderr)."""
    from pipeline import cli

    if store_uri is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.setattr(sys, "argv", ["pipeline", "--params", str(params), *args])
    saved = signal.getsignal(signal.SIGTERM)  # cli sets its own SIGTERM handler
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, saved)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_version_and_the_serve_command(experiment, store_uri, monkeypatch, capsys):
    client, name, exp = experiment
    run_id = make_run(client, exp, {"test_accuracy": 0.75})
    code, out, err = pipeline_cli(monkeypatch, capsys, "register", "--name", name, "--experiment", name,
                                 store_uri=store_uri)
    assert code == 0, err
    assert out.splitlines() == [
        f"register: registered {name} version 1 (alias champion): run {run_id}, test_accuracy = 0.75",
        f"serve it: MLFLOW_TRACKING_URI={store_uri} mlflow models serve -m models:/{name}@champion "
        "--env-manager local -h 127.0.0.1 -p 5001",
    ]


@pytest.mark.parametrize("case, fragments", [
    ("unknown run", ["run 'f00' not found in the tracking store sqlite:///"]),
    ("run without model", ["has no logged model 'model'"]),
    ("failed run", ["is FAILED, not FINISHED"]),
    ("no run has the metric", ["has the metric 'val_f1'"]),
    ("unknown experiment", ["experiment 'nope' not found in the tracking store"]),
    ("bad filter", ["--filter 'params.x === 1'", "Expected a quoted string value"]),
    ("run and filter", ["--run and --filter: give one"]),
    ("reserved alias", ["--alias 'latest'", "reserved"]),
    ("bad name", ["--name 'a/b'", "cannot contain '/'"]),
])
def test_cli_errors_are_one_line(experiment, store_uri, monkeypatch, capsys, case, fragments):
    client, name, exp = experiment
    no_model = make_run(client, exp, {"test_accuracy": 0.9}, model=None)
    failed = make_run(client, exp, {"test_accuracy": 0.9}, status="FAILED")
    args = {
        "unknown run": ["--run", "f00"],
        "run without model": ["--run", no_model],
        "failed run": ["--run", failed],
        "no run has the metric": ["--metric", "val_f1", "--experiment", name],
        "unknown experiment": ["--experiment", "nope"],
        "bad filter": ["--experiment", name, "--filter", "params.x === 1"],
        "run and filter": ["--run", no_model, "--filter", "params.x = '1'"],
        "reserved alias": ["--alias", "latest"],
        "bad name": [],
    }[case]
    model_name = "a/b" if case == "bad name" else name
    code, out, err = pipeline_cli(monkeypatch, capsys, "register", "--name", model_name, *args, store_uri=store_uri)
    assert code == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert out == ""
    assert client.search_registered_models(f"name = '{name}'") == []  # nothing registered, not even the name


def test_no_finished_run_with_a_model_names_what_is_missing(experiment, store_uri):
    client, name, exp = experiment
    make_run(client, exp, {"test_accuracy": 0.9}, model=None)
    with pytest.raises(PipelineError, match="with metric 'test_accuracy' has a logged model 'model'"):
        register.main(store_uri, name, experiment=name)
