"""`pipeline sweep`: a grid or random search over params, each trial a nested MLflow run under one parent.

The search space comes from `--grid KEY=V1,V2`, `--random KEY=SPEC` and a sweep YAML file (SweepFile).
The trial list is a pure function of the space (keys sorted, values drawn from `random.Random(seed)`),
so the same space always lists the same trials in the same order: resuming relies on it. Every trial's
config is validated before anything runs.

One parent run, tagged `pipeline.sweep` with a hash of the space and the base config, holds the space
(params `sweep.*`, the artifact `sweep.yaml`, its description as the run's note) and at the end the
best trial (`_report`). Each trial is a child run (MLflow's tag `mlflow.parentRunId`) created here and
handed through MLFLOW_RUN_ID to its own `pipeline run` process, as `mlflow run` hands a run to its
command: Keras and TensorFlow start fresh in every trial, and `--jobs N` is N such processes at once.

Run again, the same sweep reopens its parent, skips the trials whose run FINISHED and reruns the others
in their own runs and folders (a killed training resumes from its backup there: see train.py).

Across machines, `--shard I/N` runs every N-th trial from the I-th (Shard): the same command with 1/N ..
N/N on N machines against one tracking server runs each trial once. Each shard is a sweep of its own
(its own parent, tagged `sweep.shard`, resumable alone); every trial carries the sweep's key as the tag
`sweep.key`, which selects all the shards' trials at once (`pipeline compare --filter`). `--new` starts
the sweep's next generation (tag `sweep.generation` on parents and trials): the shards of the other
machines join it, with or without `--new` (place_in_generation).

The data stages run once per group of trials with equal data params (workflow.data_params): from DVC's
cache when they equal params.yaml's (workflow.dvc_data), else fetched and preprocessed into the sweep's
folder; every trial of the group is given those folders (`pipeline run --raw --data`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import interrupts
from pipeline.config import DEFAULT_PARAMS, Config, ConfigError, load_config
from pipeline.errors import PipelineError

DEFAULT_METRIC = "test_accuracy"
DEFAULT_TRIALS = 10  # random draws per grid point when --random is given and neither --trials nor the file says
SWEEP_TAG = "pipeline.sweep"  # on the parent: the sweep's key, how a rerun finds it
TRIAL_TAG = "sweep.trial"  # on a child: its 1-based position in the trial list
TRIAL_KEY_TAG = "sweep.trial_key"  # on a child: hash of its position and overrides, how a rerun finds it
SHARD_TAG = "sweep.shard"  # on a sharded sweep's parent and children: I/N (--shard)
KEY_TAG = "sweep.key"  # on a child: its sweep's key, the same in every shard: how to select all of them
GENERATION_TAG = "sweep.generation"  # on a parent and its children: which start of the sweep (--new), from 1
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting tag: the UI lists the children under the parent
SIGNIFICANT = 4  # drawn floats are rounded to 4 significant digits: readable run names, exact as YAML
STOP_SECONDS = 60  # how long a trial gets to end its run after SIGTERM before it is killed
POLL_SECONDS = 0.5  # how often the running trials are checked
FORMS = "uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH or choice:V1,V2,..."
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # 1e-4: a string to YAML 1.1, a number here


# ---------------------------------------------------------------- the search space

def split_outside_brackets(text: str, sep: str) -> list[str]:
    """Split at `sep` (" " = any whitespace) outside [], {}, () and quotes: 'a,[1, 2]' -> ['a', '[1, 2]']."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif depth == 0 and (ch.isspace() if sep == " " else ch == sep):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()] if sep == " " else [part.strip() for part in parts]


def parse_value(text: str) -> Any:
    """One value as `--set` reads it (YAML: 0.1, true, [8, 16], sgd), and 1e-4 as a number."""
    text = text.strip()
    if _EXPONENT.fullmatch(text):
        return float(text)
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def format_value(value: Any) -> str:
    """A value as YAML text that parse_value and `--set` read back as the same value (1e-05 -> 1.0e-05)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()


@dataclass(frozen=True)
class Distribution:
    """What `--random KEY=SPEC` draws from; `spec()` is its canonical text."""

    kind: str  # uniform | loguniform | int | choice
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return rng.choice(self.choices)
        if self.kind == "int":  # both ends included
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "loguniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return float(f"{value:.{SIGNIFICANT}g}")

    def spec(self) -> str:
        if self.kind == "choice":
            return "choice:" + ",".join(format_value(v) for v in self.choices)
        if self.kind == "int":
            return f"int:{int(self.low)}:{int(self.high)}"
        return f"{self.kind}:{self.low!r}:{self.high!r}"


def parse_distribution(key: str, spec: str | list, where: str) -> Distribution:
    """`uniform:0:0.5`, `loguniform:1e-4:1e-2`, `int:16:128` (both ends included), `choice:32,64,128`;
    a list (in a sweep file) is a choice. `where` names the option or file in the error."""
    if isinstance(spec, list):
        if not spec:
            raise PipelineError(f"{where} {key}: an empty choice; expected at least one value")
        return Distribution("choice", choices=tuple(spec))
    kind, _, rest = str(spec).partition(":")
    bad = f"{where} {key}={spec}"
    if kind == "choice":
        values = split_outside_brackets(rest, ",")
        if not rest.strip() or any(v == "" for v in values):
            raise PipelineError(f"{bad}: expected choice:V1,V2,... with no empty value")
        return Distribution("choice", choices=tuple(parse_value(v) for v in values))
    if kind not in ("uniform", "loguniform", "int"):
        raise PipelineError(f"{bad}: unknown distribution {kind!r}; expected {FORMS}")
    ends = rest.split(":")
    try:
        if len(ends) != 2:
            raise ValueError
        low, high = (int(e) for e in ends) if kind == "int" else (float(e) for e in ends)
    except ValueError:
        number = "integers" if kind == "int" else "numbers"
        raise PipelineError(f"{bad}: expected {kind}:LOW:HIGH with two {number}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise PipelineError(f"{bad}: expected LOW < HIGH")
    if kind == "loguniform" and low <= 0:
        raise PipelineError(f"{bad}: expected 0 < LOW < HIGH (a log scale)")
    return Distribution(kind, low, high)


NonEmptyList = Annotated[list[Any], Field(min_length=1)]


class SweepFile(BaseModel):
    """A sweep YAML file (`--file`): the same as the command-line options, unknown keys are errors.

        grid:                          # every combination of these values
          optimizer.name: [sgd, adam]
          train.batch_size: [32, 64]
        random:                        # drawn `trials` times per grid point
          optimizer.learning_rate: loguniform:1e-4:1e-2
          model.dropout: [0.1, 0.25]   # a list is a choice
        trials: 4
        seed: 0
        set:                           # fixed for every trial
          train.epochs: 3
        metric: test_accuracy
    """

    model_config = ConfigDict(extra="forbid")

    grid: dict[str, NonEmptyList] = {}
    random: dict[str, Union[str, NonEmptyList]] = {}
    trials: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    set: dict[str, Any] = {}
    metric: Optional[str] = None


def read_sweep_file(path: str | os.PathLike) -> SweepFile:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found; expected a sweep YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise PipelineError(f"{path}: expected a mapping with keys {', '.join(SweepFile.model_fields)}")
    try:
        return SweepFile.model_validate(tree)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(p) for p in error["loc"] if not str(p).isdigit() and "[" not in str(p)]
        if error["type"] == "extra_forbidden":
            raise PipelineError(f"{path}: unknown key {loc[-1]!r} (allowed: {', '.join(SweepFile.model_fields)})") \
                from None
        message = error["msg"].removeprefix("Value error, ")
        raise PipelineError(f"{path}: {': '.join(loc)} = {error.get('input')!r}: {message}") from None


@dataclass(frozen=True)
class Space:
    """What to sweep: the grid's values, the random draws, and the overrides fixed for every trial."""

    grid: dict[str, tuple]  # key -> values, keys sorted
    random: dict[str, Distribution]  # key -> distribution, keys sorted
    trials: int  # draws per grid point (with random keys)
    seed: int  # of the draws
    fixed: tuple[str, ...] = ()  # KEY=VALUE for every trial, applied first

    def canonical(self) -> dict:
        """The space as plain data (`sweep.yaml`); trials and seed only where they change the list."""
        out: dict[str, Any] = {"grid": {k: list(v) for k, v in self.grid.items()},
                               "random": {k: d.spec() for k, d in self.random.items()}}
        if self.random:
            out.update(trials=self.trials, seed=self.seed)
        out["set"] = list(self.fixed)
        return out

    def describe(self, count: int) -> str:
        parts = [f"{k} in [{', '.join(format_value(v) for v in values)}]" for k, values in self.grid.items()]
        text = "grid " + " x ".join(parts) if parts else ""
        if self.random:
            draws = "; ".join(f"{k} ~ {d.spec()}" for k, d in self.random.items())
            per = " per grid point" if self.grid else ""
            text += ("; " if text else "") + f"random {draws}, {self.trials} draws{per} (seed {self.seed})"
        fixed = f"; fixed {' '.join(self.fixed)}" if self.fixed else ""
        return f"{count} trial{'' if count == 1 else 's'}: {text}{fixed}"


def build_space(grid: tuple[str, ...] = (), draws: tuple[str, ...] = (), trials: int | None = None,
                seed: int | None = None, sweep_file: SweepFile | None = None, file_name: str = "",
                fixed: tuple[str, ...] = ()) -> Space:
    """The space from `--grid` and `--random` values (each may hold several space-separated KEY=SPEC, the
    MLproject form) and a sweep file; the options' trials and seed win over the file's."""
    sweep_file = sweep_file or SweepFile()
    grid_values: dict[str, tuple] = {k: tuple(v) for k, v in sweep_file.grid.items()}
    distributions = {k: parse_distribution(k, v, f"{file_name}: random") for k, v in sweep_file.random.items()}
    for text in (s for option in grid for s in split_outside_brackets(option, " ")):
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise PipelineError(f"--grid {text!r}: expected KEY=V1,V2,... e.g. optimizer.name=sgd,adam")
        items = split_outside_brackets(values, ",")
        if any(item == "" for item in items):
            raise PipelineError(f"--grid {text!r}: an empty value; expected KEY=V1,V2,...")
        if key in grid_values:
            raise PipelineError(f"--grid {key}: given twice (once per key, with all its values)")
        grid_values[key] = tuple(parse_value(item) for item in items)
    for text in (s for option in draws for s in split_outside_brackets(option, " ")):
        key, sep, spec = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PipelineError(f"--random {text!r}: expected KEY=SPEC with SPEC one of {FORMS}")
        if key in distributions:
            raise PipelineError(f"--random {key}: given twice")
        distributions[key] = parse_distribution(key, spec.strip(), "--random")
    both = sorted(set(grid_values) & set(distributions))
    if both:
        raise PipelineError(f"{both[0]} is both in the grid and drawn at random; sweep it one way")
    if not grid_values and not distributions:
        raise PipelineError("nothing to sweep: give --grid KEY=V1,V2, --random KEY=SPEC or --file sweep.yaml")
    fixed_all = tuple(f"{k}={format_value(v)}" for k, v in sweep_file.set.items()) + tuple(fixed)
    fixed_keys = {text.partition("=")[0].strip() for text in fixed_all}
    for key in sorted(grid_values) + sorted(distributions):
        if key.split(".")[0] == "mlflow":
            raise PipelineError(f"{key}: mlflow.* is the sweep's store and experiment, the same for every trial; "
                                "set it with --set, not in the search space")
        if key in fixed_keys:
            raise PipelineError(f"{key} is both swept and fixed (--set or the file's set); keep one")
    trials = trials if trials is not None else sweep_file.trials if sweep_file.trials is not None else DEFAULT_TRIALS
    if trials < 1:
        raise PipelineError(f"--trials {trials}: expected at least 1")
    seed = seed if seed is not None else sweep_file.seed if sweep_file.seed is not None else 0
    return Space(grid=dict(sorted(grid_values.items())), random=dict(sorted(distributions.items())),
                 trials=trials, seed=seed, fixed=fixed_all)


@dataclass(frozen=True)
class Trial:
    index: int  # 1-based position in the trial list
    overrides: tuple[tuple[str, Any], ...]  # (key, value): the grid's keys, then the drawn ones

    def args(self) -> list[str]:
        return [f"{key}={format_value(value)}" for key, value in self.overrides]

    @property
    def name(self) -> str:
        return " ".join(self.args())

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.index, self.args()]).encode()).hexdigest()[:16]


def trial_list(space: Space) -> list[Trial]:
    """Every grid point (in sorted key order) once, or `trials` times with fresh random draws; the same
    space and seed give the same list."""
    points = [tuple(zip(space.grid, values)) for values in itertools.product(*space.grid.values())]
    rng = random.Random(space.seed)
    out: list[Trial] = []
    for point in points:
        for _ in range(space.trials if space.random else 1):
            drawn = tuple((key, dist.draw(rng)) for key, dist in space.random.items())
            out.append(Trial(len(out) + 1, point + drawn))
    return out


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` of a sweep's trials (`--shard I/N`): trials I, I + N, I + 2N, ... (round robin,
    so each shard gets a share of every grid key's values)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise PipelineError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/3 (part 2 of 3)")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, trial: Trial) -> bool:
        return (trial.index - 1) % self.count == self.index - 1


def place_in_generation(parents: list[tuple[int, str]], shard_text: str, new: bool) -> tuple[int, int | None]:
    """(generation, index in `parents` of the parent to resume, or None for a new one) for this run's parent.

    parents: the sweep's earlier parents, newest first, as (generation, shard: "I/N", or "" unsharded).
    A generation is one start of the sweep on all its machines. Without --new, a shard resumes its parent in
    the newest generation, or joins that generation with a new parent when it has none there (another
    machine started it afresh). --new starts the next generation, unless this shard has no parent yet in
    the newest one and that one is split the same way: then it joins it (every machine of a restart gives
    --new, and the first one started it)."""
    newest = max((generation for generation, _ in parents), default=0)
    current = [(i, shard) for i, (generation, shard) in enumerate(parents) if generation == newest]
    mine = [i for i, shard in current if shard == shard_text]
    if new:
        same_split = all(split_count(shard) == split_count(shard_text) for _, shard in current)
        return (newest if current and not mine and same_split else newest + 1), None
    return max(newest, 1), (mine[0] if mine else None)


def split_count(shard_text: str) -> str:
    """N of a shard's "I/N" (the count its sweep is split in); "" for an unsharded sweep."""
    return shard_text.partition("/")[2]


def generation_of(run) -> int:
    """A sweep parent's generation; 1 for one made before generations were tagged."""
    text = run.data.tags.get(GENERATION_TAG, "")
    return int(text) if text.isdigit() else 1


def _placed(parents: list) -> list[tuple[int, str]]:
    """Parent runs as place_in_generation takes them: (generation, shard)."""
    return [(generation_of(run), run.data.tags.get(SHARD_TAG, "")) for run in parents]


def trial_configs(params: str | os.PathLike, space: Space, trials: list[Trial]) -> list[Config]:
    """Every trial's config, validated before any trial starts; the first bad one fails naming its trial."""
    configs = []
    for trial in trials:
        try:
            configs.append(load_config(params, [*space.fixed, *trial.args()]))
        except ConfigError as exc:
            raise ConfigError(f"trial {trial.index} ({trial.name}): {exc}") from None
    return configs


def sweep_key(space: Space, base: Config) -> str:
    """What makes two sweeps the same one: the canonical space (without the fixed overrides' wording) and
    the base config they produce (params.yaml with the fixed overrides)."""
    space_data = {k: v for k, v in space.canonical().items() if k != "set"}
    text = json.dumps({"space": space_data, "config": base.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def better(metric: str) -> Callable:
    """min for metrics whose name ends in `loss`, else max (tracking.minimised)."""
    from pipeline.tracking import minimised

    return min if minimised(metric) else max


# ---------------------------------------------------------------- running it

@dataclass
class Outcome:
    trial: Trial
    run_id: str
    status: str  # FINISHED | FAILED | KILLED
    skipped: bool = False  # FINISHED in an earlier run of the sweep
    error: str = ""
    metric: float | None = None


@dataclass
class SweepResult:
    parent_id: str
    folder: Path
    metric: str
    outcomes: list[Outcome] = field(default_factory=list)
    best: Outcome | None = None
    resumed: bool = False
    key: str = ""  # the sweep's (sweep_key): tag sweep.key on every trial, in every shard
    shard: Shard | None = None
    generation: int = 1  # tag sweep.generation on the parent and every trial: which start of the sweep

    def table(self) -> str:
        rows = [f"{'trial':>5}  {'status':8}  {self.metric:>14}  {'run id':32}  overrides"]
        for o in self.outcomes:
            value = "" if o.metric is None else f"{o.metric:.4f}"
            mark = " (done before)" if o.skipped else ""
            best = " <- best" if self.best is not None and o.run_id == self.best.run_id else ""
            rows.append(f"{o.trial.index:>5}  {o.status:8}  {value:>14}  {o.run_id:32}  {o.trial.name}{mark}{best}")
        return "\n".join(rows)


def child_runs(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=50_000)


def _report(client, parent_id: str, out_dir: Path, metric: str) -> Any:
    """The parent's report, made at the end of every sweep (a resumed one too); returns the best trial's run.

    The best FINISHED trial by `metric` (min for a loss) as tags `best.run_id`, `best.run_name`,
    `best.overrides`, `best.param.<swept key>` and metrics `best.<metric>` for every metric of its run.
    Tags and metrics, not params: params cannot change, and a resumed sweep (or another --metric) may pick
    another trial. Then `pipeline compare --parent`'s report of every trial, sorted by `metric`, into
    `out_dir` and logged to the parent under `comparison/`.
    """
    from mlflow.entities import Metric

    from pipeline import compare

    parent = client.get_run(parent_id)
    finished = [r for r in child_runs(client, parent.info.experiment_id, parent_id) if r.info.status == "FINISHED"]
    if not finished:
        return None
    scored = [r for r in finished if metric in r.data.metrics]
    if not scored:
        logged = sorted(set().union(*(r.data.metrics for r in finished)))
        raise PipelineError(f"--metric {metric}: no finished trial logged it; they log {', '.join(logged)} "
                            "(rerun the sweep with one of those: finished trials are not run again)")
    best = better(metric)(scored, key=lambda r: r.data.metrics[metric])
    tags = {"best.run_id": best.info.run_id, "best.run_name": best.info.run_name or "", "best.metric": metric,
            "best.overrides": best.data.tags.get("sweep.overrides", "")}
    for text in split_outside_brackets(tags["best.overrides"], " "):
        key, _, value = text.partition("=")
        tags[f"best.param.{key}"] = value
    for key, value in tags.items():
        client.set_tag(parent_id, key, value)
    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(f"best.{k}", v, now, 0) for k, v in sorted(best.data.metrics.items())],
                     synchronous=True)
    compare.write_report(client, compare.select_runs(client, parent=parent_id), out_dir, sort_by=metric,
                         log_to=parent_id)
    return best


class Sweep:
    """One run of a sweep: the parent, the data, the trial processes; `run()` returns a SweepResult."""

    def __init__(self, params: str, space: Space, metric: str, jobs: int, out: str, new: bool,
                 echo: Callable[[str], None], shard: Shard | None = None):
        if jobs < 1:
            raise PipelineError(f"--jobs {jobs}: expected at least 1")
        if not metric.strip():
            raise PipelineError("--metric: expected a metric name such as test_accuracy or val_loss")
        self.params, self.space, self.metric, self.jobs, self.new, self.echo = params, space, metric, jobs, new, echo
        self.out = Path(out)
        self.base = load_config(params, space.fixed)  # a bad --set fails here, before it is blamed on a trial
        self.trials = trial_list(space)
        self.configs = trial_configs(params, space, self.trials)  # all of them: every shard fails alike
        self.shard = shard
        self.mine = [(t, c) for t, c in zip(self.trials, self.configs) if shard is None or shard.holds(t)]
        if not self.mine:
            raise PipelineError(f"--shard {shard}: this sweep has {len(self.trials)} trials, so shard {shard.index} "
                                f"would hold none; split it into at most {len(self.trials)} shards")
        self.shard_text = str(shard) if shard else ""
        self.shard_tags = {SHARD_TAG: self.shard_text} if shard else {}  # on the parent and every trial
        self.generation = 1  # open_parent finds it (place_in_generation)

    # -- the parent

    def open_parent(self, client, experiment_id: str, key: str) -> tuple[str, bool]:
        """(parent run id, whether it is an earlier run of this sweep), the run set RUNNING and owned by us."""
        from mlflow.exceptions import MlflowException

        from pipeline import tracking

        owner = {"pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid())}
        given = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run -e sweep` created it (or `--run-id` reopens one)
        if given:
            try:
                run = client.get_run(given)
            except MlflowException:
                raise PipelineError(f"MLFLOW_RUN_ID {given}: no such run in {self.base.tracking_uri()!r}") from None
            if run.info.experiment_id != experiment_id:
                raise PipelineError(f"run {given} (MLFLOW_RUN_ID) is in experiment {run.info.experiment_id}, not in "
                                    f"mlflow.experiment_name {self.base.mlflow.experiment_name!r} ({experiment_id}) "
                                    "where the trials go; give `mlflow run` --experiment-name "
                                    f"{self.base.mlflow.experiment_name}")
            if run.data.tags.get(SWEEP_TAG, key) != key:
                raise PipelineError(f"run {given} (MLFLOW_RUN_ID) holds another sweep ({SWEEP_TAG}="
                                    f"{run.data.tags[SWEEP_TAG]}); this one is {key}")
            if SWEEP_TAG in run.data.tags and run.data.tags.get(SHARD_TAG, "") != self.shard_text:
                raise PipelineError(f"run {given} (MLFLOW_RUN_ID) holds "
                                    f"{self._which(run.data.tags.get(SHARD_TAG, ''))} of this sweep; this is "
                                    f"{self._which(self.shard_text)}")
            resumed = SWEEP_TAG in run.data.tags
            parent_id = given
            if resumed:
                self.generation = generation_of(run)
            else:  # a new parent run, as --new makes one
                others = [r for r in self._parents(client, experiment_id, key) if r.info.run_id != given]
                self.generation, _ = place_in_generation(_placed(others), self.shard_text, new=True)
        else:
            earlier = self._parents(client, experiment_id, key)
            if earlier and not self.new:
                self._check_split(earlier[0])
            self.generation, index = place_in_generation(_placed(earlier), self.shard_text, self.new)
            if index is not None:
                run = earlier[index]
                pid = run.data.tags.get("pipeline.pid", "")
                if (run.info.status == "RUNNING" and run.data.tags.get("pipeline.host") == owner["pipeline.host"]
                        and pid.isdigit() and tracking.process_alive(int(pid))):
                    raise PipelineError(f"this sweep is running already (run {run.info.run_id}, process {pid}); "
                                        "wait for it, stop it, or start another with --new")
                parent_id, resumed = run.info.run_id, True
            else:
                name = f"sweep-{len(self.trials)}-trials-{key[:8]}"
                if self.shard:
                    name += f"-shard-{self.shard.index}-of-{self.shard.count}"
                # tagged with its shard as it is made: no other machine ever sees it unsharded (_check_split)
                parent_id = client.create_run(experiment_id, run_name=name, tags={
                    SWEEP_TAG: key, **self.shard_tags, GENERATION_TAG: str(self.generation)}).info.run_id
                resumed = False
        client.update_run(parent_id, status="RUNNING")
        from mlflow.entities import RunTag

        tags = {**owner, SWEEP_TAG: key, **self.shard_tags, GENERATION_TAG: str(self.generation),
                **tracking.git_state()}
        client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)  # at once
        with contextlib.suppress(MlflowException):  # an `error` tag from an earlier, failed run of the sweep
            client.delete_tag(parent_id, "error")
        return parent_id, resumed

    def log_space(self, client, parent_id: str, folder: Path) -> None:
        description = self.space.describe(len(self.trials))
        params: dict[str, Any] = {"sweep.trials": len(self.trials)}
        params.update({f"sweep.grid.{k}": ", ".join(format_value(v) for v in vs) for k, vs in self.space.grid.items()})
        params.update({f"sweep.random.{k}": d.spec() for k, d in self.space.random.items()})
        if self.space.random:
            params.update({"sweep.draws_per_point": self.space.trials, "sweep.seed": self.space.seed})
        if self.shard:
            params.update({"sweep.shard": self.shard_text, "sweep.shard_trials": len(self.mine)})
        from mlflow.entities import Param

        client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in params.items()], synchronous=True)
        part = f" Shard {self.shard}: trials {self._indices()}." if self.shard else ""
        client.set_tag(parent_id, "mlflow.note.content", f"Sweep of {description}.{part} Best by {self.metric}.")
        client.set_tag(parent_id, "sweep.metric", self.metric)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.yaml").write_text(yaml.safe_dump(
            {**self.space.canonical(), "metric": self.metric, "params": str(self.params),
             **({"shard": self.shard_text, "shard_trials": [t.index for t, _ in self.mine]} if self.shard else {}),
             "trials_list": [{"trial": t.index, "overrides": t.args()} for t in self.trials]}, sort_keys=False))
        (folder / "config.json").write_text(json.dumps(self.base.model_dump(mode="json"), indent=2) + "\n")
        client.log_artifact(parent_id, str(folder / "sweep.yaml"))
        client.log_artifact(parent_id, str(folder / "config.json"), artifact_path="provenance")

    # -- the data

    def prepare_data(self, todo: list[tuple[Trial, Config]], folder: Path) -> dict[int, tuple[Path, Path]]:
        """(raw, prepared) for each trial index to run, made once per group of equal data params."""
        from pipeline import workflow

        dvc_base = load_config(DEFAULT_PARAMS) if Path(DEFAULT_PARAMS).is_file() else None
        groups: dict[str, list[tuple[Trial, Config]]] = {}
        for trial, cfg in todo:
            groups.setdefault(json.dumps(workflow.data_params(cfg), sort_keys=True), []).append((trial, cfg))
        dirs = {}
        for text, members in groups.items():
            cfg = members[0][1]
            which = ", ".join(str(t.index) for t, _ in members)
            data = workflow.dvc_data(cfg, dvc_base)
            if data is None:  # data params other than params.yaml's: built for this sweep, once
                where = folder / "data" / hashlib.sha256(text.encode()).hexdigest()[:12]
                self.echo(f"sweep: data for trials {which}: fetch + preprocess {cfg.data.source} -> {where}")
                # Built again on every run of the sweep, never reused because it exists (STYLE 3): the
                # trials that run now all get this build.
                data = workflow.build_data(cfg, where / "raw", where / "prepared")
            else:
                self.echo(f"sweep: data for trials {which}: dvc repro preprocess -> {data[1]}")
            for trial, _ in members:
                dirs[trial.index] = data
        return dirs

    # -- the trials

    def command(self, trial: Trial, folder: Path, data: tuple[Path, Path]) -> list[str]:
        sets = [arg for text in (*self.space.fixed, *trial.args()) for arg in ("--set", text)]
        return [sys.executable, "-m", "pipeline", "--params", str(self.params), *sets, "run",
                "--out", str(folder), "--raw", str(data[0]), "--data", str(data[1])]

    def start(self, client, experiment_id: str, parent_id: str, key: str, trial: Trial, existing, folder: Path,
              data: tuple[Path, Path]) -> tuple[subprocess.Popen, str]:
        from mlflow.exceptions import MlflowException

        tags = {PARENT_TAG: parent_id, TRIAL_TAG: str(trial.index), TRIAL_KEY_TAG: trial.key, KEY_TAG: key,
                **self.shard_tags, GENERATION_TAG: str(self.generation), "sweep.overrides": trial.name,
                "sweep.data": str(data[1]),
                # the sweep owns the run until the trial's process reopens it (tracking.fail_abandoned_runs)
                "pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid())}
        if existing is None:
            name = f"{trial.index}: {trial.name}"[:250] if trial.name else f"trial {trial.index}"
            run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        else:  # rerun in its own run: a killed training resumes from the backup in its folder
            run_id = existing.info.run_id
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            with contextlib.suppress(MlflowException):
                client.delete_tag(run_id, "error")
        trial_dir = folder / run_id
        trial_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.base.tracking_uri(), "MLFLOW_RUN_ID": run_id}
        with open(trial_dir / "trial.log", "w") as log:
            # its own session: a terminal's Ctrl-C reaches the sweep alone, which stops each trial once
            proc = subprocess.Popen(self.command(trial, folder, data), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return proc, run_id

    def finish(self, client, trial: Trial, run_id: str, returncode: int, log_path: Path) -> Outcome:
        """The trial's outcome from its run; a run its process could not end is ended here, never RUNNING."""
        lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        run = client.get_run(run_id)
        error = errors[-1] if errors else run.data.tags.get("error", "")
        if run.info.status == "RUNNING" or (returncode != 0 and run.info.status == "FINISHED"):
            error = error or f"its process exited with status {returncode} without ending its run"
            client.set_tag(run_id, "error", error[:5000])
            client.set_terminated(run_id, "FAILED")
        elif returncode != 0 and not error:
            error = f"exit status {returncode}"
        if log_path.is_file():
            client.log_artifact(run_id, str(log_path))
        run = client.get_run(run_id)
        return Outcome(trial, run_id, run.info.status, error=error if run.info.status != "FINISHED" else "",
                       metric=run.data.metrics.get(self.metric))

    def stop(self, client, running: dict) -> None:
        """SIGTERM to every running trial (each ends its run KILLED), SIGKILL to one that does not stop."""
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for proc, (trial, run_id) in running.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "error", "interrupted")
                client.set_terminated(run_id, "KILLED")

    def run(self) -> SweepResult:
        from mlflow.tracking import MlflowClient

        from pipeline import tracking

        experiment = tracking.connect(self.base)  # an unusable store fails here, in one line, before any run
        client = MlflowClient()
        key = sweep_key(self.space, self.base)
        tracking.fail_abandoned_runs(experiment.experiment_id)  # e.g. the trials of a sweep that was killed
        parent_id, resumed = self.open_parent(client, experiment.experiment_id, key)
        folder = self.out / parent_id
        result = SweepResult(parent_id, folder, self.metric, resumed=resumed, key=key, shard=self.shard,
                             generation=self.generation)
        self.echo(f"sweep: {'resuming' if resumed else 'new'} parent run {parent_id} "
                  f"({self.space.describe(len(self.trials))}) -> {folder}")
        part = f"shard {self.shard} (trials {self._indices()}): " if self.shard else ""
        running: dict[subprocess.Popen, tuple[Trial, str]] = {}
        try:
            self.log_space(client, parent_id, folder)
            existing = {r.data.tags.get(TRIAL_KEY_TAG): r
                        for r in child_runs(client, experiment.experiment_id, parent_id)}
            outcomes: dict[int, Outcome] = {}
            todo = []
            for trial, cfg in self.mine:
                run = existing.get(trial.key)
                if run is not None and run.info.status == "FINISHED":
                    outcomes[trial.index] = Outcome(trial, run.info.run_id, "FINISHED", skipped=True,
                                                    metric=run.data.metrics.get(self.metric))
                else:
                    todo.append((trial, cfg))
            self.echo(f"sweep: {part}{len(outcomes)} of {len(self.mine)} trials finished before; {len(todo)} to run, "
                      f"{self.jobs} at a time")
            data = self.prepare_data(todo, folder)
            queue = [trial for trial, _ in todo]
            done = len(outcomes)
            while queue or running:
                interrupts.raise_if_interrupted()  # a Ctrl-C that Python dropped
                while queue and len(running) < self.jobs:
                    trial = queue.pop(0)
                    proc, run_id = self.start(client, experiment.experiment_id, parent_id, key, trial,
                                              existing.get(trial.key), folder, data[trial.index])
                    running[proc] = (trial, run_id)
                    self.echo(f"sweep: trial {trial.index}/{len(self.trials)} started: {trial.name} (run {run_id})")
                for proc in [p for p in running if p.poll() is not None]:
                    trial, run_id = running.pop(proc)
                    outcome = self.finish(client, trial, run_id, proc.returncode, folder / run_id / "trial.log")
                    outcomes[trial.index] = outcome
                    done += 1
                    value = "" if outcome.metric is None else f" {self.metric}={outcome.metric:.4f}"
                    why = f": {outcome.error}" if outcome.error else ""
                    self.echo(f"sweep: trial {trial.index} {outcome.status}{value}{why} ({done}/{len(self.mine)})")
                time.sleep(POLL_SECONDS if running else 0)
            result.outcomes = [outcomes[t.index] for t, _ in self.mine]
            from pipeline import compare

            report = compare.default_folder(parent=parent_id)
            best = _report(client, parent_id, report, self.metric)
            if best is not None:
                self.echo(f"sweep: comparison of the trials -> {report} (and the parent run's comparison/)")
            if best is not None:
                result.best = next(o for o in result.outcomes if o.run_id == best.info.run_id)
            failed = [o for o in result.outcomes if o.status != "FINISHED"]
            if failed:
                listed = "; ".join(f"trial {o.trial.index} ({o.trial.name}): {o.error or o.status}" for o in failed)
                of_shard = f" of shard {self.shard}" if self.shard else ""
                raise TrialsFailed(f"{len(failed)} of {len(self.mine)} trials{of_shard} failed: {listed}; "
                                   f"run the same command again to rerun them", result)
        except KeyboardInterrupt:
            # a second Ctrl-C or SIGTERM must not cut the clean-up short
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                self.stop(client, running)
                client.set_tag(parent_id, "error", "interrupted")
                client.set_terminated(parent_id, "KILLED")
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            raise
        except BaseException as exc:
            self.stop(client, running)
            client.set_tag(parent_id, "error", f"{type(exc).__name__}: {exc}"[:5000]
                           if not isinstance(exc, PipelineError) else str(exc)[:5000])
            client.set_terminated(parent_id, "FAILED")
            raise
        client.set_terminated(parent_id, "FINISHED")
        return result

    @staticmethod
    def _parents(client, experiment_id: str, key: str) -> list:
        """The sweep's parent runs, newest first."""
        return client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{key}'",
                                  order_by=["attributes.start_time DESC"], max_results=1000)

    def _check_split(self, newest) -> None:
        """One split at a time: shards of another count (or none) would run trials that other machines run
        or ran. The newest parent of the sweep tells how it is split now; --new starts it afresh."""
        theirs = newest.data.tags.get(SHARD_TAG, "")
        count = split_count(theirs)
        if count == split_count(self.shard_text):
            return
        which = f"runs in {count} shards (run {newest.info.run_id} holds shard {theirs})" if count else \
            f"ran unsharded (run {newest.info.run_id})"
        fix = f"give --shard I/{count}" if count else "run it without --shard"
        raise PipelineError(f"{'--shard ' + self.shard_text if self.shard else 'sweep'}: this sweep {which}; "
                            f"{fix}, or --new to start it afresh{' in these shards' if self.shard else ''}")

    def _indices(self) -> str:
        return ", ".join(str(t.index) for t, _ in self.mine)

    @staticmethod
    def _which(shard_text: str) -> str:
        return f"shard {shard_text}" if shard_text else "all the trials"


class TrialsFailed(PipelineError):
    """Some trials failed; the sweep ran the others. Carries the result for the summary table."""

    def __init__(self, message: str, result: SweepResult):
        super().__init__(message)
        self.result = result


def run_sweep(params: str, space: Space, metric: str = DEFAULT_METRIC, jobs: int = 1, out: str = "outputs/sweeps",
              new: bool = False, echo: Callable[[str], None] = print, shard: Shard | None = None) -> SweepResult:
    """Validate every trial, then run the sweep (or resume it), or only `shard`'s part of its trials; raises
    TrialsFailed when trials failed."""
    return Sweep(params, space, metric, jobs, out, new, echo, shard).run()
