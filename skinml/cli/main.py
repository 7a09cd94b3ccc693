"""The `skinml` command group: logging set up once, and every SkinmlError one line, exit 2.

Commands live one group per module (`data`, `runs`, `models`, `bench`) and import what they
run inside their own body: `skinml --help` and a mistyped option answer in a fraction of a
second instead of waiting for torch and MLflow to import.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from skinml.cli import bench, data, models, runs
from skinml.core.errors import SkinmlError


class _Cli(click.Group):
    """Turns a SkinmlError anywhere below into `error: <reason>` and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SkinmlError as exc:
            click.echo(f"error: {exc}", err=True)
            if os.environ.get("MLFLOW_RUN_ID"):  # the run `mlflow run` made says why, too
                from skinml.tracking.writer import tag_launching_run_error

                tag_launching_run_error(str(exc))
            ctx.exit(2)


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


main.add_command(data.data)
main.add_command(bench.bench)
for command in (*runs.COMMANDS, *models.COMMANDS):
    main.add_command(command)
