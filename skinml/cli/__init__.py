"""The `skinml` command line (click), one module per command group."""

from skinml.cli.main import main

__all__ = ["main"]
