"""Stopping training cleanly on SIGINT (Ctrl-C) or SIGTERM.

The first SIGINT or SIGTERM raises :class:`Interrupted` in the training loop (in the main
thread, between two Python operations). The run then cuts its metrics.jsonl back to the length
its last checkpoint recorded, so its folder holds exactly what a resume continues from, and the
exception travels up: the command line exits with 128 + the signal number (130, 143). Further
signals while stopping are ignored, so one Ctrl-C is enough and a second cannot cut the
cleanup short. A section that must not be cut (writing a checkpoint and recording its length)
runs :func:`uninterrupted`: a signal there is raised when it ends.

Worker processes of :func:`bnkernels.experiments.batch.run_many` start with
:func:`init_worker`: a signal raises only while a run trains (:func:`armed`); an idle worker
records it and refuses the runs it is given afterwards. A worker also watches its parent: when
the parent dies (killed outright), it stops its run as on SIGTERM, leaving the folder
consistent, and exits: a killed ``reproduce`` leaves no worker training on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: training stops, its folder as of its last checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


class _State:
    signum = 0  # the first SIGINT/SIGTERM received (0: none)
    installed = False  # our handler is in place
    armed = False  # the handler raises (in a worker: only while a run trains)
    critical = 0  # depth of uninterrupted() sections
    parent = None  # a worker's parent pid


_state = _State()


def _handler(signum, frame):
    if _state.signum:
        return  # already stopping: one signal is enough, and cleanup must finish
    _state.signum = signum
    if _state.parent is not None and not _state.armed and os.getppid() != _state.parent:
        os._exit(128 + signum)  # an idle worker whose parent died: nothing to clean up
    if _state.armed and _state.critical == 0:
        raise Interrupted(signum)


def stop_requested() -> int:
    """The signal that asked this process to stop, or 0."""
    return _state.signum


def check() -> None:
    """Raise :class:`Interrupted` if a signal asked to stop while it could not be raised."""
    if _state.signum and _state.armed and _state.critical == 0:
        raise Interrupted(_state.signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (main thread only; in a
    nested use, or in another thread, the block runs under the handlers already there)."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.installed, _state.armed, _state.signum = True, True, 0
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.installed, _state.armed = False, False


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A section a signal must not cut: one arriving inside is raised when the section ends."""
    _state.critical += 1
    try:
        yield
    finally:
        _state.critical -= 1
    check()


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """In a worker: signals raise :class:`Interrupted` while the block runs; one that came
    before (the worker was told to stop while idle) is raised at once."""
    before = _state.armed
    _state.armed = True
    try:
        check()
        yield
    finally:
        _state.armed = before


def parent_alive() -> bool:
    return _state.parent is None or os.getppid() == _state.parent


WATCH_SECONDS = 0.25
"""How often a worker checks that its parent is alive."""

GRACE_SECONDS = 30.0
"""How long a worker whose parent died gives its run to stop before it exits regardless."""


def _watch_parent(main: int) -> None:
    """A worker's daemon thread: once the parent is gone, SIGTERM to the main thread (a
    signal sent to the process may land on another thread, which leaves a main thread blocked
    on its task queue asleep), then exit after :data:`GRACE_SECONDS` if still running."""
    while parent_alive():
        time.sleep(WATCH_SECONDS)
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(main, signal.SIGTERM)
        time.sleep(GRACE_SECONDS)
    os._exit(128 + int(signal.SIGTERM))


def _exit_now_if_stopping() -> None:
    """At exit of a worker told to stop: its pool's own finalizers have run (they precede
    atexit), its runs' files are closed; skip tearing down an interpreter that has torch
    loaded (seconds on a busy machine), which the parent would otherwise wait for."""
    if _state.signum:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)


def init_worker(parent: int) -> None:
    """Initializer of a run_many worker process whose parent has pid ``parent``."""
    import atexit

    atexit.register(_exit_now_if_stopping)  # after the imports: runs before their hooks
    _state.parent = parent
    for s in SIGNALS:
        signal.signal(s, _handler)
    _state.installed, _state.armed, _state.signum = True, False, 0
    threading.Thread(target=_watch_parent, args=(threading.main_thread().ident,),
                     name="bnkernels-watch-parent", daemon=True).start()
