"""`skinml register`, `compare`, `serve`, `predict`, `evaluate` and `explain`: the commands
that judge, register and use logged models."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import click

from skinml.cli.options import GATE_DATA, MIN_DELTA, blank_is_none

SERVE_PORT = 5001  # `mlflow ui` and `mlflow server` take 5000


@click.command()
@click.option("--run-id", callback=blank_is_none, help="Register this run's model.")
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
@click.option("--study", callback=blank_is_none,
              help="Register the best trial of this Optuna study (by its validation value).")
@click.option("--storage", default="sqlite:///optuna.db", show_default=True,
              help="The study's storage (with --study).")
@GATE_DATA
@MIN_DELTA
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
    from skinml.tracking.store import require_tracking_store
    from skinml.workflows.registry import GateOptions, best_run, register_run

    require_tracking_store()
    if run_id is None and study is not None:
        from skinml.workflows.tuning.study import best_run_id

        run_id = best_run_id(study, storage)
    if run_id is None:
        run_id = best_run(experiment, metric).info.run_id
    gate = GateOptions(gate_data=gate_data, min_delta=min_delta, force=force)
    click.echo(register_run(run_id, name=name, gate=gate).summary())


@click.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--data-dir", callback=blank_is_none,
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
    from skinml.tracking.store import require_tracking_store
    from skinml.workflows.compare import CompareOptions, per_class_text
    from skinml.workflows.compare import compare as run_comparison

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


@click.command()
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
    """Serve a model over REST: runs `mlflow models serve` with the local environment (or
    MLServer with --mlserver, announced once the model is loaded)."""
    from skinml.serving.mlserver import mlserver_command, mlserver_log_path
    from skinml.serving.ports import check_port_free
    from skinml.serving.server import (
        check_model_uri,
        default_workers,
        serve_command,
        serve_until_stopped,
        server_log_path,
    )

    for given, name in ((timeout, "--timeout"), (workers, "--workers")):
        if mlserver and given:
            raise click.BadParameter("is for mlflow models serve, not MLServer",
                                     param_hint=name)
    check_model_uri(model_uri)
    check_port_free(host, port)
    if mlserver:
        command, env = mlserver_command(model_uri, host, port)
        serving = f"serving {model_uri} at http://{host}:{port} (MLServer)"
        sys.exit(serve_until_stopped(command, env, host, port, model_uri,
                                     on_ready=lambda: click.echo(serving, err=True),
                                     log_path=mlserver_log_path(model_uri)))
    workers = workers or default_workers()
    command, env = serve_command(model_uri, host, port, timeout, workers)
    serving = (f"serving {model_uri} at http://{host}:{port} (mlflow models serve, {workers} "
               "worker(s))")
    sys.exit(serve_until_stopped(command, env, host, port, model_uri,
                                 on_ready=lambda: click.echo(serving, err=True),
                                 log_path=server_log_path(model_uri)))


@click.command()
@click.argument("model_uri")
@click.argument("images", nargs=-1)
@click.option("--list", "lists", multiple=True, metavar="FILE",
              help="A file listing image paths, one per line (relative to its folder).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write the predictions into this folder in parts, with errors.csv and a "
                   "manifest, for any number of images [default: print them].")
@click.option("--format", "fmt", default="csv", show_default=True,
              type=click.Choice(["csv", "parquet"]), help="Format of the parts (with --out).")
@click.option("--part-size", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Images per part (with --out): what a killed run can lose and redo.")
@click.option("--resume", is_flag=True,
              help="Continue the killed or interrupted run that wrote --out.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@click.option("--tta", is_flag=True, help="Average the 8 flips/rotations of each image.")
@click.option("--isic-csv", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the ISIC 2018 Task 3 submission CSV here.")
def predict(model_uri: str, images: tuple[str, ...], lists: tuple[str, ...], out: Path | None,
            fmt: str, part_size: int, resume: bool, as_json: bool, tta: bool,
            isic_csv: Path | None) -> None:
    """Predict image files, folders (recursive), glob patterns or listed paths with a logged
    or registered model.

    Without --out the predictions are printed (a file that cannot be decoded stops the
    command). With --out they stream into parts: any number of images, a file that cannot be
    read or decoded goes to errors.csv with its reason, and --resume continues a killed run
    without a duplicate or a lost row.
    """
    from skinml.data.image_files import ImageSources
    from skinml.tracking.store import require_tracking_store

    require_tracking_store(model_uri)
    sources = ImageSources.resolve(images, lists)
    if out is None:
        for given, name in ((resume, "--resume"), (fmt != "csv", "--format"),
                            (part_size != 2048, "--part-size")):
            if given:
                raise click.BadParameter("needs --out", param_hint=name)
        _print_predictions(model_uri, list(sources.paths()), as_json, tta, isic_csv)
        return
    if as_json:
        raise click.BadParameter("prints to the terminal; with --out the predictions go to "
                                 "files", param_hint="--json")
    _score_into(model_uri, sources, out, fmt, part_size, resume, tta, isic_csv)


def _print_predictions(model_uri: str, paths: list[str], as_json: bool, tta: bool,
                       isic_csv: Path | None) -> None:
    from skinml.core.files import write_atomically
    from skinml.tracking.logged_model import isic_submission, predict_files

    table = predict_files(model_uri, [Path(path) for path in paths], tta=tta)
    if isic_csv is not None:
        write_atomically(isic_csv, isic_submission(table).to_csv(index=False))
    if as_json:
        click.echo(table.reset_index().to_json(orient="records", indent=2))
    else:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20,
                               "display.float_format", "{:.4f}".format):
            click.echo(table.to_string())


def _score_into(model_uri: str, sources, out: Path, fmt: str, part_size: int, resume: bool,
                tta: bool, isic_csv: Path | None) -> None:
    import shlex

    from skinml.core.errors import Interrupted
    from skinml.workflows.score import ERRORS, PARTS, ScoreOptions, score_files

    options = ScoreOptions(model_uri=model_uri, sources=sources, out=out, fmt=fmt, tta=tta,
                           part_size=part_size, resume=resume, isic_csv=isic_csv)
    try:
        result = score_files(options)
    except KeyboardInterrupt:
        again = ["skinml", *sys.argv[1:], *([] if resume else ["--resume"])]
        raise Interrupted(f"continue with: {shlex.join(again)}") from None
    done = result.images + result.errors - result.resumed_at
    errors = (f"{result.errors} could not be read or decoded (listed in {out / ERRORS})"
              if result.errors else "none failed")
    if result.resumed_at and not done:
        click.echo(f"{out} is already complete: {result.images} images in {result.parts} "
                   f"{fmt} parts under {out / PARTS}; {errors}")
    else:
        resumed = f" after the {result.resumed_at} done before" if result.resumed_at else ""
        click.echo(f"predicted {result.images} images into {out / PARTS} ({result.parts} {fmt} "
                   f"parts); {errors}; this run: {done} files{resumed} in "
                   f"{result.seconds:.1f} s, {result.per_second:.1f} files/s")
    if isic_csv is not None:
        click.echo(f"ISIC 2018 submission CSV: {isic_csv}")


@click.command()
@click.argument("model_uri", default="models:/skin-lesion-classifier@champion")
@click.option("--data-dir", callback=blank_is_none,
              help="HAM10000 folder [default: the training run's, else the bundled sample]; "
                   "with --split isic the folder of ISIC 2018 images.")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["test", "val", "all", "isic"]),
              help="test/val: the training run's split.csv; all: every labelled image; "
                   "isic: ISIC 2018 Task 3 images + --truth.")
@click.option("--truth", "truth_csv", callback=blank_is_none,
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
    from skinml.tracking.store import require_tracking_store
    from skinml.workflows.evaluate import EvaluateOptions, evaluate_model

    require_tracking_store(model_uri)

    result = evaluate_model(EvaluateOptions(model_uri=model_uri, data_dir=data_dir,
                                            split=split, tta=tta,
                                            truth_csv=Path(truth_csv) if truth_csv else None,
                                            bootstrap=bootstrap, experiment=experiment))
    from skinml.evaluation.reports import metrics_markdown

    click.echo(metrics_markdown(result.scored.scores, split))
    click.echo(f"evaluation run {result.run_id} (report: evaluation_report.md)")


@click.command()
@click.argument("model_uri")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Where to write the Grad-CAM overlay (PNG), same size as IMAGE.")
@click.option("--figure", type=click.Path(path_type=Path),
              help="Also write the overlay with its colour scale and feature-map size (PNG).")
def explain(model_uri: str, image: Path, out: Path, figure: Path | None) -> None:
    """Grad-CAM overlay of one image: where the model looked for its answer."""
    from skinml.core.files import write_atomically
    from skinml.core.labels import CLASSES, DIAGNOSES
    from skinml.data.decode import open_rgb
    from skinml.evaluation.explain import FEATURE_MAP
    from skinml.evaluation.explain import explain as explain_image
    from skinml.inference.decoder import MAX_PIXELS
    from skinml.tracking.logged_model import load_model
    from skinml.tracking.store import require_tracking_store

    require_tracking_store(model_uri)
    picture = open_rgb(image, max_pixels=MAX_PIXELS)
    served = load_model(model_uri).unwrap_python_model()
    result, index, probability = explain_image(served, picture)
    write_atomically(out, _png(result))
    dx = CLASSES[index]
    caption = f"{image.name}: {dx} ({DIAGNOSES[dx]}) {probability:.3f}"
    if figure is not None:
        from skinml.evaluation.reports import gradcam_figure

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


COMMANDS = (register, compare, serve, predict, evaluate, explain)
