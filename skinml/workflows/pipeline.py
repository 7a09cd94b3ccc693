"""`skinml pipeline`: from a HAM10000 folder and a base config to a tuned, cross-validated,
gated model in one command, under one parent run.

Four stages, each recorded on the parent run when it ends, so a pipeline stopped anywhere
(Ctrl-C, a kill) continues with `skinml pipeline --resume RUN_ID` from the stage it was in,
without redoing a finished one:

1. the study: `skinml tune` of the base config (its verdict trains the base config once
   more with the same budget: the `baseline`);
2. the cross-validation of the best trial's configuration (its fold ensemble is the model);
3. the fold ensemble registered through the promotion gate;
4. the report: base config, best trial and fold ensemble on the same test images, with the
   paired lesion-bootstrap interval of each difference.

Everything chosen is chosen before a test number exists: the configuration by validation
(the study), the ensemble by design (the chosen configuration trained on every fold and
averaged is what is registered, whatever it scores), the champion by the gate. The test
split is only reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from skinml.core.config import Config
from skinml.core.errors import SkinmlError
from skinml.data.split import assign_folds
from skinml.models import require_weights
from skinml.tracking import reader
from skinml.tracking.store import absolute_sqlite_uri
from skinml.tracking.writer import RunLog, pipeline_run
from skinml.training.choices import build_run_config, load_run_config
from skinml.workflows.cv import CVHooks, cross_validate
from skinml.workflows.pipeline_report import PipelineReport, judge_candidates
from skinml.workflows.prepared import PreparedData, prepare_data
from skinml.workflows.registry import DEFAULT_NAME, GateOptions, gated, register_run
from skinml.workflows.tuning.options import TuneOptions, check_options
from skinml.workflows.tuning.search_space import load_search_space
from skinml.workflows.tuning.study import tune
from skinml.workflows.tuning.verdict import baseline_run

log = logging.getLogger(__name__)

STAGES = ("study", "cross-validation", "registration", "report")
OPTIONS_FILE = "pipeline_options.json"
REPORT_FILE = "pipeline_report.md"
# What each finished stage leaves on the parent run (the runs it links, in the UI too).
STUDY_RUN, BEST_RUN, BASELINE_RUN = ("skinml.pipeline.study_run", "skinml.pipeline.best_run",
                                     "skinml.pipeline.baseline_run")
CV_RUN, VERSION = "skinml.pipeline.cv_run", "skinml.pipeline.model_version"
REGISTRATION = "skinml.pipeline.registration"
STAGE = "skinml.pipeline.stage"  # the stage running now, or "done"


@dataclass(frozen=True)
class PipelineOptions:
    config: str = "demo"
    overrides: tuple[str, ...] = ()
    search_space: str = "search_space"
    n_trials: int = 20
    folds: int = 5
    workers: int = 1
    storage: str = "sqlite:///optuna.db"
    study_name: str | None = None  # None: pipeline-<the parent run id's first 8 digits>
    name: str = DEFAULT_NAME  # the registered model
    gate_data: str | None = None
    seed: int = 0
    heartbeat_interval: int = 10
    grace_period: int = 60


@dataclass(frozen=True)
class PipelineResult:
    run_id: str
    tags: dict[str, str]
    report: PipelineReport


def run_pipeline(options: PipelineOptions, resume_run_id: str | None = None
                 ) -> PipelineResult:
    """Run (or continue) the four stages; bad input is refused before any run starts."""
    if resume_run_id is not None:
        reader.resumable(resume_run_id)
        options = _options_of(resume_run_id)
    else:
        options = _anchored(options)
    base = load_run_config(options.config, options.overrides)
    load_search_space(options.search_space)
    check_options(_tune_options(options, "check"))
    require_weights(base.model)  # offline: one line before any run or cache
    data = prepare_data(base)
    assign_folds(data.frame, data.split, options.folds, seed=base.data.split_seed)
    with pipeline_run(base.runtime.experiment, base.runtime.run_name or "pipeline",
                      resume_run_id) as run:
        log.info("if it stops, continue it with: skinml pipeline --resume %s", run.run_id)
        if resume_run_id is None:
            run.log_text(json.dumps(dataclasses.asdict(options), indent=2), OPTIONS_FILE)
        study_name = options.study_name or f"pipeline-{run.run_id[:8]}"
        tags = dict(reader.get_run(run.run_id).data.tags)
        for stage in (_study, _cross_validation, _registration):
            tags |= stage(run, tags, options, study_name, base, data)
        _begin(run, 4, f"{STAGES[3]}: the base config, the best trial and the fold "
                       "ensemble on the same test images")
        report = judge_candidates(tags[BASELINE_RUN], tags[BEST_RUN], tags[CV_RUN],
                                  tags.get(REGISTRATION, ""), seed=options.seed)
        run.log_text(report.markdown(), REPORT_FILE)
        run.log_summary(report.metrics())
        run.set_tags({STAGE: "done"})
    return PipelineResult(run.run_id, tags, report)


def _study(run: RunLog, tags: dict[str, str], options: PipelineOptions, study_name: str,
           base: Config, data: PreparedData) -> dict[str, str]:
    if BASELINE_RUN in tags:
        return {}
    _begin(run, 1, f"{STAGES[0]} {study_name}: {options.n_trials} trials of the search "
                   f"space over {options.config}")
    tuned = tune(_tune_options(options, study_name))
    if tuned.best_run_id is None:
        raise SkinmlError(f"study {study_name} has no complete trial: nothing to "
                          "cross-validate")
    baseline = baseline_run(_tune_options(options, study_name), base, data)  # the verdict's
    done = {STUDY_RUN: tuned.parent_run_id, BEST_RUN: tuned.best_run_id,
            BASELINE_RUN: baseline}
    run.set_tags(done)
    return done


def _cross_validation(run: RunLog, tags: dict[str, str], options: PipelineOptions,
                      study_name: str, base: Config, data: PreparedData) -> dict[str, str]:
    started = tags.get(CV_RUN)
    if started and reader.run_status(started) == "FINISHED":
        return {}
    _begin(run, 2, f"{STAGES[1]} of best trial run {tags[BEST_RUN]}'s configuration, "
                   f"{options.folds} folds" + (f" (continuing run {started})" if started else ""))

    def linked(cv_run_id: str) -> None:
        run.set_tags({CV_RUN: cv_run_id})

    hooks = CVHooks(nested=True, on_run_start=linked,
                    tags={"skinml.pipeline": run.run_id, "optuna.study_name": study_name})
    if started:
        result = cross_validate(base, options.folds, started, data=data, hooks=hooks)
    else:
        result = cross_validate(_best_config(tags[BEST_RUN], study_name), options.folds,
                                data=data, hooks=hooks)
    return {CV_RUN: result.run_id}


def _registration(run: RunLog, tags: dict[str, str], options: PipelineOptions,
                  study_name: str, base: Config, data: PreparedData) -> dict[str, str]:
    if VERSION in tags:
        return {}
    _begin(run, 3, f"{STAGES[2]}: the fold ensemble of run {tags[CV_RUN]} as a version of "
                   f"{options.name}, through the promotion gate")
    earlier = reader.versions_of_run(options.name, tags[CV_RUN])
    if earlier and gated(options.name, earlier[-1]):  # registered before the pipeline stopped
        summary = f"version {earlier[-1]} of {options.name} (registered before a restart)"
        done = {VERSION: f"{options.name}/{earlier[-1]}", REGISTRATION: summary}
    else:  # a version whose gate a stop cut short is judged now, not registered twice
        registration = register_run(tags[CV_RUN], options.name,
                                    GateOptions(gate_data=options.gate_data, seed=options.seed),
                                    version=earlier[-1] if earlier else None)
        done = {VERSION: f"{options.name}/{registration.version}",
                REGISTRATION: registration.summary()}
    run.set_tags(done)
    return done


def _begin(run: RunLog, number: int, what: str) -> None:
    """One line and the parent run's tag: which stage of four runs now."""
    log.info("pipeline stage %d/%d: %s", number, len(STAGES), what)
    run.set_tags({STAGE: STAGES[number - 1]})


def _best_config(best_run_id: str, study_name: str) -> Config:
    """The best trial's resolved config (as it logged it), named for the cross-validation."""
    config = build_run_config(reader.logged_config(best_run_id), f"run {best_run_id} config.yaml")
    runtime = dataclasses.replace(config.runtime, run_name=f"{study_name}-best-cv")
    return dataclasses.replace(config, runtime=runtime)


def _tune_options(options: PipelineOptions, study_name: str) -> TuneOptions:
    return TuneOptions(config=options.config, search_space=options.search_space,
                       n_trials=options.n_trials, storage=options.storage,
                       study_name=study_name, verdict=True, workers=options.workers,
                       seed=options.seed, heartbeat_interval=options.heartbeat_interval,
                       grace_period=options.grace_period, overrides=options.overrides)


def _anchored(options: PipelineOptions) -> PipelineOptions:
    """The options with each relative path made absolute: `--resume` from another folder
    (`mlflow run` ran the pipeline in the project's folder) reads the same files and study."""
    def absolute(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    overrides = tuple(f"data.dir={absolute(item.partition('=')[2])}"
                      if item.startswith("data.dir=") else item for item in options.overrides)
    return dataclasses.replace(
        options, config=absolute(options.config), search_space=absolute(options.search_space),
        storage=absolute_sqlite_uri(options.storage), overrides=overrides,
        gate_data=absolute(options.gate_data) if options.gate_data else options.gate_data)


def _options_of(run_id: str) -> PipelineOptions:
    """The options a pipeline run was started with (what `--resume` runs again)."""
    try:
        with open(reader.download_run_artifact(run_id, OPTIONS_FILE)) as file:
            logged = json.load(file)
    except SkinmlError:
        raise SkinmlError(f"--resume {run_id}: not a skinml pipeline run (no "
                          f"{OPTIONS_FILE})") from None
    return PipelineOptions(**{**logged, "overrides": tuple(logged["overrides"])})
