"""MLServer (V2 inference protocol, adaptive batching) serving a logged model: what
`mlflow models serve --enable-mlserver` did before MLflow 3 dropped it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow

from skinml.core.errors import SkinmlError
from skinml.core.files import write_atomically
from skinml.data.cache import cache_root
from skinml.serving.ports import free_port
from skinml.tracking.coalescer import batch_settings

MLSERVER_MODEL_NAME = "skin-lesion-classifier"  # V2 path: /v2/models/<this>/infer


# MLServer's adaptive batching waits `max_batch_time` unless a batch is full, so its batch
# should be about the number of concurrent clients (measured on 2 cores, 16 one-image
# clients: 16 rows 456 requests/s, 64 rows 399, 8 rows 361).
MLSERVER_MAX_BATCH = 16


def mlserver_folder(model_uri: str, folder: Path, host: str, port: int, max_batch: int,
                    max_wait_ms: float) -> Path:
    """A folder `mlserver start` serves: the model downloaded with MLServer's settings.

    What `mlflow models serve --enable-mlserver` did before MLflow 3 dropped it: the
    `mlserver_mlflow.MLflowRuntime` with MLServer's adaptive batching (V2 requests that
    arrive within `max_wait_ms` are run as one `predict` of up to `max_batch` rows).
    """
    try:
        import mlserver_mlflow  # noqa: F401  (an optional extra: one line when it is missing)
    except ImportError:
        raise SkinmlError("--mlserver needs MLServer: pip install 'skinml[mlserver]'") from None
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
    try:  # the model folder appears whole, settings included, or not at all
        mlflow.artifacts.download_artifacts(model_uri, dst_path=str(staging))
        (staging / "model-settings.json").write_text(json.dumps({
            "name": MLSERVER_MODEL_NAME,
            "implementation": "mlserver_mlflow.MLflowRuntime",
            "max_batch_size": max_batch,
            "max_batch_time": max_wait_ms / 1000,
            "parameters": {"uri": "./"},
        }, indent=2))
        shutil.rmtree(folder / "model", ignore_errors=True)
        staging.rename(folder / "model")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_atomically(folder / "settings.json", json.dumps({
        "host": host, "http_port": port, "grpc_port": free_port(),
        "metrics_endpoint": None,  # no third port; MLServer's /metrics stays off
        "parallel_workers": 0,  # inference in the server process (measured faster on 2 cores)
    }, indent=2))
    return folder


def mlserver_command(model_uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """`mlserver start` of the model's folder (prepared here), and its environment.

    MLServer merges requests before the model sees them, so the model's per-request limits
    would judge a whole merged batch: the model applies them only behind MLflow's scoring
    server, not here (a proxy's body limit belongs in front). Batching follows
    SKINML_SERVE_MAX_BATCH and SKINML_SERVE_MAX_WAIT_MS.
    """
    max_batch, max_wait = batch_settings(default_max_batch=MLSERVER_MAX_BATCH)
    folder = cache_root() / "mlserver" / hashlib.sha256(model_uri.encode()).hexdigest()[:16]
    mlserver_folder(model_uri, folder, host, port, max_batch, max_wait * 1000)
    command = [sys.executable, "-c", "import sys; from mlserver.cli import main; sys.exit(main())",
               "start", str(folder)]
    return command, dict(os.environ)
