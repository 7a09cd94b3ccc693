"""Optuna's log lines for a trial that raised, quieted where skinml says it in one line.

Optuna logs a failed trial as two WARNING records of its private logger
`optuna.study._optimize`: the first carries the exception (with its traceback), the next
says "failed with value None". A trial stopped by Ctrl-C, or declared dead by another
worker, is not a failure to show a traceback for: skinml reports those ends itself, so both
records are dropped. Every other failure is logged as Optuna logs it.

This relies on how Optuna 5.0 logs (pinned in pyproject.toml); `missing_behaviour()` says
what a newer Optuna no longer does, and the suite fails on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import optuna

OPTIMIZE_LOGGER = "optuna.study._optimize"
# The ends skinml reports in its own line: Ctrl-C (the trial's run is KILLED), and a trial
# another worker failed while it ran (`workers.optimize` says so).
QUIET = (KeyboardInterrupt, optuna.exceptions.UpdateFinishedTrialError)


class _QuietStops(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._drop_next = False  # the "failed with value" record that follows a dropped one

    def filter(self, record: logging.LogRecord) -> bool:
        if self._drop_next:
            self._drop_next = False
            return False
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, QUIET):
            self._drop_next = True
            return False
        return True


@contextlib.contextmanager
def quiet_stops() -> Iterator[None]:
    """While a worker optimizes: no traceback for a trial stopped or declared dead."""
    logger = logging.getLogger(OPTIMIZE_LOGGER)
    quiet = _QuietStops()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def missing_behaviour() -> list[str]:
    """What `quiet_stops` relies on that the installed Optuna does not do: a failed trial
    logged by OPTIMIZE_LOGGER as a record with the exception, then one without."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    def fails(trial: optuna.Trial) -> float:
        raise ValueError("on purpose")

    logger, library = logging.getLogger(OPTIMIZE_LOGGER), logging.getLogger("optuna")
    handler = _Keep(level=logging.WARNING)
    shown = library.handlers[:], library.propagate  # this check shows nothing
    library.handlers, library.propagate = [], False
    logger.addHandler(handler)
    try:
        study = optuna.create_study()
        study.optimize(fails, n_trials=1, catch=(ValueError,))
    finally:
        logger.removeHandler(handler)
        library.handlers, library.propagate = shown
    missing = []
    if len(records) != 2:
        missing.append(f"two records per failed trial from {OPTIMIZE_LOGGER} (got "
                       f"{len(records)})")
    elif not (records[0].exc_info and isinstance(records[0].exc_info[1], ValueError)):
        missing.append("the first record of a failed trial carries its exception")
    elif records[1].exc_info:
        missing.append("the second record of a failed trial carries no exception")
    return missing
