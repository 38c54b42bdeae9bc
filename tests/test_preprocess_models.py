"""Preprocess on synthetic raw data; the model builder; the raw-pixel wrapper equals the network."""

import keras
import numpy as np
import pytest

from pipeline.config import ModelConfig, PreprocessConfig
from pipeline.errors import PipelineError
from pipeline.fetch import RawDataset
from pipeline.models import build_model, normalizer, raw_input_model
from pipeline.preprocess import (bilinear_kernel, load_prepared, pixel_layers, preprocess, rounding_shift,
                                 save_prepared, to_pixels)

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


@pytest.mark.parametrize("image_size, channels", [(None, "source"), ((12, 10), "source"), ((12, 10), "rgb"),
                                                  ((57, 57), "source")])
def test_split_images_are_scikit_learns_split_of_the_images_in_its_order(image_size, channels):
    """The stage resizes train and val through the split's indices (no copy of the images first): they are
    the images scikit-learn's train_test_split gives, in its order, each resized on its own. The sizes take
    each way through `to_pixels`: none, NumPy's resize, gray to RGB, the saved model's layers (57x57)."""
    from sklearn.model_selection import train_test_split

    raw = raw_dataset(n=90, shape=(28, 28, 1), classes=3)
    cfg = PreprocessConfig(image_size=image_size, channels=channels, val_fraction=0.3)
    prepared = preprocess(raw, cfg, seed=4)
    train_x, val_x, train_y, val_y = train_test_split(raw.train_x, raw.train_y, test_size=0.3, stratify=raw.train_y,
                                                      random_state=4)
    assert np.array_equal(prepared.train_y, train_y) and np.array_equal(prepared.val_y, val_y)
    for ours, images in ((prepared.train_x, train_x), (prepared.val_x, val_x)):
        assert np.array_equal(ours, np.concatenate([to_pixels(image[None], prepared.input_shape) for image in images]))


def test_resize_channels_and_standardize_stats(monkeypatch):
    monkeypatch.setattr("pipeline.preprocess.HISTOGRAM_CHUNK", 97)  # the histograms add up over many chunks
    raw = raw_dataset(shape=(8, 8, 1))
    prepared = preprocess(raw, PreprocessConfig(image_size=(12, 10), channels="rgb", normalize="standardize"), seed=0)
    assert prepared.train_x.shape[1:] == (12, 10, 3) and prepared.train_x.dtype == np.uint8
    assert prepared.test_x.shape == (12, 12, 10, 3)
    assert np.array_equal(prepared.train_x[..., 0], prepared.train_x[..., 2])  # gray tiled to RGB
    flat = prepared.train_x.reshape(-1, 3).astype("float64")
    assert np.allclose(prepared.stats["mean"], flat.mean(0)) and np.allclose(prepared.stats["variance"], flat.var(0))


@pytest.mark.parametrize("n_in, n_out", [(28, 48), (8, 12), (32, 224), (10, 8), (28, 227), (5, 1)])
def test_bilinear_kernel_is_tf_image_resize(n_in, n_out):
    """Each input pixel's weights are what tf.image.resize (Keras Resizing's op) gives a unit impulse."""
    import tensorflow as tf

    kernel, denominator = bilinear_kernel(n_in, n_out)
    impulses = np.eye(n_in, dtype="float32").reshape(n_in, n_in, 1, 1)
    reference = tf.image.resize(impulses, (n_out, 1)).numpy().reshape(n_in, n_out)
    np.testing.assert_allclose(kernel, reference, atol=1e-4)  # TF computes the sampling positions in float32
    np.testing.assert_allclose(kernel * denominator, np.round(kernel * denominator), atol=1e-3)  # k / denominator


def exact_resize(x: np.ndarray, size) -> np.ndarray:
    """Bilinear resize in integers, rounding halves up: the value the float32 computations must round to."""
    (ky, dy), (kx, dx) = bilinear_kernel(x.shape[1], size[0]), bilinear_kernel(x.shape[2], size[1])
    ky, kx = np.round(ky * dy).astype("int64"), np.round(kx * dx).astype("int64")
    s = np.einsum("nhwc,ho,wp->nopc", x.astype("int64"), ky, kx)
    return ((2 * s + dy * dx) // (2 * dy * dx)).astype("uint8")


@pytest.mark.parametrize("raw_shape, input_shape", [((28, 28, 1), (48, 48, 1)), ((7, 5, 3), (12, 10, 3)),
                                                     ((8, 8, 1), (12, 12, 3)), ((10, 10, 3), (6, 4, 3))])
def test_resize_is_exact_and_equals_the_saved_models_layers(raw_shape, input_shape):
    """The stage's NumPy resize gives the exact rounded bilinear values, ties included, and so do the
    saved model's layers: the same uint8 pixels on both sides, not merely close ones."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (300, *raw_shape), dtype="uint8")
    x[:100] = rng.integers(0, 2, (100, *raw_shape), dtype="uint8") * 255  # 0/255 edges: many exact halves
    ours = to_pixels(x, input_shape)
    expected = exact_resize(x, input_shape[:2])
    expected = np.repeat(expected, 3, axis=-1) if input_shape[2] != raw_shape[2] else expected
    assert ours.shape == (300, *input_shape) and ours.dtype == np.uint8
    assert np.array_equal(ours, expected)
    layered = x.astype("float32")
    for layer in pixel_layers(raw_shape, input_shape):
        layered = layer(layered)
    assert np.array_equal(np.asarray(layered).astype("uint8"), ours)
    # and within one level of tf.image.resize rounded (which a float32 tie may round either way)
    reference = np.floor(tf.image.resize(x.astype("float32"), input_shape[:2]).numpy() + 0.5).clip(0, 255)
    if input_shape[2] == raw_shape[2]:
        assert np.abs(reference - ours).max() <= 1


def test_resize_threads_give_the_same_pixels():
    """The resize split over worker threads (2 tasks of 8 chunks, the last ending inside a chunk; more workers
    asked for than there are tasks) writes every image, each as one thread computes it, and the exact values."""
    from pipeline.preprocess import _resize, rounding_shift

    x = np.random.default_rng(5).integers(0, 256, (1001, 7, 5, 3), dtype="uint8")
    offset = np.float32(0.5 + rounding_shift((7, 5, 3), (12, 10, 3)))
    alone = _resize(x, (12, 10), offset, chunk=64, workers=1)
    assert np.array_equal(alone, exact_resize(x, (12, 10)))
    for workers in (2, 3, 7):
        assert np.array_equal(_resize(x, (12, 10), offset, chunk=64, workers=workers), alone)


def test_resize_chunks_fit_the_working_set_and_give_the_same_pixels_as_one_chunk():
    """Larger images take fewer per chunk (the chunk's float32 arrays stay within RESIZE_WORKING_SET), and a
    resize in its default chunks gives the pixels of one chunk and the exact values."""
    from pipeline.preprocess import RESIZE_WORKING_SET, _resize, resize_chunk, rounding_shift

    def working_set(raw_shape, size, chunk):
        (h, w, c), (oh, ow) = raw_shape, size
        return 4 * c * chunk * ((h + oh) * (w + 1) + oh * ow)

    assert resize_chunk((28, 28, 1), (48, 48)) == 116 and resize_chunk((32, 32, 3), (224, 224)) == 2
    assert resize_chunk((8, 8, 1), (4, 4)) == 256 and resize_chunk((256, 256, 3), (1024, 1024)) == 1  # the bounds
    for raw_shape, size in [((28, 28, 1), (48, 48)), ((32, 32, 3), (64, 64)), ((32, 32, 3), (224, 224))]:
        chunk = resize_chunk(raw_shape, size)
        assert working_set(raw_shape, size, chunk) <= RESIZE_WORKING_SET < working_set(raw_shape, size, chunk + 1)
    x = np.random.default_rng(6).integers(0, 256, (50, 8, 8, 3), dtype="uint8")
    offset = np.float32(0.5 + rounding_shift((8, 8, 3), (150, 120, 3)))
    assert resize_chunk((8, 8, 3), (150, 120)) < 10
    ours = _resize(x, (150, 120), offset, workers=2)
    assert np.array_equal(ours, _resize(x, (150, 120), offset, chunk=50, workers=1))
    assert np.array_equal(ours, exact_resize(x, (150, 120)))


def test_resize_thread_errors_reach_the_caller():
    """An error inside a worker thread is raised by the resize, not lost with the thread."""
    from pipeline.preprocess import _resize

    class Unreadable(np.ndarray):
        def __getitem__(self, key):
            if isinstance(key, slice) and key.start is not None and key.start >= 512:
                raise OSError("images from 512 on are unreadable")
            return super().__getitem__(key)

    x = np.zeros((2048, 7, 5, 3), dtype="uint8").view(Unreadable)
    with pytest.raises(OSError, match="from 512 on"):
        _resize(x, (12, 10), np.float32(0.5), chunk=64, workers=2)


@pytest.mark.parametrize("raw_shape, input_shape", [((28, 28, 1), (57, 57, 1)), ((21, 21, 1), (101, 101, 1)),
                                                     ((10, 10, 3), (8, 8, 1))])
def test_other_conversions_run_the_saved_models_layers(raw_shape, input_shape):
    """A resize whose fractions are too fine for float32 to be exact (an even denominator, 12,996, and an
    odd one, 10,201: no ties, but values as close to the boundaries), or RGB to gray: the stage runs the
    saved model's own layers and rounds as they do."""
    from pipeline.preprocess import EXACT_DENOMINATOR, resize_denominator

    assert input_shape[2] < raw_shape[2] or resize_denominator(raw_shape, input_shape) >= EXACT_DENOMINATOR
    x = np.random.default_rng(4).integers(0, 256, (50, *raw_shape), dtype="uint8")
    ours = to_pixels(x, input_shape)
    layered = x.astype("float32")
    for layer in pixel_layers(raw_shape, input_shape):
        layered = layer(layered)
    assert np.array_equal(np.asarray(layered).astype("uint8"), ours)


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
    model = build_model(ModelConfig(name="cnn", batch_norm=batch_norm), (28, 28, 1), 5)
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


@pytest.mark.parametrize("raw_shape, input_shape", [((4, 4, 1), (8, 8, 1)), ((28, 28, 1), (48, 48, 1)),
                                                     ((3, 3, 3), (3, 3, 1))])
def test_round_pixels_equals_the_saved_models_discretization(raw_shape, input_shape):
    """The stage rounds in NumPy; the saved model rounds with pixel_layers' Discretization: same integers,
    at the boundaries, just below and above them, and at float32's awkward 0.5 - 2**-25."""
    from pipeline.preprocess import round_pixels

    layer = pixel_layers(raw_shape, input_shape)[-1]
    assert isinstance(layer, keras.layers.Discretization)
    shift = rounding_shift(raw_shape, input_shape)
    assert shift == (0.5 / 576 if input_shape == (48, 48, 1) else 0.5 / 16 if input_shape == (8, 8, 1) else 0)
    bounds = np.float32(np.arange(256) + 0.5 - shift)
    x = np.concatenate([
        bounds, np.nextafter(bounds, np.float32(-1)), np.nextafter(bounds, np.float32(300)), bounds + 2 * shift,
        np.float32([0, 0.5 - 2**-25, 0.25, 254.99, 255, 255.49, 255.5, 256, 300, -0.3]),
        np.random.default_rng(0).uniform(0, 255, 10_000).astype("float32"),
    ]).reshape(1, -1, 1, 1)
    assert np.array_equal(round_pixels(x, shift), np.asarray(layer(x)).astype("uint8"))
