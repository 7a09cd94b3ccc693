"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write to; it replaces `path` only if the block ends
    without an error (rename is atomic on one file system), and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, data: str | bytes) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
