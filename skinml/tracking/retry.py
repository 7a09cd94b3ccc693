"""Retrying what workers race to create: a fresh database's tables, or one shared row.

Workers started together on an empty tracking or Optuna database all try to create its
tables; workers logging the same dataset at once all try to insert its row (MLflow checks,
then inserts). The losers fail on a unique constraint, and simply trying again works.

A lost race is told by its text: SQLAlchemy, each database driver and alembic word it
their own way and share no exception type for it. Every text matched here is produced for
real (or read from alembic's source) by tests/tracking/test_retry.py, which fails when an
upgrade rewords one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from skinml.core.errors import SkinmlError

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_create_race(exc: BaseException) -> bool:
    """Whether `exc` is a CREATE or INSERT that lost to another worker's (SQLite or
    PostgreSQL text)."""
    text = str(exc)
    return ("already exists" in text or "duplicate key" in text
            or "UNIQUE constraint failed" in text
            # alembic, when another process migrated the fresh database meanwhile
            or "Online migration expected to match one" in text)


def retry_create_race(action: Callable[[], T], what: str, attempts: int = 5) -> T:
    """`action()`, tried again while it loses the race to create `what` (other errors pass)."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if not is_create_race(exc):
                raise
            if attempt == attempts:
                raise SkinmlError(f"cannot create {what}: other workers kept racing") from None
            log.info("%s is being created by another worker; retrying", what)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")
