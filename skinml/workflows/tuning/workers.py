"""A tuning worker: one of many processes or machines sharing a study through its storage.

Each worker opens the study (`open_study`), then takes trials until the study has its
`n_trials` COMPLETE trials over all workers: a worker whose trial would go past it waits for
a running trial to finish (or to be failed by the heartbeat and retried, or for its own
--timeout) instead of starting a surplus one; and a worker another worker declared dead (it
stalled past --grace-period) says so and takes the next trial. After each trial the
candidates it beat are dropped (`candidates.py`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from skinml.core.config import Config
from skinml.core.errors import SkinmlError
from skinml.tracking.retry import is_create_race, retry_create_race
from skinml.tracking.writer import mark_trial
from skinml.workflows.prepared import PreparedData
from skinml.workflows.tuning.candidates import drop_beaten
from skinml.workflows.tuning.options import (
    PRUNERS,
    SAMPLERS,
    TuneOptions,
    check_options,
    masked,
    max_trials,
    pruner_name,
)
from skinml.workflows.tuning.search_space import Dimension
from skinml.workflows.tuning.storage import HeartbeatStorage
from skinml.workflows.tuning.trial_logs import quiet_stops
from skinml.workflows.tuning.trials import RUN_ID_ATTR, run_trial

log = logging.getLogger(__name__)

WORKER_ATTR = "skinml.worker"  # the user attribute naming the process that runs a trial


def worker_tag(pid: int | None = None) -> str:
    """Who runs a trial: this machine and the process id (this process by default)."""
    return f"{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """FAIL the RUNNING trials whose worker ran on this machine and no longer exists (a
    killed `skinml tune`), and their runs: at once, not a grace period later. Their numbers.
    """
    host = f"{socket.gethostname()}:"
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = trial.user_attrs.get(WORKER_ATTR, "")
        if not tag.startswith(host) or _alive(int(tag.removeprefix(host))):
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        if RUN_ID_ATTR in trial.user_attrs:
            mark_trial(trial.user_attrs[RUN_ID_ATTR], "FAIL")
        failed.append(trial.number)
    if failed:
        log.info("trial(s) %s failed: their worker on this machine is gone",
                 ", ".join(map(str, failed)))
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def open_study(options: TuneOptions, attempts: int = 5, worker: int = 0) -> optuna.Study:
    """Create or load (resume) the study; heartbeats fail and retry a dead worker's trial.

    Workers started together on a fresh database race to create Optuna's tables
    (`skinml.tracking.retry`). `worker` (0, 1, ... of one `skinml tune --workers N`) seeds
    each worker's sampler apart, so workers started together propose different points.
    """
    check_options(options)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return retry_create_race(lambda: _open_study(options, worker),
                             f"the tables of {masked(options.storage)}", attempts)


def _open_study(options: TuneOptions, worker: int) -> optuna.Study:
    try:
        storage = HeartbeatStorage(
            options.storage, heartbeat_interval=options.heartbeat_interval,
            grace_period=options.grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
        study = optuna.create_study(storage=storage, study_name=options.study_name,
                                    direction="maximize", load_if_exists=True,
                                    sampler=SAMPLERS[options.sampler](options.seed),
                                    pruner=PRUNERS[pruner_name(options)](options))
        study.sampler = SAMPLERS[options.sampler](sampler_seed(options.seed, study, worker))
        return study
    except (ImportError, ValueError, optuna.exceptions.OptunaError) as exc:
        raise SkinmlError(f"cannot open study {options.study_name!r} at "
                          f"{masked(options.storage)}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # SQLAlchemy connection errors and the like
        if type(exc).__module__.startswith("sqlalchemy") and not is_create_race(exc):
            raise SkinmlError(f"cannot open study storage {masked(options.storage)}: "
                              f"{str(exc).splitlines()[0]}") from None
        raise


def sampler_seed(seed: int, study: optuna.Study, worker: int = 0) -> int:
    """`seed` on a new study (worker 0); on a resumed one, or for another worker, `seed`
    mixed with its trial count and the worker's number.

    A sampler seeded alike on every resume would propose trial 0's parameters again (TPE's
    first trials are random draws from the seed alone), so each resume draws fresh points
    and a study stays reproducible from its history.
    """
    trials = len(study.get_trials(deepcopy=False))
    if trials == 0 and worker == 0:
        return seed
    entropy = [seed, trials] if worker == 0 else [seed, trials, worker]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def optimize(study: optuna.Study, objective: Objective, options: TuneOptions) -> None:
    """`study.optimize`, going on when another worker declared this one's trial dead.

    A worker that stalled longer than the grace period (a loaded CPU, a suspended VM, a
    slow disk) is not dead, but its trial is failed and retried elsewhere, and Optuna then
    ends this worker with "Cannot tell a FAIL trial" (optuna/optuna#5470). One line says
    so instead, and this worker takes the next trial.
    """
    if options.timeout is not None:
        objective.deadline = time.monotonic() + options.timeout
    fail_dead_local_trials(study)
    # Optuna's lines in skinml's format (and a worker's prefix), not its own handler's.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    while True:
        try:
            with quiet_stops():
                study.optimize(objective, n_trials=None, timeout=objective.seconds_left(),
                               gc_after_trial=True, catch=(SkinmlError,),
                               callbacks=[optuna.study.MaxTrialsCallback(
                                   options.n_trials, states=(TrialState.COMPLETE,)),
                                   optuna.study.MaxTrialsCallback(max_trials(options),
                                                                  states=None),
                                   objective.drop_beaten, objective.wait_for_room])
            return
        except ValueError:
            if objective.declared_dead is None:
                raise
            log.warning("trial %d was declared dead by another worker (no heartbeat for over "
                        "%d s; raise --grace-period if this machine stalls): it is retried, "
                        "and this worker goes on", objective.declared_dead,
                        options.grace_period)
            objective.declared_dead = None


class Objective:
    """What `study.optimize` calls for each trial: wait for a slot, then run the trial.

    Its clock is the worker's --timeout, which bounds the waits for other workers' trials
    as well as `study.optimize` itself.
    """

    def __init__(self, study: optuna.Study, options: TuneOptions,
                 space: tuple[Dimension, ...], data: PreparedData, base: Config,
                 parent_run_id: str | None = None) -> None:
        self.study, self.options, self.space, self.data = study, options, space, data
        self.base = base  # the study's base config: where candidates are kept
        self.parent_run_id = parent_run_id  # the study run the trials nest under
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
        trial.set_user_attr(WORKER_ATTR, worker_tag())
        self._wait_for_slot(trial)
        return run_trial(trial, self.options, self.space, self.data, self.parent_run_id)

    def drop_beaten(self, study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        """After a trial: only the best trial's candidate stays (the trial's own, if it won)."""
        drop_beaten(study, self.base)

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
        fail_dead_local_trials(self.study)
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
