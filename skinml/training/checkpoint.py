"""Checkpoints: plain dicts of state dicts plus the resolved config, written atomically and
opened with `weights_only=True`, so a killed run resumes where it stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skinml.core.config import Config
from skinml.core.files import replaced_atomically
from skinml.data.cache import cache_root
from skinml.training.recipe import StepTools

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CANDIDATE_FILE = "candidate.pt"  # beside last.pt: a tuning trial's best-epoch weights


@dataclass
class TrainingState:
    """Where training stands after an epoch: what early stopping and `best` need."""

    epoch: int = 0
    best_epoch: int = 0
    best_score: float = -math.inf
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    stale_epochs: int = 0


def checkpoint_path(config: Config, run_id: str) -> Path:
    """`runtime.checkpoint_dir`/<run_id>/last.pt, by default under the cache folder."""
    root = Path(config.runtime.checkpoint_dir or cache_root() / "checkpoints").expanduser()
    return root / run_id / "last.pt"


@dataclass(frozen=True)
class Checkpoint:
    """Where one run's checkpoint lives, and the resolved config it records (what `--resume`
    runs again)."""

    path: Path
    config: dict[str, Any]

    def save(self, model: nn.Module, tools: StepTools, state: TrainingState) -> None:
        save_checkpoint(self.path, model, tools, state, self.config)

    def restore(self, model: nn.Module, tools: StepTools) -> TrainingState:
        """Load model, optimiser, schedule, scaler and EMA; the training state to go on from.

        A run stopped before its first epoch ended has no checkpoint: it starts again from
        the beginning, in the same run.
        """
        if not self.path.is_file():
            log.info("no checkpoint at %s (stopped before its first epoch ended): training "
                     "from the start", self.path)
            return TrainingState()
        state = load_checkpoint(self.path, model, tools)
        log.info("resumed from %s after epoch %d", self.path, state.epoch)
        return state

    def remove(self) -> None:
        """Free the disk once the run finished: its best weights are in the logged model."""
        remove_checkpoint(self.path)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint and its run's folder (when nothing else is in it), saying so."""
    if not path.is_file():
        return
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()
    log.info("removed checkpoint %s (set runtime.keep_checkpoint=true to keep checkpoints)",
             path)


def candidate_path(config: Config, run_id: str) -> Path:
    """Where a deferred run keeps its best-epoch weights until a study logs or drops them."""
    return checkpoint_path(config, run_id).with_name(CANDIDATE_FILE)


@dataclass(frozen=True)
class Candidate:
    """A finished run's best-epoch weights with what logging its model needs: the weights it
    was judged on, the temperature fitted on validation, its resolved config."""

    weights: dict[str, torch.Tensor]
    temperature: float
    config: dict[str, Any]
    best_epoch: int


def save_candidate(path: Path, candidate: Candidate) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "weights": candidate.weights,
               "temperature": candidate.temperature, "config": candidate.config,
               "best_epoch": candidate.best_epoch}
    with replaced_atomically(path) as tmp:
        torch.save(payload, tmp)


def load_candidate(path: Path) -> Candidate:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return Candidate(payload["weights"], float(payload["temperature"]), payload["config"],
                     int(payload["best_epoch"]))


def remove_candidate(path: Path) -> None:
    """Delete a candidate (and its run's folder when nothing else is in it), quietly: a study
    drops one for every trial that stops being the best."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def save_checkpoint(path: Path, model: nn.Module, tools: StepTools, state: TrainingState,
                    config: dict[str, Any]) -> None:
    """Write the checkpoint atomically: a crash mid-write leaves the previous one intact."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "model": model.state_dict(),
        "optimizer": tools.optimizer.state_dict(),
        "scheduler": tools.scheduler.state_dict(),
        "scaler": tools.precision.scaler.state_dict() or None,
        "ema": tools.ema.state_dict() if tools.ema is not None else None,
        "state": {f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
    }
    with replaced_atomically(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, model: nn.Module, tools: StepTools) -> TrainingState:
    """Restore model, optimiser, schedule, scaler and EMA; returns the training state."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    tools.optimizer.load_state_dict(payload["optimizer"])
    tools.scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"]:
        tools.precision.scaler.load_state_dict(payload["scaler"])
    if tools.ema is not None and payload["ema"] is not None:
        tools.ema.load_state_dict(payload["ema"])
    known = {f.name for f in dataclasses.fields(TrainingState)}
    return TrainingState(**{k: v for k, v in payload["state"].items() if k in known})


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The resolved config a checkpoint was trained with (what `--resume` runs again)."""
    return torch.load(path, map_location="cpu", weights_only=True)["config"]
