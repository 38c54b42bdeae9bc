"""Bad input through the real command line: one line, non-zero exit, no traceback, no output, no RUNNING run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pandas as pd
import pytest

from tests.conftest import BIN, client, run, set_params


def assert_one_line_error(done, *fragments):
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def test_help_lists_one_command_per_stage(project):
    done = run(["pipeline", "--help"], project)
    for command in ("fetch", "preprocess", "train", "evaluate", "predict", "run"):
        assert command in done.stdout
    assert "Usage: pipeline" in run(["python", "-m", "pipeline", "train", "--help"], project).stdout


def test_bad_params_key_fails_before_any_work(project):
    set_params(project, {"optimizer": {"nme": "sgd"}})
    done = run(["pipeline", "fetch"], project, check=False)
    assert_one_line_error(done, "params.yaml: unknown key 'optimizer.nme'; did you mean 'optimizer.name'?")
    assert not (project / "data" / "raw").exists()


@pytest.mark.parametrize(
    "rows, fragments",
    [
        (["Id,Label,p0,p1,p2,p3", "1,a,0,1,2,3", "2,b,0,1,x,3"], ["line 3", "'p2'", "'x' is not a number"]),
        (["Id,Label,p0,p1,p2,p3", "1,a,0,1,2,3", "2,b,0,1,,3"], ["line 3", "'p2'", "empty cell"]),
        (["Id,Label,p0,p1,p2", "1,a,0,1,2"], ["3 pixel columns", "expected 4 = 2*2*1"]),
        (["Id,p0,p1,p2,p3", "1,0,1,2,3"], ["no column 'Label'"]),
        (["Id,Label,p0,p1,p2,p3", "1,a,0,1,2,300"], ["line 2", "300 is out of range"]),
    ],
)
def test_bad_csv_fails_in_one_line_naming_file_and_place(project, rows, fragments):
    (project / "train.csv").write_text("\n".join(rows) + "\n")
    set_params(project, {"data": {"source": "csv", "image_shape": [2, 2, 1], "csv": {"train": "train.csv"}}})
    done = run(["pipeline", "fetch"], project, check=False)
    assert_one_line_error(done, "train.csv", *fragments)
    assert not (project / "data" / "raw").exists()


def test_missing_dataset_without_network_names_the_file(project, tmp_path):
    set_params(project, {"data": {"source": "fashion_mnist", "dir": str(tmp_path / "none"), "download": False}})
    done = run(["pipeline", "fetch"], project, check=False)
    assert_one_line_error(done, "train-images-idx3-ubyte.gz not found in", "apt-get install dataset-fashion-mnist")


def test_train_without_data_names_the_missing_stage(project):
    done = run(["pipeline", "train"], project, check=False)
    assert_one_line_error(done, "data/prepared", "run `pipeline preprocess` first")


@pytest.mark.slow
def test_crash_ends_the_run_failed_and_ctrl_c_ends_it_killed(project):
    run(["pipeline", "fetch"], project)
    run(["pipeline", "preprocess"], project)
    # Four 2x2 poolings of an 8x8 digit leave nothing to pool: build_model refuses, inside the run.
    done = run(["pipeline", "--set", "model.filters=[[4],[4],[4],[4]]", "--set", "model.kernel_sizes=[3,3,3,3]",
                "train"], project, check=False)
    assert done.returncode != 0
    assert not (project / "data" / "train").exists()
    store = client(project)
    exp = store.get_experiment_by_name("tests")
    (failed,) = store.search_runs([exp.experiment_id])
    assert failed.info.status == "FAILED" and failed.data.tags["error"]

    # A shell that starts jobs in the background (as CI may) leaves SIGINT ignored, and Python then keeps it
    # ignored; restore the default so the child gets KeyboardInterrupt like a terminal's Ctrl-C gives it.
    proc = subprocess.Popen([str(BIN / "pipeline"), "--set", "train.epochs=5000", "train"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    running = []
    while time.time() < deadline and proc.poll() is None:
        running = [r for r in store.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
        if running and store.get_metric_history(running[0].info.run_id, "loss"):
            break
        time.sleep(1)
    assert running, "training never logged an epoch"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert store.get_run(running[0].info.run_id).info.status == "KILLED"
    assert not (project / "data" / "train").exists()


def closed_port() -> int:
    with socket.socket() as sock:  # a port the system just handed out, now closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_tracking_server_fails_before_training_in_one_line(project):
    run(["pipeline", "fetch"], project)
    run(["pipeline", "preprocess"], project)
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    done = run(["pipeline", "train"], project, check=False, env={"MLFLOW_TRACKING_URI": uri})
    seconds = time.monotonic() - start
    assert_one_line_error(done, f"MLflow tracking store '{uri}' cannot be reached (", "Connection refused")
    assert seconds < 30, f"took {seconds:.0f} s"  # MLflow's default retries take minutes
    assert not (project / "data" / "train").exists() and not (project / "data" / ".train.resume").exists()


def test_runs_left_running_by_ended_processes_are_marked_failed(project, monkeypatch):
    from pipeline import tracking
    from pipeline.config import load_config

    monkeypatch.chdir(project)
    cfg = load_config(project / "params.yaml")
    store = client(project)
    experiment = tracking.connect(cfg).experiment_id
    ended = subprocess.Popen(["true"])
    ended.wait()
    owner = {"pipeline.host": socket.gethostname()}
    abandoned = store.create_run(experiment, tags={**owner, "pipeline.pid": str(ended.pid)}).info.run_id
    alive = store.create_run(experiment, tags={**owner, "pipeline.pid": str(os.getppid())}).info.run_id
    elsewhere = store.create_run(experiment, tags={"pipeline.host": "another-host", "pipeline.pid": str(ended.pid)})
    resuming = store.create_run(experiment, tags={**owner, "pipeline.pid": str(ended.pid)}).info.run_id
    with tracking.run_scope(cfg, run_id=resuming) as run_id:
        assert run_id == resuming
        assert store.get_run(run_id).data.tags["pipeline.pid"] == str(os.getpid())
    assert store.get_run(resuming).info.status == "FINISHED"
    failed = store.get_run(abandoned)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == (f"process {ended.pid} on {socket.gethostname()} ended without closing "
                                         "the run (killed, or its machine stopped)")
    assert store.get_run(alive).info.status == "RUNNING"
    assert store.get_run(elsewhere.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_killed_training_resumes_under_dvc_and_ends_as_if_never_interrupted(project):
    import keras

    set_params(project, {"train": {"epochs": 8, "batch_size": 16}, "augment": {"rotation_degrees": 10},
                         "callbacks": {"reduce_lr": {"enabled": True, "patience": 1}}})
    run(["git", "commit", "-qam", "params"], project)
    run(["dvc", "repro", "preprocess"], project)
    run(["pipeline", "train", "--out", "data/reference"], project)

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    # a session of its own: SIGKILL to dvc and the training under it, as when the machine's job is killed
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backup = project / "data" / ".train.resume"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(backup.glob("epoch-*/state.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the training ended before it could be killed"
    (snapshot,) = backup.glob("epoch-*")
    killed_after = int(snapshot.name.split("-")[1])
    assert 1 <= killed_after < 8 and not (project / "data" / "train").exists()
    store = client(project)
    experiment = store.get_experiment_by_name("tests").experiment_id
    (killed,) = store.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")

    start = time.monotonic()
    done = run(["dvc", "repro", "train"], project)
    print(f"resumed after epoch {killed_after} in {time.monotonic() - start:.1f} s")  # shown with -s
    assert f"resuming after epoch {killed_after} of 8" in done.stdout + done.stderr
    assert not backup.exists()
    assert (project / "data" / "train" / "run.json").read_text().count(killed.info.run_id) == 1
    resumed = store.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and "error" not in resumed.data.tags

    history = pd.read_csv(project / "data" / "train" / "history.csv").drop(columns="epoch_seconds")
    reference = pd.read_csv(project / "data" / "reference" / "history.csv").drop(columns="epoch_seconds")
    assert len(history) == 8 and history.equals(reference)
    reference_run = pd.read_json(project / "data" / "reference" / "run.json", typ="series")["run_id"]
    for key in ("loss", "val_accuracy", "learning_rate"):
        logged = store.get_metric_history(killed.info.run_id, key)
        assert sorted(m.step for m in logged) == list(range(1, 9))  # every epoch once, none twice
        assert ({m.step: m.value for m in logged}
                == {m.step: m.value for m in store.get_metric_history(reference_run, key)})
    weights, reference_weights = (keras.models.load_model(project / "data" / name / "model.keras").get_weights()
                                  for name in ("train", "reference"))
    assert all((a == b).all() for a, b in zip(weights, reference_weights))


def test_evaluate_and_predict_with_an_unreachable_store_fail_in_one_line_writing_nothing(project):
    # They reopen the training's run: a store that cannot be used ends them in one line, before any output.
    for stage in ("fetch", "preprocess", "train"):
        run(["pipeline", stage], project)
    uri = f"http://127.0.0.1:{closed_port()}"
    for stage, output in (("evaluate", "data/evaluate"), ("predict", "data/predictions.csv")):
        done = run(["pipeline", stage], project, check=False, env={"MLFLOW_TRACKING_URI": uri})
        assert_one_line_error(done, f"MLflow tracking store '{uri}' cannot be reached (", "Connection refused")
        assert not (project / output).exists()
    # a store that works but lacks the training's run (moved, deleted): one line naming both, nothing written
    other = f"sqlite:///{project.parent / 'other' / 'mlflow.db'}"
    (project.parent / "other").mkdir()
    run_id = json.loads((project / "data/train/run.json").read_text())["run_id"]
    done = run(["pipeline", "predict"], project, check=False, env={"MLFLOW_TRACKING_URI": other})
    assert_one_line_error(done, f"MLflow run {run_id} is not in the tracking store '{other}'")
    assert not (project / "data/predictions.csv").exists()
    run(["pipeline", "predict"], project)  # the local store is still fine
    assert (project / "data/predictions.csv").is_file()
