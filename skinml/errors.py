"""The project's error type: bad input a user can fix, reported on one line."""


class SkinmlError(Exception):
    """Bad input (file, field or value); the CLI prints the message and exits with code 2."""
