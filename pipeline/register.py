"""`pipeline register`: the best run's model into the MLflow model registry, under a name and an alias.

The model is the one every training logs (train.log_model): an MLflow 3 logged model named `model`,
linked to its run, that takes raw uint8 pixels and answers class probabilities. It is registered from
its own URI, `models:/<model id>`, so the version records the model id and the run
(`runs:/<run id>/model` resolves to the same model, with a warning that the run has no such artifact).

`mlflow models serve -m models:/NAME@ALIAS` then serves whichever version holds the alias, so moving
the alias to a better run changes what a restarted server serves, with no new command.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError, first_line
from pipeline.tracking import minimised

MODEL_NAME = "model"  # the `name` train.log_model gives the logged model
DEFAULT_METRIC = "test_accuracy"
DEFAULT_ALIAS = "champion"
PAGE = 500  # runs per search request


@dataclass(frozen=True)
class Candidate:
    """A run and its logged model; value: the run's value of the metric it was chosen by (None: not chosen)."""

    run: Any  # mlflow.entities.Run
    model: Any  # mlflow.entities.LoggedModel
    metric: str | None
    value: float | None


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    run_id: str
    model_id: str
    metric: str | None
    value: float | None
    created: bool  # False: that model was already a version of `name`, only the alias and tags were set


def connect(tracking_uri: str):
    """A client of the store, checked with one quick request: an unreachable server fails in one line."""
    import mlflow

    from pipeline.tracking import open_store

    mlflow.set_tracking_uri(tracking_uri)  # the registry too: its URI defaults to the tracking URI
    return open_store(tracking_uri)


def logged_model(client, run) -> Any | None:
    """The run's READY logged model named `model`, the newest if it has several; None when it has none."""
    from mlflow.entities import LoggedModelStatus

    # (a `status = 'READY'` clause matches nothing in 3.17's SQL store: it is checked here)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{MODEL_NAME}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    ready = [model for model in models if model.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def get_run(client, run_id: str, metric: str | None = None) -> Candidate:
    """The run `run_id` with its model: one PipelineError when it is unknown, unfinished or has no model."""
    from pipeline.tracking import get_run as checked_run

    run = checked_run(client, run_id)
    if run.info.lifecycle_stage != "active":
        raise PipelineError(f"run {run_id} is deleted")
    if run.info.status != "FINISHED":
        raise PipelineError(f"run {run_id} is {run.info.status}, not FINISHED: register a run that completed")
    model = logged_model(client, run)
    if model is None:
        raise PipelineError(f"run {run_id} has no logged model {MODEL_NAME!r} "
                            "(trained with mlflow.log_model: false, or stopped before logging it)")
    value = run.data.metrics.get(metric) if metric else None
    return Candidate(run, model, metric if value is not None else None, value)


def experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        uri = client._tracking_client.tracking_uri
        raise PipelineError(f"experiment {name!r} not found in the tracking store {uri}")
    return experiment.experiment_id


def best_run(client, experiment: str, metric: str, filter_string: str | None = None) -> Candidate:
    """The FINISHED run of `experiment` with the best `metric` that has a logged model.

    Metrics ending in `loss` are minimised, others maximised. Runs without the metric (or with NaN), and
    runs without a model, are skipped; of equal values the earlier run wins, so a tie leaves the alias
    where it is. filter_string: MLflow search syntax, e.g. "params.`model.name` = 'cnn'".
    """
    from mlflow.exceptions import MlflowException

    exp_id = experiment_id(client, experiment)
    # MLflow's filters have AND only, and no parentheses: the user's clauses join ours as they are
    conditions = ["attributes.status = 'FINISHED'"] + ([filter_string] if filter_string else [])
    # the store sorts runs without the metric (NULL) after every value, and NaN after numbers
    order = [f"metrics.`{metric}` {'ASC' if minimised(metric) else 'DESC'}", "attributes.start_time ASC"]
    token, seen_metric = None, False
    while True:
        try:
            page = client.search_runs([exp_id], filter_string=" and ".join(conditions), order_by=order,
                                      max_results=PAGE, page_token=token)
        except MlflowException as exc:
            what = f"--filter {filter_string!r}" if filter_string else f"--metric {metric!r}"
            raise PipelineError(f"{what}: {first_line(exc)}") from None
        for run in page:
            value = run.data.metrics.get(metric)
            if value is None or math.isnan(value):
                continue
            seen_metric = True
            model = logged_model(client, run)
            if model is not None:
                return Candidate(run, model, metric, value)
        token = page.token
        if not token:
            break
    which = f"FINISHED run of experiment {experiment!r}" + (f" matching {filter_string!r}" if filter_string else "")
    if seen_metric:
        raise PipelineError(f"no {which} with metric {metric!r} has a logged model {MODEL_NAME!r}")
    raise PipelineError(f"no {which} has the metric {metric!r}")


def class_names(run_id: str) -> list[str] | None:
    """The class names, index i naming output i, from the run's data manifest (None for runs without one)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the output to our lines
    try:
        manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/provenance/data_manifest.json")
    except (MlflowException, OSError, ValueError):
        return None
    names = manifest.get("class_names")
    return [str(name) for name in names] if isinstance(names, list) else None


def register(client, candidate: Candidate, name: str, alias: str = DEFAULT_ALIAS) -> Registration:
    """Register the candidate's model as a new version of `name` (reusing the version that already holds
    that model, if any), tag it, and point `alias` at it."""
    from mlflow.exceptions import MlflowException

    run_id, model_id = candidate.run.info.run_id, candidate.model.model_id
    tags = {"run_id": run_id}
    if candidate.metric is not None:
        tags.update({"metric": candidate.metric, "metric_value": repr(candidate.value)})
    names = class_names(run_id)
    if names is not None:  # what the served probabilities' columns mean
        tags["class_names"] = json.dumps(names)
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # 3.17's SQL registry returns no model_id: the source names the model (mlflow.register_model
        # turns runs:/<run id>/model into models:/<model id> too)
        same = [v for v in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
                if model_id in (v.model_id, v.source.removeprefix("models:/"))]
        if same:  # no duplicate version of one model: the newest that holds it gets the alias
            version, created = max(same, key=lambda v: int(v.version)), False
        else:
            version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                                  model_id=model_id)
            created = True
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
        for key in {"metric", "metric_value"} - tags.keys():  # a reused version chosen without a metric now
            if key in version.tags:
                client.delete_model_version_tag(name, version.version, key)
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as exc:
        raise PipelineError(f"registering run {run_id} as {name!r} (alias {alias!r}): {first_line(exc)}") from None
    return Registration(name, str(version.version), alias, run_id, model_id, candidate.metric, candidate.value,
                        created)


def check_name(name: str, alias: str) -> None:
    """MLflow's own rules for the names (it applies them only after registering), plus what a
    `models:/NAME@ALIAS` URI and a search filter need: no '@' and no quote in the name."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (_validate_model_alias_name, _validate_model_alias_name_reserved,
                                         _validate_model_name)

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise PipelineError(f"--name {name!r}: {first_line(exc)}") from None
    if "@" in name or "'" in name:
        raise PipelineError(f"--name {name!r}: expected a name without '@' or quotes (models:/NAME@ALIAS)")
    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)  # `latest` and v<number> mean versions in models:/NAME@...
    except MlflowException as exc:
        raise PipelineError(f"--alias {alias!r}: {first_line(exc)}") from None


def serve_command(tracking_uri: str, name: str, alias: str, port: int = 5001) -> str:
    """The shell command that serves the version holding the alias, from the same store."""
    return (f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} mlflow models serve "
            f"-m {shlex.quote(f'models:/{name}@{alias}')} --env-manager local -h 127.0.0.1 -p {port}")


def main(tracking_uri: str, name: str, *, run_id: str | None = None, metric: str | None = None,
         experiment: str | None = None, default_experiment: str = "image-pipeline",
         filter_string: str | None = None, alias: str = DEFAULT_ALIAS) -> Registration:
    """Choose the run (`run_id`, else the best by `metric` in `experiment`, default `default_experiment`),
    register its model.

    metric: what chooses the run (default test_accuracy); with `run_id`, only what the version's tags
    record, when the run has it.
    """
    check_name(name, alias)
    for option, value in (("--experiment", experiment), ("--filter", filter_string)):
        if run_id is not None and value:
            raise PipelineError(f"--run and {option}: give one ({option} chooses among runs, --run names one)")
    client = connect(tracking_uri)
    if run_id is not None:
        candidate = get_run(client, run_id, metric or DEFAULT_METRIC)
    else:
        candidate = best_run(client, experiment or default_experiment, metric or DEFAULT_METRIC, filter_string)
    return register(client, candidate, name, alias)
