"""The one typed, validated config, loaded once from params.yaml (STYLE 5).

Every section is a pydantic model that forbids unknown keys. `load_config`
reads params.yaml, applies `key=value` overrides (from the CLI or `mlflow run
-P`) and validates the result; any problem becomes a `ConfigError` whose
message is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError, count

DEFAULT_PARAMS = "params.yaml"


class ConfigError(PipelineError):
    """A params.yaml key or override that is unknown, mistyped or out of range."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class CsvConfig(Section):
    train: Optional[str] = None  # labeled CSV: id column, label column, then one column per pixel
    test: Optional[str] = None  # optional unlabeled CSV: id column then pixels, predicted by `predict`
    id_column: str = "Id"
    label_column: str = "Label"


class ImageFolderConfig(Section):
    train: Optional[str] = None  # one sub-folder of PNG/JPEG images per class; the sub-folder names are the classes
    unlabeled: Optional[str] = None  # optional folder of PNG/JPEG images predicted by `predict`; ids = file names
    resize: bool = True  # resize to data.image_shape (Pillow bilinear); false: an image of another size is an error


# data.dir when it is null: where each downloadable source's files are looked for first
SOURCE_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",  # where Debian's dataset-fashion-mnist installs them
    "mnist": "~/.cache/image-pipeline/mnist",  # no Debian package; the default download folder
    "cifar10": "~/.cache/image-pipeline/cifar10",  # no Debian package; the default download folder
}
IMAGE_FOLDER_CHANNELS = (1, 3)  # Pillow modes L and RGB


class DataConfig(Section):
    source: Literal["fashion_mnist", "mnist", "cifar10", "csv", "image_folder", "digits"] = "fashion_mnist"
    dir: Optional[str] = None  # folder of the source's files; null: SOURCE_DIRS[source] (None for the others)
    download: bool = True  # fetch the official files when they are not in `dir`
    download_dir: str = "~/.cache/image-pipeline"  # downloaded files are kept (and re-verified) here
    image_shape: tuple[int, int, int] = (28, 28, 1)  # height, width, channels of a CSV row / image_folder's images
    csv: CsvConfig = CsvConfig()
    image_folder: ImageFolderConfig = ImageFolderConfig()

    @model_validator(mode="before")
    @classmethod
    def _source_dir(cls, values):
        # resolved here, not in fetch, so the effective folder is what MLflow logs as data.dir
        if isinstance(values, dict) and values.get("dir") is None:
            source = values.get("source", cls.model_fields["source"].default)
            values = {**values, "dir": SOURCE_DIRS.get(source) if isinstance(source, str) else None}
        return values

    @field_validator("image_shape")
    @classmethod
    def _positive_shape(cls, value):
        if min(value) < 1:
            raise ValueError(f"expected three positive integers (height, width, channels), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _image_folder_channels(self):
        if self.source == "image_folder" and self.image_shape[2] not in IMAGE_FOLDER_CHANNELS:
            raise ValueError(
                f"data.image_shape = {list(self.image_shape)}: image_folder converts images to grayscale "
                f"or RGB; expected {' or '.join(map(str, IMAGE_FOLDER_CHANNELS))} channels"
            )
        return self


class PreprocessConfig(Section):
    image_size: Optional[tuple[int, int]] = None  # (height, width); null keeps the data's own size
    channels: Literal["source", "grayscale", "rgb"] = "source"
    normalize: Literal["scale01", "standardize"] = "scale01"  # standardize: statistics of the train split only
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # stratified, by `seed`

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value):
        if value is not None and min(value) < 1:
            raise ValueError(f"expected two positive integers (height, width), got {list(value)}")
        return value


Padding = Literal["same", "valid"]
# Per-conv keys take one value for every conv, a list with one value per block, or, per block, a list with one
# value per conv (shaped like model.filters). Per-block keys take one value or one per block; per-dense keys one
# value or one per model.dense layer.
PER_CONV_KEYS = ("padding", "batch_norm", "conv_dropout", "l2")
PER_BLOCK_KEYS = ("pool_size", "pool_strides", "dropout", "block_batch_norm")
PER_DENSE_KEYS = ("dense_dropout", "dense_l2")
# The keys each builder reads; a key of the other builder set to a value is an error, left null it stays null.
SHARED_MODEL_KEYS = ("activation", "leaky_relu_slope", "l2", "max_norm", "conv_dropout", "dense", "dense_dropout",
                     "dense_l2")
CNN_KEYS = SHARED_MODEL_KEYS + ("filters", "kernel_sizes", "padding", "batch_norm", "batch_norm_position",
                                "block_batch_norm", "pool", "pool_size", "pool_strides", "dropout", "conv_head")
RESNET_KEYS = SHARED_MODEL_KEYS + ("resnet",)


def architecture(name: str) -> Literal["cnn", "resnet"]:
    """The builder behind a model.name: every preset is `cnn` params except notebook 003's residual network."""
    return "resnet" if name == "resnet" else "cnn"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _leaf_check(kind: str):
    """A function raising ValueError (one line) when one value of a model key is not a `kind`."""
    def check(value):
        if kind == "rate" and not (_is_number(value) and 0 <= value < 1):
            raise ValueError(f"expected dropout rates from 0 (none) to below 1, got {value!r}")
        if kind == "weight" and not (_is_number(value) and value >= 0):
            raise ValueError(f"expected non-negative numbers (0 = none), got {value!r}")
        if kind == "size" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"expected positive integers, got {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        if kind == "padding" and value not in ("same", "valid"):
            close = difflib.get_close_matches(str(value), ["same", "valid"], n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{value!r} is not allowed; expected 'same' or 'valid'{hint}")
    return check


def _check_nested(value, kind: str, depth: int):
    """`value` is one leaf or a non-empty list of leaves; with depth 2 (per-conv keys) items may be lists too."""
    if value is None:
        return value
    check = _leaf_check(kind)
    if not isinstance(value, (list, tuple)):
        check(value)
        return value
    if not value:
        raise ValueError("expected one value or a non-empty list")
    for item in value:
        if not isinstance(item, (list, tuple)):
            check(item)
        elif depth < 2 or not item:
            raise ValueError("expected one value or a flat list (lists in the list only for per-conv keys, non-empty)")
        else:
            for leaf in item:
                check(leaf)
    return value


class ConvLayerConfig(Section):
    """One conv of model.conv_head (after the last block, before the dense head), as notebook 000's."""

    filters: int = Field(ge=1)
    kernel_size: int | tuple[int, int]  # square size, or [height, width] (notebook 000's 1x4 then 4x1 pair)
    strides: int = Field(1, ge=1)
    padding: Padding = "valid"
    max_norm: float = Field(0.0, ge=0.0)  # its own limit (model.max_norm is the blocks'); 0 = none
    l2: float = Field(0.0, ge=0.0)  # its own kernel L2 factor; 0 = none

    @field_validator("kernel_size")
    @classmethod
    def _positive_kernel(cls, value):
        if min(value if isinstance(value, tuple) else (value,)) < 1:
            raise ValueError("expected a positive size or [height, width]")
        return value


class ResNetConfig(Section):
    """Notebook 003's residual network (model.name: resnet); null keys take the preset's values."""

    blocks: Optional[int] = Field(None, ge=1)  # residual stages; each after the first halves the size, doubles filters
    sub_blocks: Optional[int] = Field(None, ge=1)  # residual units per stage, two 3x3 convs each
    filters: Optional[int] = Field(None, ge=1)  # of the 7x7 stride-2 stem and the first stage
    max_pool: Optional[bool] = None  # a 3x3 stride-2 max pooling after the stem (notebook 003's use_max_pool)


class ModelConfig(Section):
    """The network. `name` picks a preset (pipeline.models.PRESETS: README "Models"); every other key left null
    takes that preset's value, and a value given here overrides it. Validation fills the nulls in, so the config
    (and what MLflow logs) holds the effective values; keys of the other builder stay null."""

    name: str = "cnn_fast"  # a preset name (the default: ours); `cnn` is notebook 003's CNN, `resnet` its ResNet
    filters: Optional[tuple[tuple[int, ...], ...]] = None  # conv blocks, each a list of filter counts
    kernel_sizes: Optional[tuple[int, ...]] = None  # one square kernel size per block
    padding: Optional[Padding | tuple[Padding | tuple[Padding, ...], ...]] = None  # per conv
    activation: Optional[Literal["relu", "leaky_relu", "elu", "tanh"]] = None  # convs and dense layers
    leaky_relu_slope: Optional[float] = Field(None, ge=0.0)  # leaky_relu's negative slope
    batch_norm: Optional[bool | tuple[bool | tuple[bool, ...], ...]] = None  # per conv
    batch_norm_position: Optional[Literal["after_activation", "before_activation"]] = None
    block_batch_norm: Optional[bool | tuple[bool, ...]] = None  # per block, after its pooling and dropout
    pool: Optional[Literal["max", "average"]] = None
    pool_size: Optional[int | tuple[int, ...]] = None  # per block
    pool_strides: Optional[int | tuple[int, ...]] = None  # per block
    conv_dropout: Optional[float | tuple[float | tuple[float, ...], ...]] = None  # per conv, after its activation
    dropout: Optional[float | tuple[float, ...]] = None  # per block, after its pooling
    l2: Optional[float | tuple[float | tuple[float, ...], ...]] = None  # per conv kernel L2 factor
    max_norm: Optional[float] = Field(None, ge=0.0)  # MaxNorm constraint on block conv and dense kernels; 0 = none
    conv_head: Optional[tuple[ConvLayerConfig, ...]] = None  # convs after the last block
    dense: Optional[tuple[int, ...]] = None  # hidden dense widths before the softmax
    dense_dropout: Optional[float | tuple[float, ...]] = None  # per dense layer, after its activation
    dense_l2: Optional[float | tuple[float, ...]] = None  # per dense layer kernel L2 factor
    resnet: ResNetConfig = ResNetConfig()

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, values):
        # resolved here, not in the builder, so the effective network is what MLflow logs as model.*
        if not isinstance(values, dict):
            return values
        from pipeline.models import PRESETS

        name = values.get("name")
        name = cls.model_fields["name"].default if name is None else name
        if not isinstance(name, str) or name not in PRESETS:
            return values  # the name check below reports it
        keys = RESNET_KEYS if architecture(name) == "resnet" else CNN_KEYS
        given = {key: value for key, value in values.items() if value is not None and key not in ("name", "resnet")}
        resnet = values.get("resnet")
        resnet = resnet.model_dump() if isinstance(resnet, ResNetConfig) else resnet
        resnet_given = {k: v for k, v in resnet.items() if v is not None} if isinstance(resnet, dict) else {}
        if resnet_given:
            given["resnet"] = resnet_given
        misplaced = [key for key in given if key in cls.model_fields and key not in keys]
        if misplaced:
            raise ValueError(
                f"model.{misplaced[0]} does not apply to model.name = {name!r}; its keys are "
                + ", ".join(f"model.{key}" for key in keys)
            )
        preset = PRESETS[name]
        filled = {**preset, **given, "name": name}
        if "resnet" in preset:
            filled["resnet"] = {**preset["resnet"], **resnet_given}
        elif resnet is not None:
            filled["resnet"] = resnet
        return filled

    @field_validator("name")
    @classmethod
    def _known_preset(cls, value):
        from pipeline.models import PRESETS

        if value not in PRESETS:
            close = difflib.get_close_matches(value, list(PRESETS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"not a model; expected one of {', '.join(PRESETS)}{hint}")
        return value

    @field_validator("conv_head", mode="before")
    @classmethod
    def _conv_head_keys(cls, value):
        # the generic unknown-key message cannot name the keys of a list's items
        allowed = list(ConvLayerConfig.model_fields)
        for h, layer in enumerate(value if isinstance(value, (list, tuple)) else (), start=1):
            unknown = [key for key in layer if key not in allowed] if isinstance(layer, dict) else []
            if unknown:
                close = difflib.get_close_matches(str(unknown[0]), allowed, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"layer {h} has unknown key '{unknown[0]}'{hint} (allowed: {', '.join(allowed)})")
        return value

    @field_validator("padding", mode="before")
    @classmethod
    def _padding(cls, value):
        return _check_nested(value, "padding", depth=2)

    @field_validator("batch_norm", mode="before")
    @classmethod
    def _batch_norm(cls, value):
        return _check_nested(value, "bool", depth=2)

    @field_validator("block_batch_norm", mode="before")
    @classmethod
    def _block_batch_norm(cls, value):
        return _check_nested(value, "bool", depth=1)

    @field_validator("pool_size", "pool_strides", mode="before")
    @classmethod
    def _pool(cls, value):
        return _check_nested(value, "size", depth=1)

    @field_validator("conv_dropout", mode="before")
    @classmethod
    def _conv_dropout(cls, value):
        return _check_nested(value, "rate", depth=2)

    @field_validator("dropout", "dense_dropout", mode="before")
    @classmethod
    def _rates(cls, value):
        return _check_nested(value, "rate", depth=1)

    @field_validator("l2", mode="before")
    @classmethod
    def _l2(cls, value):
        return _check_nested(value, "weight", depth=2)

    @field_validator("dense_l2", mode="before")
    @classmethod
    def _dense_l2(cls, value):
        return _check_nested(value, "weight", depth=1)

    @model_validator(mode="after")
    def _shapes_match(self):
        if architecture(self.name) == "resnet":
            for key in ("l2", "conv_dropout"):
                if isinstance(getattr(self, key), tuple):
                    raise ValueError(f"model.{key}: expected one value for model.name = 'resnet', not a list")
        else:
            if not self.filters or any(not block for block in self.filters) or min(map(min, self.filters)) < 1:
                raise ValueError("model.filters: expected non-empty lists of positive filter counts")
            if len(self.kernel_sizes) != len(self.filters):
                raise ValueError(
                    f"model.kernel_sizes has {count(len(self.kernel_sizes), 'entry', 'entries')} but model.filters "
                    f"has {count(len(self.filters), 'conv block')}; expected one kernel size per block"
                )
            if min(self.kernel_sizes) < 1:
                raise ValueError("model.kernel_sizes: expected positive kernel sizes")
            for key in PER_BLOCK_KEYS + PER_CONV_KEYS:
                value = getattr(self, key)
                if isinstance(value, tuple) and len(value) != len(self.filters):
                    raise ValueError(
                        f"model.{key} has {count(len(value), 'entry', 'entries')} but model.filters has "
                        f"{count(len(self.filters), 'conv block')}; expected one value, or one per block"
                    )
            for key in PER_CONV_KEYS:
                blocks = getattr(self, key)
                for b, (convs, filters) in enumerate(zip(blocks if isinstance(blocks, tuple) else (), self.filters)):
                    if isinstance(convs, tuple) and len(convs) != len(filters):
                        raise ValueError(
                            f"model.{key}'s block {b + 1} has {count(len(convs), 'entry', 'entries')} but "
                            f"model.filters' block {b + 1} has {count(len(filters), 'conv')}; expected one value "
                            "for the block, or one per conv"
                        )
        if min(self.dense, default=1) < 1:
            raise ValueError("model.dense: expected positive layer widths")
        for key in PER_DENSE_KEYS:
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != len(self.dense):
                raise ValueError(
                    f"model.{key} has {count(len(value), 'entry', 'entries')} but model.dense has "
                    f"{count(len(self.dense), 'layer')}; expected one value, or one per dense layer"
                )
        return self

    def per_block(self, key: str) -> list:
        """A per-block key's value for each conv block."""
        value = getattr(self, key)
        return list(value) if isinstance(value, tuple) else [value] * len(self.filters)

    def per_conv(self, key: str) -> list[list]:
        """A per-conv key's value for each conv, shaped like `filters`."""
        return [list(value) if isinstance(value, tuple) else [value] * len(block)
                for value, block in zip(self.per_block(key), self.filters)]

    def per_dense(self, key: str) -> list:
        """A per-dense key's value for each hidden dense layer."""
        value = getattr(self, key)
        return list(value) if isinstance(value, tuple) else [value] * len(self.dense)


# The constructor arguments besides the learning rate that each optimizer takes, by their Keras 3 names.
# optimizer.* keys of the others stay null (= Keras' default): a value for an optimizer that ignores it is an error.
OPTIMIZER_PARAMS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "nesterov"),
    "rmsprop": ("rho", "momentum", "epsilon"),
    "adam": ("beta_1", "beta_2", "epsilon"),
    "adamax": ("beta_1", "beta_2", "epsilon"),
    "adadelta": ("rho", "epsilon"),
    "adagrad": ("initial_accumulator_value", "epsilon"),
    "nadam": ("beta_1", "beta_2", "epsilon"),
}

# What each optimizer.schedule.name reads; the other schedule keys stay null.
SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "exponential": ("decay_rate", "decay_epochs"),
    "step": ("decay_rate", "decay_epochs", "boundaries"),
    "cosine": ("decay_epochs", "alpha", "warmup_epochs"),
}

# What `fit` logs (the loss and the `accuracy` metric, on the train and validation splits): what callbacks can watch.
Monitor = Literal["loss", "accuracy", "val_loss", "val_accuracy"]


def _only_params_of(section: str, chosen: str, params: dict[str, tuple[str, ...]], values: BaseModel) -> None:
    """Fail on a key that is set (not null) but not read by the chosen optimizer/schedule, naming both."""
    takes = params[chosen]
    for key in dict.fromkeys(k for keys in params.values() for k in keys):
        value = getattr(values, key)
        if value is not None and key not in takes:
            value = list(value) if isinstance(value, tuple) else value
            users = [name for name, keys in params.items() if key in keys]
            users = ", ".join(users[:-1]) + " or " + users[-1] if len(users) > 1 else users[0]
            raise ValueError(
                f"{section}.{key} = {value!r} is not a parameter of {section}.name = {chosen!r} "
                f"(which takes {', '.join(takes) or 'none of them'}); set it to null, or use it with {users}"
            )


class ScheduleConfig(Section):
    """How the learning rate changes with every step (batch); epochs are converted to steps at train time."""

    name: Literal["constant", "exponential", "step", "cosine"] = "cosine"  # the default recipe: see params.yaml
    decay_rate: Optional[float] = Field(None, gt=0.0, lt=1.0)  # exponential, step: rate multiplier per decay_epochs
    decay_epochs: Optional[float] = Field(None, gt=0.0)  # exponential, step: period; cosine: length (null: to the end)
    boundaries: Optional[tuple[int, ...]] = None  # step: epochs after which the rate is multiplied by decay_rate
    alpha: Optional[float] = Field(None, ge=0.0, le=1.0)  # cosine: final rate / learning_rate (null: Keras' 0)
    warmup_epochs: Optional[float] = Field(None, gt=0.0)  # cosine: linear warm-up from 0 to learning_rate first

    @model_validator(mode="after")
    def _params_match_the_schedule(self):
        _only_params_of("optimizer.schedule", self.name, SCHEDULE_PARAMS, self)
        if self.name in ("exponential", "step") and self.decay_rate is None:
            raise ValueError(f"optimizer.schedule.name = {self.name!r} needs optimizer.schedule.decay_rate")
        if self.name == "exponential" and self.decay_epochs is None:
            raise ValueError("optimizer.schedule.name = 'exponential' needs optimizer.schedule.decay_epochs")
        if self.name == "step" and (self.decay_epochs is None) == (self.boundaries is None):
            raise ValueError(
                "optimizer.schedule.name = 'step' needs exactly one of optimizer.schedule.decay_epochs "
                "(a regular period) and optimizer.schedule.boundaries (a list of epochs)"
            )
        if self.boundaries is not None:
            bounds = list(self.boundaries)
            if not bounds or bounds[0] < 1 or any(b >= a for b, a in zip(bounds, bounds[1:])):
                raise ValueError(
                    f"optimizer.schedule.boundaries = {bounds}: expected increasing epoch numbers of at least 1"
                )
        return self


class OptimizerConfig(Section):
    name: Literal["sgd", "rmsprop", "adam", "adamax", "adadelta", "adagrad", "nadam"] = "adam"
    learning_rate: float = Field(3e-3, gt=0.0)  # with a schedule, its starting rate (cosine with warm-up: its peak)
    # Per-optimizer params (see OPTIMIZER_PARAMS); null = Keras 3's default for the chosen optimizer.
    momentum: Optional[float] = Field(None, ge=0.0, lt=1.0)  # sgd, rmsprop
    nesterov: Optional[bool] = None  # sgd
    rho: Optional[float] = Field(None, gt=0.0, lt=1.0)  # rmsprop, adadelta
    beta_1: Optional[float] = Field(None, ge=0.0, lt=1.0)  # adam, adamax, nadam
    beta_2: Optional[float] = Field(None, ge=0.0, lt=1.0)  # adam, adamax, nadam
    epsilon: Optional[float] = Field(None, gt=0.0)  # all but sgd
    initial_accumulator_value: Optional[float] = Field(None, ge=0.0)  # adagrad
    decay: float = Field(0.0, ge=0.0)  # Keras 2's `decay`: rate = learning_rate / (1 + decay * step); 0 = none
    schedule: ScheduleConfig = ScheduleConfig()
    clipnorm: Optional[float] = Field(None, gt=0.0)  # clip each gradient tensor's L2 norm
    clipvalue: Optional[float] = Field(None, gt=0.0)  # clip each gradient element to [-clipvalue, clipvalue]
    global_clipnorm: Optional[float] = Field(None, gt=0.0)  # clip the L2 norm of all gradients together

    @model_validator(mode="after")
    def _params_match_the_optimizer(self):
        _only_params_of("optimizer", self.name, OPTIMIZER_PARAMS, self)
        if self.decay and self.schedule.name != "constant":
            raise ValueError(
                f"optimizer.decay = {self.decay!r} (Keras 2's inverse-time decay) and optimizer.schedule.name = "
                f"{self.schedule.name!r} are two schedules; set optimizer.decay to 0 or the schedule to constant"
            )
        if self.clipnorm is not None and self.global_clipnorm is not None:
            raise ValueError("optimizer.clipnorm and optimizer.global_clipnorm are both set; Keras takes one of them")
        return self


class TrainConfig(Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)  # the global batch: batch_size / replicas on each replica (pipeline/distribute.py)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # > 0: one-hot labels, CategoricalCrossentropy(label_smoothing)
    initial_model: Optional[str] = None  # a model.keras saved by the train stage: start from its network's weights
    deterministic: bool = True  # TensorFlow op determinism: same params + same machine = bitwise-equal results
    # auto: bf16 mixed precision where it is faster on this machine (pipeline/hardware.py), else float32
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    # none | mirrored (MirroredStrategy: this machine's GPUs) | multi_worker (MultiWorkerMirroredStrategy, TF_CONFIG)
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: the GPU if TensorFlow finds one, else the CPU


class EarlyStoppingConfig(Section):
    enabled: bool = True
    monitor: Monitor = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = Field(3, ge=0)  # epochs without improvement before stopping
    min_delta: float = Field(0.0, ge=0.0)
    restore_best_weights: bool = True


class ReduceLROnPlateauConfig(Section):
    enabled: bool = False  # the default cosine schedule lowers the rate itself
    monitor: Monitor = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    factor: float = Field(0.5, gt=0.0, lt=1.0)
    patience: int = Field(2, ge=0)
    min_delta: float = Field(1e-4, ge=0.0)  # Keras' default
    cooldown: int = Field(0, ge=0)  # epochs to wait after a reduction before counting again
    min_lr: float = Field(1e-5, ge=0.0)


class CheckpointConfig(Section):
    enabled: bool = False  # keep the weights of the best epoch by `monitor`; they are what is saved and logged
    monitor: Monitor = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"


class CallbacksConfig(Section):
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    reduce_lr: ReduceLROnPlateauConfig = ReduceLROnPlateauConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()


class AugmentConfig(Section):
    """Random transformations of the training batches (Keras preprocessing layers); all zero/none = off."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    translation: float = Field(0.0, ge=0.0, lt=1.0)  # max shift, as a fraction of height and of width
    rotation_degrees: float = Field(0.0, ge=0.0, le=180.0)  # max rotation either way
    zoom: float = Field(0.0, ge=0.0, lt=1.0)  # max zoom in or out, as a fraction of the size
    contrast: float = Field(0.0, ge=0.0, le=1.0)  # contrast factor drawn from [1 - contrast, 1 + contrast]
    fill_mode: Literal["reflect", "wrap", "constant", "nearest"] = "reflect"  # pixels shifted/rotated/zoomed in

    @property
    def enabled(self) -> bool:
        return self.flip != "none" or any((self.translation, self.rotation_degrees, self.zoom, self.contrast))


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI, when set, wins
    experiment_name: str = "image-pipeline"
    run_name: Optional[str] = None  # null: "<model>-<optimizer>-lr<lr>-bs<batch>"
    log_model: bool = True


class PredictConfig(Section):
    id_column: str = "Id"
    label_column: str = "Label"
    label_format: Literal["index", "name"] = "index"  # class index, or the class name/label as in the data


class Config(Section):
    seed: int = 42
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = Field(default_factory=ModelConfig)  # built on use: its presets live in pipeline.models
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    callbacks: CallbacksConfig = CallbacksConfig()
    augment: AugmentConfig = AugmentConfig()
    mlflow: MlflowConfig = MlflowConfig()
    predict: PredictConfig = PredictConfig()

    def flat(self) -> dict[str, Any]:
        """Every effective param with dotted keys, as logged to MLflow."""
        return flatten(self.model_dump(mode="json"))

    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI, else mlflow.tracking_uri; a relative SQLite path is the project's (see below)."""
        return project_store(os.environ.get("MLFLOW_TRACKING_URI") or self.mlflow.tracking_uri)


def project_store(uri: str) -> str:
    """A local store's relative path made absolute: against DVC_ROOT when DVC runs the stage, else the
    working directory.

    - DVC sets DVC_ROOT for every stage command to the project's root, also when `dvc exp run --queue` or
      `--temp` runs the stages in a copy under .dvc/tmp/exps: there a path relative to the working
      directory would put the runs in the copy's own mlflow.db, deleted with it.
    - MLflow keeps one database engine per URI string for the life of a process
      (SqlAlchemyStore._engine_map): a relative `sqlite:///mlflow.db` would keep meaning the first
      directory's database after a chdir (a notebook, a test process).
    """
    root = os.environ.get("DVC_ROOT")
    return absolute_uri(uri, Path(root) if root else Path.cwd())


def absolute_uri(uri: str, base: Path) -> str:
    """A tracking URI that means the same store from another working directory; `base`: what a relative
    path is relative to. Servers and absolute paths are returned as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        if uri == "sqlite:///:memory:":
            return uri
        return f"sqlite:///{(Path(base) / uri[len('sqlite:///'):]).resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        from mlflow.utils.file_utils import local_file_uri_to_path

        path = Path(local_file_uri_to_path(uri) if uri.startswith("file:") else uri)
        return (Path(base) / path).resolve().as_uri()
    return uri


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


def _section_of(model: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: dict, source: str) -> str:
    loc = tuple(str(p) for p in error["loc"])
    # drop pydantic's union/literal sub-locations such as 'tuple[int, int]' or integer indices
    key_parts = [p for p in loc if not p.isdigit() and "[" not in p]
    key = ".".join(key_parts) or "(top level)"
    value = error.get("input")
    kind = error["type"]
    if kind == "extra_forbidden":
        section = _section_of(Config, tuple(key_parts[:-1]))
        candidates = list(section.model_fields) if section else []
        close = difflib.get_close_matches(key_parts[-1], candidates, n=1, cutoff=0.6)
        hint = f"; did you mean '{'.'.join(key_parts[:-1] + close)}'?" if close else ""
        allowed = ", ".join(candidates)
        return f"{source}: unknown key '{key}'{hint} (allowed here: {allowed})"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",")]
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{source}: {key} = {value!r} is not allowed; expected one of {expected}{hint}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if kind == "missing":
        return f"{source}: {key} is required"
    if isinstance(value, dict):  # a cross-field check: its message names the keys
        return f"{source}: {message}"
    return f"{source}: {key} = {value!r}: {message}"


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML (so 0.1, true, [1, 2], null work)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. optimizer.name=sgd")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str = "override") -> dict:
    known = _known_keys(Config)
    for text in overrides:
        key, value = parse_override(text)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source} {text!r}: unknown key '{key}'{hint}")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return tree


def read_params(path: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; expected a params.yaml") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    return tree


def validate(tree: dict[str, Any], source: str = DEFAULT_PARAMS) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], source)) from None


def load_config(path: str | os.PathLike = DEFAULT_PARAMS, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read params.yaml, apply `key=value` overrides, validate; one ConfigError on any problem."""
    tree = read_params(path)
    source = str(path)
    if overrides:
        tree = apply_overrides(tree, overrides)
        source = f"{path} with overrides"
    return validate(tree, source)
