"""SIGTERM as an exception, so that timeout / kill / SLURM preemption close the run (KILLED) as Ctrl-C does.

Usage (pipeline/runner.py):
    with on_sigterm_raise():
        ...                     # SIGTERM raises Terminated here, wherever the main thread is,
        with deferred():        # but not here (MLflow's store writes): it is raised when this body ends
            ...
        raise_if_terminated()   # at safe points: raise it again if its first raise was lost

A signal handler's exception can be lost: raised while the main thread runs a finalizer (``__del__``, a weakref
callback, the garbage collector), Python prints it as "Exception ignored" and goes on, and the run would then finish
as if it had never been stopped. So the handler also records the signal, and ``raise_if_terminated`` (called after
each calibrated layer and each stage) raises it again.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

_received: list[str] = []  # the SIGTERM the running body received, if any
_deferring = [0]  # depth of `deferred` bodies the main thread is in


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that the run is closed (KILLED) as for Ctrl-C."""


@contextmanager
def on_sigterm_raise():
    """While the body runs, SIGTERM raises Terminated (a KeyboardInterrupt) instead of ending the process at once."""
    def handler(signum, frame):
        _received.append(signal.Signals(signum).name)
        if not _deferring[0]:
            raise Terminated(_received[-1])

    _received.clear()
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _received.clear()


def raise_if_terminated() -> None:
    """Raise Terminated if SIGTERM arrived during the body (its first raise lost, or this is where it is seen)."""
    if _received:
        raise Terminated(_received[-1])


@contextmanager
def deferred(raise_after: bool = True):
    """A body SIGTERM must not interrupt (an MLflow store write: an exception inside it can leave the store unable to
    end the run, which then stays RUNNING): the signal is recorded there and raised when the body ends (unless
    raise_after is False: the caller is ending the run anyway)."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    if raise_after and not _deferring[0]:
        raise_if_terminated()
