"""MLServer (V2 inference protocol) serving a logged model: what `mlflow models serve
--enable-mlserver` did before MLflow 3 dropped it, with skinml's runtime
(`mlserver_runtime.py`: MLflow's one-line refusals, the request limits, both endpoints
batched)."""

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
from skinml.inference.requests import RequestLimits
from skinml.serving.ports import free_port

MLSERVER_MODEL_NAME = "skin-lesion-classifier"  # V2 path: /v2/models/<this>/infer
RUNTIME = "skinml.serving.mlserver_runtime.SkinmlRuntime"
LOAD_FAILURE = "cannot load the model: "  # how the runtime's log says why the model failed

def mlserver_folder(model_uri: str, folder: Path, host: str, port: int,
                    limits: RequestLimits | None = None) -> Path:
    """A folder `mlserver start` serves: the model downloaded, with MLServer's settings.

    The runtime judges each request of both endpoints against `limits` (default: from the
    environment), then the model batches them as under `mlflow models serve`; MLServer's
    own adaptive batching stays off (`mlserver_runtime` says why), as do its debug mode
    (tracebacks in response bodies, a log line per request) and its metrics port.
    """
    try:
        import mlserver_mlflow  # noqa: F401  (an optional extra: one line when it is missing)
    except ImportError:
        raise SkinmlError("--mlserver needs MLServer: pip install 'skinml[mlserver]'") from None
    limits = limits or RequestLimits.from_environment()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
    try:  # the model folder appears whole, settings included, or not at all
        model = model_folder(model_uri, staging)
        (model / "model-settings.json").write_text(json.dumps({
            "name": MLSERVER_MODEL_NAME,
            "implementation": RUNTIME,
            "parameters": {"uri": "./", "extra": {
                "max_rows": limits.max_rows, "max_request_mb": limits.max_mb}},
        }, indent=2))
        # Always "model/" (`skinml cache` reads the MLmodel there), whatever the URI kind.
        shutil.rmtree(folder / "model", ignore_errors=True)
        model.rename(folder / "model")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_atomically(folder / "settings.json", json.dumps({
        "host": host, "http_port": port, "grpc_port": free_port(),
        "debug": False,
        "metrics_endpoint": None,  # no third port; MLServer's /metrics stays off
        "parallel_workers": 0,  # inference in the server process (measured faster on 2 cores)
    }, indent=2))
    return folder


def model_folder(model_uri: str, staging: Path) -> Path:
    """The model downloaded under `staging`: the folder holding its MLmodel.

    A runs:/ URI (or a local path) downloads into a subfolder named after its last part,
    a models:/ URI flat; MLflow returns the path either way.
    """
    path = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(staging)))
    if not (path / "MLmodel").is_file():
        raise SkinmlError(f"cannot serve {model_uri}: it holds no MLmodel file (not a model)")
    return path


def mlserver_command(model_uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The MLServer process serving the model's folder (prepared here), and its environment.

    Batching follows SKINML_SERVE_MAX_BATCH and SKINML_SERVE_MAX_WAIT_MS, the limits
    SKINML_SERVE_MAX_ROWS and SKINML_SERVE_MAX_REQUEST_MB, as under `skinml serve`.
    """
    folder = _folder(model_uri)
    mlserver_folder(model_uri, folder, host, port)
    command = [sys.executable, "-m", "skinml.serving.mlserver_entry", str(folder)]
    return command, dict(os.environ)


def mlserver_log_path(model_uri: str) -> Path:
    """Where `skinml serve --mlserver` keeps the output of a server that failed to start."""
    return _folder(model_uri) / "startup.log"


def _folder(model_uri: str) -> Path:
    return cache_root() / "mlserver" / hashlib.sha256(model_uri.encode()).hexdigest()[:16]
