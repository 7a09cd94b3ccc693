"""`skinml train`, `cv` and `tune`: the commands that train models and log runs."""

from __future__ import annotations

import os
import shlex
import sys

import click

from skinml.cli.options import (
    DATA_DIR_OPTION,
    GATE_DATA,
    OVERRIDES,
    SEED,
    blank_is_none,
    checked_run_overrides,
    whole_number,
)


@click.command()
@click.option("--config", "config_path", default="demo", show_default=True,
              help="YAML run configuration, or a shipped one by name: demo (the embedded "
                   "default, = experiments/demo.yaml) or ham10000 (full data, GPU).")
@DATA_DIR_OPTION
@click.option("--epochs", callback=blank_is_none, metavar="INT", help="optim.epochs")
@click.option("--image-size", callback=blank_is_none, metavar="INT", help="model.image_size")
@click.option("--batch-size", callback=blank_is_none, metavar="INT", help="optim.batch_size")
@click.option("--lr", callback=blank_is_none, metavar="FLOAT", help="optim.lr")
@click.option("--arch", callback=blank_is_none, metavar="NAME", help="model.arch")
@click.option("--balance-strategy", callback=blank_is_none, metavar="NAME",
              help="balance.strategy")
@click.option("--pretrained", callback=blank_is_none, metavar="[true|false]",
              help="model.pretrained")
@SEED
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set balance.strategy=focal (repeatable).")
@OVERRIDES
@click.option("--resume", "resume_run_id", callback=blank_is_none, metavar="RUN_ID",
              help="Continue a killed run from its last checkpoint.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes (GPUs) on this machine: relaunches itself under torchrun.")
def train(config_path: str, sets: tuple[str, ...], overrides: str | None,
          resume_run_id: str | None, nproc: int, **shortcuts: str | None) -> None:
    """Train a ResNeXt and log the run, its figures and the model to MLflow."""
    items = checked_run_overrides(config_path, shortcuts, overrides, sets)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        _relaunch_under_torchrun(nproc)  # before the imports below: each rank does them
    from skinml.training.choices import load_run_config
    from skinml.workflows.train import train as run_training

    config = load_run_config(config_path, items)
    result = run_training(config, resume_run_id=resume_run_id)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports
    click.echo(f"run {result.run_id}: best epoch {result.best_epoch}, val balanced accuracy "
               f"{result.val_balanced_accuracy:.4f}, test balanced accuracy "
               f"{result.test['balanced_accuracy']:.4f}; model {result.model_uri}")


@click.command()
@click.option("--config", "config_path", default="demo", show_default=True,
              help="YAML run configuration, or a shipped one by name (demo, ham10000).")
@click.option("--folds", default="5", show_default=True, callback=blank_is_none,
              metavar="INT", help="Number of lesion-grouped folds (at least 2).")
@DATA_DIR_OPTION
@SEED
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key (repeatable).")
@OVERRIDES
@click.option("--resume", "resume_run_id", callback=blank_is_none, metavar="RUN_ID",
              help="Continue a killed cross-validation: its finished folds are kept.")
def cv(config_path: str, folds: str | None, sets: tuple[str, ...], overrides: str | None,
       resume_run_id: str | None, **shortcuts: str | None) -> None:
    """Cross-validate: one training run per lesion-grouped fold, out-of-fold metrics, and
    the fold ensemble logged as the parent run's model."""
    try:
        fold_count = int(folds or "5")
    except ValueError:
        raise click.BadParameter(f"{folds!r} is not a whole number", param_hint="--folds") from None
    if fold_count < 2:
        raise click.BadParameter("needs at least 2 folds", param_hint="--folds")
    items = checked_run_overrides(config_path, shortcuts, overrides, sets)
    from skinml.training.choices import load_run_config
    from skinml.workflows.cv import cross_validate

    config = load_run_config(config_path, items)
    result = cross_validate(config, fold_count, resume_run_id)
    oof, test = result.oof, result.test
    click.echo(f"run {result.run_id}: {len(result.fold_run_ids)} folds, out-of-fold balanced "
               f"accuracy {oof['balanced_accuracy']:.4f} (95 % CI "
               f"{oof.get('balanced_accuracy_ci_low', float('nan')):.2f}-"
               f"{oof.get('balanced_accuracy_ci_high', float('nan')):.2f}), fold ensemble test "
               f"balanced accuracy {test['balanced_accuracy']:.4f}; model {result.model_uri}")


@click.command()
@click.option("--config", "config_path", default="demo", show_default=True,
              help="Base config (a YAML path, or demo / ham10000); the space overrides it.")
@DATA_DIR_OPTION
@click.option("--search-space", default="search_space", show_default=True,
              help="YAML search space, or search_space: the shipped experiments/search_space.yaml.")
@click.option("--n-trials", default=20, show_default=True, type=click.IntRange(min=1),
              help="COMPLETE trials of the study in total, over all workers and resumes.")
@click.option("--max-trials", callback=blank_is_none, metavar="INT",
              help="Trials of any state (pruned too) in total [default: 5 x --n-trials].")
@click.option("--timeout", callback=blank_is_none, help="Seconds this worker may run.")
@click.option("--study-name", default="skin-lesion-tuning", show_default=True)
@click.option("--storage", default="sqlite:///optuna.db", show_default=True,
              help="Optuna storage URL, e.g. postgresql://user@host/db for many workers.")
@click.option("--sampler", default="tpe", show_default=True,
              type=click.Choice(["tpe", "random"]))
@click.option("--objective", default="val", show_default=True, type=click.Choice(["val", "cv"]),
              help="val: each trial's validation split; cv: the mean over --folds "
                   "lesion-grouped folds (each trial a cross-validation, pruned per fold).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=2),
              help="Folds of each trial with --objective cv.")
@click.option("--pruner", callback=blank_is_none,
              type=click.Choice(["patient", "median", "hyperband", "none", ""]),
              metavar="[patient|median|hyperband|none]",
              help="patient: median pruning only after --pruner-patience epochs without "
                   "improvement; median: compare with the median at the same epoch (fold). "
                   "[default: patient; median with --objective cv]")
@click.option("--pruner-startup-trials", default=3, show_default=True,
              type=click.IntRange(min=0), help="patient/median: trials before pruning starts.")
@click.option("--pruner-warmup-epochs", callback=blank_is_none, metavar="INT",
              help="patient/median: epochs (folds with --objective cv) before a trial can be "
                   "pruned. [default: 5; 2 folds with --objective cv]")
@click.option("--pruner-patience", default=3, show_default=True, type=click.IntRange(min=0),
              help="patient: epochs without improvement before the median may prune.")
@click.option("--register-best", is_flag=False, flag_value="true", default="false",
              type=click.BOOL, metavar="[true|false]",
              help="Register the best trial's model through the promotion gate (see `skinml "
                   "register`); a bare --register-best means true.")
@GATE_DATA
@click.option("--verdict", is_flag=False, flag_value="true", default="true", type=click.BOOL,
              metavar="[true|false]", show_default=True,
              help="End with the best trial against the base config (one more training run, "
                   "compared on the shared test split).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampler seed.")
@click.option("--workers", callback=blank_is_none, metavar="INT",
              help="Trials run at once on this machine, each in its own process, spread "
                   "over the GPUs (the CPU's cores are split between them). [default: one "
                   "per GPU, 1 without]")
@click.option("--log-models", default="best", show_default=True,
              type=click.Choice(["best", "all"]),
              help="best: trials log what choosing reads (epochs, validation with its "
                   "interval); the best trial and the verdict's baseline get their model, "
                   "test scores and figures at the end. all: every trial logs them.")
@click.option("--heartbeat-interval", default=10, show_default=True, type=click.IntRange(min=1),
              help="Seconds between a running trial's heartbeats in the storage.")
@click.option("--grace-period", default=60, show_default=True, type=click.IntRange(min=2),
              help="Seconds without heartbeat before a trial counts as dead and is retried.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Base config overrides (e.g. --set optim.epochs=5).")
@click.option("--overrides", callback=blank_is_none,
              help="Space-separated KEY=VALUE base overrides (for MLproject).")
def tune(config_path: str, search_space: str, n_trials: int, max_trials: str | None,
         timeout: str | None, study_name: str, storage: str, sampler: str, objective: str,
         folds: int, pruner: str | None, pruner_startup_trials: int,
         pruner_warmup_epochs: str | None, pruner_patience: int,
         register_best: bool, gate_data: str | None, verdict: bool, seed: int,
         workers: str | None, log_models: str, heartbeat_interval: int, grace_period: int,
         sets: tuple[str, ...], overrides: str | None, data_dir: str | None) -> None:
    """Tune augmentation and class balancing with Optuna; trials are nested MLflow runs."""
    try:
        seconds = float(timeout) if timeout is not None else None
    except ValueError:
        raise click.BadParameter(f"{timeout!r} is not a number of seconds",
                                 param_hint="--timeout") from None
    bound = whole_number(max_trials, "--max-trials")
    if bound is not None and bound < n_trials:
        raise click.BadParameter(f"{bound} is below --n-trials {n_trials}",
                                 param_hint="--max-trials")
    warmup = whole_number(pruner_warmup_epochs, "--pruner-warmup-epochs", minimum=0)
    asked_workers = whole_number(workers, "--workers")
    base_overrides = checked_run_overrides(config_path, {"data_dir": data_dir}, overrides, sets)
    from skinml.workflows.tuning.options import TuneOptions
    from skinml.workflows.tuning.pool import default_workers
    from skinml.workflows.tuning.study import tune as run_study

    result = run_study(TuneOptions(
        config=config_path, search_space=search_space, n_trials=n_trials, max_trials=bound,
        timeout=seconds, study_name=study_name, storage=storage, sampler=sampler,
        objective=objective, folds=folds, pruner=pruner,
        pruner_startup_trials=pruner_startup_trials, pruner_warmup_epochs=warmup,
        pruner_patience=pruner_patience,
        register_best=register_best, gate_data=gate_data, verdict=verdict, seed=seed,
        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        overrides=tuple(base_overrides), log_models=log_models,
        workers=asked_workers or default_workers()))
    counts = ", ".join(f"{n} {state.lower()}" for state, n in result.counts.items())
    click.echo(f"study {result.study_name}: {counts}; parent run {result.parent_run_id}")
    if result.best_value is not None:
        what = f"mean of {folds} folds' " if objective == "cv" else ""
        click.echo(f"best {what}val balanced accuracy {result.best_value:.4f} (run "
                   f"{result.best_run_id}): {result.best_params}")
    if result.verdict:
        click.echo(result.verdict)
    if result.registration:
        click.echo(result.registration)


@click.command()
@click.option("--config", "config_path", default="demo", show_default=True,
              help="Base config (a YAML path, or demo / ham10000).")
@DATA_DIR_OPTION
@click.option("--search-space", default="search_space", show_default=True,
              help="YAML search space, or search_space: the shipped one.")
@click.option("--n-trials", default="20", show_default=True, callback=blank_is_none,
              metavar="INT", help="COMPLETE trials of the study.")
@click.option("--folds", default="5", show_default=True, callback=blank_is_none,
              metavar="INT", help="Lesion-grouped folds of the best configuration (>= 2).")
@click.option("--workers", callback=blank_is_none, metavar="INT",
              help="Trials at once on this machine (see skinml tune). [default: one per GPU, "
                   "1 without]")
@click.option("--storage", default="sqlite:///optuna.db", show_default=True,
              help="Optuna storage URL of the study.")
@click.option("--study-name", callback=blank_is_none,
              help="[default: pipeline-<the first 8 digits of the pipeline's run id>]")
@click.option("--name", default="skin-lesion-classifier", show_default=True,
              help="Registered model the fold ensemble becomes a version of.")
@GATE_DATA
@click.option("--seed", default="0", show_default=True, callback=blank_is_none,
              metavar="INT", help="Sampler and bootstrap seed.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Base config overrides (e.g. --set optim.epochs=15).")
@OVERRIDES
@click.option("--resume", "resume_run_id", callback=blank_is_none, metavar="RUN_ID",
              help="Continue a stopped pipeline from the stage it was in (its options are "
                   "the ones it started with).")
def pipeline(config_path: str, data_dir: str | None, search_space: str, n_trials: str | None,
             folds: str | None, workers: str | None, storage: str, study_name: str | None,
             name: str, gate_data: str | None, seed: str | None, sets: tuple[str, ...],
             overrides: str | None, resume_run_id: str | None) -> None:
    """Tune, cross-validate the best configuration, register its fold ensemble through the
    promotion gate, and report the three models on the same test images: one parent run."""
    trials = whole_number(n_trials, "--n-trials") or 20
    fold_count = whole_number(folds, "--folds", minimum=2) or 5
    asked_workers = whole_number(workers, "--workers")
    sampler_seed = whole_number(seed, "--seed", minimum=0) or 0
    base_overrides = checked_run_overrides(config_path, {"data_dir": data_dir}, overrides, sets)
    from skinml.workflows.pipeline import PipelineOptions, run_pipeline
    from skinml.workflows.tuning.pool import default_workers

    options = PipelineOptions(
        config=config_path, overrides=tuple(base_overrides),
        search_space=search_space, n_trials=trials, folds=fold_count,
        workers=asked_workers or default_workers(), storage=storage, study_name=study_name,
        name=name, gate_data=gate_data, seed=sampler_seed)
    result = run_pipeline(options, resume_run_id)
    click.echo(f"pipeline run {result.run_id}: study run {result.tags['skinml.pipeline.study_run']}"
               f", cross-validation run {result.tags['skinml.pipeline.cv_run']}, model "
               f"{result.tags['skinml.pipeline.model_version']}")
    for line in result.report.lines():
        click.echo(line)


def _relaunch_under_torchrun(nproc: int) -> None:
    """`skinml train --nproc N ...` -> `torchrun --nproc_per_node=N -m skinml train ...`."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "skinml", *args]
    click.echo(shlex.join(command), err=True)  # the whole command, to rerun by hand
    os.execv(sys.executable, command)


COMMANDS = (train, cv, tune, pipeline)
