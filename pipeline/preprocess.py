"""Preprocess stage: resize, convert channels, split train/val, compute normalisation statistics.

The labeled test split is kept for evaluation. The unlabeled set stays raw in
the fetch stage's output: `predict` feeds it to the saved raw-pixel model.

Images stay uint8 on disk (a quarter of float32's size); normalisation happens
per batch in the input pipeline and in the saved model, with the statistics
written here. The resizing and channel conversion are also Keras layers
(`pixel_layers`), the saved model's first layers, so that it takes raw images:
nobody re-implements preprocessing. Both sides give the same uint8 pixels: a
bilinear resize of integer pixels has exact values k / d, and both round their
float32 result to the exact integer (`rounding_shift`); here it is two matrix
products per batch of images in NumPy (11-16x a per-image PIL loop, on
2 threads). The train/val split is a list of indices: the resize takes the
images through it a chunk at a time, with no copy of the images first.
"""

from __future__ import annotations

import functools
import logging
import math
import os
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

RESIZE_TASK_CHUNKS = 8  # chunks per resize thread task (928 images of Fashion-MNIST to 48x48: 65 for train and val)
# float32 bytes a resize chunk's three arrays may take (its layout and both products), so that they stay in a core's
# cache: 116 images of 28x28 to 48x48, 24 of 32x32x3 to 64x64, 2 of 32x32x3 to 224x224. Against the earlier
# fixed 256, on the AVX2-only EPYC (Zen 3, 512 KiB of L2 a core), median of 7 alternated: 70,000 images to 48x48
# 1.37x faster (0.306 s against 0.420 s), 20,000 32x32x3 to 64x64 1.78x, 4,000 32x32x3 to 224x224 1.67x.
RESIZE_WORKING_SET = 2 * 1024 * 1024
BATCH = 4096  # images per vectorised resize call: bounds the float32 working memory to ~BATCH*H*W*C*4 bytes
HISTOGRAM_CHUNK = 65_536  # pixels per bincount call in normalization_stats
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


@functools.cache
def bilinear_kernel(n_in: int, n_out: int) -> tuple[np.ndarray, int]:
    """(n_in, n_out) float32 weights of a bilinear resize along one axis, and their common denominator.

    The sampling is tf.image.resize's and Keras Resizing's (half-pixel centres, no antialiasing, edges
    clamped), computed with exact fractions: every weight is k / denominator for an integer k.
    """
    from fractions import Fraction

    kernel = [[Fraction(0)] * n_out for _ in range(n_in)]
    for out in range(n_out):
        source = Fraction((2 * out + 1) * n_in - n_out, 2 * n_out)  # (out + 0.5) * n_in / n_out - 0.5
        below = math.floor(source)
        share = source - below
        kernel[min(max(below, 0), n_in - 1)][out] += 1 - share
        kernel[min(math.ceil(source), n_in - 1)][out] += share
    denominator = math.lcm(*(w.denominator for row in kernel for w in row))
    weights = np.array([[float(w) for w in row] for row in kernel], dtype="float32")
    weights.flags.writeable = False  # cached: shared by every caller
    return weights, denominator


def rounding_shift(raw_shape, input_shape) -> float:
    """How far below k + 0.5 the rounding boundaries sit, so that float32 resizing rounds exactly.

    A bilinear resize of integer pixels gives exact values S / d (d: the product of both axes'
    denominators). Those are never within 0.5 / d of a boundary placed half-way between a tie (S / d =
    k + 0.5, which rounds up) and the value just below it (k + 0.5 - 1 / d): both float32 computations of
    the resize, NumPy's here and the saved model's, round to the exact result wherever their error is
    under 0.5 / d (`EXACT_DENOMINATOR`). An odd d has no ties: the boundary stays at k + 0.5.
    """
    d = resize_denominator(raw_shape, input_shape)
    return 0.5 / d if d % 2 == 0 else 0.0


def resize_denominator(raw_shape, input_shape) -> int:
    """d: every value of a bilinear resize from `raw_shape` to `input_shape` is (integer) / d; 1 without one."""
    if tuple(raw_shape[:2]) == tuple(input_shape[:2]):
        return 1
    return bilinear_kernel(raw_shape[0], input_shape[0])[1] * bilinear_kernel(raw_shape[1], input_shape[1])[1]


# Below this denominator, a float32 resize of pixels in 0..255 (two weighted terms per axis, all positive:
# relative error under 8 float32 epsilons, 2x margin) is within 0.5 / d of the exact value, so rounding with
# `rounding_shift` gives the exact integers. 28x28 -> 48x48 has d = 576; 32x32 -> 224x224 has d = 196.
EXACT_DENOMINATOR = 2048


def pixel_layers(raw_shape, input_shape) -> list:
    """Keras layers mapping raw uint8 images of `raw_shape` to pixels of `input_shape`.

    Built-in layers only, so the saved model loads anywhere without our code: two fixed EinsumDense
    layers that resize (bilinear, one axis each, with `bilinear_kernel`'s weights), a fixed Dense on
    the channel axis for gray<->RGB, and a Discretization that rounds back to integer pixel values
    (boundaries at k + 0.5 - `rounding_shift`), exactly what this stage stores as uint8.
    """
    raw_shape, input_shape = tuple(raw_shape), tuple(input_shape)
    if raw_shape == input_shape:
        return []  # nothing to do, and no TensorFlow import (seconds) for the common case
    import keras

    fixed = {"trainable": False, "dtype": "float32"}  # float32 even under a mixed-precision policy
    layers = []
    (height, width, channels), (out_height, out_width) = raw_shape, input_shape[:2]
    if (height, width) != (out_height, out_width):
        for axis, (equation, n_in, n_out, shape_in, shape_out) in enumerate([
            ("abcd,be->aecd", height, out_height, (height, width), (out_height, width)),
            ("abcd,ce->abed", width, out_width, (out_height, width), (out_height, out_width)),
        ]):
            layer = keras.layers.EinsumDense(equation, output_shape=(*shape_out, channels),
                                             name=("resize_height", "resize_width")[axis], **fixed)
            layer.build((None, *shape_in, channels))
            layer.set_weights([bilinear_kernel(n_in, n_out)[0]])
            layers.append(layer)
    if raw_shape[2] != input_shape[2]:
        if input_shape[2] == 1 and raw_shape[2] == 3:
            kernel = np.array(GRAY_WEIGHTS, dtype="float32").reshape(3, 1)
        elif input_shape[2] == 3 and raw_shape[2] == 1:
            kernel = np.ones((1, 3), dtype="float32")
        else:
            raise PipelineError(f"cannot convert {raw_shape[2]} channels to {input_shape[2]}; expected 1 or 3")
        channel = keras.layers.Dense(input_shape[2], use_bias=False, name="channels", **fixed)
        channel.build((None, *input_shape[:2], raw_shape[2]))
        channel.set_weights([kernel])
        layers.append(channel)
    shift = rounding_shift(raw_shape, input_shape)
    boundaries = [k + 0.5 - shift for k in range(255)]
    layers.append(keras.layers.Discretization(bin_boundaries=boundaries, output_mode="int", name="round"))
    return layers


def to_pixels(images: np.ndarray, input_shape, batch: int = BATCH, index: np.ndarray | None = None) -> np.ndarray:
    """uint8 images resized and converted to `input_shape` as `pixel_layers` does it; returns uint8.

    A resize (and gray to RGB) whose denominator is under EXACT_DENOMINATOR runs here in NumPy: two
    float32 matrix products per batch and a rounding cast, the exact integers that the saved model's
    layers give too. Anything else runs `pixel_layers` themselves, then rounds as their Discretization.
    With `index`, the images are images[index], taken a batch at a time rather than copied first.
    """
    raw_shape, input_shape = tuple(images.shape[1:]), tuple(input_shape)
    if raw_shape == input_shape:
        return images if index is None else images[index]
    gray_to_rgb = raw_shape[2] == 1 and input_shape[2] == 3
    shift = rounding_shift(raw_shape, input_shape)
    resize = raw_shape[:2] != input_shape[:2]
    if resize and (raw_shape[2] == input_shape[2] or gray_to_rgb) and (
            resize_denominator(raw_shape, input_shape) < EXACT_DENOMINATOR):
        out = _resize(images, input_shape[:2], np.float32(0.5 + shift), index=index)
        return np.repeat(out, 3, axis=-1) if gray_to_rgb else out
    layers = pixel_layers(raw_shape, input_shape)[:-1]  # the rounding is round_pixels'
    out = []
    for start in range(0, len(images) if index is None else len(index), batch):
        x = _take(images, index, start, start + batch).astype("float32")
        for layer in layers:
            x = layer(x)
        out.append(round_pixels(np.asarray(x), shift))
    return np.concatenate(out) if out else np.zeros((0, *input_shape), dtype="uint8")


def _take(images: np.ndarray, index: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """images[start:stop], or with `index` the images index[start:stop] names."""
    return images[start:stop] if index is None else images[index[start:stop]]


def network_input(images: np.ndarray, stats: dict) -> np.ndarray:
    """The images as the network takes them: resized as this stage does (a no-op on its own output), then
    normalised with its statistics, as float32 (what the saved model's first layers compute)."""
    pixels = to_pixels(images, stats["input_shape"]).astype("float32")
    return (pixels - np.asarray(stats["mean"], "float32")) / np.sqrt(np.asarray(stats["variance"], "float32"))


def _resize(images: np.ndarray, size, offset: np.float32, chunk: int | None = None, workers: int | None = None,
            index: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resize of uint8 (N, H, W, C) images (or of images[index]) to `size`, rounded by truncating
    x + offset; uint8.

    Height first, as one matrix product over the whole chunk laid out (H, N, C, W + 1), then width, as
    another over (out_H * N * C, W + 1): two BLAS calls per chunk of images (by default as many as
    RESIZE_WORKING_SET holds: `resize_chunk`). The extra column of ones carries the offset through both
    products (the height weights of an output sum to 1), so the cast to uint8 is the only pass left. The
    chunks are shared out to worker threads (default: one per usable CPU), each running one-thread BLAS:
    the layout and the cast are single-threaded NumPy, so this is about 1.3x BLAS' own threads on 2 cores
    (70,000 images to 48x48)."""
    count, height, width, channels = images.shape if index is None else (len(index), *images.shape[1:])
    (out_height, out_width) = size
    chunk = chunk or resize_chunk((height, width, channels), size)
    along_height = np.ascontiguousarray(bilinear_kernel(height, out_height)[0].T)  # (out_H, H)
    along_width = np.concatenate([bilinear_kernel(width, out_width)[0], np.full((1, out_width), offset)])
    out = np.empty((count, out_height, out_width, channels), dtype="uint8")

    def resize_range(first: int, last: int) -> None:
        laid = np.ones((height, min(chunk, last - first), channels, width + 1), dtype="float32")
        for start in range(first, last, chunk):
            x = _take(images, index, start, min(start + chunk, last))  # with index: a gather of one chunk
            n = len(x)
            laid[:, :n, :, :width] = x.transpose(1, 0, 3, 2)
            resized = (along_height @ laid[:, :n].reshape(height, -1)).reshape(-1, width + 1)  # height done
            pixels = resized @ along_width  # every value > 0: the cast's truncation is floor(resized + offset)
            out[start : start + n].transpose(1, 0, 3, 2)[...] = pixels.reshape(out_height, n, channels, out_width)

    # tasks of a few chunks: on an error or Ctrl-C, the ones not started are cancelled, the running ones end soon
    step = chunk * RESIZE_TASK_CHUNKS
    workers = min(workers or usable_cpus(), math.ceil(count / step))
    if workers <= 1:  # one task: BLAS' own threads instead
        resize_range(0, count)
        return out
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        tasks = [pool.submit(resize_range, start, min(start + step, count)) for start in range(0, count, step)]
        try:
            for task in tasks:
                task.result()  # a worker's exception is raised here
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
    return out


def resize_chunk(raw_shape, size) -> int:
    """Images per chunk of `_resize`: its three float32 arrays for them within RESIZE_WORKING_SET, 1 to 256."""
    (height, width, channels), (out_height, out_width) = raw_shape, size
    per_image = 4 * channels * ((height + out_height) * (width + 1) + out_height * out_width)
    return max(1, min(256, RESIZE_WORKING_SET // per_image))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, as a container's CPU set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def round_pixels(x: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """float32 pixels to uint8 as `pixel_layers`' Discretization rounds them: the count of its float32
    boundaries k + 0.5 - shift that are <= x (halves up for shift 0), so 0..255.

    A first guess floor(x + 0.5 + shift) in float64, then one step down or up where a float32 boundary
    (rounded from k + 0.5 - shift) falls on the other side of x."""
    boundaries = np.concatenate([[-np.inf], np.float32([k + 0.5 - shift for k in range(255)]), [np.inf]])
    values = np.asarray(x, dtype="float64")  # float32 to float64 is exact, and so are the comparisons
    guess = np.floor(np.clip(values, -1, 256) + (0.5 + shift)).clip(0, 255).astype("int64")
    guess -= values < boundaries[guess]  # boundaries[k] is the k-th boundary's, k - 1 + 0.5 - shift
    guess += values >= boundaries[guess + 1]
    return guess.astype("uint8")


def normalization_stats(train_pixels: np.ndarray, method: str) -> tuple[list[float], list[float]]:
    """Per-channel mean and variance for keras.layers.Normalization: (x - mean) / sqrt(variance).

    From each channel's histogram of its 256 values: exact integer sums, one pass over uint8 (a float64
    copy of 48,000 48x48 images would be 0.9 GB, and so would bincount's int64 copy of them whole: in chunks
    that stay in the CPU's cache it is 2.6x faster, 0.17 s instead of 0.43 s on the 2-core Xeon)."""
    channels = train_pixels.shape[-1]
    if method == "scale01":
        return [0.0] * channels, [255.0**2] * channels
    flat = train_pixels.reshape(-1, channels)
    values = np.arange(256, dtype="float64")
    means, variances = [], []
    for channel in range(channels):
        pixels = flat[:, channel]
        counts = np.zeros(256, dtype="float64")
        for start in range(0, len(pixels), HISTOGRAM_CHUNK):  # bincount copies its input as int64: chunk by chunk
            counts += np.bincount(pixels[start : start + HISTOGRAM_CHUNK], minlength=256)
        mean = float(counts @ values / counts.sum())
        means.append(mean)
        variances.append(float(counts @ (values - mean) ** 2 / counts.sum()))
    return means, variances


def split_train_val(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split, as indices into y: (train, val); every class keeps its share in both.

    The images themselves are taken through these indices as they are resized (`to_pixels`), not copied
    first: they are what scikit-learn's train_test_split of the images would give, in the same order."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    n_val = int(np.ceil(len(y) * val_fraction))
    if counts[counts > 0].min() < 2 or n_val < np.count_nonzero(counts) or len(y) - n_val < np.count_nonzero(counts):
        raise PipelineError(
            f"preprocess.val_fraction = {val_fraction}: cannot split {len(y)} images of "
            f"{np.count_nonzero(counts)} classes so that train and val each hold every class "
            f"(smallest class has {counts[counts > 0].min()} images)"
        )
    return tuple(train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=y, random_state=seed))


def preprocess(raw: RawDataset, cfg: PreprocessConfig, seed: int) -> Prepared:
    raw_shape = tuple(int(d) for d in raw.train_x.shape[1:])
    input_shape = target_shape(raw_shape, cfg)
    train_index, val_index = split_train_val(raw.train_y, cfg.val_fraction, seed)
    # train and val in one pass over the train split's images: one set of resize tasks for the threads
    pixels = to_pixels(raw.train_x, input_shape, index=np.concatenate([train_index, val_index]))
    train_x, val_x = pixels[: len(train_index)], pixels[len(train_index) :]
    train_y, val_y = raw.train_y[train_index], raw.train_y[val_index]
    test_x = to_pixels(raw.test_x, input_shape) if raw.test_x is not None else None
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
