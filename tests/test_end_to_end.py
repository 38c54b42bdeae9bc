"""The real thing: `dvc repro` and `mlflow run` in a temporary git repo, asserting on the real MLflow store."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import keras
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import hardware
from pipeline.fetch import load_raw
from tests.conftest import client, run, set_params

pytestmark = pytest.mark.slow


def only_run(repo, experiment="tests"):
    store = client(repo)
    exp = store.get_experiment_by_name(experiment)
    runs = store.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    return store, runs


def test_dvc_repro_end_to_end_then_only_later_stages_rerun(project, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")  # for runs:/ URIs below
    # as a user's shell has it: the `pipeline` command itself chooses TensorFlow's kernels (oneDNN's on x86-64)
    first = run(["dvc", "repro"], project, unset=(hardware.ONEDNN_VARIABLE, hardware.ONEDNN_SET_BY))
    for path in ["data/raw/manifest.json", "data/prepared/stats.json", "data/train/model.keras",
                 "data/train/history.csv", "data/train/run.json", "data/evaluate/metrics.json",
                 "data/evaluate/plots/history.csv", "data/evaluate/plots/confusion.csv",
                 "data/evaluate/figures/val_accuracy_vs_loss.png", "data/predictions.csv", "dvc.lock"]:
        assert (project / path).is_file(), f"{path} missing\n{first.stdout}"
    assert "\u2501" not in first.stdout + first.stderr  # no Keras progress bar (MLflow predicts the input example)

    store, runs = only_run(project)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "cnn_fast-adam-lr0.005-bs64"
    assert r.data.params["optimizer.name"] == "adam" and r.data.params["train.epochs"] == "3"
    assert r.data.params["data.source"] == "digits" and r.data.params["derived.input_shape"] == "8x8x1"
    for key in ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds"]:
        steps = [m.step for m in store.get_metric_history(r.info.run_id, key)]
        assert steps == [1, 2, 3], key
    losses = [m.value for m in store.get_metric_history(r.info.run_id, "loss")]
    assert losses[-1] < losses[0]
    for key in ["train_seconds", "images_per_second", "best_val_accuracy", "param_count", "test_accuracy",
                "final_val_accuracy", "test_loss", "epochs_run"]:
        assert key in r.data.metrics, key
    assert r.data.metrics["test_accuracy"] > 0.5  # digits learn fast; chance is 0.1
    metrics = json.loads((project / "data/evaluate/metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(r.data.metrics["test_accuracy"])
    assert r.data.tags["mlflow.source.git.commit"] and r.data.tags["git.dirty"] in ("true", "false")
    assert len(r.data.tags["data.digest"]) >= 8 and r.data.tags["versions.keras"] == keras.__version__
    if platform.machine() in ("x86_64", "AMD64"):  # the train stage ran oneDNN's kernels, whatever the CPU
        assert r.data.tags["tensorflow.onednn"] == "on"
    assert r.inputs.dataset_inputs and r.inputs.dataset_inputs[0].dataset.digest == r.data.tags["data.digest"]
    artifacts = {a.path for a in store.list_artifacts(r.info.run_id)}
    assert {"history.csv", "model_summary.txt", "plots", "evaluation", "predictions", "provenance"} <= artifacts
    plots = {a.path for a in store.list_artifacts(r.info.run_id, "plots")}
    assert "plots/train_loss.png" in plots and "plots/confusion_test.png" in plots

    # The logged model takes raw pixels and agrees with the Keras model the stage saved.
    raw = load_raw(project / "data/raw")
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{r.info.run_id}/model", dst_path=str(tmp_path))  # not /tmp
    keras_model = keras.models.load_model(project / "data/train/model.keras")
    expected = keras_model.predict(raw.test_x, verbose=0).argmax(1)
    assert np.array_equal(np.asarray(pyfunc.predict(raw.test_x)).argmax(1), expected)
    predictions = pd.read_csv(project / "data/predictions.csv")
    assert list(predictions.columns) == ["Id", "Label"]
    assert predictions["Id"].tolist() == list(range(len(raw.test_x)))  # input order
    assert np.array_equal(predictions["Label"].to_numpy(), expected)

    # Change only a training param: fetch re-verifies, preprocess is skipped, train/evaluate/predict rerun.
    set_params(project, {"train": {"epochs": 2}})
    second = run(["dvc", "repro"], project)
    assert "Stage 'preprocess' didn't change, skipping" in second.stdout
    for stage in ("train", "evaluate", "predict"):
        assert f"Running stage '{stage}'" in second.stdout
    store, runs = only_run(project)
    assert len(runs) == 2 and runs[0].data.params["train.epochs"] == "2"
    assert [m.step for m in store.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout or \
        "always changed" in run(["dvc", "status"], project).stdout


def test_mlflow_run_with_overrides_in_the_run_mlflow_created(project):
    before = (project / "params.yaml").read_text()
    uri = f"sqlite:///{project / 'mlflow.db'}"
    done = run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "tests",
                "-P", "optimizer=sgd", "-P", "epochs=2", "-P", "set=optimizer.momentum=0.9 optimizer.nesterov=true predict.label_format=name"],
               project, env={"MLFLOW_TRACKING_URI": uri})
    assert (project / "params.yaml").read_text() == before
    store, runs = only_run(project)
    assert len(runs) == 1, done.stderr
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["optimizer.name"] == "sgd" and r.data.params["optimizer.nesterov"] == "True"
    assert r.data.params["optimizer.momentum"] == "0.9"
    assert r.data.params["train.epochs"] == "2"
    assert [m.step for m in store.get_metric_history(r.info.run_id, "val_accuracy")] == [1, 2]
    assert "test_accuracy" in r.data.metrics
    out = project / "outputs" / "runs" / r.info.run_id
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions["Label"].astype(str)) <= {str(i) for i in range(10)}
    assert (project / "data/prepared/stats.json").is_file()  # the data came from `dvc repro preprocess`


def test_mlflow_run_rejects_a_bad_param_in_one_line_and_fails_the_run(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    done = run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "tests", "-P", "optimizer=adamm"],
               project, check=False, env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode != 0
    assert "optimizer.name = 'adamm' is not allowed; expected one of 'sgd', 'rmsprop', 'adam', 'adamax', 'adadelta', 'adagrad' or 'nadam'; did you mean 'adam'?" in done.stderr
    assert "Traceback" not in done.stderr
    _, runs = only_run(project)
    assert [r.info.status for r in runs] == ["FAILED"]


def locked_raw(repo: Path) -> dict:
    """data/raw as dvc.lock records it (its md5, size, file count)."""
    (out,) = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["fetch"]["outs"]
    return out


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="/usr/share/datasets/fashion-mnist missing (apt-get install dataset-fashion-mnist)")
def test_dvc_repro_leaves_an_up_to_date_data_raw_as_it_is_and_rewrites_a_damaged_one(project):
    set_params(project, {"data": {"source": "fashion_mnist", "dir": "/usr/share/datasets/fashion-mnist"}})
    run(["git", "commit", "-qam", "fashion-mnist"], project)
    raw = project / "data" / "raw"
    first = run(["dvc", "repro", "fetch"], project)
    assert "(unchanged)" not in first.stdout
    written = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in raw.iterdir()}
    locked = locked_raw(project)

    again = run(["dvc", "repro", "fetch"], project)  # fetch always runs: its sources are outside the repo
    assert "Running stage 'fetch'" in again.stdout and "-> data/raw (unchanged)" in again.stdout
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in raw.iterdir()} == written
    assert locked_raw(project) == locked

    damaged = bytearray(written["train.npz"][1])
    damaged[-100] ^= 1  # a pixel of the last training image
    (raw / "train.npz").write_bytes(damaged)
    healed = run(["dvc", "repro", "fetch"], project)
    assert "(unchanged)" not in healed.stdout
    assert {path.name: path.read_bytes() for path in raw.iterdir()} == {name: data for name, (_, data) in written.items()}
    assert locked_raw(project) == locked  # DVC hashed it to what it recorded first
