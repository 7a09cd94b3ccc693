"""What a study is asked to do: its options, and the registries of samplers, pruners and
objectives those options name (an unknown name is one line listing the valid ones)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import optuna

from skinml.core.errors import SkinmlError


@dataclass(frozen=True)
class TuneOptions:
    config: str | Path  # a path, or a shipped config's name (demo, ham10000)
    search_space: str | Path
    n_trials: int = 20
    max_trials: int | None = None  # trials of any state in total; None: 5 x n_trials
    timeout: float | None = None
    study_name: str = "skin-lesion-tuning"
    storage: str = "sqlite:///optuna.db"
    sampler: str = "tpe"
    objective: str = "val"  # "val": one validation split; "cv": the mean over `folds` folds
    folds: int = 5
    pruner: str | None = None  # None: "patient" for "val", "median" for "cv"
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int | None = None  # steps: epochs (val) or folds (cv); None: 5 / 2
    pruner_patience: int = 3
    register_best: bool = False
    verdict: bool = True  # train the base config once more and compare the best trial with it
    gate_data: str | None = None  # the promotion gate's folder when registering the best
    seed: int = 0
    heartbeat_interval: int = 10
    grace_period: int = 60
    overrides: tuple[str, ...] = field(default_factory=tuple)
    # "best": trials log what choosing reads, the best trial (and the verdict's baseline)
    # get their model, test scores and figures; "all": every trial logs them all.
    log_models: str = "best"
    workers: int = 1  # processes on this machine, each running trials of the study


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    parent_run_id: str
    best_value: float | None
    best_params: dict[str, Any]
    best_run_id: str | None
    counts: dict[str, int]
    registration: str | None
    verdict: str | None = None  # the best trial against the base config (see verdict.py)


SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


@dataclass(frozen=True)
class ObjectiveKind:
    """What a trial's value is: its reported steps, default pruning, where its CI is logged."""

    step: str  # one report per epoch, or per fold
    pruner: str
    warmup: int  # steps before a trial can be pruned
    metric: str  # the trial run's metric holding the value, with `_ci_low`/`_ci_high`


OBJECTIVES = {
    "val": ObjectiveKind("epoch", "patient", 5, "best_val_balanced_accuracy"),
    # A CV trial reports the running mean of its folds; 2 folds before pruning.
    "cv": ObjectiveKind("fold", "median", 2, "fold_val_balanced_accuracy_mean"),
}

OBJECTIVE = "validation balanced accuracy"  # what a trial returns, named on the figures
LOG_MODELS = ("best", "all")  # which trials log their model, test scores and figures


def pruner_name(options: TuneOptions) -> str:
    return options.pruner or OBJECTIVES[options.objective].pruner


def pruner_warmup(options: TuneOptions) -> int:
    """Steps before a trial can be pruned: 5 epochs, or 2 folds with --objective cv."""
    if options.pruner_warmup_epochs is not None:
        return options.pruner_warmup_epochs
    return OBJECTIVES[options.objective].warmup


PRUNERS: dict[str, Callable[[TuneOptions], optuna.pruners.BasePruner]] = {
    # The median of a validation split of ~100 images moves by several points from one
    # epoch to the next: prune only after a warm-up, and only a trial that is below the
    # median and has not improved for `pruner_patience` epochs.
    "patient": lambda o: optuna.pruners.PatientPruner(
        optuna.pruners.MedianPruner(n_startup_trials=o.pruner_startup_trials,
                                    n_warmup_steps=pruner_warmup(o)),
        patience=o.pruner_patience),
    # With --objective cv a step is a fold and the reported value the running mean of the
    # folds so far: every trial is cut into the same folds, so the median compares like
    # with like.
    "median": lambda o: optuna.pruners.MedianPruner(n_startup_trials=o.pruner_startup_trials,
                                                    n_warmup_steps=pruner_warmup(o)),
    "hyperband": lambda o: optuna.pruners.HyperbandPruner(min_resource=1),
    "none": lambda o: optuna.pruners.NopPruner(),
}


def check_options(options: TuneOptions) -> None:
    """One line for an objective, sampler or pruner that does not exist, before any study."""
    if options.objective not in OBJECTIVES:
        raise SkinmlError(f"--objective must be one of {', '.join(OBJECTIVES)}, "
                          f"got {options.objective!r}")
    if options.objective == "cv" and options.folds < 2:
        raise SkinmlError(f"--folds must be at least 2, got {options.folds}")
    if options.log_models not in LOG_MODELS:
        raise SkinmlError(f"--log-models must be one of {', '.join(LOG_MODELS)}, "
                          f"got {options.log_models!r}")
    if options.workers < 1:
        raise SkinmlError(f"--workers must be at least 1, got {options.workers}")
    for name, value, registry in (("sampler", options.sampler, SAMPLERS),
                                  ("pruner", pruner_name(options), PRUNERS)):
        if value not in registry:
            raise SkinmlError(f"--{name} must be one of {', '.join(sorted(registry))}, "
                              f"got {value!r}")


def max_trials(options: TuneOptions) -> int:
    """The bound on trials of any state: pruned trials count, so a study whose trials are
    all pruned still ends."""
    return options.max_trials or 5 * options.n_trials


def objective_name(options: TuneOptions) -> str:
    if options.objective == "cv":
        return f"mean {OBJECTIVE} of {options.folds} folds"
    return OBJECTIVE


def logged_options(options: TuneOptions) -> dict[str, Any]:
    """The options a worker logs on its study run (`tune.<name>` params)."""
    return {"n_trials": options.n_trials, "max_trials": max_trials(options),
            "verdict": options.verdict, "objective": options.objective,
            "folds": options.folds if options.objective == "cv" else None,
            "timeout": options.timeout, "sampler": options.sampler,
            "pruner": pruner_name(options), "pruner_warmup": pruner_warmup(options),
            "seed": options.seed, "log_models": options.log_models,
            "workers": options.workers,
            "search_space": str(options.search_space), "config": str(options.config)}


def masked(url: str) -> str:
    """The storage URL without its password, fit for tags and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
