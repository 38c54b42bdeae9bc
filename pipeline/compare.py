"""Compare: notebook 003's "comparison at a glance" over a set of MLflow runs.

`select_runs` picks the runs (an experiment, a sweep's parent, run ids, an
MLflow filter string); `write_report` writes one table (Markdown, CSV, HTML)
and three plots (val accuracy and val loss by epoch for every run, accuracy
against train time) into a folder, whole or not at all, and can log them to a
run (a sweep's parent) under `comparison/`. `pipeline compare` and
`pipeline sweep` call these two.

The table reads what the train and evaluate stages log (README "Looking at the
runs"): per-epoch `accuracy`/`loss` (MLflow keeps each metric's latest step:
the last epoch), evaluate's `final_val_*` and `test_*`, and the totals
`epochs_run`, `train_seconds`, `images_per_second`, `param_count`. Figures are
`matplotlib.figure.Figure` objects on an Agg canvas, as in evaluate.py.
"""

from __future__ import annotations

import html
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import pandas as pd

from pipeline.errors import PipelineError, count, first_line
from pipeline.files import atomic_path
from pipeline.tracking import minimised

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

# The files of a report, by the key write_report returns them under.
REPORT_FILES = {
    "markdown": "comparison.md",
    "csv": "comparison.csv",
    "html": "comparison.html",
    "val_accuracy": "val_accuracy.png",
    "val_loss": "val_loss.png",
    "accuracy_vs_time": "accuracy_vs_time.png",
}
ARTIFACT_PATH = "comparison"  # where write_report(log_to=...) puts them in the run

# Table column -> the MLflow metric it shows (None: computed). Order = the table's, after the params.
METRIC_COLUMNS = {
    "train_accuracy": "accuracy",  # the last epoch's: MLflow's latest value is the highest step (= epoch)
    "train_loss": "loss",
    "val_accuracy": "final_val_accuracy",  # evaluate's, on the weights saved (early stopping may restore an epoch)
    "val_loss": "final_val_loss",
    "test_accuracy": "test_accuracy",
    "test_loss": "test_loss",
    "epochs_run": "epochs_run",
    "train_seconds": "train_seconds",
    "seconds_per_epoch": None,  # train_seconds / epochs_run
    "images_per_second": "images_per_second",
    "param_count": "param_count",
}
# A run with none of these is not a training (a sweep's parent, a run of another tool): it is left out.
TRAINING_METRICS = ("accuracy", "val_accuracy", "epochs_run", "final_val_accuracy", "test_accuracy")
HISTORY_METRICS = ("val_accuracy", "val_loss")  # the per-epoch histories plotted

# Params never shown as a differing column: they are columns already, or say where and how a run was
# recorded rather than what was trained, or are paths whose content the `data.digest` tag (shown when it
# differs) and `derived.initial_model_sha256` identify, or copy another param.
SKIPPED_PARAMS = frozenset({
    "model.name", "optimizer.name",
    "mlflow.tracking_uri", "mlflow.experiment_name", "mlflow.run_name", "mlflow.log_model",
    "data.dir", "data.download", "data.download_dir", "data.csv.train", "data.csv.test",
    "data.image_folder.train", "data.image_folder.unlabeled", "train.initial_model",
    "derived.learning_rate", "derived.global_batch_size",  # = optimizer.learning_rate, train.batch_size
})
SKIPPED_PARAM_PREFIXES = ("predict.",)  # the predictions CSV's format
# Besides these, undotted params other than `seed` are skipped: they are MLproject's -P names (`optimizer`,
# `epochs`, `set`, ...) that `mlflow run` logs beside the dotted keys they set.
DIGEST_TAG = "data.digest"

MAX_LEGEND = 20  # runs drawn each in its own colour with a legend; beyond, the best HIGHLIGHT in colour
HIGHLIGHT = 10
REPORTS = Path("reports/compare")
PNG_DPI = 120
PNG_METADATA = {"Software": None}  # no matplotlib version in the bytes
SEARCH_PAGE = 50_000  # MLflow's largest search_runs page
HISTORY_THREADS = 8  # concurrent get_metric_history calls where the store has no bulk query


# --------------------------------------------------------------------------- selecting runs


def open_store(uri: str) -> MlflowClient:
    """A client of the existing store at `uri`, checked with one quick request (see tracking.open_store)."""
    from pipeline.tracking import open_store as open_checked

    return open_checked(uri, must_exist=True)


def select_runs(client: MlflowClient, *, experiment: str | None = None, parent: str | None = None,
                run_ids: Sequence[str] = (), filter_string: str | None = None) -> list[Run]:
    """The runs to compare, newest first (run ids: in the order given).

    experiment: an experiment's name; parent: a run id whose children (tag `mlflow.parentRunId`, in the
    parent's experiment) are selected; run_ids: runs by id; filter_string: MLflow search syntax
    (`metrics.test_accuracy > 0.9 and params.optimizer.name = 'sgd'`), within `experiment` or the
    parent's children when given, else over every active experiment. Deleted runs are never selected.
    Bad or empty selections raise PipelineError naming what was given.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    run_ids = list(dict.fromkeys(run_ids))  # duplicates once, order kept
    if run_ids:
        if experiment or parent or filter_string:
            raise PipelineError("run ids select runs by themselves: give them without an experiment, "
                                "a parent run or a filter")
        return [_get_run(client, run_id, "run") for run_id in run_ids]
    if experiment and parent:
        raise PipelineError(f"give an experiment ({experiment!r}) or a parent run ({parent!r}), not both: "
                            "a parent's children are in its own experiment")
    if not (experiment or parent or filter_string):
        raise PipelineError("nothing to compare: give an experiment, a parent run, run ids or a filter")

    clauses, what = [], []
    if parent:
        parent_run = _get_run(client, parent, "parent run")
        experiment_ids = [parent_run.info.experiment_id]
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run.info.run_id}'")
        what.append(f"children of run {parent!r}")
    elif experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage != "active":
            names = [e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=20)]
            raise PipelineError(f"experiment {experiment!r} not found in {client.tracking_uri}; "
                                f"it has {', '.join(map(repr, sorted(names))) or 'none'}")
        experiment_ids = [found.experiment_id]
        what.append(f"experiment {experiment!r}")
    else:
        experiment_ids = [e.experiment_id for e in _all_experiments(client)]
        what.append(f"the experiments of {client.tracking_uri}")
    if filter_string:
        clauses.append(filter_string)  # MLflow's run filters are comparisons joined by AND only (no OR, no brackets)
        what.append(f"filter {filter_string!r}")

    runs, token = [], None
    try:
        while True:
            page = client.search_runs(experiment_ids, filter_string=" and ".join(clauses),
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=SEARCH_PAGE,
                                      order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        if not filter_string:
            raise
        raise PipelineError(f"filter {filter_string!r}: {first_line(exc.message)}") from None
    if not runs:
        raise PipelineError(f"no runs match: {' and '.join(what)}")
    return runs


def _get_run(client: MlflowClient, run_id: str, role: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise PipelineError(f"{role} {run_id!r} not found in {client.tracking_uri} "
                            f"({first_line(exc.message)})") from None
    if run.info.lifecycle_stage != "active":
        raise PipelineError(f"{role} {run_id!r} is deleted (restore it with `mlflow runs restore --run-id {run_id}`)")
    return run


def _all_experiments(client: MlflowClient) -> list:
    from mlflow.entities import ViewType

    experiments, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
        experiments.extend(page)
        token = page.token
        if not token:
            return experiments


def default_folder(**selection) -> Path:
    """Where a selection's report goes unless told otherwise: reports/compare/<selection_name>."""
    return REPORTS / selection_name(**selection)


def selection_name(*, experiment: str | None = None, parent: str | None = None, run_ids: Sequence[str] = (),
                   filter_string: str | None = None) -> str:
    """A folder name for a selection: `experiment-<name>`, `parent-<run id>`, `runs-<count>-<hash>`,
    `filter-<hash>`, joined by `-` when combined (hashes: the first 8 hex digits of a SHA-1)."""
    import hashlib
    import re

    def short(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    parts = []
    if experiment:
        parts.append("experiment-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or short(experiment)))
    if parent:
        parts.append(f"parent-{parent}")
    if run_ids:
        ids = list(dict.fromkeys(run_ids))
        parts.append(f"runs-{len(ids)}-{short(','.join(sorted(ids)))}")
    if filter_string:
        parts.append(f"filter-{short(filter_string)}")
    return "-".join(parts) or "runs"


# --------------------------------------------------------------------------- the table


def is_training(run: Run) -> bool:
    """Whether the run logged any training or evaluation metric (a sweep's parent does not)."""
    return any(key in run.data.metrics for key in TRAINING_METRICS)


def differing_params(runs: Iterable[Run]) -> list[str]:
    """The param keys with two or more values among the runs that logged them, sorted, less SKIPPED_PARAMS
    and the like; `data.digest` (a tag) likewise. A key some runs lack does not count as a difference by
    itself: a run logged by another tool or an older version (fewer params) would otherwise bring them all."""
    runs = list(runs)
    keys = sorted({key for run in runs for key in run.data.params})
    shown = []
    for key in keys:
        if key in SKIPPED_PARAMS or key.startswith(SKIPPED_PARAM_PREFIXES) or ("." not in key and key != "seed"):
            continue
        if len({run.data.params[key] for run in runs if key in run.data.params}) > 1:
            shown.append(key)
    if len({run.data.tags[DIGEST_TAG] for run in runs if DIGEST_TAG in run.data.tags}) > 1:
        shown.append(DIGEST_TAG)
    return shown


def comparison_table(runs: Sequence[Run], sort_by: str = "test_accuracy") -> tuple[pd.DataFrame, list[Run]]:
    """One row per training run, sorted by `sort_by`; and the runs left out (not trainings).

    Columns: run (name), model, optimizer, the differing params (their dotted keys), METRIC_COLUMNS, run_id;
    values are floats (NaN: not logged) and strings ('' : not logged). `sort_by` is a column of the table
    or any metric a run logged; losses (names ending in `loss`) sort lowest first, the rest highest first,
    runs without it last.
    """
    trainings = [run for run in runs if is_training(run)]
    left_out = [run for run in runs if not is_training(run)]
    if not trainings:
        raise PipelineError(f"none of the {len(runs)} selected runs logged training metrics "
                            f"({', '.join(TRAINING_METRICS)}): {_names(left_out)}")
    params = differing_params(trainings)
    rows = []
    for run in trainings:
        metrics, data = run.data.metrics, run.data
        row = {"run": run.info.run_name or "", "model": data.params.get("model.name", ""),
               "optimizer": data.params.get("optimizer.name", "")}
        for key in params:
            value = data.tags.get(key) if key == DIGEST_TAG else data.params.get(key)
            row[key] = "" if value is None else (value[:12] if key == DIGEST_TAG else value)
        for column, metric in METRIC_COLUMNS.items():
            row[column] = metrics.get(metric, math.nan) if metric else math.nan
        if metrics.get("epochs_run"):
            row["seconds_per_epoch"] = metrics.get("train_seconds", math.nan) / metrics["epochs_run"]
        row["run_id"] = run.info.run_id
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run", "model", "optimizer", *params, *METRIC_COLUMNS, "run_id"])

    if sort_by in METRIC_COLUMNS:
        key = table[sort_by].astype(float)
    elif any(sort_by in run.data.metrics for run in trainings):
        key = pd.Series([run.data.metrics.get(sort_by, math.nan) for run in trainings], dtype=float)
    else:
        raise PipelineError(f"sort metric {sort_by!r}: no selected run logged it; the table's columns are "
                            f"{', '.join(METRIC_COLUMNS)}, or any metric of the runs (e.g. best_val_accuracy)")
    order = key.sort_values(ascending=minimised(sort_by), na_position="last", kind="stable").index
    return table.loc[order].reset_index(drop=True), left_out


def _names(runs: Iterable[Run]) -> str:
    return ", ".join(f"{run.info.run_name or '(unnamed)'} ({run.info.run_id})" for run in runs)


# Markdown/HTML formats by column; the CSV keeps full precision.
def _format(column: str, value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column.endswith(("accuracy", "loss")):
        return f"{value:.4f}"
    if column in ("epochs_run", "param_count"):
        return f"{int(round(value)):,}"
    if column == "images_per_second":
        return f"{value:,.0f}"
    return f"{value:.1f}"  # seconds


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: [_format(c, v) for v in table[c]] for c in table.columns}, columns=table.columns)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub Markdown table of the formatted values (numbers right-aligned)."""
    shown = formatted(table)
    numeric = [c in METRIC_COLUMNS for c in table.columns]

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    return "\n".join([line(table.columns), rule, *(line(row) for row in shown.itertuples(index=False))])


def describe(table: pd.DataFrame, left_out: Sequence[Run], sort_by: str) -> str:
    """The line under the table: how it is sorted, which params it shows, which runs it left out."""
    direction = "lowest" if minimised(sort_by) else "highest"
    params = [c for c in table.columns if c not in ("run", "model", "optimizer", "run_id", *METRIC_COLUMNS)]
    lines = [f"{len(table)} runs, sorted by {sort_by} ({direction} first; runs without it last). "
             f"Params shown: those that differ between the runs ({', '.join(params) or 'none'})."]
    if left_out:
        lines.append(f"Left out {count(len(left_out), 'run')} without training "
                     f"metrics: {_names(left_out)}.")
    return "\n\n".join(lines)


def html_page(table: pd.DataFrame, note: str) -> str:
    body = formatted(table).to_html(index=False, border=0, classes="comparison", escape=True)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Run comparison</title>\n<style>"
            "body{font-family:sans-serif} table.comparison{border-collapse:collapse;font-size:13px}"
            "table.comparison td,table.comparison th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
            "</style></head><body>\n<h1>Run comparison</h1>\n"
            + "".join(f"<p>{html.escape(p)}</p>\n" for p in note.split("\n\n"))
            + body + "\n<p><img src=\"val_accuracy.png\"> <img src=\"val_loss.png\"> "
              "<img src=\"accuracy_vs_time.png\"></p>\n</body></html>\n")


# --------------------------------------------------------------------------- histories


def metric_histories(client: MlflowClient, run_ids: Sequence[str],
                     keys: Sequence[str] = HISTORY_METRICS) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{run id: {key: [(step, value), ...] by step}}; a metric a run did not log is an empty list.

    On a SQL store (SQLite, PostgreSQL, ...) one query per key for all the runs (the store's
    get_metric_history_bulk, which the client does not expose); elsewhere (a tracking server) one
    get_metric_history call per run and key, HISTORY_THREADS at a time. A step logged twice (a resumed
    training) keeps its last value.
    """
    histories: dict[str, dict[str, dict[int, float]]] = {run_id: {key: {} for key in keys} for run_id in run_ids}
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if hasattr(store, "get_metric_history_bulk"):
        chunk = 500  # run ids per IN (...) clause, well under SQLite's variable limit
        for key in keys:
            for start in range(0, len(run_ids), chunk):
                # results are ordered by run, timestamp, step: later values of a step overwrite earlier ones
                for item in store.get_metric_history_bulk(run_ids[start:start + chunk], key, max_results=10**9):
                    histories[item.run_id][key][item.step] = item.value
    else:
        return histories_one_by_one(client, run_ids, keys)
    return {run_id: {key: sorted(steps.items()) for key, steps in by_key.items()}
            for run_id, by_key in histories.items()}


def histories_one_by_one(client: MlflowClient, run_ids: Sequence[str],
                         keys: Sequence[str] = HISTORY_METRICS) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric_histories through the public client: one get_metric_history call per run and key,
    HISTORY_THREADS at a time (for stores without a bulk query: a tracking server)."""
    def one(pair):
        run_id, key = pair
        steps = {}
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step)):
            steps[metric.step] = metric.value  # a step logged twice (a resumed training): the last value
        return run_id, key, sorted(steps.items())

    histories: dict[str, dict[str, list[tuple[int, float]]]] = {run_id: {} for run_id in run_ids}
    with ThreadPoolExecutor(HISTORY_THREADS) as pool:
        for run_id, key, steps in pool.map(one, [(r, k) for r in run_ids for k in keys]):
            histories[run_id][key] = steps
    return histories


# --------------------------------------------------------------------------- plots


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _labels(table: pd.DataFrame) -> list[str]:
    """Run names, with the run id's start where a name repeats (same params, run twice)."""
    names = [name or run_id[:8] for name, run_id in zip(table["run"], table["run_id"])]
    counts = pd.Series(names).value_counts()
    return [f"{name} ({run_id[:8]})" if counts[name] > 1 else name for name, run_id in zip(names, table["run_id"])]


def _colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _highlighted(n: int) -> int:
    """How many runs (the table's first, best by the sort metric) get a colour and a legend entry."""
    return n if n <= MAX_LEGEND else HIGHLIGHT


def history_overlay(table: pd.DataFrame, histories, key: str, sort_by: str, path: Path) -> None:
    """`key` by epoch for every run of the table; up to MAX_LEGEND runs each in a colour with a legend,
    beyond that the best HIGHLIGHT (table order) in colour and the others as thin grey lines."""
    from matplotlib.ticker import MaxNLocator

    labels, n = _labels(table), len(table)
    shown = _highlighted(n)
    fig = _new_figure((10.0, 5.5))
    ax = fig.add_subplot()
    grey = [histories[table["run_id"][i]][key] for i in range(shown, n)]
    if grey:  # under the coloured lines; one collection draws faster than a line each
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection([steps for steps in grey if steps], colors="0.75", linewidths=0.8,
                                         zorder=1))
    for i, colour in zip(range(shown), _colours(shown)):
        steps = histories[table["run_id"][i]][key]
        ax.plot([s for s, _ in steps], [v for _, v in steps], marker="o", markersize=3, color=colour,
                label=labels[i], zorder=2)
    title = f"{'Validation accuracy' if key == 'val_accuracy' else 'Validation loss'} by epoch, {n} runs"
    if shown < n:
        title += f"\n(the {shown} best by {sort_by} in colour, the other {n - shown} in grey)"
    ax.set_title(title)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if shown:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, format="png", dpi=PNG_DPI, metadata=PNG_METADATA)


def accuracy_vs_time(table: pd.DataFrame, sort_by: str, path: Path) -> None:
    """Final accuracy (test, or val where no run has test) against train seconds, one labelled point a run
    (beyond MAX_LEGEND runs only the best HIGHLIGHT are labelled)."""
    column = "test_accuracy" if table["test_accuracy"].notna().any() else "val_accuracy"
    labels, n = _labels(table), len(table)
    labelled = _highlighted(n)
    drawn = table["train_seconds"].notna() & table[column].notna()
    fig = _new_figure((8.0, 5.5))
    ax = fig.add_subplot()
    rest = drawn & (table.index >= labelled)
    ax.scatter(table["train_seconds"][rest], table[column][rest], color="0.6", s=12, zorder=1)
    for i, colour in zip(range(labelled), _colours(labelled)):
        if drawn[i]:
            x, y = table["train_seconds"][i], table[column][i]
            ax.scatter([x], [y], color=colour, s=30, zorder=2)
            ax.annotate(labels[i], (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
    title = f"{column} against train time, {int(drawn.sum())} runs"
    notes = []
    if labelled < n:
        notes.append(f"the {labelled} best by {sort_by} labelled")
    if not drawn.all():
        notes.append(f"{int((~drawn).sum())} without {column} or train_seconds not shown")
    if notes:
        title += "\n(" + "; ".join(notes) + ")"
    ax.set_title(title)
    ax.set_xlabel("train_seconds (s)")
    ax.set_ylabel(column)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, format="png", dpi=PNG_DPI, metadata=PNG_METADATA)


# --------------------------------------------------------------------------- the report


def write_report(client: MlflowClient, runs: Sequence[Run], out_dir, sort_by: str = "test_accuracy",
                 log_to: str | None = None) -> dict[str, Path]:
    """Write the comparison of `runs` into `out_dir`, replacing a previous report there; returns
    {kind: path} for REPORT_FILES' kinds.

    The folder is built under a temporary name and renamed when complete, so a failure leaves the
    previous one (or none). A folder holding files other than a report's is refused. log_to: a run id
    that also gets the files as artifacts under `comparison/` (logged before the rename).
    """
    table, left_out = comparison_table(runs, sort_by)
    out_dir = Path(out_dir)
    if out_dir.exists():
        others = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else [out_dir.name]
        others = [name for name in others if name not in REPORT_FILES.values()]
        if others:
            raise PipelineError(f"{out_dir}: holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, "
                                f"not a comparison report; give a folder of its own")
    if log_to:
        _get_run(client, log_to, "run to log to")
    histories = metric_histories(client, list(table["run_id"]))
    note = describe(table, left_out, sort_by)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / REPORT_FILES["markdown"]).write_text(markdown_table(table) + "\n\n" + note + "\n")
        table.to_csv(tmp / REPORT_FILES["csv"], index=False, lineterminator="\n")
        (tmp / REPORT_FILES["html"]).write_text(html_page(table, note))
        for key in HISTORY_METRICS:
            history_overlay(table, histories, key, sort_by, tmp / REPORT_FILES[key])
        accuracy_vs_time(table, sort_by, tmp / REPORT_FILES["accuracy_vs_time"])
        if log_to:
            client.log_artifacts(log_to, str(tmp), artifact_path=ARTIFACT_PATH)
    return {kind: out_dir / name for kind, name in REPORT_FILES.items()}


__all__ = ["REPORT_FILES", "comparison_table", "differing_params", "histories_one_by_one", "metric_histories",
           "open_store", "select_runs", "selection_name", "write_report"]
