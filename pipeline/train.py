"""Train stage: build the model and optimizer from params, fit through a tf.data pipeline."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import CallbacksConfig, Config, OptimizerConfig
from pipeline.errors import PipelineError
from pipeline.preprocess import Prepared

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Python, NumPy and the backend's generators (keras.utils.set_random_seed seeds all three)."""
    import keras

    keras.utils.set_random_seed(seed)


def make_dataset(x: np.ndarray, y: np.ndarray | None, stats: dict, batch_size: int, shuffle: bool, seed: int = 0):
    """uint8 images batched, then normalised per batch with the preprocess statistics; prefetched.

    Images stay uint8 until the batch (4x less memory traffic than float32 arrays).
    """
    import tensorflow as tf

    from pipeline.models import normalizer

    norm = normalizer(stats)
    items = x if y is None else (x, y)
    ds = tf.data.Dataset.from_tensor_slices(items)
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if y is None:
        ds = ds.map(lambda images: norm(images), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda images, labels: (norm(images), labels), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def build_optimizer(cfg: OptimizerConfig):
    import keras

    if cfg.name == "sgd":
        return keras.optimizers.SGD(cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "rmsprop":
        return keras.optimizers.RMSprop(cfg.learning_rate, momentum=cfg.momentum)
    if cfg.name == "adam":
        return keras.optimizers.Adam(cfg.learning_rate)
    raise PipelineError(f"optimizer.name = {cfg.name!r} has no builder")  # config validation keeps this unreachable


def build_callbacks(cfg: CallbacksConfig) -> list:
    import keras

    callbacks = []
    es = cfg.early_stopping
    if es.enabled:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=es.monitor,
                mode=es.mode,
                patience=es.patience,
                min_delta=es.min_delta,
                restore_best_weights=es.restore_best_weights,
            )
        )
    rl = cfg.reduce_lr
    if rl.enabled:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=rl.monitor, factor=rl.factor, patience=rl.patience, min_lr=rl.min_lr
            )
        )
    return callbacks


@dataclass
class TrainResult:
    network: object  # keras.Model on normalised inputs
    history: pd.DataFrame  # one row per epoch: epoch, loss, accuracy, val_loss, val_accuracy, learning_rate, epoch_seconds
    train_seconds: float
    stopped_epoch: int | None  # epoch (1-based) at which early stopping fired, None if it did not


def train_model(cfg: Config, data: Prepared, on_epoch=None, verbose: int = 2) -> TrainResult:
    """Fit the network on `data`; `on_epoch(row)` is called after every epoch (MLflow logging)."""
    from pipeline.models import build_model
    from pipeline.tracking import epoch_callback

    seed_everything(cfg.seed)
    num_classes = len(data.class_names)
    network = build_model(cfg.model, data.input_shape, num_classes)
    network.compile(
        optimizer=build_optimizer(cfg.optimizer),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    batch = cfg.train.batch_size
    train_ds = make_dataset(data.train_x, data.train_y, data.stats, batch, shuffle=True, seed=cfg.seed)
    val_ds = make_dataset(data.val_x, data.val_y, data.stats, batch, shuffle=False)
    recorder = epoch_callback(on_epoch)
    callbacks = [recorder, *build_callbacks(cfg.callbacks)]  # recorder first: it reads the lr the epoch used
    start = time.perf_counter()
    network.fit(
        train_ds, validation_data=val_ds, epochs=cfg.train.epochs, callbacks=callbacks, verbose=verbose,
        shuffle=False,  # train_ds reshuffles itself every epoch
    )
    seconds = time.perf_counter() - start
    stopped = next((cb.stopped_epoch + 1 for cb in callbacks if getattr(cb, "stopped_epoch", 0)), None)
    return TrainResult(network, pd.DataFrame(recorder.rows), seconds, stopped)


def summary_text(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=True)
    return "\n".join(lines)


def totals(result: TrainResult, n_train: int) -> dict[str, float]:
    history = result.history
    best = int(history["val_accuracy"].idxmax())
    return {
        "train_seconds": result.train_seconds,
        "images_per_second": n_train * len(history) / result.train_seconds,
        "epochs_run": float(len(history)),
        "best_val_accuracy": float(history["val_accuracy"].max()),
        "best_epoch": float(history["epoch"].iloc[best]),
        "stopped_epoch": float(result.stopped_epoch or 0),
    }


def main(cfg: Config, data_dir, raw_dir, out_dir) -> str:
    """The stage: train, save the raw-pixel model, log everything to one MLflow run; returns its id."""
    import mlflow

    from pipeline import fetch, tracking
    from pipeline.files import atomic_path, read_json, write_json
    from pipeline.models import raw_input_model
    from pipeline.preprocess import load_prepared

    data = load_prepared(data_dir)
    manifest = read_json(Path(raw_dir) / "manifest.json")
    digest = fetch.dataset_digest(manifest)
    tags = {**tracking.git_state(), **tracking.environment_tags(), "data.digest": digest, "data.source": cfg.data.source}
    with tracking.run_scope(cfg, tags=tags) as run_id:
        mlflow.set_tags(tags)  # also on a run that `mlflow run` created
        mlflow.log_params(cfg.flat())
        with warnings.catch_warnings():  # MLflow warns that a local path matches two equivalent source kinds
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(
                data.train_x, targets=data.train_y, source=str(Path(raw_dir).resolve()),
                name=f"{cfg.data.source}-train", digest=digest,
            )
        mlflow.log_input(dataset, context="training")
        for name in ("params.yaml", "dvc.lock"):
            if Path(name).is_file():
                mlflow.log_artifact(name, artifact_path="provenance")
        mlflow.log_dict(manifest, "provenance/data_manifest.json")
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            result = train_model(cfg, data, on_epoch=lambda row: tracking.log_epoch(run_id, row["epoch"], row))
            model = raw_input_model(result.network, data.stats)
            model.save(tmp / "model.keras")
            result.history.to_csv(tmp / "history.csv", index=False)
            summary = summary_text(model)
            (tmp / "summary.txt").write_text(summary + "\n")
            facts = {
                "param_count": float(result.network.count_params()),
                "train_images": float(len(data.train_x)),
                "val_images": float(len(data.val_x)),
                "test_images": float(0 if data.test_x is None else len(data.test_x)),
            }
            mlflow.log_params({
                "derived.input_shape": "x".join(map(str, data.input_shape)),
                "derived.raw_shape": "x".join(map(str, data.stats["raw_shape"])),
                "derived.num_classes": len(data.class_names),
            })
            mlflow.log_metrics({**facts, **totals(result, len(data.train_x))})
            mlflow.log_text(summary, "model_summary.txt")
            mlflow.log_artifact(str(tmp / "history.csv"))
            if cfg.mlflow.log_model:
                log_model(model, fetch.load_raw(raw_dir).train_x[:2])
            write_json(tmp / "run.json", {"run_id": run_id, "tracking_uri": cfg.tracking_uri(),
                                          "experiment_name": cfg.mlflow.experiment_name})
    return run_id


def log_model(model, example: np.ndarray) -> None:
    """The raw-pixel model in MLflow's Keras format, with signature and a raw-image input example."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    signature = infer_signature(example, model.predict(example, verbose=0))
    with _keras_flavor_saves_examples():
        mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            # stated, not inferred: inference reloads the model in a subprocess (seconds per run)
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
        )


@contextlib.contextmanager
def _keras_flavor_saves_examples():
    """Work around mlflow/mlflow#16183 (open in 3.17): mlflow.keras writes the input example
    before creating the model folder, so any log_model with an example fails. Create it first."""
    from mlflow.keras import save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = save_example
    try:
        yield
    finally:
        keras_save._save_example = original
