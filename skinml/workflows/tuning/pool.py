"""Several workers of one study on one machine: `skinml tune --workers N`.

The study's process prepares the data (the decode-once cache is built once: a file every
worker maps, never copies), opens the study and its run, then starts N worker processes.
Each takes trials of the same study through its storage (SQLite or PostgreSQL), nested under
the one study run. On k GPUs worker i trains on cuda:(i mod k); on the CPU the cores are
split between the workers. Ctrl-C (SIGINT to the study's process) stops every worker, whose
running trial ends KILLED, and the same command continues the study. A worker that dies
fails only its trial: the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
import torch

from skinml.core.config import Config
from skinml.core.errors import SkinmlError, WorkersFailed
from skinml.core.interrupts import keep_interrupts
from skinml.tracking.store import shown_uri, use_store
from skinml.training.choices import load_run_config
from skinml.workflows.prepared import prepare_data
from skinml.workflows.tuning.options import TuneOptions
from skinml.workflows.tuning.search_space import load_search_space
from skinml.workflows.tuning.workers import (
    Objective,
    fail_dead_local_trials,
    open_study,
    optimize,
)

log = logging.getLogger(__name__)

STOP_SECONDS = 60  # how long stopped workers get to mark their trials KILLED
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process is given: its number, the study, where it runs."""

    index: int
    options: TuneOptions
    parent_run_id: str  # the study run its trials nest under
    tracking_uri: str
    placement: tuple[str, ...]  # config overrides: the worker's GPU
    threads: int  # torch threads on the CPU
    log_level: int


def default_workers() -> int:
    """One worker per GPU of this machine; one on a machine without."""
    return max(1, torch.cuda.device_count())


def placements(workers: int, base: Config) -> list[tuple[tuple[str, ...], int]]:
    """Each worker's (device override, torch threads): spread over the GPUs when the config
    lets skinml choose the device, the cores split between workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    threads = max(1, cores // workers)
    gpus = torch.cuda.device_count() if base.runtime.device in ("auto", "cuda") else 0
    if not gpus:
        return [((), threads)] * workers
    return [((f"runtime.device=cuda:{i % gpus}",), threads) for i in range(workers)]


def run_workers(study: optuna.Study, options: TuneOptions, base: Config,
                parent_run_id: str) -> None:
    """Run `options.workers` worker processes to the study's end (or Ctrl-C)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    specs = [WorkerSpec(i, options, parent_run_id, shown_uri(), placement,
                        threads, logging.getLogger().getEffectiveLevel())
             for i, (placement, threads) in enumerate(placements(options.workers, base))]
    log.info("starting %d tuning workers (%s)", len(specs),
             ", ".join(_where(spec) for spec in specs))
    processes = []
    with _sigint_blocked():  # a Ctrl-C now reaches this process once the workers run
        for spec in specs:
            process = context.Process(target=_work, args=(spec,),
                                      name=f"skinml-tune-worker-{spec.index}")
            process.start()
            processes.append(process)
    try:
        _wait(processes, study)
    except KeyboardInterrupt:
        _stop(processes)
        raise


def _where(spec: WorkerSpec) -> str:
    device = spec.placement[0].partition("=")[2] if spec.placement else "cpu"
    return f"worker {spec.index} on {device}, {spec.threads} thread(s)"


def _wait(processes: list, study: optuna.Study) -> None:
    """Until every worker has ended; a worker that died fails its running trial at once."""
    failed = []
    running = list(processes)
    while running:
        time.sleep(POLL_SECONDS)
        for process in [p for p in running if not p.is_alive()]:
            running.remove(process)
            if process.exitcode != 0:
                failed.append(process)
                fail_dead_local_trials(study)  # its trial, without the heartbeat's grace
                log.warning("%s stopped (exit code %s); its running trial failed; %d "
                            "worker(s) go on", process.name, process.exitcode, len(running))
    if failed and len(failed) == len(processes):
        codes = ", ".join(str(p.exitcode) for p in failed)
        raise WorkersFailed(f"every tuning worker stopped with an error (exit codes {codes}; "
                            "their lines above say why)")


def _stop(processes: list) -> None:
    """SIGINT to every worker; those still running after STOP_SECONDS are killed."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: same stop
    try:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("%s did not stop in %d s: killed", process.name, STOP_SECONDS)
                process.kill()
                process.join()
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT held back while workers start: they inherit the block, leave the terminal's
    process group, then take SIGINT again, so only the study's process hears Ctrl-C and
    each worker is told exactly once."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _work(spec: WorkerSpec) -> None:
    """A worker process: trials of the study until it has its trials, or SIGINT."""
    os.setpgrp()
    keep_interrupts()  # a spawned interpreter: the CLI's hook is not inherited
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    logging.basicConfig(level=spec.log_level, stream=sys.stderr, force=True,
                        format=f"%(levelname)s: worker {spec.index}: %(message)s")
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _stop_when_orphaned(os.getppid())
    try:
        _take_trials(spec)
    except KeyboardInterrupt:
        log.info("stopped (a trial it was running is marked KILLED)")
        sys.exit(130)
    except SkinmlError as exc:
        log.error("%s", exc)
        sys.exit(2)


def _take_trials(spec: WorkerSpec) -> None:
    os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run`'s run is the study's, not a trial's
    use_store(spec.tracking_uri)
    torch.set_num_threads(spec.threads)
    options = dataclasses.replace(spec.options,
                                  overrides=(*spec.options.overrides, *spec.placement))
    base = load_run_config(options.config, options.overrides)
    data = prepare_data(base)  # the cache the study's process built: mapped, not copied
    study = open_study(options, worker=spec.index)
    objective = Objective(study, options, load_search_space(options.search_space), data,
                          base, spec.parent_run_id)
    optimize(study, objective, options)


def _stop_when_orphaned(parent: int) -> None:
    """A worker whose study process died (SIGKILL) stops as on Ctrl-C: its trial KILLED."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="skinml-orphan-watch", daemon=True).start()
