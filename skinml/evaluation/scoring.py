"""Everything reported about a model's predictions on one labelled split: metrics with
lesion-bootstrap confidence intervals, calibration before and after temperature scaling,
and subgroup tables. Pure numbers (no MLflow): training and `skinml evaluate` both log
what `score_split` returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from skinml.evaluation.calibration import apply_temperature
from skinml.evaluation.metrics import (
    age_band,
    balanced_accuracy,
    bootstrap_ci,
    compute_metrics,
    expected_calibration_error,
    macro_auc,
    negative_log_likelihood,
    per_class_metrics,
    subgroup_metrics,
)


@dataclass(frozen=True)
class ScoredSplit:
    split: str
    labels: np.ndarray
    probs: np.ndarray  # calibrated: what the served model answers
    uncalibrated: np.ndarray
    temperature: float
    scores: dict[str, float]
    per_class: pd.DataFrame
    subgroups: pd.DataFrame | None


def subgroup_attributes(frame: pd.DataFrame) -> pd.DataFrame:
    """sex, age band (<30, 30-49, 50-69, >=70, unknown) and localization of each row."""
    return pd.DataFrame({"sex": frame["sex"].fillna("unknown").to_numpy(),
                         "age_band": [age_band(a) for a in frame["age"]],
                         "localization": frame["localization"].fillna("unknown").to_numpy()})


def score_split(split: str, labels: np.ndarray, uncalibrated: np.ndarray,
                temperature: float, groups: np.ndarray,
                attributes: pd.DataFrame | None = None, n_boot: int = 1000, seed: int = 0,
                served: np.ndarray | None = None) -> ScoredSplit:
    """Everything reported about `split`; `groups` are lesion ids (what the bootstrap resamples).

    `served` are the calibrated probabilities exactly as the model serves them (with
    test-time augmentation they are the mean of tempered softmaxes); without them they are
    computed from `uncalibrated` and `temperature`.
    """
    labels = np.asarray(labels)
    probs = apply_temperature(uncalibrated, temperature) if served is None else served
    per_class = per_class_metrics(labels, probs)
    scores = compute_metrics(labels, probs, per_class)
    if n_boot:
        for name, statistic in (("balanced_accuracy", balanced_accuracy), ("auc", macro_auc)):
            low, high = bootstrap_ci(labels, probs, groups, statistic, n_boot=n_boot, seed=seed)
            scores[f"{name}_ci_low"], scores[f"{name}_ci_high"] = low, high
    scores.update({
        "nll": negative_log_likelihood(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "nll_uncalibrated": negative_log_likelihood(labels, uncalibrated),
        "ece_uncalibrated": expected_calibration_error(labels, uncalibrated),
        "temperature": float(temperature),
    })
    subgroups = (subgroup_metrics(labels, probs, attributes)
                 if attributes is not None else None)
    return ScoredSplit(split, labels, probs, np.asarray(uncalibrated), float(temperature),
                       scores, per_class, subgroups)
