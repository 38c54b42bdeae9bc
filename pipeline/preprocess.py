"""Preprocess stage: resize, convert channels, split train/val, compute normalisation statistics.

The labeled test split is kept for evaluation. The unlabeled set stays raw in
the fetch stage's output: `predict` feeds it to the saved raw-pixel model.

Images stay uint8 on disk (a quarter of float32's size); normalisation happens
per batch in the input pipeline and in the saved model, with the statistics
written here. The resizing and channel conversion are Keras layers
(`pixel_layers`) so that the model saved by `train` runs the very same ops on
raw images: nobody re-implements preprocessing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, load_arrays, read_json, write_json

if TYPE_CHECKING:
    from pipeline.fetch import RawDataset

log = logging.getLogger(__name__)

BATCH = 4096  # images per vectorised resize call: bounds the float32 working memory to ~BATCH*H*W*C*4 bytes
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma, as tf.image.rgb_to_grayscale


@dataclass
class Prepared:
    train_x: np.ndarray  # (N, h, w, c) uint8
    train_y: np.ndarray  # (N,) int64
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray | None  # labeled test split, for evaluation
    test_y: np.ndarray | None
    stats: dict  # raw_shape, input_shape, channels, normalize, mean, variance, class_names, counts

    @property
    def class_names(self) -> list[str]:
        return list(self.stats["class_names"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.stats["input_shape"])


def target_shape(raw_shape: tuple[int, int, int], cfg: PreprocessConfig) -> tuple[int, int, int]:
    height, width = cfg.image_size if cfg.image_size else raw_shape[:2]
    channels = {"source": raw_shape[2], "grayscale": 1, "rgb": 3}[cfg.channels]
    return (int(height), int(width), int(channels))


def pixel_layers(raw_shape, input_shape) -> list:
    """Keras layers mapping raw uint8 images of `raw_shape` to pixels of `input_shape`.

    Built-in layers only, so the saved model loads anywhere without our code:
    Resizing (bilinear), a fixed Dense on the channel axis for gray<->RGB, and a
    Discretization with boundaries at k+0.5 that rounds back to integer pixel
    values, exactly what this stage stores as uint8.
    """
    raw_shape, input_shape = tuple(raw_shape), tuple(input_shape)
    if raw_shape == input_shape:
        return []  # nothing to do, and no TensorFlow import (seconds) for the common case
    import keras

    layers = []
    if raw_shape[:2] != input_shape[:2]:
        layers.append(keras.layers.Resizing(*input_shape[:2], interpolation="bilinear", name="resize"))
    if raw_shape[2] != input_shape[2]:
        if input_shape[2] == 1 and raw_shape[2] == 3:
            kernel = np.array(GRAY_WEIGHTS, dtype="float32").reshape(3, 1)
        elif input_shape[2] == 3 and raw_shape[2] == 1:
            kernel = np.ones((1, 3), dtype="float32")
        else:
            raise PipelineError(f"cannot convert {raw_shape[2]} channels to {input_shape[2]}; expected 1 or 3")
        channel = keras.layers.Dense(input_shape[2], use_bias=False, trainable=False, name="channels")
        channel.build((None, *raw_shape[:2], raw_shape[2]))
        channel.set_weights([kernel])
        layers.append(channel)
    if layers:
        boundaries = [k + 0.5 for k in range(255)]
        layers.append(keras.layers.Discretization(bin_boundaries=boundaries, output_mode="int", name="round"))
    return layers


def to_pixels(images: np.ndarray, layers: list, batch: int = BATCH) -> np.ndarray:
    """Run `pixel_layers` over uint8 images in batches; returns uint8.

    The last layer, the Discretization that rounds, is done here by `round_pixels` instead: the same
    integers (a test compares them), several times faster than TensorFlow's bucketize over 255 boundaries.
    """
    if not layers:
        return images
    layers = layers[:-1] if layers[-1].name == "round" else layers
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].astype("float32")
        for layer in layers:
            x = layer(x)
        out.append(round_pixels(np.asarray(x)))
    return np.concatenate(out) if out else np.zeros((0,), dtype="uint8")


def round_pixels(x: np.ndarray) -> np.ndarray:
    """float32 pixels to uint8 as `pixel_layers`' Discretization (boundaries at k + 0.5) rounds them:
    halves up, clipped to 0..255. The 0.5 is added in float64, where x + 0.5 is exact for every float32 x
    (in float32, 0.5 - 2**-25 + 0.5 would round up to 1)."""
    return (np.clip(x, 0, 255).astype("float64") + 0.5).astype("uint8")  # the cast truncates: floor for x >= 0


def normalization_stats(train_pixels: np.ndarray, method: str) -> tuple[list[float], list[float]]:
    """Per-channel mean and variance for keras.layers.Normalization: (x - mean) / sqrt(variance).

    From each channel's histogram of its 256 values: exact integer sums, one pass over uint8 (a float64
    copy of 48,000 48x48 images would be 0.9 GB)."""
    channels = train_pixels.shape[-1]
    if method == "scale01":
        return [0.0] * channels, [255.0**2] * channels
    flat = train_pixels.reshape(-1, channels)
    values = np.arange(256, dtype="float64")
    means, variances = [], []
    for channel in range(channels):
        counts = np.bincount(flat[:, channel], minlength=256).astype("float64")
        mean = float(counts @ values / counts.sum())
        means.append(mean)
        variances.append(float(counts @ (values - mean) ** 2 / counts.sum()))
    return means, variances


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    """A stratified split; every class keeps its share in train and val."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    n_val = int(np.ceil(len(y) * val_fraction))
    if counts[counts > 0].min() < 2 or n_val < np.count_nonzero(counts) or len(y) - n_val < np.count_nonzero(counts):
        raise PipelineError(
            f"preprocess.val_fraction = {val_fraction}: cannot split {len(y)} images of "
            f"{np.count_nonzero(counts)} classes so that train and val each hold every class "
            f"(smallest class has {counts[counts > 0].min()} images)"
        )
    return train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)


def preprocess(raw: RawDataset, cfg: PreprocessConfig, seed: int) -> Prepared:
    raw_shape = tuple(int(d) for d in raw.train_x.shape[1:])
    input_shape = target_shape(raw_shape, cfg)
    layers = pixel_layers(raw_shape, input_shape)
    train_x, val_x, train_y, val_y = split_train_val(raw.train_x, raw.train_y, cfg.val_fraction, seed)
    train_x, val_x = to_pixels(train_x, layers), to_pixels(val_x, layers)
    test_x = to_pixels(raw.test_x, layers) if raw.test_x is not None else None
    mean, variance = normalization_stats(train_x, cfg.normalize)
    stats = {
        "raw_shape": list(raw_shape),
        "input_shape": list(input_shape),
        "channels": cfg.channels,
        "normalize": cfg.normalize,
        "mean": mean,
        "variance": variance,
        "class_names": list(raw.class_names),
        "counts": {
            "train": len(train_x),
            "val": len(val_x),
            "test": 0 if test_x is None else len(test_x),
            "unlabeled": 0 if raw.unlabeled_x is None else len(raw.unlabeled_x),
        },
    }
    return Prepared(train_x, train_y, val_x, val_y, test_x, raw.test_y, stats)


def save_prepared(prepared: Prepared, out_dir) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        np.savez(tmp / "train.npz", x=prepared.train_x, y=prepared.train_y)
        np.savez(tmp / "val.npz", x=prepared.val_x, y=prepared.val_y)
        if prepared.test_x is not None:
            np.savez(tmp / "test.npz", x=prepared.test_x, y=prepared.test_y)
        write_json(tmp / "stats.json", prepared.stats)


def load_prepared(out_dir) -> Prepared:
    out_dir = Path(out_dir)
    if not (out_dir / "stats.json").exists():
        raise PipelineError(f"{out_dir}: no preprocessed data (stats.json missing); run `pipeline preprocess` first")
    train, val = (load_arrays(out_dir / f"{name}.npz") for name in ("train", "val"))
    test = load_arrays(out_dir / "test.npz") if (out_dir / "test.npz").exists() else {"x": None, "y": None}
    stats = read_json(out_dir / "stats.json")
    return Prepared(train["x"], train["y"], val["x"], val["y"], test["x"], test["y"], stats)
