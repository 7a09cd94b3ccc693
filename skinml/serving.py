"""Start, wait for and stop an `mlflow models serve` process (for benchmarks and tests)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from skinml.errors import SkinmlError, first_line
from skinml.files import write_atomically

# Local servers are reached directly: an http_proxy in the environment (or one urllib cached
# when it first opened a URL) must not swallow requests to 127.0.0.1.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_model_uri(model_uri: str) -> None:
    """One line (SkinmlError) for a model URI that does not resolve, before any server starts."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from skinml.run_store import require_tracking_store

    require_tracking_store(model_uri)
    try:
        get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        reason = first_line(exc)
        raise SkinmlError(f"cannot serve {model_uri}: {reason}") from None


def check_port_free(host: str, port: int) -> None:
    """SkinmlError at once if another program holds host:port (the server would say so only
    after loading the model, buried in a traceback)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SkinmlError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (another "
                              "program holds the port; choose one with --port)") from None


def default_workers() -> int:
    """Server processes for `skinml serve`: two per CPU core, at most 4.

    MLflow's scoring server spends milliseconds of Python per request (HTTP, JSON, pandas,
    schema check) under one GIL; separate processes overlap that work with each other's
    forward passes on every core (README, "Serving under load", has the measurements).
    """
    return max(1, min(4, 2 * (os.cpu_count() or 1)))


def serve_command(model_uri: str, host: str, port: int, timeout: int | None = None,
                  workers: int = 1) -> tuple[list[str], dict[str, str]]:
    """`mlflow models serve` with the local environment, and its environment.

    `timeout` (s) cuts a slow request with HTTP 504 (MLflow's default: 60). With several
    `workers` each gets an equal share of the cores for torch (OMP_NUM_THREADS, unless set):
    N workers with all cores each would fight over them.
    """
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", host, "-p", str(port), "-w", str(workers)]
    env = dict(os.environ)
    if workers > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return command + (["-t", str(timeout)] if timeout else []), env


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
    import mlflow

    try:
        import mlserver_mlflow  # noqa: F401
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
    would judge a whole merged batch: they are off there (a proxy's body limit belongs in
    front). Batching follows SKINML_SERVE_MAX_BATCH and SKINML_SERVE_MAX_WAIT_MS.
    """
    from skinml.batching import batch_settings
    from skinml.data.cache import cache_root
    from skinml.packaging import MAX_REQUEST_MB_ENV, MAX_ROWS_ENV

    max_batch, max_wait = batch_settings(default_max_batch=MLSERVER_MAX_BATCH)
    folder = cache_root() / "mlserver" / hashlib.sha256(model_uri.encode()).hexdigest()[:16]
    mlserver_folder(model_uri, folder, host, port, max_batch, max_wait * 1000)
    command = [sys.executable, "-c", "import sys; from mlserver.cli import main; sys.exit(main())",
               "start", str(folder)]
    return command, {**os.environ, MAX_ROWS_ENV: "0", MAX_REQUEST_MB_ENV: "0"}


def start_server(model_uri: str, port: int, log_path: Path | None = None,
                 timeout: int | None = None, mlserver: bool = False, workers: int = 1
                 ) -> subprocess.Popen:
    """`mlflow models serve` (or MLServer) on 127.0.0.1:port in its own process group."""
    output = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    if mlserver:
        command, env = mlserver_command(model_uri, "127.0.0.1", port)
    else:
        command, env = serve_command(model_uri, "127.0.0.1", port, timeout, workers)
    return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_ready(process: subprocess.Popen, port: int, timeout: float = 120.0) -> None:
    """Poll /ping until it answers 200; SkinmlError if the server dies or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SkinmlError(f"model server exited with code {process.returncode} "
                              "before answering /ping")
        try:
            with DIRECT.open(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise SkinmlError(f"model server on port {port} did not answer /ping in {timeout:.0f} s")


@contextlib.contextmanager
def running_server(model_uri: str, mlserver: bool = False, workers: int = 1) -> Iterator[str]:
    """`mlflow models serve` (or MLServer) of `model_uri` on a free 127.0.0.1 port; yields
    its URL."""
    port = free_port()
    process = start_server(model_uri, port, mlserver=mlserver, workers=workers)
    try:
        wait_ready(process, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server and its workers by PID (the whole process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
