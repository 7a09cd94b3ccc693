"""The model server process: `mlflow models serve` (or MLServer, `mlserver.py`) started with
the local environment, waited for, and stopped (for `skinml serve`, benchmarks and tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info

from skinml.core.errors import SkinmlError, first_line
from skinml.serving.mlserver import mlserver_command
from skinml.serving.ports import free_port
from skinml.tracking.store import require_tracking_store, store_hint

# Local servers are reached directly: an http_proxy in the environment (or one urllib cached
# when it first opened a URL) must not swallow requests to 127.0.0.1.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_model_uri(model_uri: str) -> None:
    """One line (SkinmlError) for a model URI that does not resolve, before any server starts."""
    require_tracking_store(model_uri)
    try:
        get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        reason = first_line(exc)
        raise SkinmlError(f"cannot serve {model_uri}: {reason}{store_hint(model_uri)}") \
            from None


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
