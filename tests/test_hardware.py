"""TensorFlow's CPU kernels: oneDNN's wherever the CPU is x86-64, unless the user chose (pipeline.hardware)."""

from __future__ import annotations

import platform

import pytest

from pipeline import hardware

OURS = {hardware.ONEDNN_VARIABLE: "1", hardware.ONEDNN_SET_BY: "1"}  # as the `pipeline` command sets them


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_oneDNN_is_turned_on_on_x86_64_and_marked_as_ours(monkeypatch, machine):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    environ = {"PATH": "/bin"}
    hardware.prefer_onednn(environ)
    assert environ == {"PATH": "/bin", **OURS}
    assert hardware.tensorflow_default_env(environ) == {"PATH": "/bin"}  # a notebook's: TensorFlow's default


@pytest.mark.parametrize("value", ["0", "1", "false"])
def test_a_setting_of_the_users_is_kept_and_passed_on_as_theirs(monkeypatch, value):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    environ = {hardware.ONEDNN_VARIABLE: value}
    hardware.prefer_onednn(environ)
    assert environ == {hardware.ONEDNN_VARIABLE: value}
    assert hardware.tensorflow_default_env(environ) == {hardware.ONEDNN_VARIABLE: value}


def test_a_subprocess_of_ours_knows_the_setting_is_ours_and_other_cpus_keep_tensorflows_default(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    inherited = dict(OURS)  # what `dvc repro` passes to a stage that `pipeline` started
    hardware.prefer_onednn(inherited)
    assert inherited == OURS and hardware.tensorflow_default_env(inherited) == {}
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    environ: dict[str, str] = {}
    hardware.prefer_onednn(environ)
    assert environ == {}


def test_this_process_runs_what_it_asked_for():  # conftest called prefer_onednn before TensorFlow loaded
    import os

    expected = os.environ.get(hardware.ONEDNN_VARIABLE)
    if expected is None:
        pytest.skip("not an x86-64 CPU: TensorFlow's own default applies")
    assert hardware.onednn_state() == ("on" if expected.lower() in ("1", "true") else "off")
