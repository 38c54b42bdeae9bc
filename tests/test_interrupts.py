"""A Ctrl-C whose KeyboardInterrupt Python drops (raised in a weakref callback or a __del__) is not lost."""

from __future__ import annotations

import signal
import sys
import weakref

import pytest

from pipeline import interrupts


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
