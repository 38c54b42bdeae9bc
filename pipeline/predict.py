"""Predict stage: the saved raw-pixel model on the unlabeled set (or the test split), as a Kaggle-style CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config, PredictConfig
from pipeline.errors import PipelineError

BATCH = 1024  # images per predict call


def predict_labels(model, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """Class indices for raw uint8 images (the model does its own preprocessing)."""
    if len(images) == 0:
        return np.zeros((0,), dtype="int64")
    from pipeline.train import image_batches, interrupt_checks

    probs = model.predict(image_batches(images, batch_size), verbose=0, callbacks=interrupt_checks())
    probs = probs[: len(images)]  # less the padding
    return np.asarray(probs).argmax(axis=1).astype("int64")


def predictions_frame(ids: np.ndarray, labels: np.ndarray, class_names: list[str], cfg: PredictConfig) -> pd.DataFrame:
    """Rows in input order; labels as class indices or as the data's own class names."""
    if len(ids) != len(labels):
        raise PipelineError(f"predict: {len(ids)} ids but {len(labels)} predictions")
    values = labels if cfg.label_format == "index" else np.asarray(class_names, dtype=object)[labels]
    return pd.DataFrame({cfg.id_column: ids, cfg.label_column: values})


def images_to_predict(raw) -> tuple[np.ndarray, np.ndarray]:
    """The unlabeled images with their ids, or the labeled test split (ids 0..n-1) when there are none."""
    if raw.unlabeled_x is not None:
        return raw.unlabeled_x, raw.unlabeled_ids
    if raw.test_x is not None:
        return raw.test_x, np.arange(len(raw.test_x), dtype="int64")
    raise PipelineError("data: the source has neither an unlabeled set nor a test split to predict")


def main(cfg: Config, raw_dir, train_dir, out_csv) -> Path:
    """The stage: raw images from the fetch stage through the saved model; CSV logged to the training run."""
    import mlflow

    from pipeline import fetch, tracking
    from pipeline.files import atomic_path, read_json

    raw = fetch.load_raw(raw_dir)
    images, ids = images_to_predict(raw)
    run = read_json(Path(train_dir) / "run.json")
    with tracking.run_scope(cfg, run_id=run["run_id"]):
        import keras  # once the store and the run are there: a store that fails does so without TensorFlow's seconds

        model = keras.models.load_model(Path(train_dir) / "model.keras")
        frame = predictions_frame(ids, predict_labels(model, images), raw.class_names, cfg.predict)
        out_csv = Path(out_csv)
        with atomic_path(out_csv) as tmp:
            frame.to_csv(tmp, index=False)
        mlflow.log_artifact(str(out_csv), artifact_path="predictions")
    return out_csv
