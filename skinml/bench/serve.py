"""Serving benchmarks: REST latency against in-process predict, batch throughput, and
concurrent one-image clients on each endpoint, with and without keep-alive, each load held
against an in-process rate measured beside it."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from skinml.core.errors import SkinmlError
from skinml.inference.requests import encode_image
from skinml.serving.mlserver import MLSERVER_MODEL_NAME
from skinml.serving.server import DIRECT

# The endpoints a load can use: MLflow's scoring protocol (both servers) and the V2
# inference protocol (MLServer).
ENDPOINTS = {"invocations": "/invocations", "v2": f"/v2/models/{MLSERVER_MODEL_NAME}/infer"}


@dataclass(frozen=True)
class ServeLatency:
    model: str  # "arch, N px"
    rest_ms: np.ndarray
    local_ms: np.ndarray
    rest_batch_images_per_second: float
    local_batch_images_per_second: float


def bench_serve(model, image: Path, url: str, requests: int, batch: int) -> ServeLatency:
    """One-image latency over REST vs in-process predict of `model` (a loaded pyfunc), and
    throughput with `batch` images."""
    encoded = encode_image(image.read_bytes())
    client = _KeptConnection(url)

    def post(rows: int) -> None:
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[encoded]] * rows}}).encode()
        if not client.post("/invocations", body):
            raise SkinmlError(f"{url}/invocations did not answer {rows} image(s) with 2xx")

    def local(rows: int) -> None:
        model.predict(pd.DataFrame({"image": [encoded] * rows}))

    rest_ms, local_ms = [], []
    for _ in range(3):  # warm-up
        post(1)
        local(1)
    for _ in range(requests):  # interleaved, so drift hits both alike
        rest_ms.append(_milliseconds(post, 1))
        local_ms.append(_milliseconds(local, 1))
    rounds = max(3, requests // 10)
    # The fastest of three repetitions, for both: a moment of noise on a shared machine
    # should lower neither.
    rest_batch = min(sum(_milliseconds(post, batch) for _ in range(rounds)) for _ in range(3))
    served = model.unwrap_python_model()
    return ServeLatency(f"{served.arch}, {served.preprocess.image_size} px",
                        np.array(rest_ms), np.array(local_ms),
                        batch * rounds / (rest_batch / 1000),
                        in_process_rate(model, image, batch, rounds))


def in_process_rate(model, image: Path, batch: int, rounds: int = 5) -> float:
    """Images/s of in-process `batch`-image predictions: the served ceiling.

    The fastest of three spells of `rounds` batches, after a pause that lets a server's
    spinning OpenMP threads go idle: a ceiling lowered by noise would flatter the server.
    """
    frame = pd.DataFrame({"image": [encode_image(image.read_bytes())] * batch})
    time.sleep(0.5)
    model.predict(frame)  # warm
    seconds = min(sum(_milliseconds(lambda _: model.predict(frame), batch)
                      for _ in range(rounds)) for _ in range(3)) / 1000
    return batch * rounds / seconds


@dataclass(frozen=True)
class PairedLoads:
    """Concurrent loads, each next to the in-process batch rate measured just before it.

    On a shared machine the ceiling drifts by 15 % within minutes (639-815 images/s in one
    afternoon here), so one ceiling against one load says little; each pair's share does.
    """

    loads: list[ConcurrentLoad]
    ceilings: list[float]  # in-process images/s just before each load

    @property
    def shares(self) -> np.ndarray:
        return np.array([load.per_second for load in self.loads]) / np.array(self.ceilings)

    @property
    def per_second(self) -> float:
        return float(np.median([load.per_second for load in self.loads]))

    @property
    def latencies_ms(self) -> np.ndarray:
        return np.concatenate([load.latencies_ms for load in self.loads])

    @property
    def errors(self) -> int:
        return sum(load.errors for load in self.loads)


def bench_paired(model, image: Path, url: str, clients: int, requests: int, batch: int,
                 repeats: int, v2: bool = False, keep_alive: bool = True) -> PairedLoads:
    """`repeats` pairs of (in-process `batch`-image rate, `clients` concurrent clients),
    the two alternating."""
    loads, ceilings = [], []
    for _ in range(repeats):
        ceilings.append(in_process_rate(model, image, batch))
        loads.append(bench_concurrency(image, url, clients, requests, v2=v2,
                                       keep_alive=keep_alive))
    return PairedLoads(loads, ceilings)


def serves_v2(url: str) -> bool:
    """Whether the server at `url` serves the model on the V2 protocol (MLServer)."""
    try:
        with DIRECT.open(f"{url}/v2/models/{MLSERVER_MODEL_NAME}/ready", timeout=10) as reply:
            return reply.status == 200
    except (OSError, http.client.HTTPException):
        return False


def _milliseconds(call, rows: int) -> float:
    started = time.perf_counter()
    call(rows)
    return (time.perf_counter() - started) * 1000


@dataclass(frozen=True)
class ConcurrentLoad:
    clients: int
    requests: int
    seconds: float
    latencies_ms: np.ndarray
    errors: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def bench_concurrency(image: Path, url: str, clients: int, requests: int, v2: bool = False,
                      keep_alive: bool = True) -> ConcurrentLoad:
    """`clients` threads each posting one-image requests until `requests` are answered
    (`v2`: the V2 inference protocol, else MLflow's /invocations).

    With `keep_alive` each client keeps its connection open between requests, as an HTTP
    client library's session does (a clinic viewer, a batch job; a failed request
    reconnects); without, each request opens its own and closes it, as curl and most
    scripts do.
    """
    path = ENDPOINTS["v2" if v2 else "invocations"]
    body = one_image_body(encode_image(image.read_bytes()), v2)
    connections = threading.local()

    def one(_: int) -> tuple[float, bool]:
        started = time.perf_counter()
        try:
            if not keep_alive:
                ok = _post_once(url, path, body)
            else:
                if not hasattr(connections, "client"):
                    connections.client = _KeptConnection(url)
                ok = connections.client.post(path, body)
        except (OSError, http.client.HTTPException):
            if hasattr(connections, "client"):
                del connections.client  # reconnect on the next request
            ok = False
        return (time.perf_counter() - started) * 1000, ok

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up: one request per client
        started = time.perf_counter()
        results = list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - started
    return ConcurrentLoad(clients, requests, seconds, np.array([ms for ms, _ in results]),
                          sum(not ok for _, ok in results))


def one_image_body(encoded: str, v2: bool) -> bytes:
    """A one-image request: the V2 protocol's, or MLflow's `inputs` payload."""
    if v2:
        return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"content_type": "str"},
                                       "data": [encoded]}]}).encode()
    return json.dumps({"inputs": {"image": [encoded]}}).encode()


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None:
        raise ValueError(f"no host in {url!r}")
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)


def _post_once(url: str, path: str, body: bytes) -> bool:
    """One request on a connection of its own, closed after the answer."""
    connection = _connection(url)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json",
                                                "Connection": "close"})
        reply = connection.getresponse()
        reply.read()
        return 200 <= reply.status < 300
    finally:
        connection.close()


class _KeptConnection:
    """One HTTP/1.1 connection reused for every request of one client."""

    def __init__(self, url: str) -> None:
        self.connection = _connection(url)

    def post(self, path: str, body: bytes) -> bool:
        """True for a 2xx answer (read whole, so the connection can carry the next one)."""
        self.connection.request("POST", path, body, {"Content-Type": "application/json"})
        reply = self.connection.getresponse()
        reply.read()
        return 200 <= reply.status < 300
