"""params.yaml loads, validates, and fails in one line naming the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, tree) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_repo_params_load_and_equal_the_defaults():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg == Config()  # params.yaml spells out every default; the code holds no hidden ones


def test_overrides_apply_and_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["optimizer.name=sgd", "train.epochs=3", "preprocess.image_size=[48, 48]",
                                            "optimizer.nesterov=true", "mlflow.run_name=null"])
    assert (cfg.optimizer.name, cfg.train.epochs, cfg.preprocess.image_size) == ("sgd", 3, (48, 48))
    assert cfg.optimizer.nesterov is True and cfg.mlflow.run_name is None


def test_flat_has_dotted_keys():
    flat = Config().flat()
    assert flat["optimizer.learning_rate"] == 0.003
    assert flat["callbacks.early_stopping.patience"] == 3
    assert not any(isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize(
    "tree, overrides, expected",
    [
        ({"model": {"nme": "cnn"}}, [], "unknown key 'model.nme'; did you mean 'model.name'?"),
        ({"optimiser": {}}, [], "unknown key 'optimiser'; did you mean 'optimizer'?"),
        ({}, ["optimizer.name=adamm"], "optimizer.name = 'adamm' is not allowed; expected one of 'sgd', 'rmsprop', 'adam', 'adamax', 'adadelta', 'adagrad' or 'nadam'; did you mean 'adam'?"),
        ({}, ["train.epoch=3"], "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
        ({}, ["train.epochs=0"], "train.epochs = 0: Input should be greater than or equal to 1"),
        ({}, ["train.batch_size=abc"], "train.batch_size = 'abc': Input should be a valid integer"),
        ({}, ["preprocess.val_fraction=1.5"], "preprocess.val_fraction = 1.5: Input should be less than 1"),
        ({}, ["model.kernel_sizes=[3]"], "model.kernel_sizes has 1 entry but model.filters has 2 conv blocks"),
        ({}, ["train.epochs"], "expected KEY=VALUE"),
        ({"seed": "x"}, [], "seed = 'x': Input should be a valid integer"),
    ],
)
def test_bad_params_fail_in_one_line_naming_the_key(tmp_path, tree, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, tree), overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: line 1 is not valid YAML|bad.yaml: line 2 is not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "sqlite:////proj/root/mlflow.db"),  # relative: the project's, not the copy's
    ("sqlite:///sub/m.db", "sqlite:////proj/root/sub/m.db"),
    ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_a_relative_sqlite_store_is_the_dvc_projects(monkeypatch, tmp_path, uri, expected):
    from pipeline.config import project_store

    monkeypatch.setenv("DVC_ROOT", "/proj/root")
    assert project_store(uri) == expected
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)  # outside DVC: relative to the working directory, as MLflow reads it, made absolute
    assert project_store(uri) == expected.replace("/proj/root", str(tmp_path.resolve()))
