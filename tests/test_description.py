"""Each training run's description (the `mlflow.note.content` tag the MLflow UI shows): its key params and result."""

from __future__ import annotations

import copy

import pytest

from pipeline.config import apply_overrides, validate
from pipeline.tracking import DESCRIPTION_TAG, run_description
from tests.conftest import TINY_PARAMS, merge


def config(*overrides: str):
    return validate(apply_overrides(copy.deepcopy(TINY_PARAMS), list(overrides)))


@pytest.mark.parametrize("overrides, shape, precision, expected", [
    ((), (8, 8, 1), "float32",
     "cnn_fast · adam, lr 0.005, cosine decay · batch 64 · 3 epochs\ndigits, 8x8x1 · precision float32"),
    (("data.source=fashion_mnist", "model.name=lenet5", "optimizer.name=sgd", "optimizer.learning_rate=0.01",
      "optimizer.momentum=0.9", "optimizer.schedule.name=constant", "callbacks.reduce_lr.enabled=true",
      "callbacks.early_stopping.enabled=true", "train.batch_size=128", "train.epochs=20"), (48, 48, 3), "auto",
     "lenet5 · sgd, lr 0.01, constant rate, x0.5 on val_loss plateau · batch 128 · 20 epochs, early stopping\n"
     "fashion_mnist, 48x48x3 · precision auto"),
    (("optimizer.schedule.warmup_epochs=0.5", "train.epochs=1"), (28, 28, 1), "mixed_bfloat16",
     "cnn_fast · adam, lr 0.005, cosine decay, 0.5-epoch warm-up · batch 64 · 1 epoch\n"
     "digits, 28x28x1 · precision mixed_bfloat16"),
    (("optimizer.schedule.name=constant", "optimizer.decay=1e-6"), (8, 8, 1), "float32",
     "cnn_fast · adam, lr 0.005, inverse-time decay 1e-06 · batch 64 · 3 epochs\ndigits, 8x8x1 · precision float32"),
], ids=["tiny", "sgd-constant-plateau", "warm-up", "keras2-decay"])
def test_the_description_names_the_key_params_in_two_lines(overrides, shape, precision, expected):
    assert run_description(config(*overrides), shape, precision) == expected


@pytest.mark.slow
def test_a_run_that_mlflow_run_created_gets_its_description_and_result(tmp_path, monkeypatch):
    """The real stages, in process, into a run created beforehand as `mlflow run` does (MLFLOW_RUN_ID)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import describe_result
    from pipeline.workflow import run_all

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    store = MlflowClient(uri)
    created = store.create_run(store.create_experiment("tests")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", created)
    cfg = validate(merge(TINY_PARAMS, {"train": {"epochs": 1}, "mlflow": {"log_model": False}}))

    assert run_all(cfg, None, tmp_path / "runs") == created
    run = store.get_run(created)
    assert run.info.status == "FINISHED"
    lines = run.data.tags[DESCRIPTION_TAG].splitlines()
    precision = run.data.params["derived.precision"]  # what train.precision = auto resolved to here
    assert lines[:2] == ["cnn_fast · adam, lr 0.005, cosine decay · batch 64 · 1 epoch",
                         f"digits, 8x8x1 · precision {precision}"]
    test, val = run.data.metrics["test_accuracy"], run.data.metrics["final_val_accuracy"]
    assert lines[2:] == [f"result: test accuracy {test:.2%} (val {val:.2%})"]

    # Evaluating again replaces the result line rather than adding another.
    assert describe_result(created, {"val_accuracy": 0.5}).splitlines()[1:] == [lines[1], "result: val accuracy 50.00%"]
