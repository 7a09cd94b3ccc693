"""A study's verdict: does its best trial beat the config the study started from?

A best trial is chosen on a validation split; on ~100 images the maximum over many trials
is mostly the luckiest draw. The verdict trains the base config once more with the same
budget and seed (a `baseline` run) and compares both models on the test split they share
with the paired lesion bootstrap of the promotion gate. The test split is reported here,
never used to choose: the best trial stays whatever validation picked.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import optuna

from skinml.core.config import Config
from skinml.evaluation.metrics import Interval
from skinml.tracking import reader
from skinml.tracking.experiments import ROLE_TAG
from skinml.workflows import compare
from skinml.workflows.compare import ModelComparison
from skinml.workflows.prepared import PreparedData
from skinml.workflows.tuning.options import TuneOptions
from skinml.workflows.tuning.trials import RUN_ID_ATTR, fit_config

log = logging.getLogger(__name__)

BASELINE_ROLE = "baseline"  # the base config's run a study's verdict compares with


@dataclass(frozen=True)
class Verdict:
    trial: int
    comparison: ModelComparison

    @property
    def delta(self) -> Interval:
        return self.comparison.result.delta

    def line(self) -> str:
        return verdict_line(self.trial, self.delta)


def verdict_line(trial: int, delta: Interval) -> str:
    """One line: Δ balanced accuracy (best trial - base config) with its 95 % CI, and what
    it supports: better or worse only when the interval excludes 0."""
    if delta.low > 0:
        finding = "better than the base config"
    elif delta.high < 0:
        finding = "worse than the base config"
    else:
        finding = "no evidence of improvement"
    return f"best trial {trial} vs base config: Δ balanced accuracy {delta.signed()}: {finding}"


def judge_best(best: optuna.trial.FrozenTrial, options: TuneOptions, base: Config,
               data: PreparedData) -> Verdict | None:
    """The best trial against the base config trained with the same budget and seed, on the
    test split both share (reported, never used to choose)."""
    baseline = baseline_run(options, base, data)
    best_run = best.user_attrs[RUN_ID_ATTR]
    try:
        image_set = compare.shared_split(best_run, baseline, "test")
    except compare.NotSameSplit as exc:
        log.warning("no verdict: %s", exc)
        return None
    judged = compare.compare_models(reader.logged_model_uri(best_run),
                                    reader.logged_model_uri(baseline), image_set,
                                    seed=options.seed)
    return Verdict(best.number, judged)


def baseline_run(options: TuneOptions, base: Config, data: PreparedData) -> str:
    """The study's `baseline` run: trained once (the first worker to finish), then reused."""
    tags = {ROLE_TAG: BASELINE_ROLE, "optuna.study_name": options.study_name}
    experiment = reader.experiment_id(base.runtime.experiment)
    if experiment is not None:
        found = reader.tagged_runs(experiment, tags, finished=True, max_results=1)
        if found:
            return found[0].info.run_id
    runtime = dataclasses.replace(base.runtime, run_name=f"{options.study_name}-baseline")
    return fit_config(dataclasses.replace(base, runtime=runtime), options, data, tags)[0]
