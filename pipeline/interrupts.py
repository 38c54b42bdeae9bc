"""Ctrl-C and SIGTERM that are never lost.

Python runs a signal's handler wherever the main thread happens to be, and the KeyboardInterrupt it raises there
is dropped when that place is a weakref callback or a `__del__` that the garbage collector runs (Python prints
"Exception ignored" and carries on). SQLAlchemy's and TensorFlow's weakref callbacks run all through a stage: of
30 Ctrl-Cs sent to `pipeline train` 4-9 s after it started (2-core AMD EPYC), 4 were handled inside one (a handler
that wrote its stack showed where) and left the training running. So `handle_interrupt` also remembers the signal,
and `raise_if_interrupted` raises it again where the pipeline checks: before every training, validation and
prediction step, before a run ends FINISHED, in the sweep's loop and when a command returns (0 of 24 lost, sent
4-14 s after start).

A signal that comes while the main thread is inside a database call (SQLAlchemy, MLflow's store) is only
remembered, and raised at the next check. A KeyboardInterrupt raised there can leave a SQLite read cursor alive
in its traceback, holding the database's shared lock, so that ending the run KILLED then waits out SQLite's busy
timeout and fails "database is locked" (CI saw it once; a loop of interrupted `log_batch` calls, 1 of 30).
"""

from __future__ import annotations

import signal
import sys

_interrupted = False

# Code that a KeyboardInterrupt must not cut short: its connections and cursors outlive the exception.
_DEFERRING_MODULES = ("sqlalchemy.", "mlflow.store.")


def handle_interrupt(signum, frame) -> None:
    """The handler for SIGINT and SIGTERM: remember the signal, raise KeyboardInterrupt (or leave it to the next
    check when `frame` is inside a database call)."""
    global _interrupted
    _interrupted = True
    if not _in_database_call(frame):
        raise KeyboardInterrupt


def _in_database_call(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_DEFERRING_MODULES):
            return True
        frame = frame.f_back
    return False


def install() -> None:
    """Handle SIGTERM, and SIGINT unless it is ignored (a shell's background job keeps ignoring it)."""
    signal.signal(signal.SIGTERM, handle_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, handle_interrupt)
    sys.unraisablehook = _quiet_dropped_interrupt


def _quiet_dropped_interrupt(unraisable) -> None:
    """Python's report of a dropped exception, except the KeyboardInterrupt that raise_if_interrupted raises again."""
    if not (_interrupted and issubclass(unraisable.exc_type, KeyboardInterrupt)):
        sys.__unraisablehook__(unraisable)


def interrupted() -> bool:
    return _interrupted


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal came, also one whose KeyboardInterrupt Python dropped."""
    if _interrupted:
        raise KeyboardInterrupt
