"""The one use of Optuna's logging internals: a trial stopped by Ctrl-C or declared dead by
another worker logs no traceback; other failures log as Optuna logs them."""

from __future__ import annotations

import contextlib
import logging

import optuna
import pytest

from skinml.workflows.tuning.trial_logs import OPTIMIZE_LOGGER, missing_behaviour, quiet_stops


def test_the_installed_optuna_logs_a_failed_trial_as_quiet_stops_expects():
    assert missing_behaviour() == []


@pytest.mark.parametrize("error, shown", [(KeyboardInterrupt, 0), (ValueError, 2)])
def test_a_stopped_trial_logs_nothing_and_a_failed_one_its_error(error, shown, caplog):
    def objective(trial: optuna.Trial) -> float:
        raise error("stop")

    optuna.logging.enable_propagation()
    study = optuna.create_study()
    with (caplog.at_level(logging.WARNING, logger=OPTIMIZE_LOGGER), quiet_stops(),
          contextlib.suppress(KeyboardInterrupt)):
        study.optimize(objective, n_trials=1, catch=(ValueError,))
    assert len([r for r in caplog.records if r.name == OPTIMIZE_LOGGER]) == shown
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
