"""`pipeline run` reuses DVC's data stages only when the run's data params equal params.yaml's."""

from pipeline.config import Config, apply_overrides, validate
from pipeline.workflow import dvc_data


def with_overrides(*overrides: str) -> Config:
    return validate(apply_overrides(Config().model_dump(mode="json"), list(overrides)))


def test_data_stages_reused_only_for_unchanged_data_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: nothing can be reused
    base = Config()
    assert dvc_data(with_overrides("optimizer.name=sgd"), base) is None
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for changed in ("seed=1", "data.source=digits", "preprocess.image_size=[32, 32]"):
        assert dvc_data(with_overrides(changed), base) is None, changed
