"""The project's error type: bad input a user can fix, reported on one line."""


class SkinmlError(Exception):
    """Bad input (file, field or value); the CLI prints the message and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type's name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C inside a run: carries the outermost run's id, so the CLI can print the one
    command that continues it (the run is marked KILLED, its checkpoint kept)."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        self.run_id = run_id


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in work that can be continued: carries the one line that says how."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


class WorkersFailed(Exception):
    """Every worker process of a job stopped with an error (each said why): the CLI prints
    this line and exits with code 1."""
