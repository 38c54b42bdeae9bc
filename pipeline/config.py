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

from pipeline.errors import PipelineError

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


class DataConfig(Section):
    source: Literal["fashion_mnist", "csv", "digits"] = "fashion_mnist"
    dir: str = "/usr/share/datasets/fashion-mnist"  # where the IDX .gz files are looked for first
    download: bool = True  # fetch the official files when they are not in `dir`
    download_dir: str = "~/.cache/image-pipeline"  # downloaded files are kept (and re-verified) here
    image_shape: tuple[int, int, int] = (28, 28, 1)  # height, width, channels of a CSV row's pixels
    csv: CsvConfig = CsvConfig()


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


class ModelConfig(Section):
    name: Literal["cnn"] = "cnn"
    filters: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64))  # conv blocks, each a list of filter counts
    kernel_sizes: tuple[int, ...] = (5, 3)  # one square kernel size per conv block
    dense: tuple[int, ...] = (256,)  # widths of the dense head before the softmax
    dropout: float = Field(0.25, ge=0.0, lt=1.0)  # after each conv block and each dense layer; 0 = none
    batch_norm: bool = False

    @model_validator(mode="after")
    def _blocks_match(self):
        if len(self.kernel_sizes) != len(self.filters):
            raise ValueError(
                f"model.kernel_sizes has {len(self.kernel_sizes)} entries but model.filters has "
                f"{len(self.filters)} conv blocks; expected one kernel size per block"
            )
        if any(f < 1 for block in self.filters for f in block) or any(not block for block in self.filters):
            raise ValueError("model.filters: expected non-empty lists of positive filter counts")
        return self


class OptimizerConfig(Section):
    name: Literal["sgd", "rmsprop", "adam"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd and rmsprop only
    nesterov: bool = False  # sgd only


class TrainConfig(Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)


class EarlyStoppingConfig(Section):
    enabled: bool = True
    monitor: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = Field(3, ge=0)  # epochs without improvement before stopping
    min_delta: float = Field(0.0, ge=0.0)
    restore_best_weights: bool = True


class ReduceLROnPlateauConfig(Section):
    enabled: bool = True
    monitor: str = "val_loss"
    factor: float = Field(0.5, gt=0.0, lt=1.0)
    patience: int = Field(2, ge=0)
    min_lr: float = Field(1e-5, ge=0.0)


class CallbacksConfig(Section):
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    reduce_lr: ReduceLROnPlateauConfig = ReduceLROnPlateauConfig()


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
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    callbacks: CallbacksConfig = CallbacksConfig()
    mlflow: MlflowConfig = MlflowConfig()
    predict: PredictConfig = PredictConfig()

    def flat(self) -> dict[str, Any]:
        """Every effective param with dotted keys, as logged to MLflow."""
        return flatten(self.model_dump(mode="json"))

    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.mlflow.tracking_uri


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
