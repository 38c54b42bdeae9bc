"""Presets reproduce the notebooks' networks; every model choice builds and trains; too small inputs fail clearly."""

import json
import zipfile

import keras
import numpy as np
import pytest

from pipeline import models
from pipeline.config import ConfigError, ModelConfig, validate
from pipeline.errors import PipelineError
from pipeline.models import PRESETS, build_model, minimum_input_size

CIFAR, FASHION, FASHION_48 = (32, 32, 3), (28, 28, 1), (48, 48, 1)

# (preset, input shape, classes, parameter count): the count each notebook reports for its network on its data.
REPORTED = [
    ("cnn", FASHION, 5, 886_245),  # notebook 003, models 1-6
    ("cnn_bn", FASHION, 5, 887_013),  # notebook 003, model 7
    ("lenet5", FASHION, 5, 245_601),  # notebook 003, LeNet-5 model 1
    ("lenet5_relu", FASHION, 5, 368_749),  # notebook 003, LeNet-5 models 2-5
    ("alexnet", FASHION_48, 5, 29_967_045),  # notebook 003
    ("vgg16", FASHION_48, 5, 33_616_581),  # notebook 003
    ("resnet", FASHION, 5, 11_183_621),  # notebook 003, model 1
    ("nb000_model1", CIFAR, 10, 853_290),
    ("nb000_model2", CIFAR, 10, 854_186),
    ("nb000_model3", CIFAR, 10, 854_186),
    ("nb000_model4", CIFAR, 10, 854_186),
    ("nb000_model5", CIFAR, 10, 965_418),
    ("nb000_model6", CIFAR, 10, 962_858),
    ("nb000_model7", CIFAR, 10, 965_418),
    ("nb001_model1", CIFAR, 10, 2_395_562),
    ("nb001_model2", CIFAR, 10, 2_367_754),
]
# Networks whose notebook shows no total: counted by hand from their layers (Keras's CIFAR-10 example: 1,250,858).
BY_HAND = [
    # ours, the default: conv 3x3 1->32 (320) + 3x3 32->64 (18,496) + dense 7*7*64->256 (803,072) + 256->10 (2,570)
    ("cnn_fast", FASHION, 10, 824_458),
    ("keras_cifar10", CIFAR, 10, 1_250_858),
    ("nb001_model7", CIFAR, 10, 1_250_858),
    ("nb002_exp1", CIFAR, 10, 356_874),
    ("nb002_exp2", CIFAR, 10, 357_514),
    ("nb002_exp3", CIFAR, 10, 357_514),
    ("nb002_exp4", CIFAR, 10, 357_514),
    ("nb002_exp5", CIFAR, 10, 357_514),
    ("nb002_exp6", CIFAR, 10, 874_890),
    ("nb002_exp7", CIFAR, 10, 4_424_458),
]


@pytest.mark.parametrize("name, shape, classes, expected", REPORTED + BY_HAND, ids=[row[0] for row in REPORTED + BY_HAND])
def test_preset_parameter_count(name, shape, classes, expected):
    assert build_model(ModelConfig(name=name), shape, classes).count_params() == expected


def test_every_preset_is_counted_and_revalidates():
    assert sorted(row[0] for row in REPORTED + BY_HAND) == sorted(PRESETS)
    for name in PRESETS:
        cfg = ModelConfig(name=name)
        assert ModelConfig(**cfg.model_dump()) == cfg  # what MLflow logs rebuilds the same network


def test_preset_values_are_defaults_that_explicit_keys_override():
    cfg = validate({"model": {"name": "vgg16", "dense_dropout": 0.3, "filters": None}}).model
    assert cfg.filters == ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3)  # null: the preset's
    assert (cfg.dense, cfg.dense_dropout) == ((4096, 4096), 0.3)
    resnet = validate({"model": {"name": "resnet", "resnet": {"max_pool": True, "blocks": 3}}}).model
    assert (resnet.resnet.blocks, resnet.resnet.sub_blocks, resnet.resnet.max_pool, resnet.l2) == (3, 2, True, 1e-4)
    assert resnet.filters is None and ModelConfig().resnet.blocks is None  # the other builder's keys stay null


# Each model choice, trained one step on 4 random images (eagerly: graph tracing costs seconds a model here).
TRAINED = {
    "relu, per-conv bn/dropout/l2, max-norm, conv head": (
        dict(filters=[[4, 4], [8]], kernel_sizes=[3, 3], batch_norm=[[True, False], True],
             conv_dropout=[[0.2, 0.0], 0.1], l2=[[0.01, 0.0], 0.001], max_norm=3.0,
             conv_head=[dict(filters=8, kernel_size=[1, 2], padding="same", max_norm=2.0, l2=0.01)],
             dense=[8, 4], dense_dropout=[0.5, 0.0], dense_l2=[0.01, 0.0]), (8, 8, 1)),
    "leaky_relu, bn before activation, average pooling, valid padding": (
        dict(activation="leaky_relu", leaky_relu_slope=0.1, batch_norm=True, batch_norm_position="before_activation",
             pool="average", pool_strides=[1, 2], padding=["valid", ["same", "valid"]], filters=[[4], [4, 8]],
             kernel_sizes=[3, 3], dense=[8]), (10, 10, 3)),
    "elu, block bn, per-block dropout": (
        dict(activation="elu", block_batch_norm=[True, False], dropout=[0.1, 0.0], filters=[[4], [8]],
             kernel_sizes=[3, 2], pool_size=[2, 3], pool_strides=[2, 1], dense=[]), (9, 7, 1)),
    "tanh (lenet5)": (dict(name="lenet5"), FASHION),
    "resnet with max pooling": (
        dict(name="resnet", resnet=dict(blocks=2, sub_blocks=2, filters=4, max_pool=True), dense=[8],
             dense_dropout=0.1), (12, 12, 1)),
}


def tiny_batch(shape, n=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype("float32"), np.arange(n) % classes


@pytest.mark.parametrize("params, shape", TRAINED.values(), ids=list(TRAINED))
def test_every_choice_builds_and_trains_one_step(params, shape):
    model = build_model(ModelConfig(**params), shape, 3)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    before = [w.copy() for w in model.get_weights()]
    x, y = tiny_batch(shape)
    loss = model.train_on_batch(x[:2], y[:2])
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_saved_model_loads_without_our_code_and_predicts_the_same(tmp_path):
    """Batch norm, leaky ReLU, max-norm and L2 (notebook 000's model 7, leaky): only built-in Keras objects."""
    model = build_model(ModelConfig(name="nb000_model7", activation="leaky_relu"), CIFAR, 10)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = tiny_batch(CIFAR, classes=10)
    model.fit(x, y, batch_size=2, epochs=1, steps_per_epoch=1, verbose=0)  # graph mode, as the train stage
    model.save(tmp_path / "model.keras")
    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        saved = json.loads(archive.read("config.json"))
    objects = set()  # (module, class) of every serialised object: layers, regularizers, constraints

    def collect(node):
        if isinstance(node, dict):
            if "class_name" in node and "module" in node:
                objects.add((node["module"], node["class_name"]))
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(saved)
    assert all(module.split(".")[0] == "keras" for module, _ in objects), objects
    assert {"MaxNorm", "L2", "LeakyReLU", "BatchNormalization"} <= {name for _, name in objects}
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(np.asarray(reloaded(x, training=False)), np.asarray(model(x, training=False)),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "params, shape, expected",
    [
        (dict(name="vgg16"), FASHION, "model.name = 'vgg16' needs images of at least 32x32 pixels, got 28x28"),
        (dict(name="alexnet"), (24, 24, 1), "needs images of at least 25x25 pixels, got 24x24"),
        (dict(filters=[[4]] * 4, kernel_sizes=[3] * 4), (8, 8, 1), "at least 16x16 pixels, got 8x8 (at the pooling "
                                                                     "of block 4 the feature map is down to 1 px"),
        (dict(name="resnet", resnet=dict(max_pool=True)), FASHION, "at least 33x33 pixels, got 28x28"),
        (dict(name="nb000_model6"), (32, 31, 3), "at least 32x32 pixels, got 32x31 (at conv_head layer 1"),
    ],
)
def test_too_small_input_fails_before_keras_naming_the_minimum(params, shape, expected):
    with pytest.raises(PipelineError) as info:
        build_model(ModelConfig(**params), shape, 5)
    message = str(info.value)
    assert expected in message and "set preprocess.image_size to [" in message and "\n" not in message


@pytest.mark.parametrize(
    "params", [dict(), dict(name="lenet5"), dict(name="nb000_model6"), dict(name="nb002_exp6"),
               dict(name="resnet", resnet=dict(blocks=2, sub_blocks=1, filters=4, max_pool=True))],
    ids=["cnn", "lenet5", "nb000_model6", "nb002_exp6", "resnet"],
)
def test_minimum_input_size_is_exactly_where_keras_stops(params, monkeypatch):
    cfg = ModelConfig(**params)
    height, width = minimum_input_size(cfg)
    build_model(cfg, (height, width, 1), 3)
    monkeypatch.setattr(models, "check_input_size", lambda cfg, shape: None)
    for shape in [(height - 1, width, 1), (height, width - 1, 1)]:
        with pytest.raises(ValueError):
            build_model(cfg, shape, 3)


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"name": "vgg61"}, "model.name = 'vgg61': not a model; expected one of cnn, "),
        ({"name": "vgg61"}, "did you mean 'vgg16'?"),
        ({"activation": "relux"}, "model.activation = 'relux' is not allowed; expected one of 'relu', 'leaky_relu', "
                                  "'elu' or 'tanh'; did you mean 'relu'?"),
        ({"padding": "smae"}, "model.padding = 'smae': 'smae' is not allowed; expected 'same' or 'valid'; did you mean"),
        ({"pool": "mean"}, "model.pool = 'mean' is not allowed; expected one of 'max' or 'average'"),
        ({"dropout": 1.5}, "model.dropout = 1.5: expected dropout rates from 0 (none) to below 1"),
        ({"conv_dropout": [[0.1, 0.2, 0.3], 0]}, "model.conv_dropout's block 1 has 3 entries but model.filters' block 1 "
                                                 "has 1 conv;"),
        ({"filters": [[32, 32], [64]], "conv_dropout": [[0.1, 0.2, 0.3], 0]},
         "model.conv_dropout's block 1 has 3 entries but model.filters' block 1 has 2 convs;"),
        ({"dropout": [0.1, 0.2, 0.3]}, "model.dropout has 3 entries but model.filters has 2 conv blocks"),
        ({"dense_l2": [0.1, 0.2]}, "model.dense_l2 has 2 entries but model.dense has 1 layer;"),
        ({"batch_norm": "yes"}, "model.batch_norm = 'yes': expected true or false"),
        ({"l2": -1}, "model.l2 = -1: expected non-negative numbers"),
        ({"max_norm": -2}, "model.max_norm = -2: Input should be greater than or equal to 0"),
        ({"pool_size": 0}, "model.pool_size = 0: expected positive integers"),
        ({"conv_head": [{"filters": 8, "kernel_size": 2, "stride": 2}]}, "layer 1 has unknown key 'stride'; did you "
                                                                         "mean 'strides'?"),
        ({"conv_head": [{"filters": 8}]}, "model.conv_head.kernel_size is required"),
        ({"name": "resnet", "filters": [[8]]}, "model.filters does not apply to model.name = 'resnet'; its keys are "),
        ({"resnet": {"blocks": 3}}, "model.resnet does not apply to model.name = 'cnn_fast'"),
        ({"name": "resnet", "l2": [0.1]}, "model.l2: expected one value for model.name = 'resnet', not a list"),
        ({"name": "resnet", "resnet": {"blocks": 0}}, "model.resnet.blocks = 0: Input should be greater than or equal "),
        ({"filts": [[8]]}, "unknown key 'model.filts'; did you mean 'model.filters'?"),
    ],
)
def test_bad_model_params_fail_in_one_line_naming_the_key(model, expected):
    with pytest.raises(ConfigError) as info:
        validate({"model": model})
    assert expected in str(info.value) and "\n" not in str(info.value)
