"""`pipeline sweep`: the trial list, its checks, and real sweeps of `pipeline run` processes on a real SQLite store."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import time

import pandas as pd
import pytest
import yaml

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.sweep import (Shard, Space, Sweep, SweepFile, better, build_space, format_value, generation_of,
                            parse_value, place_in_generation, read_sweep_file, split_outside_brackets, sweep_key,
                            trial_configs, trial_list)
from tests.conftest import BIN, ROOT, client, run
from tests.test_cli import assert_one_line_error

QUICK = ["--set", "train.epochs=2", "--set", "mlflow.log_model=false"]  # a trial in seconds: no model to log


def names(space: Space) -> list[str]:
    return [trial.name for trial in trial_list(space)]


# ---------------------------------------------------------------- the trial list

def test_grid_is_every_combination_in_sorted_key_order():
    space = build_space(grid=("train.batch_size=32,64", "optimizer.name=sgd,adam"))
    assert names(space) == [
        "optimizer.name=sgd train.batch_size=32", "optimizer.name=sgd train.batch_size=64",
        "optimizer.name=adam train.batch_size=32", "optimizer.name=adam train.batch_size=64",
    ]
    assert [t.index for t in trial_list(space)] == [1, 2, 3, 4]
    # MLproject's form: several KEY=VALUES in one option, separated by spaces; commas inside [...] stay
    same = build_space(grid=("optimizer.name=sgd,adam train.batch_size=32,64",))
    assert names(same) == names(space)
    lists = build_space(grid=("model.filters=[[8], [16]],[[16],[32]]",))
    assert [t.overrides for t in trial_list(lists)] == [(("model.filters", [[8], [16]]),),
                                                       (("model.filters", [[16], [32]]),)]


def test_random_draws_are_the_same_for_the_same_seed_and_within_their_ranges():
    draws = ("optimizer.learning_rate=loguniform:1e-4:1e-2", "model.dropout=uniform:0:0.5",
             "train.batch_size=int:16:18", "optimizer.name=choice:sgd,adam,rmsprop")
    space = build_space(grid=("train.epochs=1,2",), draws=draws, trials=20, seed=3)
    trials = trial_list(space)
    assert len(trials) == 40 and trials == trial_list(build_space(grid=("train.epochs=1,2",), draws=draws[::-1],
                                                                  trials=20, seed=3))
    assert [t.overrides for t in trials] != [t.overrides for t in trial_list(
        build_space(grid=("train.epochs=1,2",), draws=draws, trials=20, seed=4))]
    values = {key: [dict(t.overrides)[key] for t in trials] for key in dict(trials[0].overrides)}
    assert values["train.epochs"] == [1] * 20 + [2] * 20  # each grid point gets --trials draws
    assert all(1e-4 <= v <= 1e-2 for v in values["optimizer.learning_rate"])
    assert all(v == float(f"{v:.4g}") for v in values["optimizer.learning_rate"])  # 4 significant digits
    # log-uniform: about half the draws below the geometric middle 1e-3, not a tenth as a uniform draw gives
    assert 12 <= sum(v < 1e-3 for v in values["optimizer.learning_rate"]) <= 28
    assert all(0 <= v <= 0.5 for v in values["model.dropout"])
    assert set(values["train.batch_size"]) == {16, 17, 18}  # both ends included
    assert set(values["optimizer.name"]) <= {"sgd", "adam", "rmsprop"}


@pytest.mark.parametrize("value", [1e-05, 0.001, 3, True, "sgd", "0.1", [[8], [16]], None, [0.25, 0.5]])
def test_values_round_trip_through_their_text(value):
    assert parse_value(format_value(value)) == value
    assert load_config(ROOT / "params.yaml", [f"optimizer.learning_rate={format_value(2.5e-05)}"]) \
        .optimizer.learning_rate == 2.5e-05


def test_split_keeps_brackets_and_quotes_together():
    assert split_outside_brackets("a,[1, 2],'x,y'", ",") == ["a", "[1, 2]", "'x,y'"]
    assert split_outside_brackets(" k=[1, 2]  j=3 ", " ") == ["k=[1, 2]", "j=3"]
    assert parse_value("1e-4") == 1e-4 and parse_value("[1, 2]") == [1, 2]


@pytest.mark.parametrize("grid, draws, fragment", [
    ((), (), "nothing to sweep"),
    (("optimizer.name",), (), "--grid 'optimizer.name': expected KEY=V1,V2"),
    (("optimizer.name=sgd,,adam",), (), "an empty value"),
    (("optimizer.name=sgd", "optimizer.name=adam"), (), "--grid optimizer.name: given twice"),
    ((), ("optimizer.learning_rate=logunif:1:2",), "unknown distribution 'logunif'; expected uniform:LOW:HIGH"),
    ((), ("optimizer.learning_rate=loguniform:0:1",), "expected 0 < LOW < HIGH"),
    ((), ("model.dropout=uniform:0.5:0.1",), "expected LOW < HIGH"),
    ((), ("train.batch_size=int:16:64.5",), "expected int:LOW:HIGH with two integers"),
    ((), ("optimizer.name=choice:",), "expected choice:V1,V2"),
    (("train.epochs=1,2",), ("train.epochs=int:1:3",), "train.epochs is both in the grid and drawn"),
    (("mlflow.experiment_name=a,b",), (), "mlflow.* is the sweep's store and experiment"),
])
def test_a_bad_space_fails_in_one_line_naming_the_option(grid, draws, fragment):
    with pytest.raises(PipelineError, match=re.escape(fragment)):
        build_space(grid=grid, draws=draws, trials=2)


def test_a_key_both_swept_and_fixed_is_an_error():
    with pytest.raises(PipelineError, match="train.epochs is both swept and fixed"):
        build_space(grid=("train.epochs=1,2",), fixed=("train.epochs=3",))


def test_the_sweep_file_gives_the_same_space_and_the_options_win(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "grid": {"optimizer.name": ["sgd", "adam"]},
        "random": {"optimizer.learning_rate": "loguniform:1e-4:1e-2", "model.dropout": [0.1, 0.25]},
        "trials": 3, "seed": 5, "set": {"train.epochs": 1}, "metric": "val_loss",
    }))
    from_file = build_space(sweep_file=read_sweep_file(path), file_name=str(path))
    from_options = build_space(grid=("optimizer.name=sgd,adam",),
                               draws=("optimizer.learning_rate=loguniform:1e-4:1e-2", "model.dropout=choice:0.1,0.25"),
                               trials=3, seed=5, fixed=("train.epochs=1",))
    assert trial_list(from_file) == trial_list(from_options) and len(trial_list(from_file)) == 6
    assert from_file.fixed == ("train.epochs=1",)
    more = build_space(grid=("train.batch_size=32,64",), trials=1, sweep_file=read_sweep_file(path))
    assert len(trial_list(more)) == 4 and more.seed == 5


@pytest.mark.parametrize("text, fragment", [
    ("grid: {optimizer.name: [sgd]}\ntrails: 3\n", "unknown key 'trails' (allowed: grid, random, trials"),
    ("grid: {optimizer.name: []}\n", "grid: optimizer.name = []: List should have at least 1 item"),
    ("grid: {optimizer.name: sgd}\n", "grid: optimizer.name = 'sgd': Input should be a valid list"),
    ("trials: 0\n", "trials = 0: Input should be greater than or equal to 1"),
    ("grid: [\n", "line 2 is not valid YAML"),
    ("- a\n", "expected a mapping with keys grid, random"),
])
def test_a_bad_sweep_file_fails_in_one_line_naming_the_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError) as caught:
        read_sweep_file(path)
    assert str(caught.value).startswith(f"{path}: ") and fragment in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)
    assert set(SweepFile.model_fields) == {"grid", "random", "trials", "seed", "set", "metric"}


def test_every_trial_config_is_checked_naming_the_trial():
    space = build_space(grid=("optimizer.name=sgd,adamm",), fixed=("train.epochs=1",))
    with pytest.raises(PipelineError) as caught:
        trial_configs(ROOT / "params.yaml", space, trial_list(space))
    assert str(caught.value).startswith("trial 2 (optimizer.name=adamm): ")
    assert "optimizer.name = 'adamm' is not allowed" in str(caught.value)
    space = build_space(grid=("optimizer.nme=sgd",))
    with pytest.raises(PipelineError, match="trial 1 .*unknown key 'optimizer.nme'; did you mean 'optimizer.name'"):
        trial_configs(ROOT / "params.yaml", space, trial_list(space))


def test_the_sweep_key_depends_on_the_space_and_the_base_config_only():
    space = build_space(grid=("optimizer.name=sgd,adam",), draws=("model.dropout=uniform:0:0.5",), trials=2)
    key = sweep_key(space, Config())
    assert key == sweep_key(build_space(grid=("optimizer.name=sgd,adam",), draws=("model.dropout=uniform:0.0:0.5",),
                                        trials=2), Config())
    assert key != sweep_key(build_space(grid=("optimizer.name=sgd,adam",), draws=("model.dropout=uniform:0:0.5",),
                                        trials=3), Config())
    assert key != sweep_key(space, load_config(ROOT / "params.yaml", ["train.epochs=1"]))
    assert better("val_loss") is min and better("test_accuracy") is max


def test_shards_split_the_trial_list_round_robin_and_together_hold_every_trial_once():
    space = build_space(grid=("optimizer.name=sgd,adam", "train.batch_size=32,64,128"), fixed=("train.epochs=1",))
    trials = trial_list(space)
    parts = [[t.index for t in trials if Shard.parse(f"{i}/3").holds(t)] for i in (1, 2, 3)]
    assert parts == [[1, 4], [2, 5], [3, 6]]
    assert sorted(sum(parts, [])) == [t.index for t in trials]
    assert all(Shard.parse("1/1").holds(t) for t in trials)
    assert str(Shard.parse(" 2 / 3 ")) == "2/3"
    sweep = Sweep(str(ROOT / "params.yaml"), space, "test_accuracy", 1, "out", False, print, Shard(2, 3))
    assert [t.index for t, _ in sweep.mine] == [2, 5] and len(sweep.trials) == 6


def test_a_restarted_sweep_is_a_new_generation_that_every_shard_joins_with_or_without_new():
    # (generation, shard) of the sweep's parents, newest first -> (generation, index of the parent to resume)
    assert place_in_generation([], "", new=False) == (1, None)
    assert place_in_generation([], "1/2", new=True) == (1, None)
    first = [(1, "2/2"), (1, "1/2")]  # both machines ran
    assert place_in_generation(first[1:], "2/2", new=False) == (1, None)  # the second machine joins the first
    assert place_in_generation(first, "1/2", new=False) == (1, 1)  # resumes its own parent
    # host-a restarts the sweep: the next generation
    assert place_in_generation(first, "1/2", new=True) == (2, None)
    restarted = [(2, "1/2"), *first]
    # host-b joins it with or without --new, and never resumes its parent of the first generation
    assert place_in_generation(restarted, "2/2", new=False) == (2, None)
    assert place_in_generation(restarted, "2/2", new=True) == (2, None)
    both = [(2, "2/2"), *restarted]
    assert place_in_generation(both, "1/2", new=False) == (2, 1)  # host-a resumes its restarted parent
    assert place_in_generation(both, "1/3", new=True) == (3, None)  # split another way: a generation of its own
    assert place_in_generation([(1, "1/3"), (1, "1/2")], "2/2", new=True) == (2, None)  # mixed: never joined
    # unsharded: --new always starts the next generation; without it, the newest parent resumes
    assert place_in_generation([(1, "")], "", new=True) == (2, None)
    assert place_in_generation([(2, ""), (1, "")], "", new=False) == (2, 0)
    # a parent from before the tag is generation 1
    assert generation_of(parent_run({})) == 1 and generation_of(parent_run({"sweep.generation": "3"})) == 3


def parent_run(tags: dict):
    """An MLflow Run entity with these tags, as MlflowClient.search_runs returns them."""
    from mlflow.entities import Run, RunData, RunInfo, RunTag

    info = RunInfo(run_id="r", experiment_id="0", user_id="u", status="FINISHED", start_time=0, end_time=0,
                   lifecycle_stage="active")
    return Run(info, RunData(tags=[RunTag(k, v) for k, v in tags.items()]))


@pytest.mark.parametrize("text", ["3/2", "0/2", "2", "1/0", "a/b", "1/2/3", "-1/2"])
def test_a_bad_shard_is_one_error_naming_the_form(text):
    with pytest.raises(PipelineError, match=re.escape(f"--shard {text!r}: expected I/N with 1 <= I <= N")):
        Shard.parse(text)


def test_a_shard_with_no_trials_fails_the_command_before_any_run(project):
    done = run(["pipeline", "sweep", "--grid", "optimizer.name=sgd,adam", "--shard", "3/3"], project, check=False)
    assert_one_line_error(done, "--shard 3/3: this sweep has 2 trials, so shard 3 would hold none; "
                                "split it into at most 2 shards")
    assert not (project / "mlflow.db").exists() and not (project / "outputs").exists()
    done = run(["pipeline", "sweep", "--grid", "optimizer.name=sgd,adam", "--shard", "2of3"], project, check=False)
    assert_one_line_error(done, "--shard '2of3': expected I/N with 1 <= I <= N, e.g. 2/3")


def test_a_bad_trial_fails_the_command_before_any_run(project):
    done = run(["pipeline", "--set", "train.epochs=1", "sweep", "--grid", "optimizer.name=sgd,adamm"], project,
               check=False)
    assert_one_line_error(done, "trial 2 (optimizer.name=adamm): ", "did you mean 'adam'?")
    assert not (project / "mlflow.db").exists() and not (project / "outputs").exists()


# ---------------------------------------------------------------- real sweeps

def runs_of(repo, experiment="tests"):
    store = client(repo)
    exp = store.get_experiment_by_name(experiment)
    return store, store.search_runs([exp.experiment_id], max_results=1000)


def parent_and_children(repo):
    store, runs = runs_of(repo)
    (parent,) = [r for r in runs if "pipeline.sweep" in r.data.tags]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["sweep.trial"]))
    assert len(runs) == 1 + len(children)
    return store, parent, children


@pytest.mark.slow
def test_parallel_trials_all_finish_with_every_epoch_share_one_data_build_and_resume(project):
    command = ["pipeline", *QUICK, "--set", "seed=7", "sweep", "--grid", "optimizer.learning_rate=0.01,0.005,0.002",
               "--jobs", "2"]
    done = run(command, project)
    store, parent, children = parent_and_children(project)
    assert parent.info.status == "FINISHED" and len(children) == 3
    # seed 7 is not params.yaml's: the data was fetched and preprocessed once, in the sweep's folder, for all three
    folder = project / "outputs" / "sweeps" / parent.info.run_id
    (prepared,) = folder.glob("data/*/prepared")
    assert done.stderr.count("sweep: data for") == 1
    assert "sweep: data for trials 1, 2, 3: fetch + preprocess" in done.stderr
    assert not (project / "data" / "prepared").exists()
    for child in children:  # two trials at a time on one SQLite store: no run and no metric lost
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert child.data.tags["sweep.data"] == str(prepared.relative_to(project))
        assert child.data.params["seed"] == "7" and child.data.params["train.epochs"] == "2"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds"):
            assert sorted(m.step for m in store.get_metric_history(child.info.run_id, key)) == [1, 2], key
        trial_dir = folder / child.info.run_id
        assert (trial_dir / "predictions.csv").is_file() and (trial_dir / "metrics.json").is_file()
        assert not (trial_dir / "prepared").exists() and not (trial_dir / "raw").exists()
        assert "database is locked" not in (trial_dir / "trial.log").read_text()
    assert [c.data.params["optimizer.learning_rate"] for c in children] == ["0.01", "0.005", "0.002"]
    assert children[0].info.run_name == "1: optimizer.learning_rate=0.01"

    best = max(children, key=lambda r: r.data.metrics["test_accuracy"])
    assert parent.data.tags["best.run_id"] == best.info.run_id
    assert parent.data.tags["best.param.optimizer.learning_rate"] == best.data.params["optimizer.learning_rate"]
    assert parent.data.metrics["best.test_accuracy"] == best.data.metrics["test_accuracy"]
    assert parent.data.params["sweep.grid.optimizer.learning_rate"] == "0.01, 0.005, 0.002"
    assert "sweep.yaml" in {a.path for a in store.list_artifacts(parent.info.run_id)}
    assert "3 trials: grid optimizer.learning_rate in [0.01, 0.005, 0.002]" in parent.data.tags["mlflow.note.content"]
    # the comparison report of the trials: under reports/ and logged to the parent, best trial first
    report = project / "reports" / "compare" / f"parent-{parent.info.run_id}"
    table = pd.read_csv(report / "comparison.csv")
    assert list(table["run_id"]) == [c.info.run_id for c in sorted(
        children, key=lambda r: r.data.metrics["test_accuracy"], reverse=True)]
    assert "optimizer.learning_rate" in table.columns  # the swept param differs between the trials
    logged = {a.path for a in store.list_artifacts(parent.info.run_id, "comparison")}
    assert {f"comparison/{name}" for name in ("comparison.md", "comparison.csv", "val_accuracy.png")} <= logged

    # The same command again: the same parent, nothing rerun; another --metric picks the best again.
    again = run([*command, "--metric", "test_loss"], project)
    assert f"resuming parent run {parent.info.run_id}" in again.stderr
    assert "3 of 3 trials finished before; 0 to run" in again.stderr and "sweep: data for" not in again.stderr
    store, resumed, children_again = parent_and_children(project)
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert [(c.info.run_id, c.info.end_time) for c in children_again] == \
           [(c.info.run_id, c.info.end_time) for c in children]
    lowest = min(children, key=lambda r: r.data.metrics["test_loss"])  # a loss is minimised
    assert resumed.data.tags["best.run_id"] == lowest.info.run_id and resumed.data.tags["best.metric"] == "test_loss"


@pytest.mark.slow
def test_sigterm_ends_the_parent_and_the_running_trial_killed(project):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(BIN / "pipeline"), *QUICK, "--set", "train.epochs=5000", "sweep",
                             "--grid", "optimizer.name=sgd,adam"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    training = []
    while time.time() < deadline and proc.poll() is None and not training:
        if list(project.glob("outputs/sweeps/*/*/trial.log")):  # the store is made and a trial started
            store, runs = runs_of(project)
            training = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                        and store.get_metric_history(r.info.run_id, "loss")]
        time.sleep(1)
    assert training, "the trial never logged an epoch"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    store, parent, children = parent_and_children(project)
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["KILLED"]  # trial 2 never started
    assert children[0].data.tags["error"] == "interrupted"


@pytest.mark.slow
def test_mlflow_run_sweep_nests_its_trials_and_pipeline_sweep_reruns_only_the_failed_one(project):
    # In trial 2 a 4x4 pooling of the 8x8 digits, twice, leaves nothing: its network cannot be built, inside its run.
    uri = f"sqlite:///{project / 'mlflow.db'}"
    done = run(["mlflow", "run", ".", "-e", "sweep", "--env-manager", "local", "--experiment-name", "tests",
                "-P", "grid=model.pool_size=2,4", "-P", "set=train.epochs=2 mlflow.log_model=false"],
               project, check=False, env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode != 0
    assert "error: 1 of 2 trials failed: trial 2 (model.pool_size=4): " in done.stderr, done.stderr
    store, parent, (good, bad) = parent_and_children(project)
    assert parent.data.params["grid"].strip("'") == "model.pool_size=2,4"  # the run `mlflow run` made is the parent
    assert (good.info.status, bad.info.status, parent.info.status) == ("FINISHED", "FAILED", "FAILED")
    assert "needs images of at least" in bad.data.tags["error"]
    assert "trial.log" in {a.path for a in store.list_artifacts(bad.info.run_id)}
    assert parent.data.tags["best.run_id"] == good.info.run_id
    assert math.isfinite(parent.data.metrics["best.test_accuracy"])
    assert good.data.params["train.epochs"] == "2" and good.data.params["model.pool_size"] == "2"
    # params.yaml's data params: the data came once from `dvc repro preprocess`
    assert {c.data.tags["sweep.data"] for c in (good, bad)} == {os.path.join("data", "prepared")}
    assert (project / "data" / "prepared" / "stats.json").is_file()

    # The same space and overrides through `pipeline sweep`: the same parent; the finished trial is skipped,
    # the failed one reruns in its run.
    again = run(["pipeline", *QUICK, "sweep", "--grid", "model.pool_size=2,4"], project, check=False,
                env={"MLFLOW_TRACKING_URI": uri})
    assert_one_line_error(again, "1 of 2 trials failed: trial 2 (model.pool_size=4): ", "needs images of at least",
                          "run the same command again to rerun them")
    assert f"resuming parent run {parent.info.run_id}" in again.stderr
    assert "1 of 2 trials finished before; 1 to run" in again.stderr
    store, parent_again, (good_again, bad_again) = parent_and_children(project)
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FAILED"
    assert (good_again.info.run_id, good_again.info.end_time) == (good.info.run_id, good.info.end_time)
    assert bad_again.info.run_id == bad.info.run_id and bad_again.info.end_time > bad.info.end_time
    assert bad_again.info.status == "FAILED"
    # an unsharded sweep is not resumed in shards: they would rerun its finished trial
    sharded = run(["pipeline", *QUICK, "sweep", "--grid", "model.pool_size=2,4", "--shard", "1/2"], project,
                  check=False, env={"MLFLOW_TRACKING_URI": uri})
    assert_one_line_error(sharded, f"--shard 1/2: this sweep ran unsharded (run {parent.info.run_id}); run it without "
                                   "--shard, or --new to start it afresh in these shards")


@pytest.mark.slow
def test_two_shards_run_each_trial_once_under_their_own_parents_and_compare_together(project):
    # Two machines against one store, here one after the other: `--shard 1/2` and `--shard 2/2` of one command.
    command = ["pipeline", *QUICK, "sweep", "--grid", "optimizer.learning_rate=0.01,0.002"]
    first = run([*command, "--shard", "1/2"], project)
    assert "shard 1/2 (trials 1): 0 of 1 trials finished before; 1 to run" in first.stderr
    run([*command, "--shard", "2/2"], project)
    store, runs = runs_of(project)
    parents = {r.data.tags["sweep.shard"]: r for r in runs if "pipeline.sweep" in r.data.tags}
    assert set(parents) == {"1/2", "2/2"}
    (key,) = {p.data.tags["pipeline.sweep"] for p in parents.values()}  # one sweep, two parts
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    trials = {shard: [int(c.data.tags["sweep.trial"]) for c in children
                      if c.data.tags["mlflow.parentRunId"] == parent.info.run_id] for shard, parent in parents.items()}
    assert trials == {"1/2": [1], "2/2": [2]}
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert child.data.tags["sweep.key"] == key and child.data.tags["sweep.generation"] == "1"
        assert child.data.tags["sweep.shard"] == next(s for s, p in parents.items()
                                                      if p.info.run_id == child.data.tags["mlflow.parentRunId"])
    for shard, parent in parents.items():
        assert parent.info.status == "FINISHED" and parent.data.params["sweep.shard"] == shard
        assert parent.info.run_name.endswith(f"-shard-{shard.replace('/', '-of-')}")
        assert parent.data.tags["best.run_id"] in {c.info.run_id for c in children}
        assert parent.data.params["sweep.trials"] == "2" and parent.data.params["sweep.shard_trials"] == "1"
    # The line each shard ends with selects both shards' trials, for one comparison.
    hint = first.stdout.strip().splitlines()[-1]
    assert hint == (f"sweep: every shard's trials: pipeline compare --filter \"tags.\\`sweep.key\\` = '{key}' "
                    "and tags.\\`sweep.generation\\` = '1'\"")
    assert {p.data.tags["sweep.generation"] for p in parents.values()} == {"1"}
    compared = run(["pipeline", "compare", "--filter",
                    f"tags.`sweep.key` = '{key}' and tags.`sweep.generation` = '1'"], project)
    assert "compare: 2 runs selected" in compared.stdout
    assert all(c.info.run_id in compared.stdout for c in children)

    # Shard 1/2 again resumes its own parent with nothing to run; the unsharded sweep would be a third parent.
    again = run([*command, "--shard", "1/2"], project)
    assert f"resuming parent run {parents['1/2'].info.run_id}" in again.stderr
    assert "shard 1/2 (trials 1): 1 of 1 trials finished before; 0 to run" in again.stderr
    store, runs_again = runs_of(project)
    assert len(runs_again) == len(runs)

    # Split another way, or not at all, the shards would rerun what the others ran: refused, nothing made.
    newest = max(parents.values(), key=lambda r: r.info.start_time)
    other = run([*command, "--shard", "1/3"], project, check=False)
    assert_one_line_error(other, f"--shard 1/3: this sweep runs in 2 shards (run {newest.info.run_id} holds shard "
                                 f"{newest.data.tags['sweep.shard']}); give --shard I/2, or --new to start it afresh "
                                 "in these shards")
    whole = run(command, project, check=False)
    assert_one_line_error(whole, "sweep: this sweep runs in 2 shards", "give --shard I/2, or --new to start it afresh")
    store, runs_after = runs_of(project)
    assert len(runs_after) == len(runs) and all(r.info.status == "FINISHED" for r in runs_after)
