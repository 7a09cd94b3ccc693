"""The `skinml` command group: logging set up once, every SkinmlError one line and exit 2,
Ctrl-C one line and exit 130.

Commands live one group per module (`data`, `cache`, `runs`, `models`, `bench`) and import
what they run inside their own body: `skinml --help` and a mistyped option answer in a
fraction of a second instead of waiting for torch and MLflow to import.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from skinml.cli import bench, cache, data, models, runs
from skinml.core.errors import SkinmlError, WorkersFailed
from skinml.core.interrupts import keep_interrupts

# commands whose interrupted run `--resume RUN_ID` continues
RESUMABLE = ("train", "cv", "pipeline")


class _Cli(click.Group):
    """Turns a SkinmlError anywhere below into `error: <reason>` and exit code 2, and Ctrl-C
    into one line (with the command that continues the run) and exit code 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SkinmlError as exc:
            _tag_launching_run(str(exc))  # first: what MLflow logs doing it goes above
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except WorkersFailed as exc:  # each worker printed its own error already
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except click.UsageError as exc:  # one line, as every other mistake (not click's usage)
            _usage_error(ctx, exc)
        except KeyboardInterrupt as exc:
            hint = getattr(exc, "hint", None)
            click.echo(f"interrupted: {hint}" if hint else
                       _interrupted(ctx.invoked_subcommand, getattr(exc, "run_id", None)),
                       err=True)
            ctx.exit(130)  # 128 + SIGINT, as shells expect


    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _usage_error(ctx, exc)
            raise  # unreachable: _usage_error exits


def _usage_error(ctx: click.Context, exc: click.UsageError) -> None:
    """A mistaken option or argument: `error: <what click says>`, exit 2 (the run `mlflow
    run` made says why too). `COMMAND --help` shows the usage."""
    message = exc.format_message()
    _tag_launching_run(message)
    click.echo(f"error: {message}", err=True)
    ctx.exit(2)


def _interrupted(command: str | None, run_id: str | None) -> str:
    if run_id is None or os.environ.get("RANK", "0") != "0":
        return "interrupted"
    if command in RESUMABLE:
        return (f"interrupted: run {run_id} is marked KILLED; continue it with: "
                f"skinml {command} --resume {run_id}")
    if command == "tune":
        return (f"interrupted: run {run_id} is marked KILLED; the same `skinml tune` command "
                "continues the study")
    return f"interrupted: run {run_id} is marked KILLED"


def _tag_launching_run(message: str) -> None:
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: the run it made says why
        from skinml.tracking.experiments import tag_launching_run_error

        tag_launching_run_error(message)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages.")
@click.version_option(package_name="skinml")
def main(verbose: bool) -> None:
    """Skin-lesion classification on HAM10000 with MLflow and Optuna."""
    keep_interrupts()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s: %(message)s", force=True)
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


main.add_command(data.data)
main.add_command(bench.bench)
main.add_command(cache.cache)
for command in (*runs.COMMANDS, *models.COMMANDS):
    main.add_command(command)
