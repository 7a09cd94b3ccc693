"""The project's error type: bad input a user can fix, reported on one line."""


class SkinmlError(Exception):
    """Bad input (file, field or value); the CLI prints the message and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type's name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
