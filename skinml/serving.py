"""Start, wait for and stop an `mlflow models serve` process (for benchmarks and tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from skinml.errors import SkinmlError, first_line

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


def serve_command(model_uri: str, host: str, port: int, timeout: int | None = None
                  ) -> list[str]:
    """`mlflow models serve` with the local environment; `timeout` (s) cuts a slow request
    with HTTP 504 (MLflow's default: 60)."""
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", host, "-p", str(port)]
    return command + (["-t", str(timeout)] if timeout else [])


def start_server(model_uri: str, port: int, log_path: Path | None = None,
                 timeout: int | None = None) -> subprocess.Popen:
    """`mlflow models serve` on 127.0.0.1:port in its own process group."""
    output = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(serve_command(model_uri, "127.0.0.1", port, timeout),
                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


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
def running_server(model_uri: str) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on a free 127.0.0.1 port; yields its URL."""
    port = free_port()
    process = start_server(model_uri, port)
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
