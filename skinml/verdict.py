"""A study's verdict: does its best trial beat the config the study started from?

A best trial is chosen on a validation split; on ~100 images the maximum over many trials
is mostly the luckiest draw. The verdict trains the base config once more with the same
budget and seed (a `baseline` run) and compares both models on the test split they share
with the paired lesion bootstrap of the promotion gate. The test split is reported here,
never used to choose: the best trial stays whatever validation picked.
"""

from __future__ import annotations

from dataclasses import dataclass

from skinml.compare import ModelComparison
from skinml.metrics import Interval


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
