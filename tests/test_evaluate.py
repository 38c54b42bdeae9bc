"""Unit tests of the evaluate stage's plain functions: metrics, plots, DVC plot data."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from pipeline.errors import PipelineError
from pipeline.evaluate import classification_metrics, confusion_matrix_plot, dvc_plot_data, history_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
TRAIN_PLOTS = ["train_loss.png", "train_accuracy.png", "train_accuracy_vs_loss.png", "history.png"]
VAL_PLOTS = ["val_loss.png", "val_accuracy.png", "val_accuracy_vs_loss.png"]


def assert_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0, (path, image.shape)
    assert image.std() > 0, f"{path} is blank"


def make_history(epochs: int, validation: bool = True) -> pd.DataFrame:
    epoch = np.arange(1, epochs + 1)
    history = pd.DataFrame(
        {
            "epoch": epoch,
            "loss": 1.5 * np.exp(-epoch / 4) + 0.2,
            "accuracy": 0.95 - 0.5 * np.exp(-epoch / 3),
            "val_loss": 1.4 * np.exp(-epoch / 4) + 0.3,
            "val_accuracy": 0.9 - 0.45 * np.exp(-epoch / 3),
            "learning_rate": 1e-3,
            "epoch_seconds": 2.5,
        }
    )
    return history if validation else history.drop(columns=["val_loss", "val_accuracy"])


# --------------------------------------------------------------------------- classification_metrics

NAMES = ["cat", "dog", "bird"]
Y_TRUE = np.array([0, 1, 2, 1])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # true 0, predicted 0
        [0.1, 0.8, 0.1],  # true 1, predicted 1
        [0.2, 0.5, 0.3],  # true 2, predicted 1
        [0.6, 0.3, 0.1],  # true 1, predicted 0
    ]
)


def test_metrics_hand_made_example():
    metrics = classification_metrics(Y_TRUE, PROBS, NAMES)

    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.8) + math.log(0.3) + math.log(0.3)) / 4)
    assert metrics["per_class_accuracy"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(0.5), "bird": 0.0}
    assert metrics["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
    assert metrics["count"] == 4
    json.dumps(metrics, allow_nan=False)  # JSON-able as it stands
    assert all(type(value) is int for row in metrics["confusion_matrix"] for value in row)


def test_metrics_perfect_predictions():
    y_true = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[y_true]  # one-hot: the loss is clipped, not zero
    metrics = classification_metrics(y_true, probs.astype(np.float32), NAMES)

    assert metrics["accuracy"] == 1.0
    assert metrics["per_class_accuracy"] == {"cat": 1.0, "dog": 1.0, "bird": 1.0}
    assert metrics["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert 0.0 <= metrics["loss"] < 1e-5


def test_metrics_loss_is_clipped_like_keras():
    # The true class gets probability 0: Keras charges -log(1e-7), not infinity.
    y_true = np.array([0, 1])
    probs = np.array([[0.0, 1.0, 0.0], [0.25, 0.5, 0.25]])
    metrics = classification_metrics(y_true, probs, NAMES)

    expected = (-math.log(1e-7) - math.log(0.5)) / 2
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_metrics_class_absent_from_y_true():
    y_true = np.array([0, 0, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]])
    metrics = classification_metrics(y_true, probs, NAMES)

    assert metrics["per_class_accuracy"] == {"cat": 0.5, "dog": 1.0, "bird": None}
    assert metrics["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    json.dumps(metrics, allow_nan=False)


@pytest.mark.parametrize(
    ("y_true", "probs", "names", "message"),
    [
        (Y_TRUE[:3], PROBS, NAMES, "y_true has 3 samples but probs has 4 rows"),
        (Y_TRUE, PROBS[:, :2] / PROBS[:, :2].sum(1, keepdims=True), NAMES, "probs has 2 columns but there are 3"),
        (Y_TRUE, PROBS, ["cat", "dog"], "probs has 3 columns but there are 2"),
        (Y_TRUE.reshape(2, 2), PROBS, NAMES, r"y_true has shape \(2, 2\)"),
        (Y_TRUE, PROBS[0], NAMES, r"probs has shape \(3,\)"),
        (np.array([0, 1, 3, 1]), PROBS, NAMES, r"y_true\[2\] is 3: expected a class index in 0..2"),
        (Y_TRUE.astype(float), PROBS, NAMES, "expected integer class indices"),
        (Y_TRUE, PROBS * 5, NAMES, "expected finite values in"),
        (Y_TRUE, PROBS / 2, NAMES, "probs row 0 sums to 0.5"),
        (Y_TRUE, PROBS, ["cat", "cat", "bird"], "repeated: \\['cat'\\]"),
    ],
    ids=["rows", "columns", "names", "y_true-2d", "probs-1d", "label-range", "label-dtype", "range", "sum", "dupes"],
)
def test_metrics_bad_input_names_the_mismatch(y_true, probs, names, message):
    with pytest.raises(PipelineError, match=message):
        classification_metrics(y_true, probs, names)


# --------------------------------------------------------------------------- history_plots


@pytest.mark.parametrize("epochs", [12, 1], ids=["12-epochs", "1-epoch"])
def test_history_plots_with_validation(tmp_path, epochs):
    out_dir = tmp_path / "plots" / "history"  # created, parents included
    written = history_plots(make_history(epochs), out_dir)

    assert [path.name for path in written] == [
        "train_loss.png", "val_loss.png", "train_accuracy.png", "val_accuracy.png",
        "train_accuracy_vs_loss.png", "val_accuracy_vs_loss.png", "history.png",
    ]  # fmt: skip
    for path in written:
        assert path.parent == out_dir
        assert_png(path)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in written)  # no temporaries left


@pytest.mark.parametrize(
    "history",
    [
        make_history(5, validation=False),
        # A history CSV from a run without validation may carry the columns, all empty;
        # pandas' nullable Float64 holds them as pd.NA.
        make_history(1).assign(val_loss=np.nan, val_accuracy=np.nan).astype("Float64"),
    ],
    ids=["no-val-columns", "empty-val-columns-1-epoch"],
)
def test_history_plots_without_validation(tmp_path, history):
    written = history_plots(history, tmp_path)

    assert [path.name for path in written] == TRAIN_PLOTS
    for path in written:
        assert_png(path)
    assert not any((tmp_path / name).exists() for name in VAL_PLOTS)


@pytest.mark.parametrize(
    ("history", "message"),
    [
        (make_history(3).drop(columns=["loss"]), r"lacks column\(s\) \['loss'\]"),
        (make_history(3).drop(columns=["val_accuracy"]), "has val_loss but not its pair"),
        (make_history(3).iloc[:0], "no rows"),
        (pd.concat([make_history(2), make_history(2)]), r"repeats epoch\(s\) \[1, 2\]"),
    ],
    ids=["no-loss", "half-val", "empty", "repeated"],
)
def test_history_plots_bad_history(tmp_path, history, message):
    with pytest.raises(PipelineError, match=message):
        history_plots(history, tmp_path)


# --------------------------------------------------------------------------- confusion_matrix_plot


def test_confusion_matrix_plot_ten_long_names(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 60, size=(10, 10)) + np.diag(rng.integers(700, 1000, size=10))
    path = confusion_matrix_plot(cm.tolist(), FASHION_CLASSES, tmp_path / "plots" / "cm.png", "Test set")

    assert path == tmp_path / "plots" / "cm.png"
    assert_png(path)


def test_plots_are_reproducible(tmp_path):
    # DVC hashes the plots: the same input must give the same bytes (no version or date chunk).
    first = confusion_matrix_plot([[5, 1], [2, 7]], ["a", "b"], tmp_path / "first.png", "Same")
    second = confusion_matrix_plot([[5, 1], [2, 7]], ["a", "b"], tmp_path / "second.png", "Same")
    assert first.read_bytes() == second.read_bytes()


def test_confusion_matrix_plot_all_zero(tmp_path):
    assert_png(confusion_matrix_plot([[0, 0], [0, 0]], ["a", "b"], tmp_path / "cm.png", "Empty"))


def test_confusion_matrix_plot_shape_mismatch(tmp_path):
    with pytest.raises(PipelineError, match=r"shape \(2, 2\); expected \(3, 3\)"):
        confusion_matrix_plot([[1, 0], [0, 1]], NAMES, tmp_path / "cm.png", "Bad")
    assert not (tmp_path / "cm.png").exists()


# --------------------------------------------------------------------------- dvc_plot_data


def test_dvc_plot_data(tmp_path):
    names = ["T-shirt/top", "Ankle boot", "a, with comma"]
    y_true = np.array([0, 1, 2, 2, 1])
    y_pred = np.array([0, 2, 2, 1, 1])
    history = make_history(6)
    written = dvc_plot_data(history, y_true, y_pred, names, tmp_path / "dvc")

    assert written == {"history": tmp_path / "dvc" / "history.csv", "confusion": tmp_path / "dvc" / "confusion.csv"}
    history_csv = pd.read_csv(written["history"])
    assert list(history_csv.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert len(history_csv) == 6
    pd.testing.assert_frame_equal(history_csv, history[list(history_csv.columns)], check_dtype=False)

    confusion = pd.read_csv(written["confusion"])
    assert list(confusion.columns) == ["actual", "predicted"]
    assert len(confusion) == len(y_true)
    assert confusion["actual"].tolist() == [names[i] for i in y_true]
    assert confusion["predicted"].tolist() == [names[i] for i in y_pred]


@pytest.mark.parametrize(
    "history",
    [make_history(3, validation=False), make_history(3).assign(val_loss=np.nan, val_accuracy=np.nan)],
    ids=["no-val-columns", "empty-val-columns"],
)
def test_dvc_plot_data_without_validation(tmp_path, history):
    shuffled = history.iloc[[2, 0, 1]]
    written = dvc_plot_data(shuffled, np.array([0, 1]), np.array([1, 1]), NAMES, tmp_path)

    history_csv = pd.read_csv(written["history"])
    assert list(history_csv.columns) == ["epoch", "loss", "accuracy"]
    assert history_csv["epoch"].tolist() == [1, 2, 3]  # in epoch order for the x axis


def test_dvc_plot_data_length_mismatch(tmp_path):
    with pytest.raises(PipelineError, match="y_true has 3 samples but y_pred has 2"):
        dvc_plot_data(make_history(2), np.array([0, 1, 2]), np.array([0, 1]), NAMES, tmp_path)
