"""Retrying the one thing workers race for: creating a fresh database's tables.

Workers started together on an empty tracking or Optuna database all try to create its
tables; the losers' CREATE fails on a unique constraint, and simply trying again works.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from skinml.errors import SkinmlError

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_table_race(exc: BaseException) -> bool:
    """Whether `exc` is a CREATE that lost to another worker's (SQLite or PostgreSQL text)."""
    text = str(exc)
    return "already exists" in text or "duplicate key" in text


def retry_table_race(action: Callable[[], T], what: str, attempts: int = 5) -> T:
    """`action()`, tried again while it loses the table-creation race (other errors pass)."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if not is_table_race(exc):
                raise
            if attempt == attempts:
                raise SkinmlError(f"cannot create the tables of {what}: other workers kept "
                                  "racing") from None
            log.info("the tables of %s are being created by another worker; retrying", what)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")
