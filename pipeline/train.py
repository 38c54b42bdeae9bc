"""Train stage: build the model and optimizer from params, fit through a tf.data pipeline.

Everything a notebook experiment changes is a param: the optimizer and its own
arguments, a learning-rate schedule, gradient clipping, label smoothing,
callbacks (early stopping, plateau reduction, best checkpoint), continuing
from a saved model, and on-the-fly augmentation of the training batches.

A killed training resumes after its last completed epoch (Backup, written
after every epoch beside the stage's output) and, with train.deterministic,
ends as if never interrupted: each epoch's shuffle order and augmentation
draws depend on (seed, epoch, batch) only, and the backup holds everything
else that decides what comes next (weights, seed generators, optimizer,
callbacks' counters and bests, the history so far).

train.distribute and train.device (pipeline/distribute.py) decide where it runs: the model, optimizer and
metrics are created under the strategy's scope, train.batch_size is the global batch, and with several
workers only the chief logs and writes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import interrupts
from pipeline.config import OPTIMIZER_PARAMS, AugmentConfig, CallbacksConfig, Config, OptimizerConfig
from pipeline.errors import PipelineError
from pipeline.preprocess import Prepared

log = logging.getLogger(__name__)

OPTIMIZERS = {  # optimizer.name -> keras.optimizers class name
    "sgd": "SGD",
    "rmsprop": "RMSprop",
    "adam": "Adam",
    "adamax": "Adamax",
    "adadelta": "Adadelta",
    "adagrad": "Adagrad",
    "nadam": "Nadam",
}
SAMPLE_ROWS = 8  # images in the augmentation sample grid (the first of each class, then the next ones)
SAMPLE_DRAWS = 5  # augmented versions of each, beside the original


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Python, NumPy and the backend's generators (keras.utils.set_random_seed seeds all three).

    `deterministic` turns on TensorFlow's op determinism, so that ops with a
    non-deterministic kernel either use a deterministic one or raise.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


PIPELINE_THREADS = 2  # batches prepared at once: a batch is one gather and one scaling, far cheaper than a step
PREFETCH_BATCHES = 2  # ready batches kept ahead of the training step


def make_dataset(x: np.ndarray, y: np.ndarray | None, stats: dict, batch_size: int, shuffle: bool, seed: int = 0,
                 *, num_classes: int | None = None, augment=None, epochs: tuple[int, int] = (0, 1)):
    """uint8 images batched, [augmented,] then normalised per batch with the preprocess statistics; prefetched.

    Images stay uint8 until the batch (4x less memory traffic than float32 arrays).
    shuffle: the training split: one pass for each epoch in range(*epochs), each in an order drawn from
    (seed, epoch) alone, so that epoch k's batches are the same whether the training started at epoch 0 or
    resumed at k. Without shuffle: one pass in order (`epochs` is ignored).
    num_classes: turn the labels into one-hot vectors of that length (what label smoothing needs);
    None keeps class indices. augment: a Keras layer given each batch as float32 pixel values
    (0..255) in training mode, before normalisation; for the training split only. Its random draws
    for a batch are seeded from (each layer's seed, epoch, batch number), for the same reason.
    """
    import tensorflow as tf

    from pipeline.models import normalizer

    norm = normalizer(stats)
    count, batches = len(x), math.ceil(len(x) / batch_size)
    pixels = tf.constant(x)
    labels = None if y is None else tf.constant(y)

    def epoch_batches(epoch):  # -> (batch number counted from epoch 0, the batch's row indices)
        order = tf.range(count, dtype="int64")
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=tf.stack([tf.constant(seed, "int64"), epoch]))
        rows = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return rows.map(lambda number, indices: (epoch * batches + number, indices))

    if shuffle:  # the count of batches is then unknown to tf.data: fit is given steps_per_epoch
        ds = tf.data.Dataset.range(*epochs).flat_map(epoch_batches)
    else:  # a known count of batches, as evaluate and predict expect
        ds = epoch_batches(tf.constant(0, "int64"))
    reseed = _reseed_augmenter(augment)

    def load(number, indices):
        images = tf.gather(pixels, indices)
        if augment is not None:
            with tf.control_dependencies(reseed(number)):  # the draws below read the generators' new state
                images = augment(tf.cast(images, "float32"), training=True)
        images = norm(images)
        if labels is None:
            return images
        batch_labels = tf.gather(labels, indices)
        return images, batch_labels if num_classes is None else tf.one_hot(batch_labels, num_classes)

    # Not parallel with augmentation: a batch resets the layers' shared seed generators, then draws from them.
    ds = ds.map(load, num_parallel_calls=None if augment is not None else PIPELINE_THREADS)
    # Under a tf.distribute strategy: split every global batch into per-replica slices (there are no files
    # to shard by; pipeline/distribute.py says what this gives). Ignored without one.
    options = _pipeline_options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(PREFETCH_BATCHES)


def _pipeline_options():
    """tf.data options for every pipeline of ours: no autotuning. Deleting an autotuned iterator waits for
    tf.data's model thread to wake from its optimisation sleep (TF 2.21), which left the process idle for
    up to a minute at the end of fit, evaluate or predict (seen: 16-60 s in 4 of 10 trainings). A gather
    and a scaling per batch need no tuning."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def image_batches(images: np.ndarray, batch_size: int):
    """Raw images in batches, in order, for the raw-pixel model's predict: Keras' own adapter would autotune
    (see make_dataset). The batches are of one size (`even_batches`), the last one padded with blank images:
    drop the predictions past len(images)."""
    import tensorflow as tf

    size, padding = even_batches(len(images), batch_size)
    ds = tf.data.Dataset.from_tensor_slices(images)
    if padding:
        ds = ds.concatenate(tf.data.Dataset.from_tensor_slices(np.zeros((padding, *images.shape[1:]), images.dtype)))
    return ds.batch(size).with_options(_pipeline_options()).prefetch(PREFETCH_BATCHES)


def even_batches(count: int, batch_size: int) -> tuple[int, int]:
    """(size, padding): ceil(count / batch_size) batches of one size, at most batch_size, of which the last
    holds `padding` (fewer than the batches) blank images. Keras' predict traces its function again for a
    last batch of another shape, a second graph optimisation: 1.66-1.79 s for 10,000 images in batches of
    1,024 against 1.52-1.58 s in batches of 1,000 (the default network, 2-core Xeon)."""
    if count == 0:
        return batch_size, 0
    batches = math.ceil(count / batch_size)
    size = math.ceil(count / batches)
    return size, size * batches - count


AUGMENT_DRAWS_PER_BATCH = 1024  # room in a seed generator's counter for one batch's draws (each layer takes 1-3)


def _reseed_augmenter(augment):
    """A function of the batch number that sets every seed generator of `augment` to [its seed, number * 1024].

    Keras' seed generators count their draws, so a layer's draws depend on how many batches it saw before;
    resetting them per batch makes them depend on the batch number only (needed to resume a training).
    """
    import tensorflow as tf

    if augment is None:
        return lambda number: []
    generators = [v for v in augment.variables if "seed_generator_state" in v.path]
    # each state starts as [seed, 0]: the seed the layer was built with
    bases = [int(v.numpy()[0]) for v in generators]

    def reseed(number):
        return [v.value.assign(tf.cast(tf.stack([tf.constant(base, "int64"), number * AUGMENT_DRAWS_PER_BATCH]),
                                       v.dtype))
                for v, base in zip(generators, bases)]

    return reseed


def build_augmenter(cfg: AugmentConfig, seed: int):
    """The augmentation layers augment.* asks for, in a keras.Sequential; None when all are off.

    Each layer has its own seed derived from `seed`, so a run's augmentations are reproducible.
    """
    import keras
    from keras import layers

    chosen = []
    if cfg.flip != "none":
        chosen.append(layers.RandomFlip(cfg.flip, seed=seed + 1))
    if cfg.translation:
        chosen.append(layers.RandomTranslation(cfg.translation, cfg.translation, fill_mode=cfg.fill_mode,
                                               seed=seed + 2))
    if cfg.rotation_degrees:  # Keras takes the angle as a fraction of a full turn
        chosen.append(layers.RandomRotation(cfg.rotation_degrees / 360.0, fill_mode=cfg.fill_mode, seed=seed + 3))
    if cfg.zoom:
        chosen.append(layers.RandomZoom(cfg.zoom, fill_mode=cfg.fill_mode, seed=seed + 4))
    if cfg.contrast:
        chosen.append(layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed + 5))
    return keras.Sequential(chosen, name="augment") if chosen else None


def learning_rate_schedule(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int):
    """The keras.optimizers.schedules object for optimizer.decay / optimizer.schedule; None for a constant rate.

    Schedules count optimizer steps (batches); the epochs in params are converted with `steps_per_epoch`.
    """
    from keras.optimizers import schedules

    rate, schedule = cfg.learning_rate, cfg.schedule

    def steps(epoch_count: float) -> int:
        return max(1, round(epoch_count * steps_per_epoch))

    if cfg.decay:  # Keras 2's per-iteration decay: rate / (1 + decay * iterations)
        return schedules.InverseTimeDecay(rate, decay_steps=1, decay_rate=cfg.decay)
    if schedule.name == "exponential":
        return schedules.ExponentialDecay(rate, steps(schedule.decay_epochs), schedule.decay_rate)
    if schedule.name == "step" and schedule.boundaries:
        # PiecewiseConstantDecay keeps values[i] up to and including boundaries[i]: the new rate starts
        # with the first step of the epoch after each boundary epoch.
        boundaries = [epoch * steps_per_epoch - 1 for epoch in schedule.boundaries]
        values = [rate * schedule.decay_rate**i for i in range(len(boundaries) + 1)]
        return schedules.PiecewiseConstantDecay(boundaries, values)
    if schedule.name == "step":
        return schedules.ExponentialDecay(rate, steps(schedule.decay_epochs), schedule.decay_rate, staircase=True)
    if schedule.name == "cosine":
        alpha = 0.0 if schedule.alpha is None else schedule.alpha
        warmup = steps(schedule.warmup_epochs) if schedule.warmup_epochs else 0
        length = steps(schedule.decay_epochs) if schedule.decay_epochs else max(1, epochs * steps_per_epoch - warmup)
        if warmup:
            return schedules.CosineDecay(0.0, length, alpha=alpha, warmup_target=rate, warmup_steps=warmup)
        return schedules.CosineDecay(rate, length, alpha=alpha)
    return None


def build_optimizer(cfg: OptimizerConfig, learning_rate=None):
    """The Keras optimizer optimizer.* names, at `learning_rate` (a float or a schedule; default: cfg's rate).

    Only the params given (not null) are passed, so the others keep Keras' defaults.
    """
    import keras

    if cfg.name not in OPTIMIZERS:  # config validation keeps this unreachable
        raise PipelineError(f"optimizer.name = {cfg.name!r} has no builder")
    own = {key: getattr(cfg, key) for key in OPTIMIZER_PARAMS[cfg.name] if getattr(cfg, key) is not None}
    clipping = {key: getattr(cfg, key) for key in ("clipnorm", "clipvalue", "global_clipnorm")
                if getattr(cfg, key) is not None}
    rate = cfg.learning_rate if learning_rate is None else learning_rate
    return getattr(keras.optimizers, OPTIMIZERS[cfg.name])(rate, **own, **clipping)


def interrupt_checks() -> list:
    """Callbacks for `predict` on a long input: a Ctrl-C that Python dropped, or that came during a database
    call, is raised before the next batch rather than when the whole prediction ends."""
    return [_keras_classes().RaiseIfInterrupted()]


@functools.cache
def _keras_classes():
    """Keras subclasses, defined on first use so that importing this module does not import Keras."""
    import keras

    class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
        """`schedule` times a factor that ReduceLROnPlateau lowers: Keras' callback cannot set a schedule's rate.

        As with Keras 2's `decay`, the plateau scales the base rate (optimizer.learning_rate) and the
        schedule's shape applies on top; min_lr bounds that base rate.
        """

        def __init__(self, schedule, base_rate: float):
            super().__init__()
            self.schedule = schedule
            self.base_rate = float(base_rate)
            self.scale = keras.Variable(1.0, trainable=False, name="plateau_scale")

        def __call__(self, step):
            return keras.ops.multiply(self.schedule(step), keras.ops.cast(self.scale, "float32"))

        def get_config(self):
            return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                    "base_rate": self.base_rate, "scale": float(self.scale.numpy())}

    class ReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
        """Keras' callback; with a ScaledSchedule it lowers the schedule's factor instead of the rate."""

        def __init__(self, scaled: ScaledSchedule, **kwargs):
            super().__init__(**kwargs)
            self.scaled = scaled

        # Keras 3.15's private hook for one optimizer. Were it renamed, Keras' own code would try to set the
        # schedule-driven rate and fail loudly (TypeError), not silently; tests/test_train.py checks the scaling.
        def _reduce_optimizer_lr(self, optimizer, epoch, name=""):
            base = self.scaled.base_rate * float(self.scaled.scale.numpy())
            if base <= np.float32(self.min_lr):
                return False
            new_base = max(base * self.factor, self.min_lr)
            self.scaled.scale.assign(new_base / self.scaled.base_rate)
            return True

    class BestCheckpoint(keras.callbacks.ModelCheckpoint):
        """ModelCheckpoint(save_best_only) that also remembers the epoch (1-based) it saved last."""

        best_epoch: int | None = None

        def on_epoch_end(self, epoch, logs=None):
            before = self.best
            super().on_epoch_end(epoch, logs)
            if self.best is not before:
                self.best_epoch = epoch + 1

    class RaiseIfInterrupted(keras.callbacks.Callback):
        """Raises, before the next training, validation or prediction step, a Ctrl-C that was only remembered
        (one that came during a database call) or whose KeyboardInterrupt Python dropped.

        The batch-begin hooks run in the loop's thread; Keras dispatches batch-end ones to a thread pool.
        """

        def on_train_batch_begin(self, batch, logs=None):
            interrupts.raise_if_interrupted()

        def on_test_batch_begin(self, batch, logs=None):
            interrupts.raise_if_interrupted()

        def on_predict_batch_begin(self, batch, logs=None):
            interrupts.raise_if_interrupted()

    class BackupState(keras.callbacks.Callback):
        """Puts back the callbacks' state when fit begins; after every epoch, writes the training's state to a Backup.

        It comes after the callbacks whose state it keeps: their on_train_begin (which resets them) runs
        before it, and their on_epoch_end decisions (a lower rate, a new best, a stop) are in what it saves.
        """

        def __init__(self, backup, snapshot, stateful: list, variables: list, scaled, recorder):
            super().__init__()
            self.backup, self.snapshot, self.stateful, self.variables = backup, snapshot, stateful, variables
            self.scaled, self.recorder = scaled, recorder
            self.seconds = snapshot.state["train_seconds"] if snapshot is not None else 0.0
            self._start = 0.0

        def on_train_begin(self, logs=None):
            self._start = time.perf_counter()
            if self.snapshot is None:
                return
            saved = self.snapshot.state["callbacks"]
            for index, callback in enumerate(self.stateful):
                for name, value in saved.get(str(index), {}).items():
                    setattr(callback, name, _decode(value))
            if (self.snapshot.folder / "early_stopping.npz").is_file():
                best = _load_arrays(self.snapshot.folder / "early_stopping.npz")
                for callback in self.stateful:
                    if isinstance(callback, keras.callbacks.EarlyStopping):
                        callback.best_weights = best

        def on_epoch_end(self, epoch, logs=None):
            arrays = {"variables": [keras.ops.convert_to_numpy(v) for v in self.variables + self.model.optimizer.variables]}
            files = {}
            for callback in self.stateful:
                if isinstance(callback, keras.callbacks.EarlyStopping) and callback.best_weights is not None:
                    arrays["early_stopping"] = callback.best_weights
                if isinstance(callback, keras.callbacks.ModelCheckpoint) and Path(callback.filepath).is_file():
                    files["best.weights.h5"] = Path(callback.filepath)
            now = time.perf_counter()
            self.seconds += now - self._start
            self._start = now
            state = {
                "epoch": epoch + 1,
                "stop": bool(self.model.stop_training),
                "rows": self.recorder.rows,
                "train_seconds": self.seconds,
                "callbacks": {str(i): {name: _encode(getattr(callback, name)) for name in _state_names(callback)}
                              for i, callback in enumerate(self.stateful)},
                "scale": None if self.scaled is None else float(self.scaled.scale.numpy()),
            }
            self.backup.save(epoch + 1, state, arrays, files)

    return SimpleNamespace(ScaledSchedule=ScaledSchedule, ReduceLROnPlateau=ReduceLROnPlateau,
                           BestCheckpoint=BestCheckpoint, BackupState=BackupState,
                           RaiseIfInterrupted=RaiseIfInterrupted)


def _state_names(callback) -> tuple[str, ...]:
    """The attributes of CALLBACK_STATE that `callback`'s Keras class (or a subclass of it) has."""
    for base in type(callback).__mro__:
        if base.__name__ in CALLBACK_STATE:
            return CALLBACK_STATE[base.__name__]
    return ()


def build_callbacks(cfg: CallbacksConfig, scaled_schedule=None) -> list:
    """EarlyStopping and ReduceLROnPlateau as callbacks.* says (the checkpoint is train_model's own).

    scaled_schedule: the ScaledSchedule the optimizer runs on, which ReduceLROnPlateau then scales.
    """
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
        settings = dict(monitor=rl.monitor, mode=rl.mode, factor=rl.factor, patience=rl.patience,
                        min_delta=rl.min_delta, cooldown=rl.cooldown, min_lr=rl.min_lr)
        if scaled_schedule is None:
            callbacks.append(keras.callbacks.ReduceLROnPlateau(**settings))
        else:
            callbacks.append(_keras_classes().ReduceLROnPlateau(scaled_schedule, **settings))
    return callbacks


def load_initial_weights(network, path: str) -> None:
    """Copy into `network`, layer by layer, the weights of the network inside a model.keras the train stage saved.

    The layers with weights must match by name and shape: the file's network must be the one
    model.* describes for this data, so that the params logged are those of the network trained.
    """
    import keras

    where = f"train.initial_model = {path!r}"
    if not Path(path).is_file():
        raise PipelineError(f"{where}: file not found; expected a model.keras saved by the train stage "
                            "(a relative path is from the repository root)")
    try:
        saved = keras.models.load_model(path, compile=False)
    except Exception as exc:  # a corrupt or foreign file fails in any of Keras' or h5py's ways
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"{where}: cannot be loaded as a Keras model ({first})") from None
    try:
        saved = saved.get_layer("network")
    except ValueError:
        raise PipelineError(f"{where}: has no layer named 'network'; expected the raw-pixel model "
                            "that the train stage saves") from None
    here = {layer.name: layer for layer in network.layers if layer.weights}
    there = {layer.name: layer for layer in saved.layers if layer.weights}
    problem = None
    if here.keys() != there.keys():
        missing, extra = sorted(set(here) - set(there)), sorted(set(there) - set(here))
        problem = (f"layers {missing} are missing from it" if missing else "") + (
            ("; " if missing else "") + f"it has extra layers {extra}" if extra else "")
    else:
        for name, layer in here.items():
            shapes = [tuple(w.shape) for w in layer.weights]
            saved_shapes = [tuple(w.shape) for w in there[name].weights]
            if shapes != saved_shapes:
                problem = f"layer {name!r} has weights of shapes {saved_shapes} in the file, {shapes} here"
                break
    if problem:
        raise PipelineError(f"{where}: its network does not match the one model.* describes for this data "
                            f"({problem}); set model.* and preprocess.* as for the run that saved it")
    for name, layer in here.items():
        layer.set_weights(there[name].get_weights())


@dataclass
class TrainResult:
    network: object  # keras.Model on normalised inputs
    history: pd.DataFrame  # one row per epoch: epoch, loss, accuracy, val_loss, val_accuracy, learning_rate, epoch_seconds
    train_seconds: float
    stopped_epoch: int | None  # epoch (1-based) at which early stopping fired, None if it did not
    restored_epoch: int | None = None  # epoch (1-based) whose weights `network` holds; None: the last one
    resumed_epoch: int = 0  # how many epochs came from a backup (trained before a kill) rather than from this call
    precision: str = "float32"  # the Keras mixed-precision policy it trained under (train.precision resolved)
    precision_reason: str = ""  # why: the setting, or what `auto` found on this machine
    distribute: str = "none"  # train.distribute
    strategy: str = ""  # the tf.distribute strategy's class name (MultiWorkerMirroredStrategy's is CollectiveAllReduceStrategy)
    device: str = "cpu"  # what the replicas ran on: gpu or cpu (train.device resolved)
    replicas: int = 1  # in all, over every worker; each took train.batch_size / replicas images a step
    workers: int = 1


# Callback attributes that decide what a training does next; Keras resets them in on_train_begin.
CALLBACK_STATE = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "cooldown_counter", "best"),
    "ModelCheckpoint": ("best", "best_epoch"),
}


def resume_folder(out_dir) -> Path:
    """Where the train stage output `out_dir` keeps its backup: a hidden sibling, because DVC deletes a
    stage's outputs before it runs the stage again, and the stage writes them through a temporary folder."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.resume"


def resume_key(cfg: Config, data: Prepared) -> str:
    """sha256 of everything that decides a training: the params (but mlflow.* and predict.*), the prepared
    arrays and statistics, the initial model's bytes, this package's code and the library versions."""
    from importlib.metadata import version

    from pipeline.files import sha256_file

    digest = hashlib.sha256()
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("mlflow", "predict")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for array in (data.train_x, data.train_y, data.val_x, data.val_y):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(data.stats, sort_keys=True).encode())
    if cfg.train.initial_model and Path(cfg.train.initial_model).is_file():
        digest.update(sha256_file(cfg.train.initial_model).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    for package in ("tensorflow", "keras", "numpy"):
        digest.update(f"{package}=={version(package)}".encode())
    return digest.hexdigest()


@dataclass
class Snapshot:
    folder: Path  # epoch-NNNNN/: state.json, variables.npz[, early_stopping.npz][, best.weights.h5]
    state: dict  # epoch (completed epochs), stop, rows, callbacks, scale, train_seconds, key, extra


class Backup:
    """A training's state after its last completed epoch, on disk, so that a killed training resumes there.

    `folder` holds one snapshot `epoch-NNNNN/` per completed epoch, each written whole under a temporary
    name and then renamed (a kill mid-write leaves the previous one); older ones are deleted once the new
    one is in place. Each snapshot carries `key` (resume_key): a backup of another training is discarded.
    `extra` (the MLflow run id) is stored with every snapshot. `readonly`: a multi-worker training's
    non-chief workers read the chief's backup (on a shared filesystem) to resume with it, and never write.
    """

    def __init__(self, folder, key: str, extra: dict | None = None, readonly: bool = False):
        self.folder, self.key, self.extra, self.readonly = Path(folder), key, dict(extra or {}), readonly

    def latest(self) -> Snapshot | None:
        """The newest complete snapshot of this training; None (and the folder removed) if it holds another's."""
        snapshots = sorted(self.folder.glob("epoch-*/state.json")) if self.folder.is_dir() else []
        if not snapshots:
            return None
        try:
            state = json.loads(snapshots[-1].read_text())
        except (OSError, ValueError):  # renamed into place whole, so only a damaged disk gets here
            state = {}
        if state.get("key") != self.key:
            if not self.readonly:
                log.info("train: discarding %s, the backup of a training with other params, data or code",
                         self.folder)
                shutil.rmtree(self.folder, ignore_errors=True)
            return None
        return Snapshot(snapshots[-1].parent, state)

    def save(self, epoch: int, state: dict, arrays: dict[str, list], files: dict[str, Path]) -> None:
        """Write snapshot `epoch`: state.json, one .npz per entry of `arrays`, copies of `files`; drop older ones."""
        if self.readonly:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".epoch-", suffix=".tmp", dir=self.folder))
        for name, values in arrays.items():
            with open(tmp / f"{name}.npz", "wb") as fh:
                np.savez(fh, *values)
        for name, source in files.items():
            shutil.copyfile(source, tmp / name)
        (tmp / "state.json").write_text(json.dumps({**state, "key": self.key, "extra": self.extra}, indent=1))
        target = self.folder / f"epoch-{epoch:05d}"
        shutil.rmtree(target, ignore_errors=True)  # left by an earlier attempt at this epoch
        os.replace(tmp, target)
        for older in self.folder.iterdir():
            if older != target:
                shutil.rmtree(older, ignore_errors=True) if older.is_dir() else older.unlink(missing_ok=True)

    def clear(self) -> None:
        if not self.readonly:
            shutil.rmtree(self.folder, ignore_errors=True)


def _load_arrays(path: Path) -> list[np.ndarray]:
    """The arrays np.savez(fh, *arrays) wrote, in order."""
    with np.load(path, allow_pickle=False) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _encode(value):
    """A callback attribute as JSON that gives back the same type: numpy scalars keep their dtype."""
    if isinstance(value, np.generic):
        return {"dtype": value.dtype.name, "value": value.item()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else float(value)


def _decode(value):
    return np.dtype(value["dtype"]).type(value["value"]) if isinstance(value, dict) else value


def train_model(cfg: Config, data: Prepared, on_epoch=None, verbose: int = 2, backup: Backup | None = None,
                placement=None) -> TrainResult:
    """Fit the network on `data`; `on_epoch(row)` is called after every epoch (MLflow logging).

    The network is model.*'s, starting from train.initial_model's weights when that is set. The
    returned network holds the best checkpoint's weights (callbacks.checkpoint), else early
    stopping's restored best (callbacks.early_stopping.restore_best_weights), else the last epoch's.

    backup: after every epoch the whole training state goes there (weights, optimizer, seed generators,
    the plateau scale, the callbacks' counters and bests, the history so far); when it already holds a
    snapshot of this training, the training resumes after that epoch, and `on_epoch` is first called
    again with each restored row (the caller skips those it has). It is left in place: the caller
    clears it once the outputs are saved. With train.deterministic the result equals an uninterrupted
    run's, bitwise.

    placement: where to train (distribute.place); default: as train.distribute and train.device say. A
    multi-worker training's every worker calls this with the same arguments (a non-chief worker with a
    read-only backup and no on_epoch).
    """
    import keras

    from pipeline import distribute
    from pipeline.hardware import resolve_precision

    if placement is None:  # first: a multi-worker strategy must come before any other TF op
        placement = distribute.place(cfg.train.distribute, cfg.train.device)
    if cfg.train.batch_size % placement.replicas:
        raise PipelineError(f"train.batch_size = {cfg.train.batch_size} is not divisible by the {placement.replicas} "
                            f"replicas of train.distribute = {placement.distribute} (it is the global batch, "
                            "split evenly over the replicas)")
    precision, reason = resolve_precision(cfg.train.precision, placement.device)
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)  # layers take it when they are built
    try:
        result = _fit(cfg, data, on_epoch, verbose, backup, placement)
    finally:
        keras.mixed_precision.set_global_policy(before)
    result.precision, result.precision_reason = precision, reason
    result.distribute, result.strategy = placement.distribute, type(placement.strategy).__name__
    result.device = placement.device
    result.replicas, result.workers = placement.replicas, placement.cluster.workers
    return result


def training_loss(label_smoothing: float, num_classes: int):
    """(loss, one_hot): the loss to compile with, and the class count to one-hot the labels to (None: integer
    labels as they are). Keras 3's SparseCategoricalCrossentropy has no label_smoothing: smoothing needs
    one-hot labels."""
    import keras

    if label_smoothing:
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing), num_classes
    return "sparse_categorical_crossentropy", None


def _fit(cfg: Config, data: Prepared, on_epoch, verbose: int, backup: Backup | None, placement) -> TrainResult:
    import keras

    from pipeline.distribute import gather_from_workers, lost_worker
    from pipeline.models import build_model
    from pipeline.tracking import epoch_callback

    seed_everything(cfg.seed, cfg.train.deterministic)
    num_classes = len(data.class_names)
    batch = cfg.train.batch_size  # the global batch
    steps_per_epoch = math.ceil(len(data.train_x) / batch)
    loss, one_hot = training_loss(cfg.train.label_smoothing, num_classes)
    with placement.strategy.scope():  # the network's, the optimizer's and the metrics' variables: per replica
        network = build_model(cfg.model, data.input_shape, num_classes)
        fuse_batch_norm(network)
        if cfg.train.initial_model:
            load_initial_weights(network, cfg.train.initial_model)
        schedule = learning_rate_schedule(cfg.optimizer, steps_per_epoch, cfg.train.epochs)
        scaled = None
        if schedule is not None and cfg.callbacks.reduce_lr.enabled:
            scaled = schedule = _keras_classes().ScaledSchedule(schedule, cfg.optimizer.learning_rate)
        network.compile(optimizer=build_optimizer(cfg.optimizer, schedule), loss=loss, metrics=["accuracy"])

    snapshot = backup.latest() if backup is not None else None
    resume_from = snapshot.state["epoch"] if snapshot is not None else 0
    resumes = gather_from_workers(placement, resume_from)  # every worker must start from the same epoch
    if len(set(resumes)) > 1:
        raise PipelineError(
            f"the workers would resume from different epochs ({', '.join(map(str, resumes))}, by worker): a "
            f"multi-worker training resumes only when every worker sees the chief's backup {backup.folder} "
            "(a shared filesystem); delete it on the chief to train from the start")
    state = snapshot.state if snapshot is not None else {"epoch": 0, "stop": False, "rows": [], "train_seconds": 0.0}
    # a training that had stopped early (or run all its epochs) runs none: fit only ends it (restores the best)
    first_epoch = cfg.train.epochs if state["stop"] else state["epoch"]
    # outside the strategy's scope: its seed generators are plain variables that the input pipeline resets
    augment = build_augmenter(cfg.augment, cfg.seed)
    train_ds = make_dataset(data.train_x, data.train_y, data.stats, batch, shuffle=True, seed=cfg.seed,
                            num_classes=one_hot, augment=augment, epochs=(first_epoch, cfg.train.epochs))
    val_ds = make_dataset(data.val_x, data.val_y, data.stats, batch, shuffle=False, num_classes=one_hot)
    _fit_under_strategy(network, train_ds.element_spec, placement.strategy)
    recorder = epoch_callback()
    recorder.rows = [dict(row) for row in state["rows"]]
    callbacks = [_keras_classes().RaiseIfInterrupted(), recorder, *build_callbacks(cfg.callbacks, scaled)]
    stopper = next((cb for cb in callbacks if isinstance(cb, keras.callbacks.EarlyStopping)), None)
    # every worker's own best-epoch checkpoint (Keras writes it on each): in scratch, deleted when fit ends
    with tempfile.TemporaryDirectory(prefix="pipeline-checkpoint-") as scratch:
        checkpoint = None
        if cfg.callbacks.checkpoint.enabled:
            ck = cfg.callbacks.checkpoint
            checkpoint = _keras_classes().BestCheckpoint(
                str(Path(scratch) / "best.weights.h5"), monitor=ck.monitor, mode=ck.mode,
                save_best_only=True, save_weights_only=True,
            )
            callbacks.append(checkpoint)
        stateful = [cb for cb in callbacks if cb is not recorder]
        variables = network.variables  # weights and the layers' seed generators (dropout)
        if snapshot is not None:
            with placement.strategy.scope():
                network.optimizer.build(network.trainable_variables)
            _restore_variables(snapshot, variables + network.optimizer.variables, scaled)
            if checkpoint is not None and (snapshot.folder / "best.weights.h5").is_file():
                shutil.copyfile(snapshot.folder / "best.weights.h5", checkpoint.filepath)
            log.info("train: resuming after epoch %d of %d from %s", state["epoch"], cfg.train.epochs, backup.folder)
        if on_epoch is not None:
            for row in recorder.rows:
                on_epoch(row)
        if backup is not None and not backup.readonly:
            callbacks.append(_keras_classes().BackupState(backup, snapshot, stateful, variables, scaled, recorder))
        if on_epoch is not None:  # after the backup: an epoch is reported once it can be resumed from
            callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: on_epoch(recorder.rows[-1])))
        start = time.perf_counter()
        lost = None
        try:
            network.fit(
                train_ds, validation_data=val_ds, epochs=cfg.train.epochs, initial_epoch=first_epoch,
                steps_per_epoch=steps_per_epoch,  # train_ds holds every remaining epoch, each in its own order
                callbacks=callbacks, verbose=verbose,
                shuffle=False,  # train_ds shuffles itself every epoch
            )
        except Exception as exc:
            lost = lost_worker(exc) if placement.cluster.workers > 1 else None
            if lost is None:
                raise
        if lost is not None:  # raised here, not in the except: TensorFlow's error and the thread pool its frames
            raise lost        # hold go now, not at exit, where the pool's cleanup prints a traceback
        seconds = state["train_seconds"] + time.perf_counter() - start
        restored = len(recorder.rows)
        if stopper is not None and stopper.restore_best_weights and stopper.best_weights is not None:
            restored = stopper.best_epoch + 1  # Keras restores them at the end of fit, stopped early or not
        if checkpoint is not None and checkpoint.best_epoch is not None:
            network.load_weights(checkpoint.filepath)
            restored = checkpoint.best_epoch
    stopped = stopper.stopped_epoch + 1 if stopper is not None and stopper.stopped_epoch else None
    return TrainResult(network, pd.DataFrame(recorder.rows), seconds, stopped, restored, int(state["epoch"]))


def _fit_under_strategy(network, element_spec, strategy) -> None:
    """Work around two ways Keras 3.15's fit fails under tf.distribute (keras-team/keras#20585), on this instance.

    1. For a model made under a strategy, fit and evaluate take the first batch of the distributed dataset
       and average it over the replicas, `strategy.reduce("MEAN", (x, y))`, to learn its shapes
       (TensorFlowTrainer._maybe_symbolic_build). A strategy with more than one replica cannot reduce a
       tuple: "ValueError: Attempt to convert a value (PerReplica:{...}) ... to a Tensor". The shapes are in
       the dataset's element_spec: build the loss and metrics from that under the scope, as Keras would,
       and skip Keras' step (which also costs a batch of input).
    2. With MultiWorkerMirroredStrategy each step's logs are reduced with `strategy.reduce("MEAN", v, axis=0)`,
       which fails for the scalar loss and metrics ("Invalid reduction dimension 0 for input with 0
       dimensions"): train_step and test_step return them as vectors of one element, which that reduce
       averages over the replicas into scalars again.
    Should these private names change, fit fails loudly again, not silently; the multi-worker test runs it.
    """
    import tensorflow as tf

    if getattr(network, "_distribute_strategy", None) is None:  # made outside any scope: Keras builds it itself
        return
    with strategy.scope():
        network._symbolic_build(data_batch=element_spec)
    network._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        def as_vectors(step):
            def wrapped(data):
                return tf.nest.map_structure(lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v, step(data))
            return wrapped

        network.train_step = as_vectors(network.train_step)
        network.test_step = as_vectors(network.test_step)


def fuse_batch_norm(network) -> int:
    """Let `network`'s BatchNormalization layers train through TensorFlow's fused kernel; returns how many.

    Keras 3 trains batch norm as separate ops (tf.nn.moments, then tf.nn.batch_normalization, and the
    gradients of each); TensorFlow's FusedBatchNormV3 and its gradient do the same in one oneDNN kernel
    each way: notebook 003's cnn_bn trains about 1.2x faster on the 2-core Xeon (bench's cnn_bn figures).
    Only the training call changes, on these instances: inference, the layers' config and their weights
    are Keras' own, so the saved model is plain Keras. A layer the kernel does not cover (a mask, renorm,
    synchronized statistics, a channel axis other than the last, inputs not 2-D or 4-D) keeps Keras' call.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return 0
    fused = 0
    for layer in network.layers:
        if isinstance(layer, keras.Model):
            fused += fuse_batch_norm(layer)
        elif type(layer) is keras.layers.BatchNormalization and layer.input_spec.ndim in (2, 4) and not (
                layer.renorm or layer.synchronized or layer.axis not in (-1, layer.input_spec.ndim - 1)):
            layer.call = functools.partial(_fused_batch_norm_call, layer, layer.call)
            fused += 1
    return fused


def _fused_batch_norm_call(layer, keras_call, inputs, training=None, mask=None):
    """BatchNormalization.call with FusedBatchNormV3 when training: normalised by the batch's moments, the
    moving statistics updated as Keras does (its biased variance: the op's is Bessel-corrected)."""
    import tensorflow as tf

    if not (training and layer.trainable) or mask is not None:
        return keras_call(inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    x = tf.cast(inputs, "float32")  # as Keras: batch norm computes in float32 under a mixed-precision policy
    x4 = tf.reshape(x, [-1, 1, 1, channels]) if len(inputs.shape) == 2 else x
    scale = tf.cast(layer.gamma, "float32") if layer.scale else tf.ones([channels])
    offset = tf.cast(layer.beta, "float32") if layer.center else tf.zeros([channels])
    y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=scale, offset=offset, mean=tf.zeros([channels]), variance=tf.ones([channels]),
        epsilon=layer.epsilon, is_training=True, data_format="NHWC")
    count = tf.cast(tf.size(x4) // channels, "float32")
    variance = variance * (count - 1.0) / count
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + tf.cast(mean, layer.moving_mean.dtype) * (1 - momentum))
    layer.moving_variance.assign(
        layer.moving_variance * momentum + tf.cast(variance, layer.moving_variance.dtype) * (1 - momentum))
    return tf.cast(tf.reshape(y, tf.shape(x)), layer.compute_dtype)


def _restore_variables(snapshot: Snapshot, variables: list, scaled) -> None:
    """Load a snapshot's variables.npz into `variables` (the network's, then the optimizer's) and the scale."""
    values = _load_arrays(snapshot.folder / "variables.npz")
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        raise PipelineError(f"{snapshot.folder}: its variables do not match this network; delete "
                            f"{snapshot.folder.parent} to train from the start")
    for variable, value in zip(variables, values):
        variable.assign(value)
    if scaled is not None:
        scaled.scale.assign(snapshot.state["scale"])


def augmentation_samples(images: np.ndarray, labels: np.ndarray, augmenter, class_names: list[str]):
    """A matplotlib Figure: rows of training images, each as it is and SAMPLE_DRAWS augmented versions.

    images: (N, H, W, C) uint8; the rows are the first image of each class, then the next images,
    SAMPLE_ROWS in all. `augmenter` (from build_augmenter) is called in training mode once per column.
    """
    import keras
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(len(class_names)) if (labels == c).any()]
    rest = [i for i in range(len(images)) if i not in set(firsts)]
    rows = (firsts + rest)[:SAMPLE_ROWS]
    originals = images[rows].astype("float32")
    columns = [originals] + [
        keras.ops.convert_to_numpy(augmenter(originals, training=True)) for _ in range(SAMPLE_DRAWS)
    ]
    fig = Figure(figsize=(1.3 * len(columns) + 0.8, 1.3 * len(rows) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, index in enumerate(rows):
        for c, batch in enumerate(columns):
            ax = axes[r][c]
            pixels = np.clip(batch[r], 0, 255).astype("uint8")
            if pixels.shape[-1] == 3:
                ax.imshow(pixels)
            else:  # grayscale (or any other channel count: its first channel)
                ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(str(class_names[int(labels[index])]), fontsize=8)
    fig.suptitle("Training images and random augmentations (augment.*)", fontsize=9)
    return fig


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
        "restored_epoch": float(result.restored_epoch or len(history)),  # the epoch whose weights are saved
    }


def main(cfg: Config, data_dir, raw_dir, out_dir, worker_wait: float | None = None) -> str | None:
    """The stage: train, save the raw-pixel model, log everything to one MLflow run; returns its id.

    A training killed before it ended resumes after its last completed epoch when the stage runs again
    with the same params, data and code: its state is backed up in resume_folder(out_dir) after every
    epoch (removed once the outputs are saved), and it continues the same MLflow run.

    With train.distribute = multi_worker every worker runs this; a non-chief worker trains, writes and logs
    nothing, and returns None. worker_wait: seconds to wait for every worker to start (distribute.WORKER_WAIT).
    """
    import mlflow

    from pipeline import distribute, fetch, tracking
    from pipeline.files import atomic_path, read_json, write_json
    from pipeline.models import raw_input_model
    from pipeline.preprocess import load_prepared

    # What can fail does so before the workers meet (a worker that fails after would leave the others waiting):
    # the cluster (TF_CONFIG), the store, the data, the device (the checks that need no TensorFlow first).
    # No TF op runs before the strategy exists.
    where = distribute.cluster(cfg.train.distribute)
    wait = distribute.WORKER_WAIT if worker_wait is None else worker_wait
    if not where.chief:
        data = load_prepared(data_dir)
        placement = distribute.place(cfg.train.distribute, cfg.train.device, where, wait_seconds=wait)
        backup = Backup(resume_folder(out_dir), resume_key(cfg, data), readonly=True)
        train_model(cfg, data, verbose=0, backup=backup, placement=placement)
        return None
    experiment = tracking.connect(cfg)  # an unreachable store fails here, before anything is loaded or trained
    data = load_prepared(data_dir)
    manifest = read_json(Path(raw_dir) / "manifest.json")
    digest = fetch.dataset_digest(manifest)
    placement = distribute.place(cfg.train.distribute, cfg.train.device, where, wait_seconds=wait)
    backup = Backup(resume_folder(out_dir), resume_key(cfg, data))
    snapshot = backup.latest()
    resumed = snapshot.state["extra"].get("run_id") if snapshot is not None else None
    if resumed and not tracking.run_in_experiment(resumed, experiment.experiment_id):
        resumed = None  # another store or experiment: a new run, given every epoch

    tags = {**tracking.git_state(), **tracking.environment_tags(placement.tag), "data.digest": digest,
            "data.source": cfg.data.source}
    with tracking.run_scope(cfg, run_id=resumed, tags=tags) as run_id:
        backup.extra["run_id"] = run_id
        mlflow.set_tags(tags)  # also on a run that `mlflow run` created
        # its description in the UI; rewritten below with the precision that train.precision = auto resolved to
        mlflow.set_tag(tracking.DESCRIPTION_TAG, tracking.run_description(cfg, data.input_shape, cfg.train.precision))
        if snapshot is not None:
            mlflow.set_tag("pipeline.resumed_after_epoch", str(snapshot.state["epoch"]))
        if run_id == resumed:  # it has its inputs from its start; an error tag from when it was killed goes
            tracking.clear_error(run_id)
        else:
            log_inputs(cfg, data, manifest, digest, raw_dir)
        logged = tracking.last_logged_epoch(run_id)

        def log_epoch(row):
            if row["epoch"] > logged:  # a resumed run has the epochs it logged before it was killed
                tracking.log_epoch(run_id, row["epoch"], row)

        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            result = train_model(cfg, data, on_epoch=log_epoch, backup=backup, placement=placement)
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
                "derived.precision": result.precision,
                "derived.input_shape": "x".join(map(str, data.input_shape)),
                "derived.raw_shape": "x".join(map(str, data.stats["raw_shape"])),
                "derived.num_classes": len(data.class_names),
                # as used: the global batch split over the replicas, the learning rate as given (not scaled)
                "derived.distribute": result.distribute,
                "derived.strategy": result.strategy,
                "derived.device": result.device,
                "derived.workers": result.workers,
                "derived.replicas": result.replicas,
                "derived.global_batch_size": cfg.train.batch_size,
                "derived.per_replica_batch_size": cfg.train.batch_size // result.replicas,
                "derived.learning_rate": cfg.optimizer.learning_rate,
            })
            mlflow.set_tag("precision.reason", result.precision_reason)
            mlflow.set_tag(tracking.DESCRIPTION_TAG, tracking.run_description(cfg, data.input_shape, result.precision))
            mlflow.log_metrics({**facts, **totals(result, len(data.train_x))})
            mlflow.log_text(summary, "model_summary.txt")
            # the optimizer as Keras ran it: the values that optimizer.* params left null (Keras' defaults) included
            mlflow.log_dict(result.network.optimizer.get_config(), "optimizer.json")
            mlflow.log_artifact(str(tmp / "history.csv"))
            if cfg.mlflow.log_model:
                log_model(model, fetch.load_raw(raw_dir).train_x[:2])
            write_json(tmp / "run.json", {"run_id": run_id, "tracking_uri": cfg.tracking_uri(),
                                          "experiment_name": cfg.mlflow.experiment_name})
        backup.clear()  # the outputs are in place: nothing left to resume
    return run_id


def log_inputs(cfg: Config, data: Prepared, manifest: dict, digest: str, raw_dir) -> None:
    """What a run records before training: params, the dataset, provenance files, augmentation samples."""
    import mlflow

    from pipeline.files import sha256_file

    mlflow.log_params(cfg.flat())
    with warnings.catch_warnings():  # MLflow warns that a local path matches two equivalent source kinds
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(
            data.train_x, targets=data.train_y, source=str(Path(raw_dir).resolve()),
            name=f"{cfg.data.source}-train", digest=digest,
        )
    try:
        mlflow.log_input(dataset, context="training")
    except mlflow.exceptions.MlflowException as exc:
        # Two runs logging the same new dataset at once (parallel sweep trials, `dvc queue start -j 2`): the
        # SQL store looks it up, finds none, and both insert it; the second fails on the table's unique key.
        # Once the first has inserted it, logging it again links it to this run.
        if "UNIQUE constraint failed: datasets" not in str(exc) and "duplicate key" not in str(exc):
            raise
        mlflow.log_input(dataset, context="training")
    for name in ("params.yaml", "dvc.lock"):
        if Path(name).is_file():
            mlflow.log_artifact(name, artifact_path="provenance")
    mlflow.log_dict(manifest, "provenance/data_manifest.json")
    # the complete effective config, overrides included: what `pipeline reproduce` rebuilds the run from
    mlflow.log_dict(cfg.model_dump(mode="json"), "provenance/config.json")
    if cfg.train.initial_model and Path(cfg.train.initial_model).is_file():
        mlflow.log_param("derived.initial_model_sha256", sha256_file(cfg.train.initial_model))
    if cfg.augment.enabled:  # its own augmenter: drawing from the training one would change its draws
        samples = augmentation_samples(data.train_x, data.train_y, build_augmenter(cfg.augment, cfg.seed),
                                       data.class_names)
        mlflow.log_figure(samples, "plots/augmented_samples.png",
                          save_kwargs={"dpi": 120, "metadata": {"Software": None}})


def log_model(model, example: np.ndarray) -> None:
    """The raw-pixel model in MLflow's Keras format, with signature and a raw-image input example."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    signature = infer_signature(example, model.predict(image_batches(example, len(example)), verbose=0)[:len(example)])
    # MLflow checks the input example by predicting it through the logged model, twice, with Keras' default
    # verbosity: two progress bars in the stage's log. Off while it logs.
    with _keras_flavor_saves_examples(), keras_progress_off():
        mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            # stated, not inferred: inference reloads the model in a subprocess (seconds per run)
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
        )


@contextlib.contextmanager
def keras_progress_off():
    """Keras' progress bars (interactive logging) off for a while, then back as they were: for MLflow code
    that predicts with Keras' default verbosity (the Keras flavor's input-example check, autolog)."""
    import keras

    if not keras.utils.is_interactive_logging_enabled():
        yield
        return
    keras.utils.disable_interactive_logging()
    try:
        yield
    finally:
        keras.utils.enable_interactive_logging()


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
