"""The served champion: `pipeline run` trains, `pipeline register` registers, `mlflow models serve` answers.

Everything real: `pipeline run` and the scoring server are subprocesses in a temporary project (the server on
127.0.0.1, asked over HTTP); `pipeline register` runs through cli.main in this process, which saves a Python
and MLflow start-up (tests/test_register.py covers the command's choices and errors). The server's answers
must be the in-process predictions of the same registered model. About 2.5 minutes on 2 cores shared with
other work (1 minute of CPU); the server alone needs ~20-70 s to start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from pipeline.fetch import load_raw
from tests.conftest import BIN, client, run, stop_group
from tests.test_register import pipeline_cli

pytestmark = pytest.mark.slow

START_SECONDS = 300  # the server imports MLflow and TensorFlow and loads the model: ~50 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict | str]:
    """(HTTP status, the JSON answer, or its text when it is not JSON)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def wait_until_up(proc: subprocess.Popen, port: int, log) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:  # refused while it starts
            pass
        time.sleep(1)
    raise AssertionError(f"the server did not answer /ping within {START_SECONDS} s:\n{log.read_text()}")


def test_registered_champion_is_served_and_answers_like_the_model_in_process(project, monkeypatch, capsys,
                                                                              tmp_path):
    import mlflow.pyfunc

    uri = f"sqlite:///{project / 'mlflow.db'}"
    trained = run(["pipeline", "run"], project)
    run_id = trained.stdout.strip().splitlines()[-1].split()[3]  # "run: MLflow run <id> -> <folder>"
    accuracy = client(project).get_run(run_id).data.metrics["test_accuracy"]

    monkeypatch.chdir(project)  # as a user runs it: params.yaml and sqlite:///mlflow.db from here
    code, out, err = pipeline_cli(monkeypatch, capsys, "register", "--name", "digits", params=project / "params.yaml")
    assert code == 0, err
    assert out.splitlines() == [
        f"register: registered digits version 1 (alias champion): run {run_id}, test_accuracy = {accuracy}",
        f"serve it: MLFLOW_TRACKING_URI=sqlite:///{project.resolve() / 'mlflow.db'} mlflow models serve "
        "-m models:/digits@champion "
        "--env-manager local -h 127.0.0.1 -p 5001",
    ]

    port = free_port()
    log = project / "serve.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with log.open("w") as sink:  # a session of its own: the server and the uvicorn it starts end together
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/digits@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        images = load_raw(project / "data" / "raw").test_x[:32]  # raw uint8, (32, 8, 8, 1)
        # while the server starts: the same registered model in this process
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        champion = mlflow.pyfunc.load_model("models:/digits@champion", dst_path=str(tmp_path))  # not in /tmp
        expected = np.asarray(champion.predict(images))
        wait_until_up(proc, port, log)
        url = f"http://127.0.0.1:{port}/invocations"
        good = json.dumps({"inputs": images.tolist()}).encode()
        status, answer = post(url, good)
        assert status == 200, answer
        served = np.asarray(answer["predictions"], dtype="float32")
        assert served.shape == expected.shape == (32, 10)
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
        assert np.array_equal(served.argmax(1), expected.argmax(1))
        status, answer = post(url, json.dumps({"instances": images.tolist()}).encode())  # TF Serving's other key
        assert status == 200 and np.array_equal(np.asarray(answer["predictions"]).argmax(1), expected.argmax(1))

        bad = [
            (b"not json", "valid JSON"),
            (json.dumps({"inputs": images[:, :7, :7].tolist()}).encode(),
             "Shape of input (32, 7, 7, 1) does not match expected shape (-1, 8, 8, 1)"),
            (json.dumps({"inputs": "an image"}).encode(), "Failed to convert data"),
            (json.dumps({"inputs": (images.astype(int) + 256).tolist()}).encode(), "out of bounds for uint8"),
            (json.dumps({"pixels": images.tolist()}).encode(), "exactly one of the input fields"),
        ]
        for body, message in bad:
            status, answer = post(url, body)
            assert 400 <= status < 500 and message in answer["message"], (status, answer)
        status, answer = post(url, b"1,2,3", "text/plain")
        assert status == 415 and "only supports the following content types" in answer, answer

        status, answer = post(url, good)  # still serving
        assert status == 200
        np.testing.assert_allclose(np.asarray(answer["predictions"], dtype="float32"), expected, rtol=0, atol=1e-6)
    finally:
        stop_group(proc)
