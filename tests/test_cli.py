"""Bad input through the real command line: one line, non-zero exit, no traceback, no output, no RUNNING run."""

from __future__ import annotations

import signal
import subprocess
import time

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
