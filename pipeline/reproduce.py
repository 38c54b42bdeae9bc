"""`pipeline reproduce RUN_ID`: rerun a logged run from its own commit, data and params, then compare.

1. Read the run from the tracking store; it must name a git commit (tag
   mlflow.source.git.commit), a clean tree (git.dirty false, or --allow-dirty)
   and its data (tag data.digest).
2. Check that commit out into a temporary `git worktree`; the user's checkout is never written to.
3. Get the data with that commit's own code: `dvc pull data/raw` against the run's
   provenance/dvc.lock from the DVC remote the commit configures, else the commit's
   fetch stage from the recorded source. Either way its digest must equal data.digest.
4. Rerun the commit's preprocess, train and evaluate stages (`python -m pipeline`,
   this venv's python, cwd and PYTHONPATH the worktree) with the run's config
   (provenance/config.json, else its logged params), into a new run tagged
   `reproduces` = the original's id, in the original's experiment.
5. Compare both runs' per-epoch and final metrics: identical (bitwise), within a
   tolerance (naming what differs between the runs: device, library versions), or different.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from pipeline import hardware
from pipeline.config import absolute_uri
from pipeline.errors import PipelineError

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
FINAL_METRICS = ("final_val_loss", "final_val_accuracy", "test_loss", "test_accuracy")
EXIT_CODES = {"identical": 0, "within tolerance": 3, "different": 4}  # 1: an error, 2: a usage error (click)
DEFAULT_TOLERANCE = 0.01  # absolute, on losses and accuracies alike: other hardware or library versions
RAW = "data/raw"  # the fetch stage's output, as dvc.yaml names it


@dataclass(frozen=True)
class Original:
    """What a logged run says about how it was made."""

    run_id: str
    run_name: str
    experiment_id: str
    commit: str
    dirty: bool
    digest: str
    tags: dict[str, str]


@dataclass
class Comparison:
    original_id: str
    new_id: str
    rows: list[tuple[str, str, float | None, float | None]]  # (epoch or "final", metric, original, new)
    verdict: str  # a key of EXIT_CODES
    tolerance: float
    reason: str  # the largest difference, or what is missing
    environment: list[str] = field(default_factory=list)  # "device: a != b", "versions.x: 1 != 2"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


def read_original(client, run_id: str, allow_dirty: bool = False, warn: Callable[[str], None] = print) -> Original:
    """The run's provenance tags, checked: one PipelineError naming what is missing."""
    from pipeline.tracking import get_run

    run = get_run(client, run_id)
    tags = run.data.tags
    commit = tags.get("mlflow.source.git.commit")
    if not commit:
        raise PipelineError(f"run {run_id} has no git commit (tag mlflow.source.git.commit): "
                            "it was not made from a git checkout, so its code cannot be had")
    dirty = tags.get("git.dirty") == "true"
    if dirty:
        if not allow_dirty:
            raise PipelineError(f"run {run_id} was made from a dirty working tree (git.dirty=true) at commit "
                                f"{commit[:12]}: its uncommitted changes are in no commit; "
                                "--allow-dirty reruns the commit without them")
        warn(f"warning: run {run_id} was made from a dirty working tree; rerunning commit {commit[:12]} "
             "without its uncommitted changes")
    digest = tags.get("data.digest")
    if not digest:
        raise PipelineError(f"run {run_id} has no data.digest tag, so its data cannot be checked")
    return Original(run_id, run.info.run_name or "", run.info.experiment_id, commit, dirty, digest, dict(tags))


def repo_root(cwd: Path) -> Path:
    done = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"{cwd} is not in a git repository: run reproduce inside a clone of the project")
    return Path(done.stdout.strip())


def check_commit(repo: Path, original: Original) -> None:
    done = subprocess.run(["git", "cat-file", "-e", f"{original.commit}^{{commit}}"], cwd=repo,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"commit {original.commit} of run {original.run_id} is not in the repository at {repo}: "
                            "fetch it (git fetch) or run reproduce in the repository it was made in")


@contextlib.contextmanager
def worktree(repo: Path, commit: str, path: Path) -> Iterator[Path]:
    """The commit checked out (detached) at `path`; removed, with git's record of it, afterwards."""
    done = subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=repo,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"git worktree add {commit[:12]} failed: {last_line(done.stderr or done.stdout)}")
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=repo, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def config_of(client, run_id: str, folder: Path) -> tuple[dict, str]:
    """The run's complete config: provenance/config.json, else rebuilt from its logged params."""
    from mlflow.exceptions import MlflowException

    try:
        path = client.download_artifacts(run_id, "provenance/config.json", str(folder))
        return yaml.safe_load(Path(path).read_text()), "provenance/config.json"
    except (MlflowException, OSError):
        pass
    params = client.get_run(run_id).data.params
    if not params:
        raise PipelineError(f"run {run_id} has neither provenance/config.json nor logged params to rerun with")
    tree: dict = {}
    for key, text in params.items():
        if key.startswith("derived."):  # facts about the data, not params
            continue
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = param_value(text)
    return tree, "the logged params"


def param_value(text: str):
    """A param as MLflow stored it (str() of the value) back to the value: '0.5', 'True', 'None', '[[8], [16]]'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def download_optional(client, run_id: str, artifact: str, folder: Path) -> Path | None:
    from mlflow.exceptions import MlflowException

    try:
        return Path(client.download_artifacts(run_id, artifact, str(folder)))
    except (MlflowException, OSError):
        return None


def raw_digest(raw: Path) -> str:
    from pipeline.fetch import dataset_digest
    from pipeline.files import read_json

    return dataset_digest(read_json(raw / "manifest.json"))


def kernels_env(onednn: str | None, environ=os.environ) -> dict[str, str]:
    """`environ` for a rerun whose original ran TensorFlow's CPU kernels as its tag tensorflow.onednn says:
    on (oneDNN's) or off (Eigen's) forced so; a run without the tag predates it and ran TensorFlow's default
    for its CPU (hardware.prefer_onednn came after), so the rerun gets that default too."""
    env = hardware.tensorflow_default_env(environ)
    if onednn in ("on", "off"):
        env[hardware.ONEDNN_VARIABLE] = "1" if onednn == "on" else "0"
    return env


class Rerun:
    """Runs the checked-out commit's own commands in its worktree, with this venv's python."""

    def __init__(self, src: Path, params: Path, tracking_uri: str, echo: Callable[[str], None],
                 onednn: str | None = None):
        """onednn: the original's tag tensorflow.onednn; TensorFlow's CPU kernels are chosen as they were."""
        self.src, self.params, self.echo = src, params, echo
        self.env = {**kernels_env(onednn), "PYTHONPATH": str(src), "MLFLOW_TRACKING_URI": tracking_uri}
        self.env.pop("MLFLOW_RUN_ID", None)

    def call(self, args: list[str], run_id: str | None = None) -> subprocess.CompletedProcess:
        env = dict(self.env, **({"MLFLOW_RUN_ID": run_id} if run_id else {}))
        return subprocess.run([sys.executable, *args], cwd=self.src, env=env, capture_output=True, text=True)

    def stage(self, name: str, *args: str, run_id: str | None = None) -> None:
        done = self.call(["-m", "pipeline", "--params", str(self.params), name, *args], run_id)
        if done.returncode != 0:
            line = last_line(done.stderr).removeprefix("error: ")
            raise PipelineError(f"the rerun's {name} stage failed (exit {done.returncode}): {line}")
        self.echo(f"reproduce: {last_line(done.stdout)}")

    def dvc_pull(self, lock: Path) -> str | None:
        """data/raw as the run's dvc.lock records it, from the commit's DVC remote; None (with why) if not."""
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        outs = [out.get("path") for out in stages.get("fetch", {}).get("outs", [])]
        if RAW not in outs:
            return f"the run's dvc.lock does not track {RAW}"
        if not (self.src / "dvc.yaml").is_file():
            return "the run's commit has no dvc.yaml"
        shutil.copyfile(lock, self.src / "dvc.lock")  # git_state leaves dvc.lock out of the dirty check
        done = self.call(["-m", "dvc", "pull", "--quiet", RAW])
        if done.returncode != 0:
            return f"dvc pull {RAW} failed: {last_line(done.stderr or done.stdout)}"
        return None


def get_data(rerun: Rerun, original: Original, lock: Path | None, folder: Path) -> Path:
    """The run's raw data, from the DVC remote or refetched, with the recorded digest; else one error."""
    if lock is not None:
        why_not = rerun.dvc_pull(lock)
        raw = rerun.src / RAW
        if why_not is None:
            try:
                found = raw_digest(raw)
            except (OSError, ValueError, KeyError) as exc:  # pulled, but not a fetch stage's output
                found = f"none ({type(exc).__name__}: {exc})"
            if found == original.digest:
                rerun.echo(f"reproduce: data {found} pulled from the DVC remote")
                return raw
            why_not = f"the pulled {RAW} has digest {found}"
        rerun.echo(f"reproduce: {why_not}; refetching from the recorded source")
    raw = folder / "raw"
    rerun.stage("fetch", "--out", str(raw))
    found = raw_digest(raw)
    if found != original.digest:
        raise PipelineError(f"data digest mismatch: run {original.run_id} used data {original.digest}, "
                            f"the recorded source now gives {found}; the source files changed since the run")
    return raw


def reproduce(run_id: str, tracking_uri: str, cwd: Path, *, allow_dirty: bool = False,
              tolerance: float = DEFAULT_TOLERANCE, echo: Callable[[str], None] = print) -> Comparison:
    """Rerun `run_id` from its commit, data and config into a new run; compare the two."""
    from mlflow.tracking import MlflowClient

    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise PipelineError(f"--tolerance {tolerance}: expected a finite number >= 0")
    uri = absolute_uri(tracking_uri, cwd)
    client = MlflowClient(tracking_uri=uri)
    original = read_original(client, run_id, allow_dirty, warn=echo)
    repo = repo_root(cwd)
    check_commit(repo, original)
    with tempfile.TemporaryDirectory(prefix="pipeline-reproduce-") as tmp:
        folder = Path(tmp)
        config, config_source = config_of(client, run_id, folder / "original")
        params = folder / "params.yaml"
        params.write_text(yaml.safe_dump(config, sort_keys=False))
        lock = download_optional(client, run_id, "provenance/dvc.lock", folder / "original")
        echo(f"reproduce: run {run_id} at commit {original.commit[:12]}, config from {config_source}")
        with worktree(repo, original.commit, folder / "src") as src:
            rerun = Rerun(src, params, uri, echo, onednn=original.tags.get(hardware.ONEDNN_TAG))
            raw = get_data(rerun, original, lock, folder)
            prepared, train_dir, evaluation = folder / "prepared", folder / "train", folder / "evaluate"
            rerun.stage("preprocess", "--raw", str(raw), "--out", str(prepared))
            new_id = new_run(client, original)
            try:
                rerun.stage("train", "--data", str(prepared), "--raw", str(raw), "--out", str(train_dir),
                            run_id=new_id)
                rerun.stage("evaluate", "--data", str(prepared), "--train", str(train_dir),
                            "--metrics", str(evaluation / "metrics.json"), "--plots", str(evaluation / "plots"),
                            "--figures", str(evaluation / "figures"), run_id=new_id)
            except KeyboardInterrupt:
                end_if_running(client, new_id, "KILLED")
                raise
            except BaseException:
                end_if_running(client, new_id, "FAILED")
                raise
    comparison = compare(client, run_id, new_id, tolerance)
    client.set_tag(new_id, "reproduce.verdict", comparison.verdict)
    return comparison


def new_run(client, original: Original) -> str:
    """The run the rerun logs into, beside the original, tagged with its id."""
    name = f"{original.run_name}-reproduce" if original.run_name else None
    run = client.create_run(original.experiment_id, run_name=name, tags={"reproduces": original.run_id})
    return run.info.run_id


def end_if_running(client, run_id: str, status: str) -> None:
    """A rerun that died before its own run_scope could end the run: never leave it RUNNING."""
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)


def metric_steps(client, run_id: str, key: str) -> dict[int, float]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}  # a step logged twice (a resumed run): its last value


def compare(client, original_id: str, new_id: str, tolerance: float) -> Comparison:
    """Both runs' metrics side by side and the verdict."""
    rows: list[tuple[str, str, float | None, float | None]] = []
    histories = {key: (metric_steps(client, original_id, key), metric_steps(client, new_id, key))
                 for key in EPOCH_METRICS}
    for step in sorted(set().union(*(a.keys() | b.keys() for a, b in histories.values()))):
        rows += [(str(step), key, a.get(step), b.get(step)) for key, (a, b) in histories.items()
                 if step in a or step in b]
    first, second = client.get_run(original_id), client.get_run(new_id)
    for key in FINAL_METRICS:
        a, b = first.data.metrics.get(key), second.data.metrics.get(key)
        if a is not None or b is not None:
            rows.append(("final", key, a, b))
    verdict, reason = judge(rows, tolerance)
    return Comparison(original_id, new_id, rows, verdict, tolerance, reason,
                      environment_differences(first.data.tags, second.data.tags))


def judge(rows, tolerance: float) -> tuple[str, str]:
    if not rows:
        return "different", "no metrics to compare"
    missing = [(epoch, key) for epoch, key, a, b in rows if a is None or b is None]
    if missing:
        epoch, key = missing[0]
        return "different", f"{key} at epoch {epoch} is in one run only"
    unequal = [(abs(a - b), epoch, key) for epoch, key, a, b in rows if not same(a, b)]
    if not unequal:
        return "identical", "every metric is bitwise equal"
    gap, epoch, key = max(unequal, key=lambda item: (math.isnan(item[0]), item[0]))
    where = f"{key} at epoch {epoch}" if epoch != "final" else key
    verdict = "within tolerance" if gap <= tolerance else "different"
    return verdict, f"largest difference {gap:.3g} ({where}); tolerance {tolerance:g}"


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def environment_differences(first: dict[str, str], second: dict[str, str]) -> list[str]:
    keys = sorted(k for k in first.keys() | second.keys()
                  if k in ("device", hardware.ONEDNN_TAG) or k.startswith("versions."))
    return [f"{k}: {first.get(k, '-')} != {second.get(k, '-')}" for k in keys if first.get(k) != second.get(k)]


def format_comparison(c: Comparison) -> str:
    """The side-by-side table and the verdict, for the terminal."""
    def show(value):
        return "-" if value is None else repr(value)

    lines = [f"{'epoch':<6} {'metric':<20} {'original ' + c.original_id[:8]:<22} {'reproduced ' + c.new_id[:8]:<22} "
             "difference"]
    for epoch, key, a, b in c.rows:
        diff = "-" if a is None or b is None else ("0" if same(a, b) else f"{abs(a - b):.3g}")
        lines.append(f"{epoch:<6} {key:<20} {show(a):<22} {show(b):<22} {diff}")
    lines.append(f"verdict: {c.verdict} ({c.reason})")
    if c.verdict != "identical":
        lines.append("the runs differ in: " + ("; ".join(c.environment) if c.environment
                                               else "nothing recorded (same device and library versions)"))
    lines.append(f"reproduced as run {c.new_id} (tag reproduces={c.original_id})")
    return "\n".join(lines)
