"""The table `skinml bench gpu` prints and writes: one row per step, with its figure, its
ratio to a target, peak GPU memory and time; a step that fails or is skipped says why."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skinml.core.files import write_atomically


@dataclass
class Row:
    """One step's outcome, as printed and as written to JSON."""

    step: str
    status: str = "ok"  # ok | failed: reason | skipped: reason
    figure: str = ""
    ratio: str = ""
    seconds: float = 0.0
    peak_gpu_mib: float | None = None
    values: dict[str, float | str | None] = field(default_factory=dict)  # None: not measured

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


class Skipped(Exception):
    """A step that cannot run on this machine (no second GPU, no CUDA)."""


def format_row(row: Row) -> str:
    """One line: step, ok/failed/skipped, figure and ratio (or the reason), memory, time."""
    memory = f"{row.peak_gpu_mib:,.0f} MiB" if row.peak_gpu_mib is not None else "-"
    state, _, reason = row.status.partition(": ")
    detail = f"{row.figure:<38} {row.ratio:<44}" if state == "ok" else f"{reason:<83}"
    return f"{row.step:<30} {state:<8} {detail} {memory:>10} {row.seconds:7.1f} s"


def header() -> str:
    return (f"{'step':<30} {'status':<8} {'figure':<38} {'ratio / detail':<44} "
            f"{'peak GPU':>10} {'time':>9}")


def report(rows: list[Row], device: torch.device, quick: bool, machine: str) -> dict:
    return {"machine": machine, "device": str(device), "quick": quick,
            "torch": torch.__version__, "ok": not any(r.failed for r in rows),
            "rows": [dataclasses.asdict(r) for r in rows]}


def write_report(path: Path, content: dict) -> None:
    write_atomically(path, (json.dumps(content, indent=2) + "\n").encode())


@contextlib.contextmanager
def work_folder(keep: Path | None) -> Iterator[Path]:
    """A scratch folder for the synthetic data, caches, checkpoints and tracking store."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="skinml-bench-gpu-") as folder:
        yield Path(folder)
