"""DVC's own sweeps: `dvc exp run --queue -S ...` then `dvc queue start -j N`, each experiment an MLflow run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import client, run


def wait_for_queue(repo: Path, deadline_s: float = 900) -> str:
    """Poll `dvc queue status` until no task is queued or running; return its last output."""
    deadline = time.monotonic() + deadline_s
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            return status
        if time.monotonic() > deadline:
            run(["dvc", "queue", "kill", "--all"], repo, check=False)
            raise AssertionError(f"the DVC queue did not finish in {deadline_s} s:\n{status}")
        time.sleep(3)


@pytest.mark.slow
def test_queued_experiments_log_runs_to_the_projects_store(project):
    """Queued experiments run in copies under .dvc/tmp/exps, two at once: their runs, artifacts included,
    must land in the project's own mlflow.db and mlruns/, each naming its DVC experiment."""
    run(["dvc", "exp", "run", "--queue", "-q", "-n", "exp-adam", "-S", "train.epochs=1"], project)
    run(["dvc", "exp", "run", "--queue", "-q", "-n", "exp-sgd", "-S", "train.epochs=1", "-S", "optimizer.name=sgd"],
        project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    status = wait_for_queue(project)
    assert status.count("Success") == 2, status + "\n" + run(["dvc", "queue", "logs", "exp-adam"], project,
                                                             check=False).stdout[-3000:]

    store = client(project)
    experiment = store.get_experiment_by_name("tests")
    assert experiment is not None, "no runs in the project's own mlflow.db"
    runs = {r.data.tags.get("dvc.experiment"): r for r in store.search_runs([experiment.experiment_id])}
    assert set(runs) == {"exp-adam", "exp-sgd"}
    for name, found in runs.items():
        assert found.info.status == "FINISHED"
        assert found.info.run_name.startswith(f"{name}: ")
        assert found.data.tags["dvc.baseline_rev"] == run(["git", "rev-parse", "HEAD"], project).stdout.strip()
        assert found.data.params["train.epochs"] == "1"
        assert "test_accuracy" in found.data.metrics  # evaluate reopened the same run
        artifacts = Path(found.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(project / "mlruns"), artifacts
        assert (artifacts / "predictions" / "predictions.csv").is_file()  # predict, the last stage, logged it
    assert runs["exp-sgd"].data.params["optimizer.name"] == "sgd"
    assert runs["exp-adam"].data.params["optimizer.name"] == "adam"
    assert not list((project / ".dvc" / "tmp").glob("exps/tmp*/mlflow.db"))
