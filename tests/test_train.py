"""train_model on tiny data: every optimizer, schedule, loss, callback and augmentation param builds and trains.

60 random 8x8 images of 3 classes (48 train, 12 val) and conftest's tiny CNN: each fit is one to three
epochs of a few steps, so the file runs in about a minute on 2 cores, most of it TensorFlow's import.
"""

from __future__ import annotations

import copy
import io
import json
import math
import sys

import keras
import numpy as np
import pytest

from pipeline import interrupts
from pipeline.config import Config, ConfigError, PreprocessConfig, apply_overrides, validate
from pipeline.errors import PipelineError
from pipeline.evaluate import predict_probs
from pipeline.fetch import RawDataset
from pipeline.models import raw_input_model
from pipeline.preprocess import preprocess
from pipeline.train import (
    Backup,
    augmentation_samples,
    build_augmenter,
    build_callbacks,
    build_optimizer,
    even_batches,
    fuse_batch_norm,
    image_batches,
    learning_rate_schedule,
    make_dataset,
    totals,
    train_model,
)
from tests.conftest import TINY_PARAMS, merge
from tests.test_interrupts import drop_interrupt

CLASSES = 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 8, 8, 1), dtype="uint8")
    y = np.arange(60, dtype="int64") % CLASSES
    raw = RawDataset(class_names=[f"c{i}" for i in range(CLASSES)], train_x=x, train_y=y)
    return preprocess(raw, PreprocessConfig(), seed=0)


def config(*overrides: str) -> Config:
    """conftest's tiny params, 1 epoch of 3 batches of 16, with `key=value` overrides applied as the CLI does."""
    tree = copy.deepcopy(merge(TINY_PARAMS, {"train": {"epochs": 1, "batch_size": 16}}))
    return validate(apply_overrides(tree, list(overrides)))


def one_hot(cfg: Config, data) -> int | None:
    """The label form the trained network's loss takes: one-hot under label smoothing (the default)."""
    return len(data.class_names) if cfg.train.label_smoothing else None


def rate(schedule, step: int) -> float:
    return float(keras.ops.convert_to_numpy(schedule(step)))


# --------------------------------------------------------------------------- defaults


def test_defaults_are_adam_at_3e3_with_cosine_decay_to_zero_label_smoothing_no_plateau_or_augmentation():
    cfg = Config()
    optimizer = build_optimizer(cfg.optimizer)
    settings = optimizer.get_config()
    assert type(optimizer) is keras.optimizers.Adam and settings["learning_rate"] == pytest.approx(3e-3)
    assert (settings["beta_1"], settings["beta_2"], settings["epsilon"]) == (0.9, 0.999, 1e-7)  # Keras' own
    assert settings["clipnorm"] is settings["clipvalue"] is settings["global_clipnorm"] is None
    schedule = learning_rate_schedule(cfg.optimizer, steps_per_epoch=400, epochs=5)
    assert rate(schedule, 0) == pytest.approx(3e-3) and rate(schedule, 2000) == pytest.approx(0.0)
    assert rate(schedule, 1000) == pytest.approx(1.5e-3)  # half way down a cosine
    assert cfg.train.label_smoothing == 0.1 and cfg.train.initial_model is None
    assert build_augmenter(cfg.augment, cfg.seed) is None and not cfg.augment.enabled
    (early,) = build_callbacks(cfg.callbacks)  # no plateau reduction: the schedule lowers the rate
    assert (early.monitor, early.patience, early.restore_best_weights) == ("val_loss", 3, True)
    plateau = cfg.callbacks.reduce_lr  # notebook 003's, when enabled
    assert (plateau.factor, plateau.patience, plateau.min_lr, plateau.min_delta) == (0.5, 2, 1e-5, 1e-4)
    assert not cfg.callbacks.checkpoint.enabled


# --------------------------------------------------------------------------- optimizers


OPTIMIZER_CASES = {
    "sgd": ({"momentum": 0.5, "nesterov": True, "clipnorm": 1.0}, "SGD"),
    "rmsprop": ({"rho": 0.8, "momentum": 0.1, "epsilon": 1e-6, "clipvalue": 0.5}, "RMSprop"),
    "adam": ({"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-8, "global_clipnorm": 2.0}, "Adam"),
    "adamax": ({"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1.0}, "Adamax"),
    "adadelta": ({"rho": 0.9, "epsilon": 1e-6}, "Adadelta"),
    "adagrad": ({"initial_accumulator_value": 0.2, "epsilon": 1e-6}, "Adagrad"),
    "nadam": ({"beta_1": 0.85, "beta_2": 0.995}, "Nadam"),
}


@pytest.mark.parametrize("name", list(OPTIMIZER_CASES))
def test_each_optimizer_takes_its_own_params_and_trains(data, name):
    params, keras_name = OPTIMIZER_CASES[name]
    overrides = [f"optimizer.{key}={value}" for key, value in params.items()]
    result = train_model(config(f"optimizer.name={name}", "optimizer.learning_rate=0.01", *overrides), data, verbose=0)
    optimizer = result.network.optimizer
    settings = optimizer.get_config()
    assert type(optimizer).__name__ == keras_name
    assert {key: settings[key] for key in params} == pytest.approx(params)
    assert int(optimizer.iterations.numpy()) == 3  # 48 images in batches of 16
    history = result.history
    assert len(history) == 1 and np.isfinite(history["loss"]).all()
    assert history["learning_rate"].tolist() == pytest.approx([0.01])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optimizer.momentum=0.9"], "optimizer.momentum = 0.9 is not a parameter of optimizer.name = 'adam'"),
        (["optimizer.name=sgd", "optimizer.epsilon=1e-08"], "optimizer.epsilon = 1e-08 is not a parameter of optimizer.name = 'sgd'"),
        (["optimizer.name=adagrad", "optimizer.rho=0.9"], "use it with rmsprop or adadelta"),
        (["optimizer.name=adamm"], "did you mean 'adam'?"),
        (["optimizer.schedule.name=constant", "optimizer.schedule.alpha=0.1"], "optimizer.schedule.alpha = 0.1 is not a parameter of optimizer.schedule.name = 'constant'"),
        (["optimizer.schedule.name=exponential", "optimizer.schedule.decay_rate=0.5"], "needs optimizer.schedule.decay_epochs"),
        (["optimizer.schedule.name=step", "optimizer.schedule.decay_rate=0.5"], "needs exactly one of"),
        (["optimizer.schedule.name=step", "optimizer.schedule.decay_rate=0.5", "optimizer.schedule.boundaries=[4, 2]"],
         "boundaries = [4, 2]: expected increasing epoch numbers"),
        (["optimizer.decay=1e-6"], "are two schedules"),  # with the default cosine schedule
        (["optimizer.clipnorm=1", "optimizer.global_clipnorm=1"], "Keras takes one of them"),
        (["callbacks.early_stopping.monitor=val_acc"], "did you mean 'val_accuracy'?"),  # Keras 2's name
        (["callbacks.checkpoint.mode=best"], "callbacks.checkpoint.mode = 'best' is not allowed"),
        (["train.label_smoothing=1"], "train.label_smoothing = 1: Input should be less than 1"),
        (["augment.flip=both"], "expected one of 'none', 'horizontal', 'vertical' or 'horizontal_and_vertical'"),
        (["augment.rotation_degrees=-5"], "augment.rotation_degrees = -5: Input should be greater than or equal to 0"),
    ],
)
def test_params_an_optimizer_schedule_or_callback_cannot_take_fail_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        config(*overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "overrides, expected",  # {step: rate / learning_rate}, with 10 steps an epoch and 4 epochs
    [
        (["optimizer.schedule.name=constant", "optimizer.decay=0.01"], {0: 1.0, 25: 1 / 1.25}),  # Keras 2: lr / (1 + decay * iterations)
        (["optimizer.schedule.name=exponential", "optimizer.schedule.decay_rate=0.5", "optimizer.schedule.decay_epochs=2"],
         {0: 1.0, 10: 0.5**0.5, 20: 0.5}),
        (["optimizer.schedule.name=step", "optimizer.schedule.decay_rate=0.1", "optimizer.schedule.decay_epochs=1"],
         {9: 1.0, 10: 0.1, 25: 0.01}),
        (["optimizer.schedule.name=step", "optimizer.schedule.decay_rate=0.5", "optimizer.schedule.boundaries=[1, 3]"],
         {9: 1.0, 10: 0.5, 29: 0.5, 30: 0.25}),
        (["optimizer.schedule.name=cosine"], {0: 1.0, 20: 0.5, 40: 0.0}),
        (["optimizer.schedule.name=cosine", "optimizer.schedule.warmup_epochs=1", "optimizer.schedule.alpha=0.1"],
         {0: 0.0, 5: 0.5, 10: 1.0, 25: 0.55, 40: 0.1}),  # decays over the 3 epochs after the warm-up
    ],
)
def test_schedules_give_the_documented_rates(overrides, expected):
    cfg = config("optimizer.learning_rate=0.1", *overrides)
    schedule = learning_rate_schedule(cfg.optimizer, steps_per_epoch=10, epochs=4)
    assert {step: rate(schedule, step) / 0.1 for step in expected} == pytest.approx(expected, abs=1e-6)


def test_plateau_scales_the_schedule_and_the_rate_used_is_logged(data):
    # min_delta 100: no epoch after the first counts as better, so with patience 0 the rate drops after each
    cfg = config("optimizer.schedule.name=constant", "optimizer.name=sgd", "optimizer.learning_rate=0.1",
                 "optimizer.decay=0.1", "train.epochs=3",
                 "callbacks.reduce_lr.enabled=true", "callbacks.reduce_lr.patience=0",
                 "callbacks.reduce_lr.min_delta=100", "callbacks.reduce_lr.factor=0.5")
    result = train_model(cfg, data, verbose=0)
    expected = [0.1, 0.1 / (1 + 0.1 * 3), 0.5 * 0.1 / (1 + 0.1 * 6)]  # the rate at each epoch's first step
    assert result.history["learning_rate"].tolist() == pytest.approx(expected, rel=1e-5)
    json.dumps(result.network.optimizer.get_config())  # what train.main logs as optimizer.json


# --------------------------------------------------------------------------- loss and callbacks


def test_label_smoothing_trains_on_one_hot_labels_and_unlabeled_batches_still_work(data):
    result = train_model(config("train.label_smoothing=0.1"), data, verbose=0)
    loss = result.network.loss
    assert isinstance(loss, keras.losses.CategoricalCrossentropy) and loss.get_config()["label_smoothing"] == 0.1
    assert np.isfinite(result.history["loss"]).all()
    images, labels = next(iter(make_dataset(data.val_x, data.val_y, data.stats, 4, shuffle=False, num_classes=CLASSES)))
    assert labels.shape == (4, CLASSES) and np.array_equal(labels.numpy().argmax(1), data.val_y[:4])
    probs = predict_probs(result.network, data.val_x, data.stats)  # evaluate's path: make_dataset(x, None, ...)
    assert probs.shape == (len(data.val_x), CLASSES)


def test_checkpoint_keeps_the_best_epoch_and_reports_it(data):
    cfg = config("optimizer.learning_rate=0.05", "train.epochs=3", "callbacks.checkpoint.enabled=true")
    result = train_model(cfg, data, verbose=0)
    val_loss = result.history["val_loss"].to_numpy()
    assert result.restored_epoch == int(val_loss.argmin()) + 1
    val = make_dataset(data.val_x, data.val_y, data.stats, 16, shuffle=False, num_classes=one_hot(cfg, data))
    loss, _ = result.network.evaluate(val, verbose=0)
    assert loss == pytest.approx(val_loss.min(), rel=1e-5)  # the network holds the best epoch's weights
    assert totals(result, len(data.train_x))["restored_epoch"] == result.restored_epoch


def test_early_stopping_reports_the_stopped_and_restored_epochs(data):
    # min_delta 100: only the first epoch is an improvement, so patience 0 stops after the second
    cfg = config("train.epochs=5", "callbacks.early_stopping.enabled=true", "callbacks.early_stopping.patience=0",
                 "callbacks.early_stopping.min_delta=100")
    result = train_model(cfg, data, verbose=0)
    assert len(result.history) == 2 and (result.stopped_epoch, result.restored_epoch) == (2, 1)
    facts = totals(result, len(data.train_x))
    assert (facts["stopped_epoch"], facts["restored_epoch"], facts["epochs_run"]) == (2.0, 1.0, 2.0)


def test_initial_model_continues_from_a_saved_models_weights(data, tmp_path):
    first = train_model(config(), data, verbose=0)
    path = tmp_path / "model.keras"
    raw_input_model(first.network, data.stats).save(path)
    # as notebook 004: the same network, recompiled with a new optimizer and a far lower rate
    again = train_model(config(f"train.initial_model={path}", "optimizer.name=sgd", "optimizer.learning_rate=1e-9"),
                        data, verbose=0)
    for before, after in zip(first.network.get_weights(), again.network.get_weights()):
        np.testing.assert_allclose(after, before, atol=1e-6)
    with pytest.raises(PipelineError, match=r"does not match the one model.\* describes .*'dense1'"):
        train_model(config(f"train.initial_model={path}", "model.dense=[16]"), data, verbose=0)
    with pytest.raises(PipelineError, match="train.initial_model = .*nothing.keras': file not found"):
        train_model(config(f"train.initial_model={tmp_path / 'nothing.keras'}"), data, verbose=0)


# --------------------------------------------------------------------------- augmentation

AUGMENT = ["augment.flip=horizontal_and_vertical", "augment.translation=0.1", "augment.rotation_degrees=15",
           "augment.zoom=0.1", "augment.contrast=0.2"]


def test_augmentation_is_seeded_random_and_on_the_training_split_only(data):
    cfg = config(*AUGMENT)
    augmenter = build_augmenter(cfg.augment, seed=7)
    assert [type(layer).__name__ for layer in augmenter.layers] == [
        "RandomFlip", "RandomTranslation", "RandomRotation", "RandomZoom", "RandomContrast"]
    assert augmenter.layers[2].get_config()["factor"] == pytest.approx((-15 / 360, 15 / 360))  # turns

    def first_epoch(augment):
        ds = make_dataset(data.train_x, data.train_y, data.stats, 16, shuffle=True, seed=1, augment=augment)
        return [images.numpy() for images, _ in ds]

    same = first_epoch(build_augmenter(cfg.augment, seed=7)), first_epoch(build_augmenter(cfg.augment, seed=7))
    assert all(np.array_equal(a, b) for a, b in zip(*same))
    assert not any(np.array_equal(a, b) for a, b in zip(same[0], first_epoch(None)))

    result = train_model(cfg, data, verbose=0)
    val = make_dataset(data.val_x, data.val_y, data.stats, 16, shuffle=False, num_classes=one_hot(cfg, data))
    loss, _ = result.network.evaluate(val, verbose=0)
    assert loss == pytest.approx(result.history["val_loss"].iloc[-1], rel=1e-5)  # validation saw plain images


def test_augmentation_samples_are_a_png_grid_of_originals_and_variants(data):
    augmenter = build_augmenter(config(*AUGMENT).augment, seed=7)
    fig = augmentation_samples(data.train_x, data.train_y, augmenter, data.class_names)
    rows = min(8, len(data.train_x))
    assert len(fig.axes) == rows * 6
    originals, variants = fig.axes[0].images[0].get_array(), fig.axes[1].images[0].get_array()
    first = int(np.flatnonzero(data.train_y == 0)[0])
    assert np.array_equal(originals, data.train_x[first, ..., 0]) and not np.array_equal(originals, variants)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the notebooks, as params


NOTEBOOK_EXPERIMENTS = {
    # 000: SGD(lr=0.01, momentum=0.9, decay=lrate/epochs, nesterov=False), 25 epochs of batch 256
    "000 base": (["optimizer.schedule.name=constant", "optimizer.name=sgd", "optimizer.learning_rate=0.01", "optimizer.momentum=0.9",
                  "optimizer.nesterov=false", "optimizer.decay=0.0004", "train.epochs=25", "train.batch_size=256"],
                 "SGD", {"momentum": 0.9, "nesterov": False}),
    # 001 models 4-5: Adamax(lr=0.002, beta_1=0.9, beta_2=0.999, epsilon=1, decay=0.0)
    "001 adamax": (["optimizer.schedule.name=constant", "optimizer.name=adamax", "optimizer.learning_rate=0.002", "optimizer.beta_1=0.9",
                    "optimizer.beta_2=0.999", "optimizer.epsilon=1"], "Adamax", {"epsilon": 1.0}),
    # 003 models 5-7: SGD(lr=0.01, decay=1e-6, momentum=0.9, nesterov=True) + ReduceLROnPlateau(val_accuracy, 3, 0.5, 1e-5)
    "003 model 5": (["optimizer.schedule.name=constant", "optimizer.name=sgd", "optimizer.learning_rate=0.01", "optimizer.decay=1e-6",
                     "optimizer.momentum=0.9", "optimizer.nesterov=true", "callbacks.reduce_lr.enabled=true",
                     "callbacks.reduce_lr.monitor=val_accuracy", "callbacks.reduce_lr.patience=3", "callbacks.early_stopping.enabled=false"],
                    "SGD", {"nesterov": True}),
    # 003: Adadelta() with Keras 2's default rate of 1.0 (Keras 3's default is 0.001)
    "003 adadelta": (["optimizer.schedule.name=constant", "optimizer.name=adadelta", "optimizer.learning_rate=1.0"], "Adadelta", {"rho": 0.95}),
    # 004: RMSprop(lr=0.0001, decay=1e-6) with EarlyStopping(monitor='val_acc', patience=5)
    "004 baseline": (["optimizer.schedule.name=constant", "optimizer.name=rmsprop", "optimizer.learning_rate=1e-4", "optimizer.decay=1e-6",
                      "callbacks.early_stopping.monitor=val_accuracy", "callbacks.early_stopping.patience=5",
                      "callbacks.reduce_lr.enabled=false", "train.epochs=100", "train.batch_size=32"],
                     "RMSprop", {"rho": 0.9, "momentum": 0.0}),
}


@pytest.mark.parametrize("name", list(NOTEBOOK_EXPERIMENTS))
def test_notebook_experiments_are_params(name):
    overrides, keras_name, settings = NOTEBOOK_EXPERIMENTS[name]
    cfg = config(*overrides)
    schedule = learning_rate_schedule(cfg.optimizer, steps_per_epoch=100, epochs=cfg.train.epochs)
    optimizer = build_optimizer(cfg.optimizer, schedule)
    assert type(optimizer).__name__ == keras_name
    assert {key: optimizer.get_config()[key] for key in settings} == pytest.approx(settings)
    if cfg.optimizer.decay:
        assert rate(schedule, 1000) == pytest.approx(cfg.optimizer.learning_rate / (1 + cfg.optimizer.decay * 1000))
    assert math.isfinite(float(keras.ops.convert_to_numpy(optimizer.learning_rate)))


# --------------------------------------------------------------------------- determinism


def test_same_params_train_bitwise_identical(data):
    """seed + train.deterministic: per-epoch metrics and every weight are equal, not merely close."""
    cfg = config("train.epochs=2", "model.dense_dropout=0.5", "augment.flip=horizontal", "augment.rotation_degrees=10")
    first, second = (train_model(cfg, data, verbose=0) for _ in range(2))
    columns = ["loss", "accuracy", "val_loss", "val_accuracy"]
    assert first.history[columns].equals(second.history[columns])
    for a, b in zip(first.network.get_weights(), second.network.get_weights()):
        assert np.array_equal(a, b)
    other = train_model(config("train.epochs=2", "model.dense_dropout=0.5", "augment.flip=horizontal",
                               "augment.rotation_degrees=10", "seed=7"), data, verbose=0)
    assert not np.array_equal(other.network.get_weights()[0], first.network.get_weights()[0])


# --------------------------------------------------------------------------- resuming


def test_each_epochs_batches_depend_on_the_epoch_not_on_where_training_started(data):
    """Shuffling and augmentation draw from (seed, epoch, batch): a resumed training sees the same batches."""
    def batches(epochs):
        augmenter = build_augmenter(config(*AUGMENT).augment, seed=7)
        ds = make_dataset(data.train_x, data.train_y, data.stats, 16, shuffle=True, seed=1, augment=augmenter,
                          epochs=epochs)
        return [(images.numpy(), labels.numpy()) for images, labels in ds]

    per_epoch = math.ceil(len(data.train_x) / 16)
    both, second = batches((0, 2)), batches((1, 2))
    assert len(both) == 2 * per_epoch and len(second) == per_epoch
    for (images, labels), (images_again, labels_again) in zip(both[per_epoch:], second):
        assert np.array_equal(images, images_again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(both[0][1], both[per_epoch][1])  # each epoch has its own order


class Interrupt(Exception):
    pass


def interrupt_after(epoch: int):
    def on_epoch(row):
        if row["epoch"] == epoch:
            raise Interrupt
    return on_epoch


def test_a_ctrl_c_python_dropped_stops_the_training_before_its_next_step(data, monkeypatch):
    monkeypatch.setattr(interrupts, "_interrupted", False)
    monkeypatch.setattr(sys, "unraisablehook", interrupts._quiet_dropped_interrupt)  # as `pipeline` installs it
    reported = []

    def on_epoch(row):
        reported.append(row["epoch"])
        drop_interrupt()

    with pytest.raises(KeyboardInterrupt):
        train_model(config("train.epochs=3"), data, on_epoch=on_epoch, verbose=0)
    assert reported == [1]


RESUMES = {
    # min_delta 100: only epoch 1 improves, so the rate halves after every later epoch and early stopping
    # fires after epoch 4 (patience 3): both depend on counters and bests kept across the interruption
    "early stopping, plateau, dropout, augmentation": (
        ["train.epochs=5", "model.dense_dropout=0.5", "augment.flip=horizontal", "augment.rotation_degrees=10",
         "callbacks.early_stopping.enabled=true", "callbacks.early_stopping.patience=3",
         "callbacks.early_stopping.min_delta=100", "callbacks.reduce_lr.enabled=true",
         "callbacks.reduce_lr.patience=0", "callbacks.reduce_lr.min_delta=100"], 4),
    "checkpoint, plateau-scaled cosine schedule": (
        ["train.epochs=4", "optimizer.schedule.name=cosine", "callbacks.reduce_lr.enabled=true",
         "callbacks.reduce_lr.patience=0", "callbacks.reduce_lr.min_delta=100",
         "callbacks.checkpoint.enabled=true", "callbacks.checkpoint.monitor=val_accuracy"], None),
}


@pytest.mark.parametrize("name", list(RESUMES))
def test_interrupted_training_resumes_to_the_uninterrupted_result_bitwise(data, tmp_path, name):
    overrides, stopped = RESUMES[name]
    cfg = config(*overrides)
    whole = train_model(cfg, data, verbose=0)
    assert whole.stopped_epoch == stopped
    backup = Backup(tmp_path / "backup", key="this training")
    with pytest.raises(Interrupt):
        train_model(cfg, data, on_epoch=interrupt_after(2), verbose=0, backup=backup)
    assert backup.latest().state["epoch"] == 2
    reported = []
    resumed = train_model(cfg, data, on_epoch=reported.append, verbose=0, backup=backup)
    assert resumed.resumed_epoch == 2
    assert [row["epoch"] for row in reported] == whole.history["epoch"].tolist()  # restored rows again, then new
    columns = [column for column in whole.history.columns if column != "epoch_seconds"]
    assert resumed.history[columns].equals(whole.history[columns])
    assert (resumed.stopped_epoch, resumed.restored_epoch) == (whole.stopped_epoch, whole.restored_epoch)
    for a, b in zip(whole.network.get_weights(), resumed.network.get_weights()):
        assert np.array_equal(a, b)
    # a training that had ended (all epochs run, or stopped) resumes to its end without another epoch
    again = train_model(cfg, data, on_epoch=interrupt_after(len(whole.history) + 1), verbose=0, backup=backup)
    assert again.history[columns].equals(whole.history[columns])
    for a, b in zip(whole.network.get_weights(), again.network.get_weights()):
        assert np.array_equal(a, b)


def test_a_backup_of_another_training_is_discarded(data, tmp_path):
    cfg = config("train.epochs=1")
    train_model(cfg, data, verbose=0, backup=Backup(tmp_path / "backup", key="one"))
    assert Backup(tmp_path / "backup", key="one").latest().state["epoch"] == 1
    assert Backup(tmp_path / "backup", key="other").latest() is None
    assert not (tmp_path / "backup").exists()


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "float32"])
def test_precision_trains_in_that_policy_and_the_raw_model_matches_the_network(data, precision, tmp_path):
    """Mixed precision computes in bf16 with float32 weights; the saved raw-pixel wrapper runs the same network,
    so it predicts what the network predicts on the preprocessed arrays, before and after a save/load."""
    result = train_model(config(f"train.precision={precision}"), data, verbose=0)
    assert result.precision == precision and result.precision_reason == "train.precision"
    conv = result.network.get_layer("conv1_1")
    assert conv.compute_dtype == ("bfloat16" if precision == "mixed_bfloat16" else "float32")
    assert conv.kernel.dtype == "float32"
    assert result.network.output.dtype == "float32"  # the softmax stays float32 for a stable loss
    assert keras.mixed_precision.global_policy().name == "float32"  # restored for whatever runs next
    expected = predict_probs(result.network, data.val_x, data.stats)
    wrapper = raw_input_model(result.network, data.stats)
    assert np.array_equal(wrapper.predict(data.val_x, verbose=0), expected)
    wrapper.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert np.array_equal(loaded.predict(data.val_x, verbose=0), expected)


def test_auto_precision_says_why_and_picks_a_policy_keras_knows(data):
    from pipeline.hardware import POLICIES, cpu_info, resolve_precision

    policy, reason = resolve_precision("auto")
    assert policy in POLICIES and reason
    flags = cpu_info()["flags"]
    if "amx_bf16" in flags:
        assert policy == "mixed_bfloat16"
    elif "avx512_bf16" not in flags:
        assert policy == "float32" and "without" in reason
    assert train_model(config(), data, verbose=0).precision == policy  # auto is the default


def test_the_saved_model_loads_with_plain_keras_whatever_the_schedule(data, tmp_path):
    """A schedule scaled by the plateau callback (our ScaledSchedule) stays out of the saved model."""
    result = train_model(config("callbacks.reduce_lr.enabled=true"), data, verbose=0)
    assert type(result.network.optimizer.learning_rate).__name__ != "float"
    wrapper = raw_input_model(result.network, data.stats)
    assert wrapper.get_layer("network").name == "network" and not wrapper.get_layer("network").compiled
    wrapper.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert np.array_equal(loaded.predict(data.val_x, verbose=0), predict_probs(result.network, data.val_x, data.stats))


# --------------------------------------------------------------------------- fused batch norm


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_trains_as_keras_batch_norm_does(precision):
    """The fused kernel gives Keras' outputs, gradients and moving statistics, on conv (4-D) and dense (2-D)
    batch norm, and leaves inference and the layers' config alone."""
    import tensorflow as tf

    def network():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((6, 6, 3), name="image")
        x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
        x = keras.layers.BatchNormalization(momentum=0.9, name="bn_conv")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(5, name="dense")(x)
        x = keras.layers.BatchNormalization(center=False, name="bn_dense")(x)
        return keras.Model(inputs, keras.layers.Dense(2, dtype="float32", name="out")(x), name="net")

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        keras_net, fused_net = network(), network()
    finally:
        keras.mixed_precision.set_global_policy(before)
    assert fuse_batch_norm(fused_net) == 2
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, (8, 6, 6, 3)).astype("float32"))
    results = []
    for net in (keras_net, fused_net):
        with tf.GradientTape() as tape:
            y = net(x, training=True)
            loss = tf.reduce_sum(tf.square(tf.cast(y, "float32")))
        grads = tape.gradient(loss, net.trainable_variables)
        stats = [v.numpy() for v in net.non_trainable_variables]
        results.append((y.numpy(), [g.numpy() for g in grads], stats, net(x, training=False).numpy()))
    tolerance = {"float32": 1e-4, "mixed_bfloat16": 2e-2}[precision]
    (y0, g0, s0, i0), (y1, g1, s1, i1) = results
    np.testing.assert_allclose(y1, y0, rtol=tolerance, atol=tolerance)
    scale = max(np.abs(g).max() for g in g0)  # the conv's bias gradient is 0 up to rounding: batch norm cancels it
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * scale)
    for a, b in zip(s1, s0):  # moving mean and variance after one step
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(i1, i0, rtol=tolerance, atol=tolerance)
    assert fused_net.get_config() == keras_net.get_config()

    def op_types(net, training):
        graph = tf.function(lambda: net(x, training=training)).get_concrete_function().graph
        return {op.type for op in graph.get_operations()}

    assert "FusedBatchNormV3" in op_types(fused_net, True) and "FusedBatchNormV3" not in op_types(keras_net, True)
    assert "FusedBatchNormV3" not in op_types(fused_net, False)


# --------------------------------------------------------------------------- predict batches


@pytest.mark.parametrize("count, batch_size, expected", [
    (10_000, 1024, (1000, 0)), (12_000, 1024, (1000, 0)), (10_001, 1024, (1001, 9)), (5, 1024, (5, 0)),
    (2049, 1024, (683, 0)), (2050, 1024, (684, 2)), (0, 1024, (1024, 0)), (7, 1, (1, 0)),
])
def test_even_batches_are_of_one_size_with_less_padding_than_batches(count, batch_size, expected):
    size, padding = even_batches(count, batch_size)
    assert (size, padding) == expected
    batches = math.ceil((count + padding) / size)
    assert size <= batch_size and (count + padding) % size == 0 and batches == math.ceil(count / batch_size)
    assert padding < max(batches, 1)


def test_predict_labels_in_padded_batches_equal_the_model_on_each_image(data):
    """The raw-pixel model over 50 images in 4 batches of 13 (2 blank images padding the last) gives what it
    gives on every image at once, in order, with the padding's predictions dropped; one predict trace."""
    from pipeline.predict import predict_labels

    model = raw_input_model(train_model(config(), data, verbose=0).network, data.stats)
    images = np.concatenate([data.train_x, data.val_x])[:50]
    assert [len(b) for b in image_batches(images, 16)] == [13, 13, 13, 13]
    expected = np.asarray(model(images, training=False)).argmax(axis=1)
    assert np.array_equal(predict_labels(model, images, batch_size=16), expected)
    assert model.predict_function.experimental_get_tracing_count() == 1


def test_a_remembered_ctrl_c_stops_the_predict_and_evaluate_stages_before_their_next_batch(data, monkeypatch):
    """A Ctrl-C that came inside a database call (or that Python dropped) is raised before the next predict
    batch, not after the whole input: the predict stage's raw-pixel model and the evaluate stage's network."""
    from pipeline.predict import predict_labels

    network = train_model(config(), data, verbose=0).network
    model = raw_input_model(network, data.stats)
    images = np.concatenate([data.train_x, data.val_x])
    assert len(predict_labels(model, images, batch_size=16)) == len(images)  # no Ctrl-C: every batch
    monkeypatch.setattr(interrupts, "_interrupted", True)
    with pytest.raises(KeyboardInterrupt):
        predict_labels(model, images, batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        predict_probs(network, data.val_x, data.stats)


def test_logging_the_model_prints_no_progress_bar_and_leaves_keras_logging_on(tmp_path, capfd):
    # MLflow checks the input example by predicting it through the logged model, with Keras' default verbosity.
    import mlflow

    from pipeline.train import log_model

    model = keras.Sequential([keras.Input((8, 8, 1), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run():
        log_model(model, np.zeros((2, 8, 8, 1), dtype="uint8"))
    assert "\u2501" not in capfd.readouterr().out
    assert keras.utils.is_interactive_logging_enabled()
    (logged,) = mlflow.search_logged_models(output_format="list")
    assert logged.name == "model"


def test_keras_progress_off_restores_the_setting_it_found_even_on_an_error():
    from pipeline.train import keras_progress_off

    with pytest.raises(RuntimeError), keras_progress_off():
        assert not keras.utils.is_interactive_logging_enabled()
        raise RuntimeError("in the middle")
    assert keras.utils.is_interactive_logging_enabled()
    keras.utils.disable_interactive_logging()
    try:
        with keras_progress_off():
            pass
        assert not keras.utils.is_interactive_logging_enabled()  # off before: left off
    finally:
        keras.utils.enable_interactive_logging()
