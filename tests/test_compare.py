"""`pipeline compare` on a real SQLite store: three runs trained and evaluated by the real stages on digits
(about 15 s for the module), a sweep parent made through MLflow's API with two of them as children, and a
FAILED run with only per-epoch metrics."""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time

import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline import compare
from pipeline.config import apply_overrides, validate
from pipeline.errors import PipelineError
from tests.conftest import MLFLOW_ENV, ROOT, TINY_PARAMS, merge, run

VARIANTS = {  # the params differing between the three trainings: optimizer.learning_rate and model.dropout
    "a": [],
    "b": ["optimizer.name=sgd", "optimizer.learning_rate=0.05"],
    "c": ["model.dropout=0.3"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """{"uri", "client", "a", "b", "c" (trained runs' ids), "parent" (of a and b), "partial"}."""
    import mlflow
    from mlflow.tracking import fluent

    from pipeline import evaluate, fetch, preprocess, train

    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tree = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS)
    tree = merge(tree, {"train": {"epochs": 2}, "mlflow": {"tracking_uri": uri, "log_model": False}})
    saved = {name: os.environ.pop(name, None) for name in MLFLOW_ENV}
    cwd = os.getcwd()
    os.chdir(tmp)  # the stages log params.yaml and the git state of the working directory: none here
    try:
        ids = {}
        for name, overrides in VARIANTS.items():
            cfg = validate(apply_overrides(copy.deepcopy(tree), overrides))
            if not ids:
                fetch.save_raw(fetch.fetch_dataset(cfg.data), tmp / "raw")
                preprocess.save_prepared(preprocess.preprocess(fetch.load_raw(tmp / "raw"), cfg.preprocess, cfg.seed),
                                         tmp / "prepared")
            out = tmp / name
            ids[name] = train.main(cfg, tmp / "prepared", tmp / "raw", out / "train")
            evaluate.main(cfg, tmp / "prepared", out / "train", out / "metrics.json", out / "plots", out / "figures")
    finally:
        os.chdir(cwd)
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        fluent._active_experiment_id = None
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name("tests").experiment_id
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    for name in ("a", "b"):
        client.set_tag(ids[name], "mlflow.parentRunId", parent)
    client.set_terminated(parent, "FINISHED")
    # a training that failed in its second epoch: per-epoch metrics only, no totals or test metrics
    partial = client.create_run(experiment_id, run_name="partial").info.run_id
    now = int(time.time() * 1000)
    client.log_batch(partial, metrics=[Metric(key, value, now, 1) for key, value in
                                       {"loss": 2.0, "accuracy": 0.3, "val_loss": 2.1, "val_accuracy": 0.25}.items()],
                     params=[Param("model.name", "cnn_fast"), Param("optimizer.name", "adam")])
    client.set_terminated(partial, "FAILED")
    return {"uri": uri, "client": client, **ids, "parent": parent, "partial": partial}


def ids(runs) -> list[str]:
    return [r.info.run_id for r in runs]


# --------------------------------------------------------------------------- the table and the report


def test_table_rows_differing_params_and_values(store):
    client = store["client"]
    runs = compare.select_runs(client, experiment="tests")
    table, left_out = compare.comparison_table(runs)
    assert ids(left_out) == [store["parent"]]  # the sweep parent has no training metrics
    assert set(table["run_id"]) == {store["a"], store["b"], store["c"], store["partial"]}
    assert list(table.columns) == ["run", "model", "optimizer", "model.dropout", "optimizer.learning_rate",
                                   *compare.METRIC_COLUMNS, "run_id"]
    rows = table.set_index("run_id")
    assert rows.loc[store["b"], "optimizer"] == "sgd" and rows.loc[store["b"], "optimizer.learning_rate"] == "0.05"
    assert rows.loc[store["c"], "model.dropout"] == "0.3" and rows.loc[store["a"], "model.dropout"] == "0.1"
    for name in ("a", "b", "c"):
        logged = client.get_run(store[name])
        row = rows.loc[store[name]]
        assert row["run"] == logged.info.run_name and row["model"] == logged.data.params["model.name"] == "cnn_fast"
        assert row["test_accuracy"] == logged.data.metrics["test_accuracy"]
        assert row["val_loss"] == logged.data.metrics["final_val_loss"]
        assert row["train_accuracy"] == client.get_metric_history(store[name], "accuracy")[-1].value  # epoch 2
        assert row["epochs_run"] == 2 and row["param_count"] > 0
        assert row["seconds_per_epoch"] == pytest.approx(logged.data.metrics["train_seconds"] / 2)
    assert pd.isna(rows.loc[store["partial"], "test_accuracy"]) and rows.loc[store["partial"], "train_loss"] == 2.0


@pytest.mark.parametrize("sort_by", ["test_accuracy", "test_loss", "train_seconds", "best_val_accuracy"])
def test_sort_order_losses_lowest_first_missing_last(store, sort_by):
    table, _ = compare.comparison_table(compare.select_runs(store["client"], experiment="tests"), sort_by)
    assert table["run_id"].iloc[-1] == store["partial"]  # it lacks every one of these metrics
    runs = {r.info.run_id: r for r in compare.select_runs(store["client"], experiment="tests")}
    values = [runs[run_id].data.metrics[sort_by] for run_id in table["run_id"][:3]]
    assert values == sorted(values, reverse=not sort_by.endswith("loss"))


def test_write_report_files_and_artifacts_logged_to_the_parent(store, tmp_path):
    client = store["client"]
    runs = compare.select_runs(client, parent=store["parent"])
    out = tmp_path / "reports" / "sweep"
    paths = compare.write_report(client, runs, out, sort_by="val_loss", log_to=store["parent"])
    assert sorted(p.name for p in out.iterdir()) == sorted(compare.REPORT_FILES.values())
    assert {kind: p.name for kind, p in paths.items()} == compare.REPORT_FILES
    for kind in ("val_accuracy", "val_loss", "accuracy_vs_time"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[kind].stat().st_size > 10_000
    csv = pd.read_csv(paths["csv"])
    expected = sorted([store["a"], store["b"]], key=lambda i: client.get_run(i).data.metrics["final_val_loss"])
    assert list(csv["run_id"]) == expected
    assert "optimizer.learning_rate" in csv.columns and "model.dropout" not in csv.columns  # a and b share 0.1
    assert csv["test_accuracy"].tolist() == [client.get_run(i).data.metrics["test_accuracy"] for i in expected]
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("| run | model | optimizer | optimizer.learning_rate | train_accuracy |")
    assert all(run_id in markdown for run_id in expected) and "sorted by val_loss (lowest first" in markdown
    assert "<table" in paths["html"].read_text() and expected[0] in paths["html"].read_text()
    logged = {a.path for a in client.list_artifacts(store["parent"], compare.ARTIFACT_PATH)}
    assert logged == {f"comparison/{name}" for name in compare.REPORT_FILES.values()}


def test_report_replaces_its_own_folder_and_refuses_anothers(store, tmp_path):
    client = store["client"]
    runs = compare.select_runs(client, experiment="tests")
    out = tmp_path / "report"
    compare.write_report(client, runs, out)
    assert "Left out 1 run without training metrics: sweep" in (out / "comparison.md").read_text()
    compare.write_report(client, runs, out, sort_by="test_loss")  # a second report replaces the first
    assert "sorted by test_loss" in (out / "comparison.md").read_text()
    with pytest.raises(PipelineError, match="holds report, not a comparison report"):
        compare.write_report(client, runs, tmp_path)  # tmp_path holds the report folder
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="holds notes.txt"):
        compare.write_report(client, runs, out)
    assert (out / "notes.txt").read_text() == "mine"
    only_parent = [client.get_run(store["parent"])]
    with pytest.raises(PipelineError, match=r"none of the 1 selected runs logged training metrics \(.*\): sweep"):
        compare.write_report(client, only_parent, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_more_runs_than_the_legend_holds(store, tmp_path):
    """25 runs (copies of one, renamed): the plots colour the best 10 and say so; the table lists all 25."""
    client = store["client"]
    run_a = client.get_run(store["a"])
    runs = [run_a] * 25
    table, _ = compare.comparison_table(runs)
    assert len(table) == 25
    paths = compare.write_report(client, runs, tmp_path / "many")
    assert len(pd.read_csv(paths["csv"])) == 25 and paths["val_loss"].stat().st_size > 10_000
    assert compare._highlighted(25) == compare.HIGHLIGHT and compare._highlighted(20) == 20
    assert compare._labels(table)[0] == f"{run_a.info.run_name} ({store['a'][:8]})"  # names repeat: id added


def test_a_failure_while_writing_leaves_the_previous_report(store, tmp_path):
    """Logging to a run whose artifact folder cannot be created fails after the files are made: the
    folder keeps the previous report and no temporary folder is left."""
    client = store["client"]
    runs = compare.select_runs(client, run_ids=[store["a"], store["c"]])
    out = tmp_path / "report"
    compare.write_report(client, runs, out, sort_by="test_loss")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "a-file").write_text("")
    experiment = client.create_experiment("unwritable", artifact_location=str(tmp_path / "a-file" / "artifacts"))
    target = client.create_run(experiment).info.run_id
    with pytest.raises(OSError):
        compare.write_report(client, runs, out, log_to=target)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "report"]
    client.set_terminated(target, "FAILED")


def test_histories_bulk_equal_one_call_per_run(store):
    client = store["client"]
    run_ids = [store[name] for name in ("a", "b", "c", "partial", "parent")]
    bulk = compare.metric_histories(client, run_ids)
    assert bulk == compare.histories_one_by_one(client, run_ids)
    assert [step for step, _ in bulk[store["a"]]["val_loss"]] == [1, 2]
    assert bulk[store["a"]]["val_loss"][-1][1] == client.get_run(store["a"]).data.metrics["val_loss"]
    assert bulk[store["parent"]] == {"val_accuracy": [], "val_loss": []}


# --------------------------------------------------------------------------- selections


@pytest.mark.parametrize("selection, expected", [
    ({"experiment": "tests"}, ["a", "b", "c", "parent", "partial"]),
    ({"parent": "parent"}, ["a", "b"]),
    ({"run_ids": ["c", "a", "c"]}, ["c", "a"]),
    ({"filter_string": "params.`model.dropout` = '0.3'"}, ["c"]),
    ({"experiment": "tests", "filter_string": "metrics.epochs_run = 2"}, ["a", "b", "c"]),
    ({"parent": "parent", "filter_string": "params.`optimizer.name` = 'sgd'"}, ["b"]),
])
def test_select_runs(store, selection, expected):
    given = {k: ([store[i] for i in v] if k == "run_ids" else store.get(v, v)) for k, v in selection.items()}
    runs = compare.select_runs(store["client"], **given)
    if "run_ids" in selection:
        assert ids(runs) == [store[name] for name in expected]  # in the order given, once each
    else:
        assert sorted(ids(runs)) == sorted(store[name] for name in expected)


def test_selection_name():
    assert compare.selection_name(experiment="my exp/1") == "experiment-my_exp_1"
    assert compare.selection_name(parent="abc") == "parent-abc"
    assert compare.selection_name(run_ids=["b", "a"]) == compare.selection_name(run_ids=["a", "b", "a"])
    assert compare.selection_name(run_ids=["b", "a"]).startswith("runs-2-")
    assert compare.selection_name(experiment="e", filter_string="x").startswith("experiment-e-filter-")


# --------------------------------------------------------------------------- the command


def pipeline(store, tmp_path, *args, check=False):
    shutil.copy2(ROOT / "params.yaml", tmp_path)  # the config is loaded once, as for every command
    return run([sys.executable, "-m", "pipeline", "compare", *args], tmp_path, check=check,
               env={"MLFLOW_TRACKING_URI": store["uri"]})


def test_command_with_parent_prints_the_table_and_logs_to_the_parent(store, tmp_path):
    client = store["client"]
    done = pipeline(store, tmp_path, "--parent", store["parent"], check=True)
    folder = tmp_path / "reports" / "compare" / f"parent-{store['parent']}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(compare.REPORT_FILES.values())
    assert done.stdout.startswith("| run | model | optimizer |")
    assert store["a"] in done.stdout and store["b"] in done.stdout and store["c"] not in done.stdout
    assert str(folder.relative_to(tmp_path) / "comparison.csv") in done.stdout
    logged = client.download_artifacts(store["parent"], "comparison/comparison.md", str(tmp_path))
    assert open(logged).read() == (folder / "comparison.md").read_text()  # this report's, sorted by test_accuracy
    assert "sorted by test_accuracy" in open(logged).read()


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "experiment 'nope' not found in sqlite:///"),
    (["--runs", "0123456789abcdef0123456789abcdef"], "run '0123456789abcdef0123456789abcdef' not found"),
    (["--filter", "metrics.test_accuracy >>> 0.9"], "filter 'metrics.test_accuracy >>> 0.9': "),
    (["--experiment", "tests", "--filter", "metrics.test_accuracy > 2"],
     "no runs match: experiment 'tests' and filter 'metrics.test_accuracy > 2'"),
    (["--parent", "feedface", "--sort", "val_loss"], "parent run 'feedface' not found"),
])
def test_bad_selection_one_error_line_and_no_report(store, tmp_path, args, message):
    done = pipeline(store, tmp_path, *args)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("selection, sort_by, log_to, message", [
    ({}, "test_accuracy", None, "nothing to compare: give an experiment, a parent run, run ids or a filter"),
    ({"run_ids": ["a"], "experiment": "tests"}, "test_accuracy", None, "run ids select runs by themselves"),
    ({"experiment": "tests", "parent": "parent"}, "test_accuracy", None, "give an experiment ('tests') or a parent"),
    ({"experiment": "tests"}, "f1", None, "sort metric 'f1': no selected run logged it"),
    ({"experiment": "tests"}, "test_accuracy", "feedface", "run to log to 'feedface' not found"),
])
def test_other_bad_selections_raise_before_writing(store, tmp_path, selection, sort_by, log_to, message):
    """The same errors in process (each CLI case costs seconds of start-up): PipelineError, no folder."""
    given = {k: ([store[i] for i in v] if k == "run_ids" else store.get(v, v)) for k, v in selection.items()}
    with pytest.raises(PipelineError) as raised:
        runs = compare.select_runs(store["client"], **given)
        compare.write_report(store["client"], runs, tmp_path / "report", sort_by=sort_by, log_to=log_to)
    assert message in str(raised.value)
    assert not (tmp_path / "report").exists()


def test_missing_sqlite_store_is_an_error_not_a_new_store(tmp_path):
    with pytest.raises(PipelineError, match=r"none.db': no such file"):
        compare.open_store(f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()
