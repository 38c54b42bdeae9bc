"""The MLflow UI in a real headless Chromium, on a store the pipeline filled: what the README's guide shows renders.

Two tiny runs (conftest's TINY_PARAMS on digits; adam and sgd, 2 epochs) go through the real stages into a SQLite
store, a real `mlflow server` serves it on 127.0.0.1, and Debian's Chromium loads the experiment's run list, one
run's page (its description and metrics), its metric charts, and the compare view of the two runs. MLflow 3.17's
routes (hash-routed): `#/experiments/<id>/runs`, `#/experiments/<id>/runs/<run id>[/model-metrics]`,
`#/compare-runs?runs=[...]&experiments=[...]` (mlflow/server/js/build: routes.tsx, compiled). Plotly draws the
charts: an `svg.main-svg` per chart, and a canvas too for the parallel coordinates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import validate
from pipeline.tracking import DESCRIPTION_TAG
from tests.browser import INSTALL_HINT, Chromium, chromium_path
from tests.conftest import TINY_PARAMS, merge
from tests.test_reproduce import mlflow_server

CHROMIUM = chromium_path()

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason=f"needs Chromium, which is not installed: {INSTALL_HINT}")]

OPTIMIZERS = {"adam": 0.005, "sgd": 0.05}  # optimizer -> learning rate
EPOCHS = 2  # a line per metric chart needs two points


@dataclass
class UI:
    url: str
    experiment_id: str
    runs: dict  # optimizer -> mlflow.entities.Run
    browser: Chromium


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from pipeline.workflow import run_all

    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.chdir(folder)
        ids = {name: run_all(validate(merge(TINY_PARAMS, {
            "optimizer": {"name": name, "learning_rate": rate}, "train": {"epochs": EPOCHS},
            "mlflow": {"log_model": False},  # the model is not what this checks; it saves seconds per run
        })), None, folder / "runs") for name, rate in OPTIMIZERS.items()}
    store = MlflowClient(uri)
    runs = {name: store.get_run(run_id) for name, run_id in ids.items()}
    with mlflow_server(folder / "server", uri) as url, Chromium(CHROMIUM, width=1400, height=1000) as browser:
        yield UI(url, runs["adam"].info.experiment_id, runs, browser)


def test_the_run_list_shows_both_runs_and_their_dataset(ui):
    ui.browser.open(f"{ui.url}/#/experiments/{ui.experiment_id}/runs")
    names = [run.info.run_name for run in ui.runs.values()]
    assert names == ["cnn_fast-adam-lr0.005-bs64", "cnn_fast-sgd-lr0.05-bs64"]
    ui.browser.wait_for_text(*names)
    assert "digits-train" in ui.browser.text()  # the dataset input, named by train.log_inputs


def test_a_runs_page_shows_its_description_params_and_metrics(ui):
    run = ui.runs["adam"]
    description = run.data.tags[DESCRIPTION_TAG]
    first, *rest = description.splitlines()
    assert first == f"cnn_fast · adam, lr 0.005, cosine decay · batch 64 · {EPOCHS} epochs"
    assert rest[-1].startswith("result: test accuracy ")
    ui.browser.open(f"{ui.url}/#/experiments/{ui.experiment_id}/runs/{run.info.run_id}")
    ui.browser.wait_for_text(first, "val_accuracy")
    text = ui.browser.text()
    assert run.info.run_name in text
    assert description in text  # every line, each on its own line: the UI renders it as Markdown with line breaks
    for metric in ("loss", "val_loss", "test_accuracy", "best_val_accuracy", "epoch_seconds"):
        assert f"\n{metric}\t" in text or f"\n{metric}\n" in text, metric  # a row of the metrics table
    assert "optimizer.learning_rate" in text and "derived.input_shape" in text


def test_a_runs_metric_charts_draw_loss_and_accuracy_per_epoch(ui):
    run = ui.runs["adam"]
    browser = ui.browser
    browser.open(f"{ui.url}/#/experiments/{ui.experiment_id}/runs/{run.info.run_id}/model-metrics")
    search = 'input[placeholder="Search metric charts"]'
    browser.wait_for(f"document.querySelector({json.dumps(search)})", "the metric charts' search box")
    browser.evaluate(f"document.querySelector({json.dumps(search)}).focus()")
    browser.command("Input.insertText", {"text": "^(val_)?(loss|accuracy)$"})  # typed, as a user would
    cards = '[data-testid="experiment-view-compare-runs-card"]'
    browser.wait_for(f"document.querySelectorAll('{cards}').length === 4 && "
                     f"document.querySelectorAll('{cards} svg.main-svg').length >= 4", "4 drawn metric charts")
    # each chart's legend, drawn after its plot: this run's line
    browser.wait_for_text(*(f"{run.info.run_name} ({metric})" for metric in ("loss", "accuracy", "val_loss",
                                                                             "val_accuracy")))
    text = browser.text()
    assert "Step" in text  # the x axis: the epoch, logged as the step
    browser.wait_for("!document.body.innerText.includes('test_class_accuracy')", "only the four searched charts")


def test_the_compare_view_plots_params_against_metrics_for_both_runs(ui):
    ids = [run.info.run_id for run in ui.runs.values()]
    ui.browser.open(f"{ui.url}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([ui.experiment_id])}")
    ui.browser.wait_for_text("Comparing 2 Runs", *(run.info.run_name for run in ui.runs.values()))
    ui.browser.wait_for("document.querySelector('svg.main-svg .parcoords, svg.main-svg')", "the parallel coordinates")
    text = ui.browser.text()
    for expected in ("Parallel Coordinates Plot", "Scatter Plot", "optimizer.name", "val_accuracy"):
        assert expected in text, expected
    assert ui.browser.count("svg.main-svg") >= 1
