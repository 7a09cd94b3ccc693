"""`skinml bench tune`: what a tuning study pays per trial beyond its epochs, and how many
trials an hour one machine completes with 1 worker against N.

Each worker count runs the same study from scratch (base config, search space, seed and
trial count alike; its own tracking store and study storage in the work folder) on data
whose cache is built beforehand, so no count pays for decoding. The search space holds only
keys that leave an epoch's cost alone (augmentation strengths, learning rate, weight
decay): every count trains the same amount of work. Trials per hour are counted from the
first trial's start to the last one's end (each worker's start-up is paid once per study
and reported beside them).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from skinml.tracking.store import shown_uri, use_store
from skinml.training.choices import load_run_config
from skinml.workflows.prepared import prepare_data
from skinml.workflows.tuning.options import TuneOptions
from skinml.workflows.tuning.study import trial_timings, tune

# Cost-neutral keys only: an oversampling strategy or a fusion model would make one
# count's trials longer than another's.
BENCH_SPACE = """\
augment.scale_min: {type: float, low: 0.1, high: 0.8}
augment.rotation: {type: float, low: 0.0, high: 180.0}
augment.brightness: {type: float, low: 0.0, high: 0.4}
optim.lr: {type: float, low: 0.0003, high: 0.01, log: true}
optim.weight_decay: {type: float, low: 0.0001, high: 0.1, log: true}
"""


@dataclass(frozen=True)
class StudyTiming:
    """One study of `trials` trials run by `workers` processes."""

    workers: int
    trials: int
    seconds: float  # from the first trial's start to the last trial's end
    startup_seconds: float  # from `tune` to the first trial's start
    total_seconds: float  # the whole `tune` call, summary and best model included
    outside_epochs: list[float]  # each trial's seconds outside its epochs
    in_epochs: list[float]  # each trial's seconds in its epochs

    @property
    def per_hour(self) -> float:
        return self.trials / self.seconds * 3600

    @property
    def median_outside(self) -> float:
        return statistics.median(self.outside_epochs)


def bench_tune(config_path: str, overrides: list[str], trials: int, worker_counts: list[int],
               work: Path) -> list[StudyTiming]:
    """The same study once per worker count; the tracking store in use is restored after."""
    config = load_run_config(config_path, overrides)
    prepare_data(config)  # the cache every count's workers map
    work = work.resolve()  # the workers' stores are named from other processes
    work.mkdir(parents=True, exist_ok=True)
    space = work / "bench_space.yaml"
    space.write_text(BENCH_SPACE)
    previous = shown_uri()
    try:
        return [_study(config_path, overrides, trials, n, space, work / f"workers-{n}")
                for n in worker_counts]
    finally:
        use_store(previous)


def _study(config_path: str, overrides: list[str], trials: int, workers: int, space: Path,
           folder: Path) -> StudyTiming:
    folder.mkdir(parents=True, exist_ok=True)
    use_store(f"sqlite:///{folder / 'mlflow.db'}")
    storage = f"sqlite:///{folder / 'optuna.db'}"
    name = f"bench-{workers}-workers"
    options = TuneOptions(config=config_path, search_space=space, n_trials=trials,
                          storage=storage, study_name=name, pruner="none", verdict=False,
                          workers=workers, overrides=tuple(overrides), seed=0)
    began, clock = datetime.now(), time.perf_counter()
    with contextlib.chdir(folder):  # MLflow's ./mlruns beside the study's store
        tune(options)
    total = time.perf_counter() - clock
    timings = trial_timings(name, storage)
    first = min(t.started for t in timings)
    return StudyTiming(workers, len(timings), (timings[-1].finished - first).total_seconds(),
                       (first - began).total_seconds(), total,
                       [t.seconds_outside_epochs for t in timings],
                       [t.seconds_in_epochs for t in timings])


def timing_lines(results: list[StudyTiming]) -> list[str]:
    """The table `skinml bench tune` prints: one row per worker count."""
    base = results[0].per_hour
    lines = [f"{'workers':>7} {'trials/hour':>12} {'vs first':>9} {'start-up':>9} "
             f"{'outside epochs per trial':>25} {'epochs per trial':>17}"]
    for r in results:
        outside = f"{r.median_outside:.2f} s (max {max(r.outside_epochs):.2f})"
        lines.append(f"{r.workers:>7} {r.per_hour:>12.0f} {r.per_hour / base:>8.2f}x "
                     f"{r.startup_seconds:>8.1f}s {outside:>25} "
                     f"{statistics.median(r.in_epochs):>15.1f} s")
    return lines
