"""The pipeline's report: the base config, the best trial and the fold ensemble judged on
the same test images, each pair's difference with its paired lesion-bootstrap interval, and
beside them the validation figures that did the choosing."""

from __future__ import annotations

from dataclasses import dataclass

from skinml.evaluation.metrics import Interval, PairedComparison, paired_balanced_accuracy
from skinml.tracking import reader
from skinml.tracking.logged_model import load_model, predict_paths
from skinml.workflows import compare
from skinml.workflows.compare import ImageSet

CANDIDATES = ("base config", "best trial", "fold ensemble")
KEYS = {"base config": "base", "best trial": "trial", "fold ensemble": "ensemble"}
PAIRS = (("best trial", "base config"), ("fold ensemble", "base config"),
         ("fold ensemble", "best trial"))


@dataclass(frozen=True)
class PipelineReport:
    runs: dict[str, str]  # candidate -> run id
    validation: dict[str, Interval | None]  # what chose: validation (OOF for the ensemble)
    image_set: ImageSet
    test: dict[str, Interval]  # candidate -> test balanced accuracy (reported only)
    deltas: dict[tuple[str, str], PairedComparison]  # (a, b) -> a - b on the same images
    registration: str
    seed: int

    def lines(self) -> list[str]:
        """The report as the CLI prints it, one finding a line."""
        lines = [f"registered: {self.registration}" if self.registration else "",
                 "validation (what chose; the ensemble's is out-of-fold):"]
        for name in CANDIDATES:
            interval = self.validation[name]
            lines.append(f"  {name:<14} {interval if interval else 'not logged'}  "
                         f"(run {self.runs[name]})")
        lines.append(f"test balanced accuracy on {self.image_set.summary()} "
                     "(reported, never used to choose):")
        lines += [f"  {name:<14} {self.test[name]}" for name in CANDIDATES]
        for (a, b), result in self.deltas.items():
            lines.append(f"  {a} - {b}: Δ {result.delta.signed()}: {finding(result.delta)}")
        return [line for line in lines if line]

    def markdown(self) -> str:
        return "\n".join(["# Pipeline report", "", *self.lines(), "",
                          f"Intervals: 95 % percentile bootstrap over lesions, "
                          f"{compare.ROUNDS} rounds (seed {self.seed}), every pair resampled "
                          "alike; the same test images for all three models."]) + "\n"

    def metrics(self) -> dict[str, float]:
        """On the pipeline's run: each model's test balanced accuracy and each Δ, with CIs."""
        values: dict[str, float] = {}
        named = {f"test_balanced_accuracy_{KEYS[n]}": self.test[n] for n in CANDIDATES}
        named |= {f"delta_balanced_accuracy_{KEYS[a]}_vs_{KEYS[b]}": r.delta
                  for (a, b), r in self.deltas.items()}
        for key, interval in named.items():
            values |= {key: interval.value, f"{key}_ci_low": interval.low,
                       f"{key}_ci_high": interval.high}
        return values


def finding(delta: Interval) -> str:
    """What a paired interval supports: a difference only when it excludes 0."""
    if delta.low > 0:
        return "better"
    if delta.high < 0:
        return "worse"
    return "no evidence of a difference"


def judge_candidates(base_run: str, trial_run: str, cv_run: str, registration: str,
                     seed: int = 0) -> PipelineReport:
    """Each model predicts the shared test split once; every pair is bootstrapped alike."""
    runs = dict(zip(CANDIDATES, (base_run, trial_run, cv_run), strict=True))
    image_set = compare.shared_split(trial_run, base_run, "test")
    compare.shared_split(cv_run, trial_run, "test")  # the ensemble's are the same images
    images = image_set.images
    paths = images["path"].tolist()
    probs = {name: predict_paths(load_model(reader.logged_model_uri(run)), paths,
                                 clinical=images) for name, run in runs.items()}
    labels, lesions = images["label"].to_numpy(), images["lesion_id"].to_numpy()
    deltas = {(a, b): paired_balanced_accuracy(labels, probs[a], probs[b], lesions,
                                               n_boot=compare.ROUNDS, seed=seed)
              for a, b in PAIRS}
    test = {"best trial": deltas[PAIRS[0]].a, "base config": deltas[PAIRS[0]].b,
            "fold ensemble": deltas[PAIRS[1]].a}
    return PipelineReport(runs, {name: _validation(run) for name, run in runs.items()},
                          image_set, test, deltas, registration, seed)


def _validation(run_id: str) -> Interval | None:
    """A run's validation balanced accuracy with its CI (a cross-validation's: out-of-fold)."""
    metrics = reader.run_metrics(run_id)
    for key in ("oof_balanced_accuracy", "best_val_balanced_accuracy"):
        if key in metrics and f"{key}_ci_low" in metrics:
            return Interval(metrics[key], metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"])
    return None
