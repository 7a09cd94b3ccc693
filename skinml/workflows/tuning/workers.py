"""A tuning worker: one of many processes or machines sharing a study through its storage.

`n_trials` counts the study's COMPLETE trials over all workers, so a worker whose trial would
go past it waits for a running trial to finish (or to be failed by the heartbeat and
retried, or for its own --timeout) instead of starting a surplus one; and a worker another
worker declared dead (it stalled past --grace-period) says so and takes the next trial.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from skinml.core.errors import SkinmlError
from skinml.workflows.prepared import PreparedData
from skinml.workflows.tuning.options import TuneOptions, max_trials
from skinml.workflows.tuning.search_space import Dimension
from skinml.workflows.tuning.trials import run_trial

log = logging.getLogger(__name__)


def optimize(study: optuna.Study, objective: Objective, options: TuneOptions) -> None:
    """`study.optimize`, going on when another worker declared this one's trial dead.

    A worker that stalled longer than the grace period (a loaded CPU, a suspended VM, a
    slow disk) is not dead, but its trial is failed and retried elsewhere, and Optuna then
    ends this worker with "Cannot tell a FAIL trial" (optuna/optuna#5470). One line says
    so instead, and this worker takes the next trial.
    """
    if options.timeout is not None:
        objective.deadline = time.monotonic() + options.timeout
    while True:
        try:
            with _quiet_about(objective):
                study.optimize(objective, n_trials=None, timeout=objective.seconds_left(),
                               gc_after_trial=True, catch=(SkinmlError,),
                               callbacks=[optuna.study.MaxTrialsCallback(
                                   options.n_trials, states=(TrialState.COMPLETE,)),
                                   optuna.study.MaxTrialsCallback(max_trials(options),
                                                                  states=None),
                                   objective.wait_for_room])
            return
        except ValueError:
            if objective.declared_dead is None:
                raise
            log.warning("trial %d was declared dead by another worker (no heartbeat for over "
                        "%d s; raise --grace-period if this machine stalls): it is retried, "
                        "and this worker goes on", objective.declared_dead,
                        options.grace_period)
            objective.declared_dead = None


@contextlib.contextmanager
def _quiet_about(objective: Objective) -> Iterator[None]:
    """Without Optuna's traceback for a trial declared dead: `optimize` says it in one line."""
    logger = logging.getLogger("optuna.study._optimize")

    def keep(record: logging.LogRecord) -> bool:
        number = objective.declared_dead
        return number is None or not record.getMessage().startswith(f"Trial {number} failed")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class Objective:
    """What `study.optimize` calls for each trial: wait for a slot, then run the trial.

    Its clock is the worker's --timeout, which bounds the waits for other workers' trials
    as well as `study.optimize` itself.
    """

    def __init__(self, study: optuna.Study, options: TuneOptions,
                 space: tuple[Dimension, ...], data: PreparedData) -> None:
        self.study, self.options, self.space, self.data = study, options, space, data
        self.declared_dead: int | None = None  # this worker's trial that another one failed
        self.deadline: float | None = None  # time.monotonic() at which --timeout runs out

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._trial(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker's heartbeat check failed this trial while it ran here.
            self.declared_dead = trial.number
            raise

    def _trial(self, trial: optuna.Trial) -> float:
        self._wait_for_slot(trial)
        return run_trial(trial, self.options, self.space, self.data)

    def wait_for_room(self, study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        """After a trial: ask for another only if running trials leave room below n_trials.

        If other workers' running trials would complete the study, wait for them: they
        finish (stop here) or die and are retried (then there is room again), or this
        worker's --timeout runs out (stop here).
        """
        while True:
            complete, running = self._counts(before=None)
            if complete >= self.options.n_trials or self._out_of_time():
                study.stop()
                return
            if complete + running < self.options.n_trials:
                return
            self._pause()

    def _wait_for_slot(self, trial: optuna.Trial) -> None:
        """Start only if COMPLETE + earlier RUNNING trials leave room below n_trials.

        Two workers asking at the same moment both see room; the later trial number waits.
        """
        while True:
            complete, ahead = self._counts(before=trial.number)
            reached = complete >= self.options.n_trials
            if reached or self._out_of_time():
                trial.set_user_attr("skinml.surplus", True)
                self.study.stop()
                raise optuna.TrialPruned("the study reached its number of trials" if reached
                                         else "this worker's --timeout ran out")
            if complete + ahead < self.options.n_trials:
                return
            self._pause()

    def _counts(self, before: int | None) -> tuple[int, int]:
        """(COMPLETE, RUNNING) trials, RUNNING only below trial number `before` if given."""
        fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        running = sum(t.state == TrialState.RUNNING and (before is None or t.number < before)
                      for t in trials)
        return complete, running

    def seconds_left(self) -> float | None:
        """What is left of this worker's --timeout (None: no timeout)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _out_of_time(self) -> bool:
        """The worker's --timeout bounds its waits for other workers' trials too."""
        return self.seconds_left() == 0.0

    def _pause(self) -> None:
        time.sleep(min(5.0, max(0.5, self.options.heartbeat_interval / 2)))
