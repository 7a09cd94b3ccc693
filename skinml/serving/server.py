"""The model server process: `mlflow models serve` (or MLServer, `mlserver.py`) started with
the local environment, waited for, and stopped (for `skinml serve`, benchmarks and tests)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info

from skinml.core.errors import SkinmlError, first_line
from skinml.data.cache import cache_root
from skinml.serving.mlserver import LOAD_FAILURE, mlserver_command
from skinml.serving.ports import free_port
from skinml.tracking.store import require_tracking_store, store_hint

# Local servers are reached directly: an http_proxy in the environment (or one urllib cached
# when it first opened a URL) must not swallow requests to 127.0.0.1.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_model_uri(model_uri: str) -> None:
    """One line (SkinmlError) for a model URI that does not resolve, before any server starts.

    A model folder on disk is checked on disk: MLflow's model info would look its logged
    model up in the tracking store (making an empty `mlflow.db` where there is none), and a
    folder copied from another store would be refused though it serves.
    """
    folder = local_model_folder(model_uri)
    if folder is not None:
        if not (folder / "MLmodel").is_file():
            raise SkinmlError(f"cannot serve {model_uri}: {folder} holds no MLmodel file "
                              "(not a model folder)")
        return
    require_tracking_store(model_uri)
    try:
        get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        reason = first_line(exc)
        raise SkinmlError(f"cannot serve {model_uri}: {reason}{store_hint(model_uri)}") \
            from None


def local_model_folder(model_uri: str) -> Path | None:
    """The folder a plain path or file:// URI names; None for other URIs."""
    if model_uri.startswith("file://"):
        return Path(urllib.parse.urlsplit(model_uri).path)
    return None if "://" in model_uri or model_uri.startswith(("models:/", "runs:/")) \
        else Path(model_uri)


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


def wait_ready(process: subprocess.Popen, port: int, timeout: float = 120.0,
               host: str = "127.0.0.1") -> None:
    """Poll /ping until it answers 200 (MLflow's and skinml's MLServer runtime answer so once
    the model is loaded); SkinmlError if the server dies or never answers."""
    if host in ("", "0.0.0.0", "::"):  # every interface: this machine's loopback answers
        host = "127.0.0.1"
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/ping"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SkinmlError(f"model server exited with code {process.returncode} "
                              "before answering /ping")
        try:
            with DIRECT.open(url, timeout=2) as reply:
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


def serve_until_stopped(command: list[str], env: dict[str, str], host: str, port: int,
                        model_uri: str, on_ready: Callable[[], None], log_path: Path,
                        timeout: float = 600.0) -> int:
    """Run a server of `model_uri` in the foreground: `on_ready()` once it answers /ping,
    then its output and finally its exit code; SkinmlError with the server's own reason
    (one line; the whole output in `log_path`) if it ends before it is ready.

    The server runs in a process group of its own: Ctrl-C (and SIGTERM) reach skinml, which
    stops the whole group (`_end`), so no worker of the server is left behind and a server
    slow to stop is stopped harder.
    """
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    output = ServerOutput(cast(BinaryIO, process.stdout), sys.stderr.buffer)  # stdout=PIPE
    previous = signal.signal(signal.SIGTERM, lambda *_: _signal_group(process, signal.SIGINT))
    try:
        try:
            wait_ready(process, port, timeout=timeout, host=host)
        except SkinmlError as exc:
            _end(process)
            output.join()
            log_path.write_bytes(b"".join(output.kept))
            raise SkinmlError(f"cannot serve {model_uri}: {output.reason() or exc} (the "
                              f"server's output: {log_path})") from None
        output.pass_through()
        on_ready()
        return process.wait()
    except KeyboardInterrupt:
        _end(process)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def server_log_path(model_uri: str) -> Path:
    """Where `skinml serve` keeps the output of an `mlflow models serve` that failed to start."""
    digest = hashlib.sha256(model_uri.encode()).hexdigest()[:16]
    path = cache_root() / "logs" / f"serve-{digest}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


STOP_STEPS = ((signal.SIGINT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0))


def _end(process: subprocess.Popen) -> None:
    """Stop the server's whole process group: SIGINT (a graceful stop), SIGTERM if it is
    still there after 5 s, SIGKILL after 5 s more (MLServer alone took 20 s on SIGINT)."""
    for signum, seconds in STOP_STEPS:
        if process.poll() is not None:
            break
        _signal_group(process, signum)
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            continue
    _signal_group(process, signal.SIGKILL)  # workers the server itself left behind


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


class ServerOutput:
    """A server's output read on a thread: kept until it is passed through (then the kept
    lines first), so a server that fails to start can be reported in one line."""

    def __init__(self, stream: BinaryIO, sink: BinaryIO, keep: int = 2000) -> None:
        self.kept: collections.deque[bytes] = collections.deque(maxlen=keep)
        self._stream, self._sink = stream, sink
        self._passing = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True,
                                        name="skinml-server-output")
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stream:
            with self._lock:
                if self._passing:
                    self._sink.write(line)
                    self._sink.flush()
                else:
                    self.kept.append(line)

    def pass_through(self) -> None:
        with self._lock:
            self._sink.write(b"".join(self.kept))
            self._sink.flush()
            self._passing = True

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)

    def reason(self) -> str | None:
        """The server's reason for ending: the runtime's one line about the model, else the
        last exception line of a traceback."""
        lines = [line.decode(errors="replace").rstrip() for line in self.kept]
        for line in reversed(lines):
            if LOAD_FAILURE in line:
                return "the model did not load: " + line.split(LOAD_FAILURE, 1)[1]
        for line in reversed(lines):
            if EXCEPTION_LINE.match(line):
                return line
        return None


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")
