"""A Ctrl-C whose KeyboardInterrupt Python drops (raised in a weakref callback or a __del__) is not lost."""

from __future__ import annotations

import signal
import sys
import weakref

import pytest

from pipeline import interrupts
from tests.conftest import client


def drop_interrupt(send=lambda: interrupts.handle_interrupt(signal.SIGINT, None)) -> None:
    """Deliver an interrupt where Python drops its KeyboardInterrupt: in a weakref callback, as the garbage
    collector runs SQLAlchemy's and TensorFlow's all through a training."""
    class Collected:
        pass

    collected = Collected()
    ref = weakref.ref(collected, lambda _: send())
    del collected  # the callback runs here; its KeyboardInterrupt goes to sys.unraisablehook, not to us
    assert ref() is None


def test_a_ctrl_c_python_drops_is_raised_again_where_the_pipeline_checks_and_not_reported(monkeypatch, capsys):
    monkeypatch.setattr(interrupts, "_interrupted", False)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # install() replaces it
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a test worker may ignore it)
        interrupts.install()
        assert signal.getsignal(signal.SIGINT) is interrupts.handle_interrupt
        interrupts.raise_if_interrupted()  # no signal yet: nothing
        drop_interrupt(send=lambda: signal.raise_signal(signal.SIGINT))  # a real SIGINT, its handler run there
        assert interrupts.interrupted()
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_interrupted()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert "KeyboardInterrupt" not in capsys.readouterr().err  # raised again, so not reported as ignored


def test_an_ignored_sigint_stays_ignored(monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a shell's background job
        interrupts.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is interrupts.handle_interrupt
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_ctrl_c_inside_a_database_call_waits_for_it_and_the_run_still_ends_killed(project, monkeypatch):
    import sqlalchemy

    from pipeline import tracking
    from pipeline.config import load_config

    monkeypatch.chdir(project)
    monkeypatch.setattr(interrupts, "_interrupted", False)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    cfg = load_config(project / "params.yaml")
    store = client(project)
    sent = []

    def ctrl_c_inside_the_insert(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO METRICS") and not sent:
            sent.append(statement)
            signal.raise_signal(signal.SIGINT)  # its handler runs here, with SQLAlchemy's frames below

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", ctrl_c_inside_the_insert)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupts.install()
        with pytest.raises(KeyboardInterrupt):
            with tracking.run_scope(cfg) as run_id:
                tracking.log_epoch(run_id, 1, {"epoch": 1, "loss": 0.5})  # not cut short by the Ctrl-C inside it
                assert sent and interrupts.interrupted()
                interrupts.raise_if_interrupted()  # the next check raises it
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", ctrl_c_inside_the_insert)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ended = store.get_run(run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["error"] == "interrupted"
    assert [(m.step, m.value) for m in store.get_metric_history(run_id, "loss")] == [(1, 0.5)]
