"""The one place skinml uses Optuna's private API: a storage where a trial that never beat
goes stale.

Optuna fails only trials whose last heartbeat is old, and skips trials with none. A worker
killed between creating its trial (`ask`) and the heartbeat thread's first beat leaves that
trial RUNNING for ever, and the other workers, which count it as running, wait for it for
ever. A live worker beats at once after `ask`, so a trial started over the grace period ago
that has still never beaten is dead.

This overrides `RDBStorage._get_stale_trial_ids` and reads Optuna's SQLAlchemy models.
pyproject.toml pins Optuna to the minor release these were read from (`PRIVATE_API_OF`);
`missing_private_api()` lists what a newer Optuna no longer has, and the suite fails on it.
"""

from __future__ import annotations

import inspect
from datetime import datetime, timedelta

from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState

PRIVATE_API_OF = "5.0"  # the Optuna minor release this module was written against
_TRIAL_COLUMNS = ("trial_id", "study_id", "state", "datetime_start", "heartbeats")


class HeartbeatStorage(RDBStorage):
    """Optuna's RDB storage, where a RUNNING trial that never beat also goes stale."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        started_before = datetime.now() - timedelta(seconds=grace)
        with _create_scoped_session(self.scoped_session) as session:
            never_beat = session.query(models.TrialModel).filter(
                models.TrialModel.study_id == study_id,
                models.TrialModel.state == TrialState.RUNNING,
                ~models.TrialModel.heartbeats.any()).all()
            return stale + [int(trial.trial_id) for trial in never_beat
                            if trial.datetime_start and trial.datetime_start < started_before]


def missing_private_api() -> list[str]:
    """What `HeartbeatStorage` relies on that the installed Optuna does not have."""
    missing = []
    method = getattr(RDBStorage, "_get_stale_trial_ids", None)
    if method is None or list(inspect.signature(method).parameters) != ["self", "study_id"]:
        missing.append("RDBStorage._get_stale_trial_ids(self, study_id)")
    if "scoped_session" not in inspect.getsource(RDBStorage.__init__):
        missing.append("RDBStorage.scoped_session")
    if list(inspect.signature(_create_scoped_session).parameters)[:1] != ["scoped_session"]:
        missing.append("optuna.storages._rdb.storage._create_scoped_session(scoped_session)")
    missing += [f"optuna.storages._rdb.models.TrialModel.{column}" for column in _TRIAL_COLUMNS
                if not hasattr(models.TrialModel, column)]
    return missing
