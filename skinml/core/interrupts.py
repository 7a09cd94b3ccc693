"""Ctrl-C that is never lost in a finaliser.

Python runs signal handlers between any two bytecodes, finalisers included: a Ctrl-C that
lands in a `__del__` (GitPython's `Repo.__del__`, which MLflow's git tags leave to the
garbage collector) or a gc callback is swallowed, its traceback printed as "Exception
ignored", and the work goes on as if nobody had pressed it. `keep_interrupts` turns that into
the ordinary KeyboardInterrupt, raised again a moment later outside the finaliser.
"""

from __future__ import annotations

import _thread
import contextlib
import sys
import threading

RAISE_AGAIN_SECONDS = 0.05


def keep_interrupts() -> None:
    """Install the hook in this process (each spawned worker calls it again)."""
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


def _raise_again() -> None:
    """The SIGINT handler runs again in the main thread, outside the finaliser."""
    # RuntimeError: the interpreter is shutting down, nothing left to interrupt
    with contextlib.suppress(RuntimeError):
        threading.Timer(RAISE_AGAIN_SECONDS, _thread.interrupt_main).start()
