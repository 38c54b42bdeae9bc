"""Preprocess on synthetic raw data; the model builder; the raw-pixel wrapper equals the network."""

import keras
import numpy as np
import pytest

from pipeline.config import ModelConfig, PreprocessConfig
from pipeline.errors import PipelineError
from pipeline.fetch import RawDataset
from pipeline.models import build_model, normalizer, raw_input_model
from pipeline.preprocess import load_prepared, pixel_layers, preprocess, save_prepared, to_pixels

TINY = ModelConfig(filters=((4,), (8,)), kernel_sizes=(3, 3), dense=(8,))


def raw_dataset(n=60, shape=(8, 8, 1), classes=3, unlabeled=True, seed=0) -> RawDataset:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape), dtype="uint8")
    y = np.arange(n, dtype="int64") % classes
    return RawDataset(
        class_names=[f"c{i}" for i in range(classes)],
        train_x=x, train_y=y,
        test_x=x[:12].copy(), test_y=y[:12].copy(),
        unlabeled_x=x[:5].copy() if unlabeled else None,
        unlabeled_ids=np.arange(100, 105) if unlabeled else None,
    )


def test_split_is_stratified_and_seeded():
    raw = raw_dataset(n=100, classes=4)
    a = preprocess(raw, PreprocessConfig(val_fraction=0.2), seed=1)
    b = preprocess(raw, PreprocessConfig(val_fraction=0.2), seed=1)
    c = preprocess(raw, PreprocessConfig(val_fraction=0.2), seed=2)
    assert (len(a.train_x), len(a.val_x)) == (80, 20)
    assert np.bincount(a.val_y).tolist() == [5, 5, 5, 5]
    assert np.array_equal(a.val_x, b.val_x) and not np.array_equal(a.val_x, c.val_x)
    assert a.stats["counts"] == {"train": 80, "val": 20, "test": 12, "unlabeled": 5}


def test_resize_channels_and_standardize_stats():
    raw = raw_dataset(shape=(8, 8, 1))
    prepared = preprocess(raw, PreprocessConfig(image_size=(12, 10), channels="rgb", normalize="standardize"), seed=0)
    assert prepared.train_x.shape[1:] == (12, 10, 3) and prepared.train_x.dtype == np.uint8
    assert prepared.test_x.shape == (12, 12, 10, 3)
    assert np.array_equal(prepared.train_x[..., 0], prepared.train_x[..., 2])  # gray tiled to RGB
    flat = prepared.train_x.reshape(-1, 3).astype("float64")
    assert np.allclose(prepared.stats["mean"], flat.mean(0)) and np.allclose(prepared.stats["variance"], flat.var(0))


def test_vectorised_resize_matches_tf_image_resize():
    import tensorflow as tf

    x = np.random.default_rng(3).integers(0, 256, (7, 28, 28, 1), dtype="uint8")
    ours = to_pixels(x, pixel_layers((28, 28, 1), (48, 48, 1)))
    reference = np.floor(tf.image.resize(x.astype("float32"), (48, 48)).numpy() + 0.5).clip(0, 255).astype("uint8")
    assert np.array_equal(ours, reference)


def test_split_that_cannot_hold_every_class_fails_clearly():
    raw = raw_dataset(n=6, classes=3)
    with pytest.raises(PipelineError, match="preprocess.val_fraction = 0.2: cannot split 6 images of 3 classes"):
        preprocess(raw, PreprocessConfig(), seed=0)


def test_save_load_round_trip(tmp_path):
    prepared = preprocess(raw_dataset(), PreprocessConfig(), seed=0)
    save_prepared(prepared, tmp_path / "prepared")
    back = load_prepared(tmp_path / "prepared")
    assert np.array_equal(back.val_x, prepared.val_x) and back.stats == prepared.stats
    with pytest.raises(PipelineError, match="stats.json missing"):
        load_prepared(tmp_path / "nothing")


@pytest.mark.parametrize("batch_norm, expected", [(False, 886_245), (True, 887_013)])
def test_notebook_003_cnn_parameter_count(batch_norm, expected):
    model = build_model(ModelConfig(batch_norm=batch_norm), (28, 28, 1), 5)
    assert model.count_params() == expected


@pytest.mark.parametrize(
    "raw_shape, pre",
    [
        ((8, 8, 1), PreprocessConfig()),
        ((8, 8, 1), PreprocessConfig(image_size=(12, 12), channels="rgb", normalize="standardize")),
        ((10, 10, 3), PreprocessConfig(image_size=(8, 8), channels="grayscale")),
    ],
)
def test_raw_pixel_model_equals_network_on_preprocessed_arrays(tmp_path, raw_shape, pre):
    raw = raw_dataset(shape=raw_shape)
    prepared = preprocess(raw, pre, seed=0)
    network = build_model(TINY, prepared.input_shape, len(prepared.class_names))
    wrapper = raw_input_model(network, prepared.stats)
    on_prepared = network.predict(normalizer(prepared.stats)(prepared.test_x), verbose=0)
    on_raw = wrapper.predict(raw.test_x, verbose=0)
    np.testing.assert_allclose(on_raw, on_prepared, rtol=0, atol=1e-6)
    assert np.array_equal(on_raw.argmax(1), on_prepared.argmax(1))
    wrapper.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(raw.test_x, verbose=0), on_raw, atol=1e-6)
    assert reloaded.input.dtype == "uint8"


def test_round_pixels_equals_the_saved_models_discretization():
    """The stage rounds in NumPy; the saved model rounds with pixel_layers' Discretization: same integers,
    at the halves, just below them, and at float32's awkward 0.5 - 2**-25."""
    import keras

    from pipeline.preprocess import round_pixels

    layer = pixel_layers((4, 4, 1), (8, 8, 1))[-1]
    assert isinstance(layer, keras.layers.Discretization)
    halves = np.arange(256, dtype="float32") + np.float32(0.5)
    x = np.concatenate([
        halves, np.nextafter(halves, np.float32(0)), np.nextafter(halves, np.float32(300)),
        np.float32([0, 0.5 - 2**-25, 0.25, 254.99, 255, 255.49, 255.5, 256, -0.3]),
        np.random.default_rng(0).uniform(0, 255, 10_000).astype("float32"),
    ]).reshape(1, -1, 1, 1)
    assert np.array_equal(round_pixels(x), np.asarray(layer(x)).astype("uint8"))
