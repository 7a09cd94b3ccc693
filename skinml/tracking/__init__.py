"""The seam to MLflow's tracking API, as Lightning's loggers are: the run writer, the run
reader, the logged pyfunc model (with its request coalescer), and retries of racing
creates. No other layer but the registry and serving imports MLflow."""

import os
import sys

# MLflow draws a tqdm bar for every artifact download, also into a log file or a pipe,
# where each redraw is a line. Off unless stderr is a terminal (the user's own setting of
# MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins); set here, before any download, so library use
# (a notebook, a script) gets it as well as the CLI.
if not (sys.stderr and sys.stderr.isatty()):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
