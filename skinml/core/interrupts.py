"""Ctrl-C that is never lost, and never lands where it leaves damage behind.

Python runs signal handlers between any two bytecodes. Two places make that a problem:

- a finaliser: a Ctrl-C that lands in a `__del__` (GitPython's `Repo.__del__`, which
  MLflow's git tags leave to the garbage collector) or a gc callback is swallowed, its
  traceback printed as "Exception ignored", and the work goes on as if nobody had pressed it;
- a tracking-store transaction: a KeyboardInterrupt raised while SQLAlchemy holds an SQLite
  write transaction can leave that transaction open (1 Ctrl-C in 5, measured), so the
  interrupted command cannot mark its run KILLED ("database is locked" 20 s later).

`keep_interrupts` turns the first into the ordinary KeyboardInterrupt, raised again a moment
later outside the finaliser, and lets the tracking layer `hold` a Ctrl-C while a store
connection is in use: it is raised the moment the connection is back (or after
HOLD_AT_MOST_SECONDS, should one never come back).
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading

RAISE_AGAIN_SECONDS = 0.05
HOLD_AT_MOST_SECONDS = 5.0

_held: set[int] = set()  # what the main thread holds a Ctrl-C for (store connections)
_pending: threading.Timer | None = None  # a held Ctrl-C's deadline
_overdue = False  # the deadline passed: the next Ctrl-C is not held


def keep_interrupts() -> None:
    """Install the hooks in this process (each spawned worker calls it again)."""
    if getattr(sys.unraisablehook, "keeps_interrupts", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _raise_again()
        else:
            previous(unraisable)

    hook.keeps_interrupts = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def hold(key: int) -> None:
    """Hold any Ctrl-C until `release(key)` (only the main thread hears Ctrl-C)."""
    if threading.current_thread() is threading.main_thread():
        _held.add(key)


def release(key: int) -> None:
    """Raise the held Ctrl-C, if any, here and now once nothing is held: the caller has
    finished what the Ctrl-C had to wait for, and waiting longer could mean waiting for ever
    (a loop of writes holds one connection after another)."""
    global _pending
    if key not in _held:  # another thread's connection
        return
    _held.discard(key)
    if not _held and _pending is not None:
        _pending.cancel()
        _pending = None
        if threading.current_thread() is not threading.main_thread():
            _raise_again()  # the connection came back in another thread (garbage collected)
            return
        raise KeyboardInterrupt


def _on_sigint(signum, frame) -> None:
    global _pending, _overdue
    if not _held or _overdue:
        _overdue = False
        raise KeyboardInterrupt
    if _pending is None:  # held; raised anyway should a connection never come back
        _pending = threading.Timer(HOLD_AT_MOST_SECONDS, _raise_overdue)
        _pending.daemon = True
        _pending.start()


def _raise_overdue() -> None:
    global _pending, _overdue
    _pending, _overdue = None, True
    _thread.interrupt_main()


def _raise_again() -> None:
    """The SIGINT handler runs again in the main thread, outside the finaliser."""
    # RuntimeError: the interpreter is shutting down, nothing left to interrupt
    with contextlib.suppress(RuntimeError):
        timer = threading.Timer(RAISE_AGAIN_SECONDS, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
