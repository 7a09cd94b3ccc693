"""The stale-heartbeat storage: the one use of Optuna's private API, checked against the
installed Optuna, and a trial that never beat failed so the study still ends."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from skinml.workflows.tuning.storage import PRIVATE_API_OF, missing_private_api
from skinml.workflows.tuning.workers import open_study

from .conftest import tune_in_thread, tuning_options


def test_the_installed_optuna_has_the_private_api_the_storage_overrides():
    assert missing_private_api() == []
    assert optuna.__version__.startswith(PRIVATE_API_OF + "."), (
        f"Optuna {optuna.__version__}: HeartbeatStorage was read from {PRIVATE_API_OF}; "
        "check skinml/workflows/tuning/storage.py against it, then move the pin")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # our ask() stands in for a worker
def test_a_trial_that_never_beat_is_failed_and_the_study_still_ends(tracking, tmp_path,
                                                                    synthetic):
    """A worker killed between `ask` and its first heartbeat leaves a RUNNING trial without
    one; Optuna never fails such a trial, and the study, counting it, used to wait for it."""
    opts = tuning_options(tmp_path, synthetic, n_trials=2, study_name="ghost",
                   heartbeat_interval=1, grace_period=2)
    ghost = open_study(opts).ask()  # what the killed worker left: RUNNING, no heartbeat
    result = tune_in_thread(opts, within=240)
    assert result.counts["COMPLETE"] == 2
    trials = optuna.load_study(study_name="ghost", storage=opts.storage).get_trials()
    assert trials[ghost.number].state == TrialState.FAIL
