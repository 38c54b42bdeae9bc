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
    assert dvc_data(with_overrides("optimizer.name=sgd"), None) is None  # no params.yaml for DVC to read


def test_run_with_another_params_file_builds_its_own_data_rather_than_dvcs(project):
    """`pipeline --params other.yaml run`: dvc repro would read params.yaml, whose data differ (seed here)."""
    import re

    import yaml

    from tests.conftest import BIN, run

    other = yaml.safe_load((project / "params.yaml").read_text())
    other["seed"] = 7
    other["train"]["epochs"] = 1
    (project / "other.yaml").write_text(yaml.safe_dump(other))
    done = run([str(BIN / "pipeline"), "--params", "other.yaml", "run"], project)
    run_id = re.search(r"run: MLflow run (\w+)", done.stdout).group(1)
    assert (project / "outputs/runs" / run_id / "prepared/stats.json").is_file()  # built in the run's folder
    assert not (project / "data/prepared").exists()  # DVC's preprocess (params.yaml's seed) did not run
