"""The command line: one command per stage (dvc.yaml calls these), `run` for `mlflow run`, and `reproduce`.

Entry points are thin: parse arguments, load the config once, call the stage.
Known errors (bad params, bad files, unreachable store) end in one line on
stderr and exit 1; Ctrl-C and SIGTERM exit 130 with the MLflow run KILLED.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from pipeline import hardware, interrupts
from pipeline.config import DEFAULT_PARAMS, Config, load_config
from pipeline.errors import PipelineError
from pipeline.reproduce import DEFAULT_TOLERANCE

RUN_OPTIONS = {  # `pipeline run` / MLproject -P names -> params.yaml keys
    "model": "model.name",
    "optimizer": "optimizer.name",
    "learning_rate": "optimizer.learning_rate",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "dropout": "model.dropout",
    "dataset": "data.source",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--params", "params_path", default=DEFAULT_PARAMS, type=click.Path(dir_okay=False),
              help="The params file, validated once for every command.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a params.yaml key for this command, e.g. --set optimizer.name=sgd (repeatable). "
                   "With dvc, prefer `dvc exp run -S KEY=VALUE` so DVC tracks the change.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="image-pipeline")
@click.pass_context
def cli(ctx: click.Context, params_path: str, overrides: tuple[str, ...], verbose: bool) -> None:
    """Reproducible image-classification experiments with Keras, DVC and MLflow.

    `dvc repro` runs fetch -> preprocess -> train -> evaluate -> predict as declared
    in dvc.yaml; `mlflow run .` runs them through `pipeline run`; `pipeline reproduce RUN_ID`
    reruns a logged run from its commit, data and config and compares the two.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow.store", "urllib3", "matplotlib", "h5py", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"params": params_path, "overrides": overrides}


def _config(ctx: click.Context, extra: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(ctx.obj["params"], [*ctx.obj["overrides"], *extra])


@cli.command()
@click.option("--out", default="data/raw", type=click.Path(file_okay=False), help="Raw arrays and manifest.json.")
@click.pass_context
def fetch(ctx: click.Context, out: str) -> None:
    """Get the dataset named by data.source, verify it, write raw uint8 arrays and a manifest.

    An output that already holds Fashion-MNIST or MNIST as this would write it is verified against the
    source files without decompressing them, and left as it is."""
    from pipeline import fetch as stage

    cfg = _config(ctx)
    current = stage.up_to_date(cfg.data, out)
    if current is not None:  # left as it is, so DVC need not hash it again
        click.echo(f"fetch: {cfg.data.source}: {current['counts']} -> {out} (unchanged)")
        return
    dataset = stage.fetch_dataset(cfg.data)
    stage.save_raw(dataset, out)
    click.echo(f"fetch: {cfg.data.source}: {dataset.manifest['counts']} -> {out}")


@cli.command()
@click.option("--raw", default="data/raw", type=click.Path(file_okay=False), help="The fetch stage's output.")
@click.option("--out", default="data/prepared", type=click.Path(file_okay=False), help="Split, resized uint8 arrays and stats.json.")
@click.pass_context
def preprocess(ctx: click.Context, raw: str, out: str) -> None:
    """Resize, convert channels, split train/val (stratified), compute normalisation statistics."""
    from pipeline import fetch as fetch_stage
    from pipeline import preprocess as stage

    cfg = _config(ctx)
    prepared = stage.preprocess(fetch_stage.load_raw(raw), cfg.preprocess, cfg.seed)
    stage.save_prepared(prepared, out)
    click.echo(f"preprocess: {prepared.stats['counts']} at {prepared.input_shape} -> {out}")


@cli.command()
@click.option("--data", default="data/prepared", type=click.Path(file_okay=False), help="The preprocess stage's output.")
@click.option("--raw", default="data/raw", type=click.Path(file_okay=False), help="The fetch stage's output (manifest, input example).")
@click.option("--out", default="data/train", type=click.Path(file_okay=False), help="model.keras, history.csv, summary.txt, run.json.")
@click.option("--workers", default=None, metavar="HOST:PORT,...",
              help="With train.distribute=multi_worker: every worker's address, the chief (which logs and writes "
                   "the outputs) first; sets TF_CONFIG for this process. Without it, TF_CONFIG as a cluster "
                   "manager sets it.")
@click.option("--worker-index", "worker_index", type=int, default=None,
              help="This process's position in --workers (0: the chief).")
@click.option("--worker-wait", "worker_wait", type=click.FloatRange(min=1), default=600, metavar="SECONDS",
              help="With train.distribute=multi_worker: how long to wait for every worker to start before failing.")
@click.pass_context
def train(ctx: click.Context, data: str, raw: str, out: str, workers: str | None, worker_index: int | None,
          worker_wait: float) -> None:
    """Train the model from model.*, optimizer.*, train.*, callbacks.*; log the run to MLflow.

    With train.distribute=multi_worker, start it on every worker with the same params and data; the
    chief alone logs and writes --out, the others write nothing.
    """
    from pipeline import distribute
    from pipeline import train as stage

    cfg = _config(ctx)
    if workers is not None or worker_index is not None:
        if cfg.train.distribute != "multi_worker":
            raise PipelineError(f"--workers and --worker-index need train.distribute = multi_worker "
                                f"(it is {cfg.train.distribute!r})")
        if os.environ.get("TF_CONFIG"):
            raise PipelineError("TF_CONFIG is set and --workers given: use one of them")
        os.environ["TF_CONFIG"] = distribute.tf_config(workers or "", worker_index)
    run_id = stage.main(cfg, data, raw, out, worker_wait=worker_wait)
    if run_id is None:
        click.echo(f"train: worker done; the chief logs the run and writes {out}")
    else:
        click.echo(f"train: MLflow run {run_id} -> {out}")


@cli.command()
@click.option("--data", default="data/prepared", type=click.Path(file_okay=False), help="The preprocess stage's output.")
@click.option("--train", "train_dir", default="data/train", type=click.Path(file_okay=False), help="The train stage's output.")
@click.option("--metrics", default="data/evaluate/metrics.json", type=click.Path(dir_okay=False), help="Metrics for `dvc metrics show`.")
@click.option("--plots", default="data/evaluate/plots", type=click.Path(file_okay=False), help="CSV data for `dvc plots show`.")
@click.option("--figures", default="data/evaluate/figures", type=click.Path(file_okay=False),
              help="PNG plots, and report.json with per-class accuracy and confusion matrices.")
@click.pass_context
def evaluate(ctx: click.Context, data: str, train_dir: str, metrics: str, plots: str, figures: str) -> None:
    """Loss, accuracy, per-class accuracy and confusion matrix on val and test; the notebooks' plots."""
    from pipeline import evaluate as stage

    result = stage.main(_config(ctx), data, train_dir, metrics, plots, figures)
    shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    click.echo(f"evaluate: {shown} -> {metrics}")


@cli.command()
@click.option("--raw", default="data/raw", type=click.Path(file_okay=False), help="The fetch stage's output.")
@click.option("--train", "train_dir", default="data/train", type=click.Path(file_okay=False), help="The train stage's output.")
@click.option("--out", default="data/predictions.csv", type=click.Path(dir_okay=False), help="The predictions CSV.")
@click.pass_context
def predict(ctx: click.Context, raw: str, train_dir: str, out: str) -> None:
    """Predict the unlabeled set (or the test split) with the saved raw-pixel model; write a CSV."""
    from pipeline import predict as stage

    path = stage.main(_config(ctx), raw, train_dir, out)
    click.echo(f"predict: -> {path}")


@cli.command(name="run")
@click.option("--model", default="", help="model.name")
@click.option("--optimizer", default="", help="optimizer.name")
@click.option("--learning-rate", "learning_rate", default="", help="optimizer.learning_rate")
@click.option("--epochs", default="", help="train.epochs")
@click.option("--batch-size", "batch_size", default="", help="train.batch_size")
@click.option("--dropout", default="", help="model.dropout")
@click.option("--dataset", default="", help="data.source")
@click.option("--overrides", "more", default="", metavar="'K=V K=V'",
              help="More params.yaml overrides, space-separated (MLproject's `set` param).")
@click.option("--out", default="outputs/runs", type=click.Path(file_okay=False),
              help="Where train/evaluate/predict outputs go, one folder per MLflow run id.")
@click.option("--raw", "raw_dir", default=None, type=click.Path(file_okay=False),
              help="A fetch output made with this run's data.* params, used instead of running the data stages "
                   "(with --data; `pipeline sweep` passes the data it prepared once for its trials).")
@click.option("--data", "prepared_dir", default=None, type=click.Path(file_okay=False),
              help="The preprocess output of --raw with this run's seed and preprocess.* params.")
@click.pass_context
def run(ctx: click.Context, out: str, more: str, raw_dir: str | None, prepared_dir: str | None,
        **options: str) -> None:
    """All stages in one MLflow run (the one `mlflow run` created, or a new one).

    Empty options keep params.yaml's value; params.yaml itself is never edited.
    The data stages are reused through `dvc repro` when their params are unchanged.
    """
    from pipeline import workflow

    if (raw_dir is None) != (prepared_dir is None):
        raise PipelineError("--raw and --data go together: the fetch and the preprocess outputs of one dataset")
    extra = [f"{RUN_OPTIONS[name]}={value}" for name, value in options.items() if value != ""]
    extra += more.split()
    cfg = _config(ctx, extra)
    # the params dvc.yaml's stages read: their data may be reused only when the run's data params equal these
    base = load_config(DEFAULT_PARAMS) if Path(DEFAULT_PARAMS).is_file() else None
    data = (Path(raw_dir), Path(prepared_dir)) if raw_dir is not None else None
    run_id = workflow.run_all(cfg, base, out, data)
    click.echo(f"run: MLflow run {run_id} -> {Path(out) / run_id}")


@cli.command()
@click.option("--quick", is_flag=True, help="Tiny sizes (digits, a tiny CNN): checks that every figure runs, in about a minute.")
@click.option("--main-job/--no-main-job", default=True,
              help="Also run `dvc repro` in a fresh copy of the project (time to accuracy, peak memory, "
                   "nothing-changed repro, predict).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training-figure epochs (default 5; quick 2).")
@click.option("--train-images", type=click.IntRange(min=1), default=None,
              help="Train on the first N images of the training split (default all; quick 256).")
@click.option("--out", default="reports/bench", type=click.Path(file_okay=False), help="Where bench.json and bench.md go.")
@click.pass_context
def bench(ctx: click.Context, quick: bool, main_job: bool, epochs: int | None, train_images: int | None, out: str) -> None:
    """Measure each speed figure against its baseline in one run on this machine; print and save the table.

    Baselines: Keras model.fit on float32 NumPy arrays (training), the same training untracked and under
    mlflow.tensorflow.autolog() (tracking), a per-image PIL loop (preprocess), model.predict on a float32
    array (predict), `dvc --version` (a nothing-changed repro). Takes about an hour on 2 cores in full; use
    --epochs/--train-images to shorten.
    """
    from pipeline import bench as stage

    report = stage.run_bench(ctx.obj["params"], quick=quick, main_job=main_job, epochs=epochs,
                             train_images=train_images, echo=lambda line: click.echo(line, err=True))
    json_path, md_path = stage.write_report(report, out)
    click.echo(stage.markdown(report))
    click.echo(f"bench: -> {json_path}, {md_path}")


@cli.command()
@click.argument("run_id")
@click.option("--allow-dirty", is_flag=True,
              help="Rerun a run made from a dirty working tree from its commit, without its uncommitted changes.")
@click.option("--tolerance", default=DEFAULT_TOLERANCE, type=float,
              help="Largest absolute difference of any compared metric that counts as within tolerance.")
@click.pass_context
def reproduce(ctx: click.Context, run_id: str, allow_dirty: bool, tolerance: float) -> None:
    """Rerun RUN_ID from its git commit, data and config; compare the two runs' metrics.

    The run comes from the tracking store (MLFLOW_TRACKING_URI, else mlflow.tracking_uri); its commit is
    checked out into a temporary git worktree, its data pulled from the commit's DVC remote or refetched
    (the digest must equal the run's data.digest), and the commit's own preprocess, train and evaluate
    stages rerun with the run's config into a new run tagged `reproduces`. Prints both runs' metrics per
    epoch side by side. Exit status: 0 identical (bitwise), 3 within --tolerance, 4 different, 1 an error.
    """
    from pipeline import reproduce as stage

    cfg = _config(ctx)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr to our progress lines
    result = stage.reproduce(run_id, cfg.tracking_uri(), Path.cwd(), allow_dirty=allow_dirty, tolerance=tolerance,
                             echo=lambda line: click.echo(line, err=True))
    click.echo(stage.format_comparison(result))
    sys.exit(result.exit_code)


@cli.command()
@click.option("--name", required=True, help="The registered model's name (created if new).")
@click.option("--run", "run_id", default=None, metavar="RUN_ID",
              help="Register this run's model instead of choosing the best run.")
@click.option("--metric", default=None, metavar="METRIC",
              help="Choose the FINISHED run with the best value of this metric that has a logged model "
                   "(names ending in `loss` lowest, others highest). [default: test_accuracy]")
@click.option("--experiment", default=None, metavar="NAME",
              help="Choose among this experiment's runs. [default: mlflow.experiment_name]")
@click.option("--filter", "filter_string", default=None, metavar="FILTER",
              help="Only runs matching this MLflow search filter, e.g. \"params.`model.name` = 'cnn'\".")
@click.option("--alias", default="champion", help="The alias set on the registered version.")
@click.pass_context
def register(ctx: click.Context, name: str, run_id: str | None, metric: str | None, experiment: str | None,
             filter_string: str | None, alias: str) -> None:
    """Register the best run's model (or --run's) in the MLflow model registry as NAME, with --alias.

    The version is tagged with the run id, the metric and its value, and the class names (index i names
    probability i). A model already registered as a version of NAME is not registered again: that version
    gets the alias. `mlflow models serve -m models:/NAME@ALIAS` serves the version holding the alias.
    """
    from pipeline import register as stage

    cfg = _config(ctx)
    done = stage.main(cfg.tracking_uri(), name, run_id=run_id, metric=metric, experiment=experiment,
                      default_experiment=cfg.mlflow.experiment_name, filter_string=filter_string, alias=alias)
    what = f"{done.metric} = {done.value}" if done.metric else "chosen by --run"
    verb = "registered" if done.created else "already registered:"
    click.echo(f"register: {verb} {done.name} version {done.version} (alias {done.alias}): "
               f"run {done.run_id}, {what}")
    click.echo(f"serve it: {stage.serve_command(cfg.tracking_uri(), done.name, done.alias)}")


@cli.command()
@click.option("--experiment", default=None, metavar="NAME", help="The runs of this experiment.")
@click.option("--parent", default=None, metavar="RUN_ID",
              help="The children of this run (a sweep's parent: tag mlflow.parentRunId); the report is logged to it.")
@click.option("--runs", "run_list", default=None, metavar="ID,ID,...", help="These runs, by id.")
@click.option("--filter", "filter_string", default=None, metavar="EXPRESSION",
              help="MLflow search syntax, e.g. \"metrics.test_accuracy > 0.9 and params.`optimizer.name` = 'sgd'\"; "
                   "within --experiment or --parent when given, else over every experiment.")
@click.option("--sort", "sort_by", default="test_accuracy", metavar="METRIC",
              help="A column of the table or any logged metric; names ending in `loss` lowest first, others highest first.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="The report's folder (replaced if it holds a previous report) "
                   "[default: reports/compare/<experiment-NAME | parent-ID | runs-N-HASH | filter-HASH>]")
@click.option("--log-to", "log_to", default=None, metavar="RUN_ID",
              help="Also log the report to this run under comparison/ [default: the --parent run].")
@click.pass_context
def compare(ctx: click.Context, experiment: str | None, parent: str | None, run_list: str | None,
            filter_string: str | None, sort_by: str, out: str | None, log_to: str | None) -> None:
    """Compare runs: one table (Markdown, CSV, HTML) and plots of val accuracy/loss by epoch and accuracy by time.

    The table holds each run's name, model, optimizer, the params that differ between the runs, train
    (last epoch), val and test accuracy and loss, epochs, train seconds, seconds per epoch, images per
    second, parameter count and run id. Runs come from the configured store (MLFLOW_TRACKING_URI, else
    mlflow.tracking_uri); runs without training metrics (a sweep's parent) are left out, with a line saying so.
    """
    from pipeline import compare as stage

    cfg = _config(ctx)
    run_ids = [part.strip() for part in (run_list or "").split(",") if part.strip()]
    if run_list is not None and not run_ids:
        raise PipelineError(f"--runs {run_list!r}: expected run ids separated by commas")
    selection = {"experiment": experiment, "parent": parent, "run_ids": run_ids, "filter_string": filter_string}
    client = stage.open_store(cfg.tracking_uri())
    runs = stage.select_runs(client, **selection)
    folder = Path(out) if out else stage.default_folder(**selection)
    paths = stage.write_report(client, runs, folder, sort_by=sort_by, log_to=log_to or parent)
    click.echo(paths["markdown"].read_text().rstrip())
    click.echo(f"compare: {len(runs)} runs selected -> " + ", ".join(str(p) for p in paths.values()))
    if log_to or parent:
        click.echo(f"compare: logged to run {log_to or parent} under {stage.ARTIFACT_PATH}/")


class _BlankIsNone(click.ParamType):
    """`inner`, or None for an empty value: MLproject passes its empty defaults as ''."""

    def __init__(self, inner: click.ParamType):
        self.inner, self.name = inner, inner.name

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            return None
        return self.inner.convert(value, param, ctx)


@cli.command()
@click.option("--grid", multiple=True, metavar="KEY=V1,V2,...",
              help="Try every value of a params.yaml key, in every combination with the other --grid keys "
                   "(repeatable). Values are read as YAML; commas inside [...] belong to a value: "
                   "--grid 'model.filters=[[8],[16]],[[16],[32]]'.")
@click.option("--random", "draws", multiple=True, metavar="KEY=SPEC",
              help="Draw a key's value for each trial (repeatable): uniform:LOW:HIGH, loguniform:LOW:HIGH, "
                   "int:LOW:HIGH (both ends included) or choice:V1,V2,...; drawn floats keep 4 significant "
                   "digits. With --grid, every grid point gets --trials draws.")
@click.option("--trials", type=_BlankIsNone(click.INT), default=None,
              help="Random draws (per grid point with --grid) [default: the file's, else 10].")
@click.option("--seed", type=_BlankIsNone(click.INT), default=None,
              help="Seed of the random draws (not of the trainings: that is params.yaml's seed) "
                   "[default: the file's, else 0].")
@click.option("--file", "sweep_file", type=_BlankIsNone(click.Path(dir_okay=False)), default=None,
              help="A sweep YAML file with keys grid, random, trials, seed, set, metric (README \"Sweeps\"); "
                   "--grid and --random add keys to it, --trials, --seed and --metric replace its values.")
@click.option("--overrides", "more", default="", metavar="'K=V K=V'",
              help="More fixed overrides of every trial, space-separated (MLproject's `set`); "
                   "the same as `pipeline --set K=V sweep`.")
@click.option("--metric", type=_BlankIsNone(click.STRING), default=None,
              help="The metric that picks the best trial; a name ending in `loss` is minimised, others "
                   "maximised [default: the file's, else test_accuracy].")
@click.option("--jobs", type=click.IntRange(min=1), default=1,
              help="Trials at a time, each its own process (each uses every core TensorFlow finds).")
@click.option("--out", default="outputs/sweeps", type=click.Path(file_okay=False),
              help="Outputs go to OUT/<parent run id>/: sweep.yaml, data/ (data built for the sweep), and "
                   "one folder per trial run id with `pipeline run`'s outputs and trial.log.")
@click.option("--new", is_flag=True,
              help="Start the sweep afresh, in a new parent run, even if it ran before (its next generation; "
                   "with --shard, the other machines' shards join it, with or without --new).")
@click.option("--shard", type=_BlankIsNone(click.STRING), default=None, metavar="I/N",
              help="Run only part I of N of the trials (trials I, I+N, I+2N, ...): the same command with 1/N .. N/N "
                   "on N machines, against one tracking server, runs each trial once. Each shard has its own "
                   "parent run; all their trials carry the tags sweep.key and sweep.generation.")
@click.pass_context
def sweep(ctx: click.Context, grid: tuple[str, ...], draws: tuple[str, ...], trials: int | None, seed: int | None,
          sweep_file: str | None, more: str, metric: str | None, jobs: int, out: str, new: bool,
          shard: str | None) -> None:
    """Grid or random search: each trial a nested MLflow run under one parent run.

    \b
      pipeline --set train.epochs=3 sweep --grid optimizer.name=sgd,adam --grid train.batch_size=32,64
      pipeline sweep --random optimizer.learning_rate=loguniform:1e-4:1e-2 --trials 8 --jobs 2
      pipeline sweep --file sweep.yaml

    Every trial's config (params.yaml, `pipeline --set`, --overrides, then the trial's values) is checked
    before any trial runs. Each trial runs what `pipeline run` runs, in its own process, into a child run
    of the parent; the data stages run once for all trials with the same seed, data.* and preprocess.*
    (from DVC's cache when those equal params.yaml's). The parent logs the space and the best trial
    (tags best.*, metrics best.<metric>). A failed trial ends FAILED and the others go on; the command
    then exits 1 naming it. Ctrl-C or SIGTERM ends the running trials and the parent KILLED.

    Resume: the same command again (same space, seed, params and experiment) reopens the same parent
    run, skips the trials that FINISHED and reruns the others in their own runs and folders (a training
    killed mid-way resumes from its last epoch). --new starts afresh.

    \b
    Across machines (README "Sweeps across machines"), with MLFLOW_TRACKING_URI set to one server:
      pipeline sweep --grid optimizer.name=sgd,adam --grid train.batch_size=32,64 --shard 1/2   # host-a
      pipeline sweep --grid optimizer.name=sgd,adam --grid train.batch_size=32,64 --shard 2/2   # host-b
    """
    from pipeline import sweep as stage

    spec = stage.read_sweep_file(sweep_file) if sweep_file is not None else None
    fixed = (*ctx.obj["overrides"], *more.split())
    space = stage.build_space(grid, draws, trials, seed, spec, str(sweep_file or ""), fixed)
    metric = metric or (spec.metric if spec is not None and spec.metric else stage.DEFAULT_METRIC)
    part = stage.Shard.parse(shard) if shard is not None else None
    echo = lambda line: click.echo(line, err=True)  # noqa: E731 (progress on stderr, the table on stdout)
    try:
        result = stage.run_sweep(ctx.obj["params"], space, metric, jobs, out, new, echo, part)
    except stage.TrialsFailed as exc:
        click.echo(exc.result.table())
        raise
    click.echo(result.table())
    best = result.best
    if best is not None:
        click.echo(f"sweep: best trial {best.trial.index} ({best.trial.name}) {metric}={best.metric:.4f}, "
                   f"run {best.run_id}")
    click.echo(f"sweep: parent run {result.parent_id} -> {result.folder}")
    if part is not None:
        click.echo(f"sweep: every shard's trials: pipeline compare --filter \"tags.\\`{stage.KEY_TAG}\\` = "
                   f"'{result.key}' and tags.\\`{stage.GENERATION_TAG}\\` = '{result.generation}'\"")


def main() -> None:
    interrupts.install()  # Ctrl-C and SIGTERM: KeyboardInterrupt, never lost (a run ends KILLED)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of stage logs
    hardware.prefer_onednn()  # before TensorFlow loads: oneDNN's kernels on AVX2-only CPUs too (1.2-1.5x training)
    try:
        code = cli.main(standalone_mode=False, prog_name="pipeline")  # click's Exit(n) (--help: 0) returns n
        interrupts.raise_if_interrupted()  # one that Python dropped after the last check
        code = code if isinstance(code, int) else 0
    except (click.exceptions.Abort, KeyboardInterrupt):  # the run, if any, has ended KILLED
        click.echo("interrupted", err=True)
        code = 130
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except PipelineError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    if "tensorflow" in sys.modules and _is_the_program():
        _exit_now(code)  # also after an error or Ctrl-C: everything is ended and cleaned up by now
    if code:
        sys.exit(code)


def _is_the_program() -> bool:
    """Whether this process is the `pipeline` command (its console script, or `python -m pipeline`), rather than
    a program that calls main() and goes on afterwards (tests do)."""
    program = sys.modules.get("__main__")
    spec = getattr(program, "__spec__", None)
    return (spec is not None and spec.name == "pipeline.__main__") or (
        Path(getattr(program, "__file__", None) or "").name == "pipeline")


def _exit_now(code: int) -> None:
    """Exit at once after a command that loaded TensorFlow, skipping the interpreter's own finalisation.

    Tearing down TensorFlow's and Keras' thousands of modules and objects took 1.4-1.5 s after every train,
    evaluate and predict stage had finished (measured on 2 cores; about 5 s of the main job). Everything
    is written by then: files are closed and renamed, MLflow commits each call. The exit handlers still run
    (MLflow's, logging's flush); only the teardown is skipped."""
    import atexit

    atexit._run_exitfuncs()  # noqa: SLF001 - CPython's own exit handlers, as a normal exit runs them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
