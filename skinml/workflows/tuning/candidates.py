"""The best trial's weights, kept until the study knows it is the best.

A trial that defers its model (`trials.defers_models`) leaves its best epoch's weights in a
candidate file beside its checkpoint. Values never change once a trial is COMPLETE, so a
trial that is not the best when it ends can never become it: its candidate goes at once,
and the candidate of a best trial goes when another beats it. At the study's end (each
worker's end, a resume's too) the best trial's model, test scores and figures are logged
into its own run from its candidate: exactly the weights it was judged on.

Candidates live on the machine that trained the trial (`runtime.checkpoint_dir`): with
workers on several machines, the one holding the best trial's candidate logs it when it
ends, or point `runtime.checkpoint_dir` at a folder they share.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from skinml.core.config import Config
from skinml.tracking import reader
from skinml.training.checkpoint import candidate_path, remove_candidate
from skinml.workflows.prepared import PreparedData
from skinml.workflows.train import log_candidate
from skinml.workflows.tuning.trials import RUN_ID_ATTR, best_trial

log = logging.getLogger(__name__)


def drop_beaten(study: optuna.Study, base: Config) -> None:
    """Remove the candidates of every trial but the current best (on this machine)."""
    best = best_trial(study)
    keep = best.user_attrs[RUN_ID_ATTR] if best is not None else None
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id is None or run_id == keep or trial.state == TrialState.RUNNING:
            continue
        remove_candidate(candidate_path(base, run_id))


def log_best_model(study: optuna.Study, base: Config, data: PreparedData) -> bool:
    """Log the best trial's model from its candidate unless its run has one; whether the
    best trial has a model now.

    The candidate is locked while it is logged, so two processes of this machine ending
    together log it once; a process killed meanwhile leaves the candidate for the next.
    """
    best = best_trial(study)
    if best is None:
        return False
    run_id = best.user_attrs[RUN_ID_ATTR]
    path = candidate_path(base, run_id)
    with _locked(path):
        if reader.has_logged_model(run_id):
            return True
        if not path.is_file():
            log.warning("best trial %d (run %s) has no model yet: its weights are not on this "
                        "machine (%s); the worker that ran it logs the model when it ends",
                        best.number, run_id, path)
            return False
        log.info("logging the model of best trial %d (run %s) from its best epoch's weights",
                 best.number, run_id)
        log_candidate(run_id, path, data)
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` while it exists (nothing to lock when it does not)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - held for the block below
    except FileNotFoundError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when closed, or when the process dies
        yield
