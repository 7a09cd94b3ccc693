"""The `skinml` command line: thin click wrappers; bad input exits 2 with one line."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path

import click

from skinml.errors import SkinmlError

SERVE_PORT = 5001  # `mlflow ui` and `mlflow server` take 5000
DATA_DIR = click.argument("data_dir", required=False, type=click.Path(path_type=Path))
ALLOW_MISSING = click.option("--allow-missing", is_flag=True,
                             help="Drop metadata rows whose image file is missing.")


class _Cli(click.Group):
    """Turns a SkinmlError anywhere below into `error: <reason>` and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SkinmlError as exc:
            click.echo(f"error: {exc}", err=True)
            _tag_mlflow_run_error(str(exc))
            ctx.exit(2)


def _tag_mlflow_run_error(message: str) -> None:
    """Under `mlflow run` the run exists before skinml reads its parameters: MLflow marks it
    FAILED; the tag `skinml.error` says why, in the UI."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_tag(run_id, "skinml.error", message[:5000])
    except Exception:  # the error line is already printed; the tag is a courtesy
        logging.getLogger(__name__).debug("could not tag run %s", run_id, exc_info=True)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages.")
@click.version_option(package_name="skinml")
def main(verbose: bool) -> None:
    """Skin-lesion classification on HAM10000 with MLflow and Optuna."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s: %(message)s", force=True)
    if not sys.stderr.isatty():  # a log file gets one line per event, not bar redraws
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.group()
def data() -> None:
    """Inspect, cache and synthesize HAM10000 folders (default: the bundled sample)."""


@data.command()
@DATA_DIR
@ALLOW_MISSING
@click.option("--decode/--no-decode", default=True, show_default=True,
              help="Decode every image fully to count corrupt files.")
def check(data_dir: Path | None, allow_missing: bool, decode: bool) -> None:
    """Summarise a HAM10000 folder: images, lesions and per-class counts."""
    from skinml.data.decode import find_corrupt
    from skinml.data.errors import CorruptImageError
    from skinml.data.metadata import default_data_dir, frame_from_scan, scan_folder

    scan = scan_folder(data_dir or default_data_dir())
    frame = frame_from_scan(scan, allow_missing=allow_missing)
    corrupt = find_corrupt(frame["path"].map(Path).tolist()) if decode else []
    click.echo(_summary(scan.root, frame, missing=len(scan.missing), unlisted=len(scan.unlisted),
                        corrupt=len(corrupt) if decode else None))
    if corrupt:
        raise CorruptImageError(f"{corrupt[0]} ({len(corrupt)} corrupt image(s) in all; "
                                "`skinml data prepare --skip-corrupt` leaves them out)")


@data.command()
@DATA_DIR
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=8),
              help="Shorter side of the cached images, in pixels.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Cache folder [default: $SKINML_CACHE or ~/.cache/skinml].")
@ALLOW_MISSING
@click.option("--skip-corrupt", is_flag=True, help="Leave undecodable images out, with a warning.")
@click.option("--workers", type=click.IntRange(min=1), help="Decoding threads [default: cores].")
def prepare(data_dir: Path | None, size: int, cache_dir: Path | None, allow_missing: bool,
            skip_corrupt: bool, workers: int | None) -> None:
    """Decode every image once into the on-disk cache that training reads."""
    from skinml.data.cache import prepare_cache
    from skinml.data.metadata import load_ham10000

    frame = load_ham10000(data_dir, allow_missing=allow_missing)
    started = time.perf_counter()
    cache = prepare_cache(frame, size=size, root=cache_dir, skip_corrupt=skip_corrupt,
                          workers=workers)
    _, height, width, _ = cache.images.shape
    verb = "reused" if cache.reused else "built"
    click.echo(f"{verb} image cache {cache.path}: {len(cache.image_ids)} images at "
               f"{width}x{height} px, {cache.nbytes / 2**20:.1f} MiB, "
               f"in {time.perf_counter() - started:.2f} s")


@data.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "n", required=True, type=int, help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--width", default=600, show_default=True, type=int)
@click.option("--height", default=450, show_default=True, type=int)
@click.option("--layout", default="flat", show_default=True, type=click.Choice(["flat", "parts"]),
              help="Images at the root, or in HAM10000_images_part_1/ and _part_2/.")
def synth(out: Path, n: int, seed: int, width: int, height: int, layout: str) -> None:
    """Write a synthetic HAM10000-shaped folder (for scale tests, not for claims about skin)."""
    from skinml.data.synth import write_synthetic

    write_synthetic(out, n, seed=seed, width=width, height=height, layout=layout)
    click.echo(f"wrote {n} synthetic images and their metadata to {out}")


def _blank_is_none(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """MLproject passes every parameter; an empty string means "not given"."""
    return value if value not in ("", None) else None


def _whole_number(value: str | None, hint: str, minimum: int = 1) -> int | None:
    """An optional whole-number option that MLproject may pass blank (None: not given)."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number", param_hint=hint) from None
    if number < minimum:
        raise click.BadParameter(f"must be at least {minimum}, got {number}", param_hint=hint)
    return number


# Shortcuts for the most overridden config keys; anything else goes through --set.
_SHORTCUTS = {"data_dir": "data.dir", "epochs": "optim.epochs", "image_size": "model.image_size",
              "batch_size": "optim.batch_size", "lr": "optim.lr", "arch": "model.arch",
              "balance_strategy": "balance.strategy", "pretrained": "model.pretrained",
              "seed": "runtime.seed"}


def _shortcut_overrides(shortcuts: dict[str, str | None]) -> list[str]:
    """`--epochs 5` -> `optim.epochs=5`, each checked here so an error names the option."""
    from skinml.config import check_key_value, parse_override

    items = []
    for name, value in shortcuts.items():
        if value is not None:
            item = f"{_SHORTCUTS[name]}={value}"
            check_key_value(*parse_override(item), source=f"--{name.replace('_', '-')}")
            items.append(item)
    return items


_GATE_DATA = click.option(
    "--gate-data", callback=_blank_is_none, metavar="DIR",
    help="Labelled HAM10000 folder to judge challenger and champion on (all of it). Needed "
         "when their runs were split differently; otherwise their shared test split is used.")
_MIN_DELTA = click.option(
    "--min-delta", default=0.0, show_default=True, type=float,
    help="Promote only if the lower end of the 95 % CI of Δ balanced accuracy "
         "(challenger - champion, paired lesion bootstrap) is above this.")


_DATA_DIR = click.option("--data-dir", callback=_blank_is_none, metavar="DIR",
                         help="HAM10000 folder (data.dir).")
_SEED = click.option("--seed", callback=_blank_is_none, metavar="INT", help="runtime.seed")
_OVERRIDES = click.option("--overrides", callback=_blank_is_none,
                          help="Space-separated KEY=VALUE overrides (for MLproject).")


@main.command()
@click.option("--config", "config_path", default="demo", show_default=True,
              help="YAML run configuration, or a shipped one by name: demo (the embedded "
                   "default, = experiments/demo.yaml) or ham10000 (full data, GPU).")
@_DATA_DIR
@click.option("--epochs", callback=_blank_is_none, metavar="INT", help="optim.epochs")
@click.option("--image-size", callback=_blank_is_none, metavar="INT", help="model.image_size")
@click.option("--batch-size", callback=_blank_is_none, metavar="INT", help="optim.batch_size")
@click.option("--lr", callback=_blank_is_none, metavar="FLOAT", help="optim.lr")
@click.option("--arch", callback=_blank_is_none, metavar="NAME", help="model.arch")
@click.option("--balance-strategy", callback=_blank_is_none, metavar="NAME",
              help="balance.strategy")
@click.option("--pretrained", callback=_blank_is_none, metavar="[true|false]",
              help="model.pretrained")
@_SEED
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set balance.strategy=focal (repeatable).")
@_OVERRIDES
@click.option("--resume", "resume_run_id", callback=_blank_is_none, metavar="RUN_ID",
              help="Continue a killed run from its last checkpoint.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes (GPUs) on this machine: relaunches itself under torchrun.")
def train(config_path: str, sets: tuple[str, ...], overrides: str | None,
          resume_run_id: str | None, nproc: int, **shortcuts: str | None) -> None:
    """Train a ResNeXt and log the run, its figures and the model to MLflow."""
    from skinml.config import load_config
    from skinml.train import train as run_training

    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        _relaunch_under_torchrun(nproc)

    items = _shortcut_overrides(shortcuts)
    items += (overrides or "").split() + list(sets)
    config = load_config(config_path, items)
    result = run_training(config, resume_run_id=resume_run_id)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports
    click.echo(f"run {result.run_id}: best epoch {result.best_epoch}, val balanced accuracy "
               f"{result.val_balanced_accuracy:.4f}, test balanced accuracy "
               f"{result.test['balanced_accuracy']:.4f}; model {result.model_uri}")


@main.command()
@click.option("--config", "config_path", default="demo", show_default=True,
              help="YAML run configuration, or a shipped one by name (demo, ham10000).")
@click.option("--folds", default="5", show_default=True, callback=_blank_is_none,
              metavar="INT", help="Number of lesion-grouped folds (at least 2).")
@_DATA_DIR
@_SEED
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key (repeatable).")
@_OVERRIDES
@click.option("--resume", "resume_run_id", callback=_blank_is_none, metavar="RUN_ID",
              help="Continue a killed cross-validation: its finished folds are kept.")
def cv(config_path: str, folds: str | None, sets: tuple[str, ...], overrides: str | None,
       resume_run_id: str | None, **shortcuts: str | None) -> None:
    """Cross-validate: one training run per lesion-grouped fold, out-of-fold metrics, and
    the fold ensemble logged as the parent run's model."""
    from skinml.config import load_config
    from skinml.cv import cross_validate

    try:
        fold_count = int(folds or "5")
    except ValueError:
        raise click.BadParameter(f"{folds!r} is not a whole number", param_hint="--folds") from None
    if fold_count < 2:
        raise click.BadParameter("needs at least 2 folds", param_hint="--folds")
    items = _shortcut_overrides(shortcuts) + (overrides or "").split() + list(sets)
    result = cross_validate(load_config(config_path, items), fold_count, resume_run_id)
    oof, test = result.oof, result.test
    click.echo(f"run {result.run_id}: {len(result.fold_run_ids)} folds, out-of-fold balanced "
               f"accuracy {oof['balanced_accuracy']:.4f} (95 % CI "
               f"{oof.get('balanced_accuracy_ci_low', float('nan')):.2f}-"
               f"{oof.get('balanced_accuracy_ci_high', float('nan')):.2f}), fold ensemble test "
               f"balanced accuracy {test['balanced_accuracy']:.4f}; model {result.model_uri}")


@main.command()
@click.option("--config", "config_path", default="demo", show_default=True,
              help="Base config (a YAML path, or demo / ham10000); the space overrides it.")
@click.option("--search-space", default="search_space", show_default=True,
              help="YAML search space, or search_space: the shipped experiments/search_space.yaml.")
@click.option("--n-trials", default=20, show_default=True, type=click.IntRange(min=1),
              help="COMPLETE trials of the study in total, over all workers and resumes.")
@click.option("--max-trials", callback=_blank_is_none, metavar="INT",
              help="Trials of any state (pruned too) in total [default: 5 x --n-trials].")
@click.option("--timeout", callback=_blank_is_none, help="Seconds this worker may run.")
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
@click.option("--pruner", callback=_blank_is_none,
              type=click.Choice(["patient", "median", "hyperband", "none", ""]),
              metavar="[patient|median|hyperband|none]",
              help="patient: median pruning only after --pruner-patience epochs without "
                   "improvement; median: compare with the median at the same epoch (fold). "
                   "[default: patient; median with --objective cv]")
@click.option("--pruner-startup-trials", default=3, show_default=True,
              type=click.IntRange(min=0), help="patient/median: trials before pruning starts.")
@click.option("--pruner-warmup-epochs", callback=_blank_is_none, metavar="INT",
              help="patient/median: epochs (folds with --objective cv) before a trial can be "
                   "pruned. [default: 5; 2 folds with --objective cv]")
@click.option("--pruner-patience", default=3, show_default=True, type=click.IntRange(min=0),
              help="patient: epochs without improvement before the median may prune.")
@click.option("--register-best", is_flag=False, flag_value="true", default="false",
              type=click.BOOL, metavar="[true|false]",
              help="Register the best trial's model through the promotion gate (see `skinml "
                   "register`); a bare --register-best means true.")
@_GATE_DATA
@click.option("--verdict", is_flag=False, flag_value="true", default="true", type=click.BOOL,
              metavar="[true|false]", show_default=True,
              help="End with the best trial against the base config (one more training run, "
                   "compared on the shared test split).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampler seed.")
@click.option("--heartbeat-interval", default=10, show_default=True, type=click.IntRange(min=1),
              help="Seconds between a running trial's heartbeats in the storage.")
@click.option("--grace-period", default=60, show_default=True, type=click.IntRange(min=2),
              help="Seconds without heartbeat before a trial counts as dead and is retried.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Base config overrides (e.g. --set optim.epochs=5).")
@click.option("--overrides", callback=_blank_is_none,
              help="Space-separated KEY=VALUE base overrides (for MLproject).")
def tune(config_path: str, search_space: str, n_trials: int, max_trials: str | None,
         timeout: str | None, study_name: str, storage: str, sampler: str, objective: str,
         folds: int, pruner: str | None, pruner_startup_trials: int,
         pruner_warmup_epochs: str | None, pruner_patience: int,
         register_best: bool, gate_data: str | None, verdict: bool, seed: int,
         heartbeat_interval: int, grace_period: int, sets: tuple[str, ...],
         overrides: str | None) -> None:
    """Tune augmentation and class balancing with Optuna; trials are nested MLflow runs."""
    from skinml.tune import TuneOptions
    from skinml.tune import tune as run_study

    try:
        seconds = float(timeout) if timeout is not None else None
    except ValueError:
        raise click.BadParameter(f"{timeout!r} is not a number of seconds",
                                 param_hint="--timeout") from None
    bound = _whole_number(max_trials, "--max-trials")
    if bound is not None and bound < n_trials:
        raise click.BadParameter(f"{bound} is below --n-trials {n_trials}",
                                 param_hint="--max-trials")
    warmup = _whole_number(pruner_warmup_epochs, "--pruner-warmup-epochs", minimum=0)
    result = run_study(TuneOptions(
        config=config_path, search_space=search_space, n_trials=n_trials, max_trials=bound,
        timeout=seconds, study_name=study_name, storage=storage, sampler=sampler,
        objective=objective, folds=folds, pruner=pruner,
        pruner_startup_trials=pruner_startup_trials, pruner_warmup_epochs=warmup,
        pruner_patience=pruner_patience,
        register_best=register_best, gate_data=gate_data, verdict=verdict, seed=seed,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period, overrides=tuple((overrides or "").split()) + sets))
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


@main.command()
@click.option("--run-id", callback=_blank_is_none, help="Register this run's model.")
@click.option("--experiment", default="skin-lesion", show_default=True,
              help="Without --run-id: register the best finished training run of this "
                   "experiment (by --metric).")
@click.option("--metric", default="best_val_balanced_accuracy", show_default=True,
              help="Validation metric that picks the run with --experiment: the default is "
                   "the validation balanced accuracy of the epoch each run kept. Highest wins "
                   "(lowest for loss, nll, ece). Test metrics are refused: they are reported, "
                   "never used to choose.")
@click.option("--name", default="skin-lesion-classifier", show_default=True,
              help="Registered model name.")
@click.option("--study", callback=_blank_is_none,
              help="Register the best trial of this Optuna study (by its validation value).")
@click.option("--storage", default="sqlite:///optuna.db", show_default=True,
              help="The study's storage (with --study).")
@_GATE_DATA
@_MIN_DELTA
@click.option("--force", is_flag=False, flag_value="true", default="false", type=click.BOOL,
              metavar="[true|false]", help="Make the new version champion whatever the gate "
                                           "says (it says so); a bare --force means true.")
def register(run_id: str | None, experiment: str, metric: str, name: str, study: str | None,
             storage: str, gate_data: str | None, min_delta: float, force: bool) -> None:
    """Register a run's model: alias challenger always, champion only on a paired win.

    With a champion in place, both models are judged on the same labelled images and the
    new version becomes champion only if the 95 % interval of the difference in balanced
    accuracy lies above --min-delta. The decision is printed, tagged on the version and
    written into its model card.
    """
    from skinml.registry import GateOptions, best_run, register_run
    from skinml.run_store import require_tracking_store

    require_tracking_store()
    if run_id is None and study is not None:
        from skinml.tune import best_run_id

        run_id = best_run_id(study, storage)
    if run_id is None:
        run_id = best_run(experiment, metric).info.run_id
    gate = GateOptions(gate_data=gate_data, min_delta=min_delta, force=force)
    click.echo(register_run(run_id, name=name, gate=gate).summary())


@main.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--data-dir", callback=_blank_is_none,
              help="HAM10000 folder [default: the training run's, else the bundled sample].")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "all"]),
              help="test: the test split both models' runs share (an error if they were "
                   "split differently); all: every labelled image of --data-dir.")
@click.option("--bootstrap", default=2000, show_default=True, type=click.IntRange(min=100),
              help="Paired lesion-bootstrap rounds.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@click.option("--experiment", default="skin-lesion", show_default=True,
              help="The training experiment; this run goes to EXPERIMENT-evaluations.")
def compare(model_a: str, model_b: str, data_dir: str | None, split: str, bootstrap: int,
            seed: int, experiment: str) -> None:
    """Compare two models on the same images: Δ = A - B with a paired lesion bootstrap."""
    from skinml.compare import CompareOptions, per_class_text
    from skinml.compare import compare as run_comparison
    from skinml.run_store import require_tracking_store

    require_tracking_store(model_a)
    require_tracking_store(model_b)

    comparison, run_id = run_comparison(CompareOptions(
        uri_a=model_a, uri_b=model_b, data_dir=data_dir, split=split, rounds=bootstrap,
        seed=seed, experiment=experiment))
    result = comparison.result
    click.echo(f"A  {model_a}: balanced accuracy {result.a}")
    click.echo(f"B  {model_b}: balanced accuracy {result.b}")
    click.echo(f"Δ = A - B: {result.delta.signed()}, paired lesion bootstrap, "
               f"{result.rounds} rounds, on {comparison.image_set.summary()}")
    click.echo("")
    click.echo(per_class_text(result))
    click.echo(f"comparison run {run_id} (figure: comparison.png)")


@main.command()
@click.argument("model_uri", default="models:/skin-lesion-classifier@champion")
@click.option("--port", default=SERVE_PORT, show_default=True, type=click.IntRange(1, 65535),
              help="Not 5000, where `mlflow ui` listens.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--timeout", type=click.IntRange(min=1), metavar="SECONDS",
              help="Answer a request still running after this long with HTTP 504 "
                   "[default: MLflow's, 60].")
@click.option("--workers", type=click.IntRange(min=1), metavar="INT",
              help="Server processes, each with cores/workers torch threads (at least 1) "
                   "[default: two per CPU core, at most 4].")
@click.option("--mlserver", is_flag=True,
              help="Serve with MLServer (V2 inference protocol, adaptive batching) instead "
                   "of mlflow models serve; needs pip install 'skinml[mlserver]'.")
def serve(model_uri: str, port: int, host: str, timeout: int | None, workers: int | None,
          mlserver: bool) -> None:
    """Serve a model over REST: runs `mlflow models serve` with the local environment."""
    from skinml.serving import (
        check_model_uri,
        check_port_free,
        default_workers,
        mlserver_command,
        serve_command,
    )

    for given, name in ((timeout, "--timeout"), (workers, "--workers")):
        if mlserver and given:
            raise click.BadParameter("is for mlflow models serve, not MLServer",
                                     param_hint=name)
    check_model_uri(model_uri)
    check_port_free(host, port)
    if mlserver:
        command, env = mlserver_command(model_uri, host, port)
        server = "MLServer"
    else:
        workers = workers or default_workers()
        command, env = serve_command(model_uri, host, port, timeout, workers)
        server = f"mlflow models serve, {workers} worker(s)"
    click.echo(f"serving {model_uri} at http://{host}:{port} ({server})", err=True)
    os.execve(command[0], command, env)


@main.command()
@click.argument("model_uri")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@click.option("--tta", is_flag=True, help="Average the 8 flips/rotations of each image.")
@click.option("--isic-csv", type=click.Path(path_type=Path),
              help="Also write the ISIC 2018 Task 3 submission CSV here.")
def predict(model_uri: str, images: tuple[Path, ...], as_json: bool, tta: bool,
            isic_csv: Path | None) -> None:
    """Predict image files with a logged or registered model."""
    from skinml.files import write_atomically
    from skinml.packaging import isic_submission, predict_files
    from skinml.run_store import require_tracking_store

    require_tracking_store(model_uri)

    table = predict_files(model_uri, list(images), tta=tta)
    if isic_csv is not None:
        write_atomically(isic_csv, isic_submission(table).to_csv(index=False))
    if as_json:
        click.echo(table.reset_index().to_json(orient="records", indent=2))
    else:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20,
                               "display.float_format", "{:.4f}".format):
            click.echo(table.to_string())


@main.command()
@click.argument("model_uri", default="models:/skin-lesion-classifier@champion")
@click.option("--data-dir", callback=_blank_is_none,
              help="HAM10000 folder [default: the training run's, else the bundled sample]; "
                   "with --split isic the folder of ISIC 2018 images.")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["test", "val", "all", "isic"]),
              help="test/val: the training run's split.csv; all: every labelled image; "
                   "isic: ISIC 2018 Task 3 images + --truth.")
@click.option("--truth", "truth_csv", callback=_blank_is_none,
              help="ISIC 2018 Task 3 ground truth (image, MEL, NV, BCC, AKIEC, BKL, DF, VASC).")
@click.option("--tta", is_flag=False, flag_value="true", default="false", type=click.BOOL,
              metavar="[true|false]", help="Average the 8 flips/rotations of each image.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Lesion-bootstrap resamples for the confidence intervals (0 = none).")
@click.option("--experiment", default="skin-lesion", show_default=True,
              help="The training experiment; this run goes to EXPERIMENT-evaluations.")
def evaluate(model_uri: str, data_dir: str | None, split: str, truth_csv: str | None,
             tta: bool, bootstrap: int, experiment: str) -> None:
    """Evaluate a model: metrics with CIs, calibration, subgroups, Grad-CAM, as a new run."""
    from skinml.evaluate import EvaluateOptions, evaluate_model
    from skinml.run_store import require_tracking_store

    require_tracking_store(model_uri)

    result = evaluate_model(EvaluateOptions(model_uri=model_uri, data_dir=data_dir,
                                            split=split, tta=tta,
                                            truth_csv=Path(truth_csv) if truth_csv else None,
                                            bootstrap=bootstrap, experiment=experiment))
    from skinml.reports import metrics_markdown

    click.echo(metrics_markdown(result.scored.scores, split))
    click.echo(f"evaluation run {result.run_id} (report: evaluation_report.md)")


@main.command()
@click.argument("model_uri")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Where to write the Grad-CAM overlay (PNG), same size as IMAGE.")
@click.option("--figure", type=click.Path(path_type=Path),
              help="Also write the overlay with its colour scale and feature-map size (PNG).")
def explain(model_uri: str, image: Path, out: Path, figure: Path | None) -> None:
    """Grad-CAM overlay of one image: where the model looked for its answer."""
    from skinml.data.decode import open_rgb
    from skinml.explain import FEATURE_MAP
    from skinml.explain import explain as explain_image
    from skinml.files import write_atomically
    from skinml.labels import CLASSES, DIAGNOSES
    from skinml.packaging import MAX_PIXELS, load_model
    from skinml.run_store import require_tracking_store

    require_tracking_store(model_uri)
    picture = open_rgb(image, max_pixels=MAX_PIXELS)
    served = load_model(model_uri).unwrap_python_model()
    result, index, probability = explain_image(served, picture)
    write_atomically(out, _png(result))
    dx = CLASSES[index]
    caption = f"{image.name}: {dx} ({DIAGNOSES[dx]}) {probability:.3f}"
    if figure is not None:
        from skinml.reports import gradcam_figure

        write_atomically(figure, _png(gradcam_figure(result, caption)))
    height, width = result.info[FEATURE_MAP]
    click.echo(f"{caption}; overlay {out} (Grad-CAM from a {height}x{width} feature map)")


def _png(picture) -> bytes:
    """A PIL image or a matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    if hasattr(picture, "savefig"):
        picture.savefig(buffer, format="png")
    else:
        picture.save(buffer, format="PNG")
    return buffer.getvalue()


@main.group()
def bench() -> None:
    """Measure the input pipeline and training throughput on this machine."""


_BENCH_CONFIG = click.option(
    "--config", "config_path", help="YAML config or a shipped name [default: ham10000 on a "
    "CUDA machine (ResNeXt-50, 224 px), demo elsewhere (minutes, not hours, on a CPU)].")
_BENCH_SETS = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                           help="Config overrides, e.g. --set model.image_size=128.")
_BENCH_DATA = click.option("--data-dir", callback=_blank_is_none,
                           help="HAM10000 folder [default: the bundled sample].")


def _bench_config(config_path: str | None, data_dir: str | None, sets: tuple[str, ...]):
    import torch

    from skinml.config import load_config

    config_path = config_path or ("ham10000" if torch.cuda.is_available() else "demo")
    # Benchmarks never download weights: throughput does not depend on them.
    items = ["model.pretrained=false", "runtime.progress=false", *sets]
    if data_dir:
        items.append(f"data.dir={data_dir}")
    return load_config(config_path, items)


@bench.command("loader")
@_BENCH_CONFIG
@_BENCH_DATA
@_BENCH_SETS
@click.option("--batches", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=os.cpu_count() or 1, show_default=True,
              type=click.IntRange(min=0), help="DataLoader workers for the seed's path.")
def bench_loader(config_path: str | None, data_dir: str | None, sets: tuple[str, ...], batches: int,
                 workers: int) -> None:
    """Images/s delivered (decoded, augmented, batched): ours vs the seed's per-image path."""
    from skinml.bench import bench_loader as run
    from skinml.bench import machine

    config = _bench_config(config_path, data_dir, sets)
    click.echo(f"measuring {batches} batches of {config.optim.batch_size} at "
               f"{config.model.image_size} px, ours then the seed path ({workers} workers)",
               err=True)
    ours, seed = run(config, batches, workers)
    click.echo(f"machine: {machine()}; {config.model.image_size} px, batch "
               f"{config.optim.batch_size}, {batches} batches")
    for result in (ours, seed):
        click.echo(f"{result.per_second:10.1f} images/s  {result.name}")
    click.echo(f"ratio: {ours.per_second / seed.per_second:.1f}x (target >= 20x)")


@bench.command("train")
@_BENCH_CONFIG
@_BENCH_DATA
@_BENCH_SETS
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1))
def bench_train(config_path: str | None, data_dir: str | None, sets: tuple[str, ...],
                steps: int) -> None:
    """Training images/s end to end vs the same model fed from tensors on the device."""
    from skinml.bench import bench_train as run
    from skinml.bench import machine

    config = _bench_config(config_path, data_dir, sets)
    click.echo(f"measuring {steps} steps of {config.model.arch} at {config.model.image_size} px"
               f"{', compiling first' if config.runtime.compile else ''}", err=True)
    result = run(config, steps)
    end_to_end, ceiling = result.end_to_end, result.ceiling
    click.echo(f"machine: {machine()}; {config.model.arch}, {config.model.image_size} px, "
               f"batch {config.optim.batch_size}, amp {config.runtime.amp}, channels_last "
               f"{config.runtime.channels_last}, compile {config.runtime.compile}")
    for result in (end_to_end, ceiling):
        click.echo(f"{result.per_second:10.1f} images/s  {result.name}")
    click.echo(f"end to end / ceiling: {100 * end_to_end.per_second / ceiling.per_second:.0f}% "
               "(target >= 90% on a GPU)")


@bench.command("serve")
@click.argument("model_uri", default="models:/skin-lesion-classifier@champion")
@click.option("--url", help="A running server [default: start one on a free port].")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Request image [default: one of the bundled sample].")
@click.option("--requests", "count", default=100, show_default=True, type=click.IntRange(min=5),
              help="One-image requests timed one by one; each concurrent load sends at least "
                   "25 per client (shorter loads measure their own start-up).")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--concurrency", default="1,4,16", show_default=True, metavar="N[,N...]",
              help="Concurrent one-image clients to measure (0: skip).")
@click.option("--workers", type=click.IntRange(min=1), metavar="INT",
              help="Server processes, as skinml serve --workers [default: as skinml serve].")
@click.option("--mlserver", is_flag=True,
              help="Measure MLServer (skinml serve --mlserver); clients use the V2 protocol.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Loads per client count, each held against an in-process batch rate "
                   "measured just before it (the share's range is over these pairs).")
def bench_serve(model_uri: str, url: str | None, image: Path | None, count: int,
                batch: int, concurrency: str, workers: int | None, mlserver: bool,
                repeats: int) -> None:
    """REST latency (p50/p95) vs in-process predict, batch throughput, and throughput
    under concurrent one-image clients."""
    import numpy as np

    from skinml.bench import bench_paired, machine
    from skinml.bench import bench_serve as run
    from skinml.data.metadata import default_data_dir
    from skinml.packaging import load_model
    from skinml.serving import default_workers, running_server

    image = image or next(iter(sorted(default_data_dir().glob("*.jpg"))))
    clients = _client_counts(concurrency)
    workers = workers or default_workers()
    name = ("MLServer, V2 clients" if mlserver else
            "a server of your own" if url else f"mlflow models serve, {workers} worker(s)")
    server = running_server(model_uri, mlserver=mlserver, workers=workers)
    with contextlib.nullcontext(url.rstrip("/")) if url else server as url:
        model = load_model(model_uri)
        result = run(model, image, url, count, batch)
        loads = [bench_paired(model, image, url, n, max(count, 25 * n), batch, repeats,
                              v2=mlserver) for n in clients]
    rest50, rest95 = (float(v) for v in np.percentile(result.rest_ms, [50, 95]))
    local50, local95 = (float(v) for v in np.percentile(result.local_ms, [50, 95]))
    click.echo(f"machine: {machine()}; model {model_uri} ({result.model}); "
               f"{name}; {count} one-image requests")
    click.echo(f"REST        p50 {rest50:7.1f} ms   p95 {rest95:7.1f} ms   "
               f"{batch}-image requests {result.rest_batch_images_per_second:8.1f} images/s")
    click.echo(f"in-process  p50 {local50:7.1f} ms   p95 {local95:7.1f} ms   "
               f"{batch}-image batches  {result.local_batch_images_per_second:8.1f} images/s")
    goal = 1.25 * local50 + 2
    click.echo(f"REST p50 / in-process p50: {rest50 / local50:.2f}x; goal REST p50 <= 1.25x + 2 ms "
               f"= {goal:.1f} ms: {'met' if rest50 <= goal else 'not met'}")
    for n, load in zip(clients, loads, strict=True):
        p50, p95, p99 = (float(v) for v in np.percentile(load.latencies_ms, [50, 95, 99]))
        shares = 100 * load.shares
        click.echo(f"{n:3d} clients  {load.per_second:8.1f} requests/s "
                   f"({np.median(shares):.0f}% of in-process {batch}-image batches at "
                   f"{np.median(load.ceilings):.0f} images/s, "
                   f"{shares.min():.0f}-{shares.max():.0f}% over {repeats} pair(s); goal 70%)  "
                   f"p50 {p50:.1f} p95 {p95:.1f} p99 {p99:.1f} ms  errors {load.errors}")



def _client_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of numbers",
                                 param_hint="--concurrency") from None
    if any(n < 0 for n in counts):
        raise click.BadParameter("client counts must be >= 0", param_hint="--concurrency")
    return [n for n in counts if n > 0]


@bench.command("gpu")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table as JSON here.")
@click.option("--quick", is_flag=True, help="Fewer steps and requests (about 3 minutes).")
@click.option("--device", "device_name", default="auto", show_default=True,
              help="cuda, cuda:N, cpu, or auto (CUDA when there is one).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the synthetic data, caches and runs here [default: a temp folder].")
def bench_gpu(out: Path | None, quick: bool, device_name: str, work_dir: Path | None) -> None:
    """The GPU path in one command: loader, train step (eager and compiled), fp16, a real
    MLflow run and its resume, serving, DDP. One row per step; exit 0 only if all ran."""
    import torch

    from skinml import bench_gpu as gpu
    from skinml.bench import machine
    from skinml.device import resolve_device

    try:
        device = resolve_device(device_name)
    except RuntimeError:
        raise click.BadParameter(f"{device_name!r} is not a device",
                                 param_hint="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("this machine has no CUDA device", param_hint="--device")
    click.echo(f"machine: {machine()}; device {device}{', quick' if quick else ''}")
    click.echo(gpu.header())
    with gpu.work_folder(work_dir) as work:
        rows = gpu.run_bench(device, quick, work,
                             on_row=lambda row: click.echo(gpu.format_row(row)))
    if out is not None:
        gpu.write_report(out, gpu.report(rows, device, quick, machine()))
        click.echo(f"wrote {out}")
    failed = [row for row in rows if row.failed]
    for row in failed:
        click.echo(f"error: {row.step}: {row.status.removeprefix('failed: ')}", err=True)
    if failed:
        sys.exit(1)


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
    click.echo(" ".join(command[1:]), err=True)
    os.execv(sys.executable, command)


def _summary(root: Path, frame, *, missing: int, unlisted: int, corrupt: int | None) -> str:
    import pandas as pd

    from skinml.labels import CLASSES, DIAGNOSES

    table = pd.DataFrame({
        "diagnosis": [DIAGNOSES[dx] for dx in CLASSES],
        "images": frame["dx"].value_counts().reindex(CLASSES, fill_value=0),
        "lesions": frame.groupby("dx")["lesion_id"].nunique().reindex(CLASSES, fill_value=0),
    })
    table.loc["total"] = ["", len(frame), frame["lesion_id"].nunique()]
    table.index.name = "dx"
    corrupt_text = "not checked" if corrupt is None else str(corrupt)
    return "\n".join([
        f"HAM10000 folder  {root}",
        f"images           {len(frame)} (missing {missing}, corrupt {corrupt_text}, "
        f"without metadata {unlisted})",
        f"lesions          {frame['lesion_id'].nunique()}",
        "",
        table.to_string(),
    ])
