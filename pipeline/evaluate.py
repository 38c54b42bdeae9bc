"""Evaluate: metrics from predicted probabilities, history and confusion plots, DVC plot data.

Plain functions (STYLE 8); the stage command that loads the model and the data
calls them. Figures are built as `matplotlib.figure.Figure` objects on an Agg
canvas, never through pyplot, so nothing here touches global matplotlib state:
it runs headless and from several threads at once.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix, log_loss

from pipeline.errors import PipelineError, count
from pipeline.files import atomic_path

# Keras clips probabilities to [epsilon, 1 - epsilon] before taking the log
# (keras.config.epsilon(), 1e-7 by default), so a confident wrong answer costs
# -log(1e-7) ~= 16.1 nats instead of infinity; we match it so the evaluate
# stage's loss is comparable with the val_loss Keras reports during training.
KERAS_EPSILON = 1e-7

# How far a row of `probs` may sum from 1 and still count as softmax output
# (float32 softmax rows are within ~1e-6; logits or unnormalized scores are not).
PROBS_SUM_TOLERANCE = 1e-3

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]

PNG_DPI = 120
# No "Software: Matplotlib version ..." chunk, so the PNG bytes (hashed by DVC)
# do not change when only the matplotlib version does.
PNG_METADATA = {"Software": None}

TRAIN_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"


# --------------------------------------------------------------------------- metrics


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, Keras-style cross-entropy, per-class recall and the confusion matrix.

    y_true: (N,) integer class indices in 0..K-1; probs: (N, K) softmax
    probabilities; class_names: K names, index i naming class i. The result
    holds only JSON types: `per_class_accuracy` maps each class name to its
    recall, or None for a class with no samples in y_true; `confusion_matrix`
    has rows = true class, columns = predicted class.
    """
    class_names = _check_class_names(class_names)
    num_classes = len(class_names)
    probs = _check_probs(probs, num_classes)
    y_true = _check_labels(y_true, num_classes, "y_true")
    if probs.shape[0] != y_true.shape[0]:
        raise PipelineError(
            f"y_true has {y_true.shape[0]} samples but probs has {probs.shape[0]} rows; "
            "expected one row of probabilities per label"
        )

    labels = list(range(num_classes))
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, labels=labels)  # (K, K): rows true, columns predicted

    # As Keras' categorical_crossentropy: rescale rows to sum to 1, clip at epsilon.
    # sklearn only clips at float64 machine epsilon and warns when rows do not sum
    # to 1, so renormalize after clipping (this moves the loss by < K * 1e-7 nats).
    clipped = np.clip(probs / probs.sum(axis=1, keepdims=True), KERAS_EPSILON, 1.0 - KERAS_EPSILON)
    clipped /= clipped.sum(axis=1, keepdims=True)
    loss = log_loss(y_true, clipped, labels=labels)

    support = cm.sum(axis=1)
    per_class_accuracy = {
        name: (float(cm[i, i] / support[i]) if support[i] > 0 else None)
        for i, name in enumerate(class_names)
    }
    return {
        "accuracy": float(np.mean(y_pred == y_true)),
        "loss": float(loss),
        "count": int(y_true.shape[0]),
        "per_class_accuracy": per_class_accuracy,
        "confusion_matrix": [[int(count) for count in row] for row in cm],
    }


def _check_class_names(class_names) -> list[str]:
    names = [str(name) for name in class_names]
    if len(names) < 2:
        raise PipelineError(f"expected at least 2 class names, got {names}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PipelineError(f"class names must be unique; repeated: {duplicates}")
    return names


def _check_labels(labels, num_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PipelineError(f"{what} has shape {labels.shape}; expected (N,) class indices")
    if labels.shape[0] == 0:
        raise PipelineError(f"{what} is empty; expected at least one sample")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PipelineError(f"{what} has dtype {labels.dtype}; expected integer class indices")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise PipelineError(
            f"{what}[{bad[0]}] is {labels[bad[0]]}: expected a class index in 0..{num_classes - 1} "
            f"({bad.size} out-of-range value(s) in all)"
        )
    return labels


def _check_probs(probs, num_classes: int) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise PipelineError(f"probs has shape {probs.shape}; expected (N, K) probabilities")
    if probs.shape[1] != num_classes:
        raise PipelineError(
            f"probs has {probs.shape[1]} columns but there are {num_classes} class names; "
            "expected one column per class"
        )
    if not np.issubdtype(probs.dtype, np.floating):
        raise PipelineError(f"probs has dtype {probs.dtype}; expected floating-point probabilities")
    probs = probs.astype(np.float64)
    out_of_range = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
    bad_rows = np.flatnonzero(out_of_range.any(axis=1))
    if bad_rows.size:
        raise PipelineError(
            f"probs row {bad_rows[0]} is {probs[bad_rows[0]].tolist()}: expected finite values in [0, 1]"
        )
    sums = probs.sum(axis=1)
    bad_rows = np.flatnonzero(np.abs(sums - 1.0) > PROBS_SUM_TOLERANCE)
    if bad_rows.size:
        raise PipelineError(
            f"probs row {bad_rows[0]} sums to {sums[bad_rows[0]]:.6g}: expected softmax probabilities "
            f"summing to 1 (within {PROBS_SUM_TOLERANCE}); were logits passed instead?"
        )
    return probs


# --------------------------------------------------------------------------- history plots


def history_plots(history: pd.DataFrame, out_dir) -> list[Path]:
    """Write the per-epoch training plots as PNGs in `out_dir` and return their paths.

    history: one row per epoch with `epoch` (1-based), `loss`, `accuracy` and,
    when training had a validation split, `val_loss` and `val_accuracy`. The
    files, in the order returned: train_loss.png, val_loss.png,
    train_accuracy.png, val_accuracy.png, train_accuracy_vs_loss.png,
    val_accuracy_vs_loss.png and history.png (loss and accuracy side by side,
    train and validation together). Without validation columns (or with only
    empty ones) the val_* plots are skipped.
    """
    history = _check_history(history)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = _column(history, "epoch")
    splits = [("train", "", "Training", TRAIN_COLOR)]
    if _has_validation(history):
        splits.append(("val", "val_", "Validation", VAL_COLOR))

    written = []
    for metric, label in [("loss", "Loss"), ("accuracy", "Accuracy")]:
        for split, prefix, split_title, color in splits:
            fig = _new_figure((6.4, 4.4))
            ax = fig.add_subplot()
            ax.plot(epochs, _column(history, prefix + metric), marker="o", markersize=4, color=color)
            _epoch_axis(ax)
            ax.set_ylabel(label)
            ax.set_title(f"{split_title} {label.lower()} by epoch")
            written.append(_save_png(fig, out_dir / f"{split}_{metric}.png"))

    for split, prefix, split_title, _ in splits:
        fig = _new_figure((6.8, 5.0))
        ax = fig.add_subplot()
        loss, accuracy = _column(history, prefix + "loss"), _column(history, prefix + "accuracy")
        _accuracy_vs_loss(fig, ax, epochs, loss, accuracy)
        ax.set_title(f"{split_title} accuracy against loss, by epoch")
        written.append(_save_png(fig, out_dir / f"{split}_accuracy_vs_loss.png"))

    fig = _new_figure((11.0, 4.4))
    axes = fig.subplots(1, 2)
    for ax, (metric, label) in zip(axes, [("loss", "Loss"), ("accuracy", "Accuracy")]):
        for _, prefix, split_title, color in splits:
            values = _column(history, prefix + metric)
            ax.plot(epochs, values, marker="o", markersize=4, color=color, label=split_title)
        _epoch_axis(ax)
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.legend()
    fig.suptitle(f"Training history ({count(len(epochs), 'epoch')})")
    written.append(_save_png(fig, out_dir / "history.png"))
    return written


def _check_history(history: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(history, pd.DataFrame):
        raise PipelineError(f"history is a {type(history).__name__}; expected a pandas DataFrame")
    required = ["epoch", "loss", "accuracy"]
    missing = [column for column in required if column not in history.columns]
    if missing:
        raise PipelineError(
            f"history lacks column(s) {missing}; expected {required} (plus val_loss, val_accuracy "
            f"with validation), got {list(history.columns)}"
        )
    if history.empty:
        raise PipelineError("history has no rows; expected one row per epoch")
    val_present = [column for column in ("val_loss", "val_accuracy") if column in history.columns]
    if len(val_present) == 1:
        raise PipelineError(
            f"history has {val_present[0]} but not its pair; expected both val_loss and val_accuracy"
        )
    for column in required + val_present:
        if not pd.api.types.is_numeric_dtype(history[column]):
            raise PipelineError(
                f"history column {column!r} has dtype {history[column].dtype}; expected numbers"
            )
    if history["epoch"].isna().any():
        raise PipelineError("history column 'epoch' has empty values; expected an epoch number on every row")
    repeated = sorted(history["epoch"][history["epoch"].duplicated()].unique().tolist())
    if repeated:
        raise PipelineError(f"history repeats epoch(s) {repeated}; expected one row per epoch")
    return history.sort_values("epoch", kind="stable").reset_index(drop=True)


def _has_validation(history: pd.DataFrame) -> bool:
    """Both val columns are there and hold a value (a run without validation may leave them empty)."""
    columns = ("val_loss", "val_accuracy")
    return all(column in history.columns and history[column].notna().any() for column in columns)


def _column(history: pd.DataFrame, name: str) -> np.ndarray:
    # float with NaN, also for pandas' nullable dtypes, whose to_numpy() would give objects and pd.NA
    return history[name].to_numpy(dtype=np.float64, na_value=np.nan)


def _accuracy_vs_loss(fig: Figure, ax, epochs: np.ndarray, loss: np.ndarray, accuracy: np.ndarray) -> None:
    """Accuracy against loss, joined in epoch order, points coloured and labelled by epoch."""
    ax.plot(loss, accuracy, color="0.6", linewidth=1, zorder=1)
    # Half an epoch either side, so one epoch still gets a proper colour scale.
    norm = Normalize(vmin=epochs.min() - 0.5, vmax=epochs.max() + 0.5)
    points = ax.scatter(loss, accuracy, c=epochs, cmap="viridis", norm=norm, s=36, edgecolors="black",
                        linewidths=0.5, zorder=2)  # fmt: skip
    colorbar = fig.colorbar(points, ax=ax)
    colorbar.set_label("Epoch")
    colorbar.locator = _integer_locator()
    colorbar.update_ticks()
    for i in _epochs_to_label(loss, accuracy):
        ax.annotate(f"{epochs[i]:g}", (loss[i], accuracy[i]), xytext=(5, 5), textcoords="offset points",
                    fontsize=8)  # fmt: skip
    ax.set_xlabel("Loss")
    ax.set_ylabel("Accuracy")
    ax.grid(True, alpha=0.3)


def _epochs_to_label(x: np.ndarray, y: np.ndarray, max_labels: int = 10, min_gap: float = 0.05) -> list[int]:
    """Indices of the points to label with their epoch.

    The last and the first point, then every k-th so that about `max_labels` are
    labelled, skipping any within `min_gap` (as a fraction of the data's range)
    of one already labelled: the clustered last epochs of a converged run would
    otherwise print over each other. The colour scale identifies the rest.
    """
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if finite.size == 0:
        return []
    span_x = float(np.ptp(x[finite])) or 1.0
    span_y = float(np.ptp(y[finite])) or 1.0
    step = max(1, math.ceil(finite.size / max_labels))
    chosen: list[int] = []
    for i in [finite[-1], finite[0], *finite[step:-1:step]]:
        if all(math.hypot((x[i] - x[j]) / span_x, (y[i] - y[j]) / span_y) >= min_gap for j in chosen):
            chosen.append(int(i))
    return sorted(chosen)


def _integer_locator() -> MaxNLocator:
    # min_n_ticks=1: with a single epoch MaxNLocator would otherwise fall back to fractional ticks.
    return MaxNLocator(integer=True, min_n_ticks=1)


def _epoch_axis(ax) -> None:
    ax.set_xlabel("Epoch")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.grid(True, alpha=0.3)


# --------------------------------------------------------------------------- confusion matrix


def confusion_matrix_plot(cm: list[list[int]], class_names: list[str], path, title: str) -> Path:
    """Write the confusion matrix as a labelled heatmap PNG with the count in every cell.

    cm: K lists of K counts, rows = true class, columns = predicted class, as
    `classification_metrics` returns it.
    """
    class_names = _check_class_names(class_names)
    counts = np.asarray(cm)
    num_classes = len(class_names)
    if counts.shape != (num_classes, num_classes):
        raise PipelineError(
            f"confusion matrix has shape {counts.shape}; expected ({num_classes}, {num_classes}) "
            f"for {num_classes} class names"
        )
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise PipelineError("confusion matrix must hold non-negative integer counts")

    side = max(5.0, 0.65 * num_classes + 2.5)  # inches; ~0.65 in per cell fits a 5-digit count
    fig = _new_figure((side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("Samples")

    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title)

    # Cell text in white on dark cells; a grid between the cells, not through them.
    threshold = counts.max() / 2
    fontsize = 9 if num_classes <= 12 else 7
    for i in range(num_classes):
        for j in range(num_classes):
            ax.text(j, i, f"{counts[i, j]:d}", ha="center", va="center", fontsize=fontsize,
                    color="white" if counts[i, j] > threshold else "black")  # fmt: skip
    ax.set_xticks(ticks - 0.5, minor=True)
    ax.set_yticks(ticks - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    return _save_png(fig, Path(path))


# --------------------------------------------------------------------------- DVC plots


def dvc_plot_data(
    history: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], out_dir
) -> dict[str, Path]:
    """Write the CSVs that `dvc plots show` renders; return {"history": path, "confusion": path}.

    history.csv: epoch, loss, accuracy, val_loss, val_accuracy (the val columns
    only when they hold values), one row per epoch in epoch order, for a plot
    with `x: epoch`; other history columns are left out.
    confusion.csv: columns actual, predicted holding class names, one row per
    sample, the long format DVC's `confusion` template counts itself.
    """
    history = _check_history(history)
    class_names = _check_class_names(class_names)
    y_true = _check_labels(y_true, len(class_names), "y_true")
    y_pred = _check_labels(y_pred, len(class_names), "y_pred")
    if y_true.shape != y_pred.shape:
        raise PipelineError(
            f"y_true has {y_true.shape[0]} samples but y_pred has {y_pred.shape[0]}; "
            "expected one prediction per label"
        )
    out_dir = Path(out_dir)
    names = np.asarray(class_names, dtype=object)
    confusion = pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]})
    history_columns = HISTORY_COLUMNS if _has_validation(history) else HISTORY_COLUMNS[:3]
    return {
        "history": _save_csv(history[history_columns], out_dir / "history.csv"),
        "confusion": _save_csv(confusion, out_dir / "confusion.csv"),
    }


# --------------------------------------------------------------------------- writing


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save_png(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PNG_DPI, metadata=PNG_METADATA)
    return path


def _save_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return path


__all__ = ["classification_metrics", "confusion_matrix_plot", "dvc_plot_data", "history_plots"]


def predict_probs(network, x: np.ndarray, stats: dict, batch_size: int = 1024) -> np.ndarray:
    """The network's probabilities on preprocessed uint8 images, normalised per batch as in training; in batches
    of one size where the count allows (`even_batches`: 10,000 and 12,000 images take 1,000 a batch)."""
    from pipeline.train import even_batches, interrupt_checks, make_dataset

    size, _ = even_batches(len(x), batch_size)
    batches = make_dataset(x, None, stats, size, shuffle=False)
    return np.asarray(network.predict(batches, verbose=0, callbacks=interrupt_checks()))


def main(cfg, data_dir, train_dir, metrics_path, plots_dir, figures_dir) -> dict:
    """The stage: evaluate the trained network on val and test; write and log metrics and plots."""
    import mlflow

    from pipeline import tracking
    from pipeline.files import read_json, write_json
    from pipeline.preprocess import load_prepared

    data = load_prepared(data_dir)
    train_dir, figures_dir = Path(train_dir), Path(figures_dir)
    run = read_json(train_dir / "run.json")
    history = pd.read_csv(train_dir / "history.csv")
    with tracking.run_scope(cfg, run_id=run["run_id"]):
        import keras  # once the store and the run are there: a store that fails does so without TensorFlow's seconds

        network = keras.models.load_model(train_dir / "model.keras").get_layer("network")
        splits = {"val": (data.val_x, data.val_y)}
        if data.test_x is not None:
            splits["test"] = (data.test_x, data.test_y)
        results, predicted = {}, {}
        for split, (x, y) in splits.items():
            probs = predict_probs(network, x, data.stats)
            results[split] = classification_metrics(y, probs, data.class_names)
            predicted[split] = (y, probs.argmax(axis=1))
        headline = {f"{split}_{key}": results[split][key] for split in results for key in ("accuracy", "loss")}
        report = {**headline, "per_class_accuracy": {s: r["per_class_accuracy"] for s, r in results.items()},
                  "confusion_matrix": {s: r["confusion_matrix"] for s, r in results.items()},
                  "class_names": data.class_names}
        with atomic_path(figures_dir) as tmp:
            write_json(tmp / "report.json", report)  # the details; metrics.json keeps what `dvc metrics` compares
            history_plots(history, tmp)
            for split, result in results.items():
                confusion_matrix_plot(result["confusion_matrix"], data.class_names, tmp / f"confusion_{split}.png",
                                      f"Confusion matrix, {split} split ({result['count']} images)")
        shown = "test" if "test" in predicted else "val"
        dvc_plot_data(history, *predicted[shown], data.class_names, plots_dir)
        write_json(metrics_path, headline)
        mlflow.log_metrics({f"final_{k}" if k.startswith("val_") else k: v for k, v in headline.items()})
        mlflow.log_metrics({
            f"{split}_class_accuracy/{name}": value
            for split, result in results.items()
            for name, value in result["per_class_accuracy"].items() if value is not None
        })
        mlflow.log_artifacts(str(figures_dir), artifact_path="plots")
        mlflow.log_artifact(str(metrics_path), artifact_path="evaluation")
        mlflow.log_artifacts(str(plots_dir), artifact_path="evaluation")
        tracking.describe_result(run["run_id"], headline)
    return headline
