"""Benchmarks: our input pipeline against the seed's per-image path, and training vs its ceiling.

Numbers depend on the machine; the CLI prints them with the device and CPU count so they
can be quoted honestly. Targets: loader >= 20x the seed path, training >= 90% of the
ceiling on a GPU.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import platform
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from skinml.balance import epoch_order
from skinml.config import Config
from skinml.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from skinml.device import resolve_device, synchronize
from skinml.engine import train_one_epoch
from skinml.errors import SkinmlError
from skinml.model import build_model
from skinml.recipe import TrainSettings, build_augment, build_step_tools
from skinml.train import PreparedData, batches_for, prepare_data


@dataclass(frozen=True)
class Throughput:
    name: str
    images: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.images / self.seconds


class _SeedDataset(Dataset):
    """The seed project's path: open the JPEG and transform it, per image, every epoch."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int, config) -> None:
        self.paths, self.labels = paths, labels
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(config.scale_min, config.scale_max)),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
            v2.RandomRotation(config.rotation),
            v2.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def _timed(name: str, batches: Iterator, count: int, device: torch.device, warmup: int = 2
           ) -> Throughput:
    images, started = 0, None
    for i, (x, _) in enumerate(batches):
        if i == warmup:
            synchronize(device)
            started = time.perf_counter()
        if i >= warmup:
            images += len(x)
        if i + 1 >= warmup + count:
            break
    synchronize(device)
    return Throughput(name, images, time.perf_counter() - started)


def bench_loader(config: Config, batches: int, workers: int, data: PreparedData | None = None
                 ) -> tuple[Throughput, Throughput]:
    """(ours, seed): images/s decoded, augmented and batched on the training device."""
    data = data or prepare_data(config)
    device = resolve_device(config.runtime.device)
    train = batches_for(data, "train", config.optim.batch_size, device)
    augment = build_augment(TrainSettings.from_config(config)).to(device)

    def ours() -> Iterator:
        while True:
            generator = torch.Generator().manual_seed(0)
            for x, y in train.epoch(epoch_order(train.labels, config.balance, generator)):
                yield augment(x, y)

    chosen = data.frame[data.split == "train"]
    seed_set = _SeedDataset(chosen["path"].tolist(), chosen["label"].to_numpy(),
                            config.model.image_size, config.augment)
    loader = DataLoader(seed_set, batch_size=config.optim.batch_size, shuffle=True,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)

    def seed() -> Iterator:
        while True:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return (_timed("skinml cache + on-device augment", ours(), batches, device),
            _timed(f"seed: PIL + torchvision per image, {workers} workers", seed(), batches,
                   device))


@dataclass(frozen=True)
class TrainBench:
    end_to_end: Throughput  # cache -> on-device augment -> step
    ceiling: Throughput  # the same steps on one batch already on the device
    warmup_seconds: float  # the first steps, torch.compile's compilation included


def bench_train(config: Config, steps: int, data: PreparedData | None = None,
                compile_backend: str = "inductor") -> TrainBench:
    """Training images/s from the cache vs from a batch already on the device.

    One model serves both feeds (compiled once when `runtime.compile` is on, with
    `compile_backend`), so the only difference between the two figures is where the
    batches come from.
    """
    data = data or prepare_data(config)
    device = resolve_device(config.runtime.device)
    train = batches_for(data, "train", config.optim.batch_size, device)
    torch.manual_seed(0)
    settings = TrainSettings.from_config(config)
    model = build_model(dataclasses.replace(config.model, pretrained=False))
    model.to(device, memory_format=settings.memory_format)
    tools = build_step_tools(model, train.labels, settings, device, steps)
    runner = torch.compile(model, backend=compile_backend) if settings.compile else model
    started = time.perf_counter()
    train_one_epoch(runner, _take(_device_batches(train, config), 3), tools)
    synchronize(device)
    warmup = time.perf_counter() - started
    results = {}
    for name, feed in (("ceiling (one batch already on the device)", _device_batches),
                       ("end to end (cache -> augment -> step)", _cache_batches)):
        batches = feed(train, config)
        train_one_epoch(runner, _take(batches, 2), tools)  # this feed's own warm-up
        stats = train_one_epoch(runner, _take(batches, steps), tools)
        results[feed] = Throughput(name, stats.images, stats.seconds)
    return TrainBench(results[_cache_batches], results[_device_batches], warmup)


def _cache_batches(train, config: Config) -> Iterator:
    while True:
        generator = torch.Generator().manual_seed(0)
        yield from train.epoch(epoch_order(train.labels, config.balance, generator),
                               drop_last=True)


def _device_batches(train, config: Config) -> Iterator:
    # One real batch, kept on the device: no loading at all. The augment still runs in
    # the step (it is part of the model's work on the device), so only the feed differs.
    x, y = next(iter(train.epoch(np.arange(config.optim.batch_size))))
    while True:
        yield x, y


def _take(iterator: Iterator, count: int) -> Iterator:
    for _, item in zip(range(count), iterator, strict=False):
        yield item


def machine() -> str:
    device = resolve_device("auto")
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    return f"{gpu}{cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def cpu_name() -> str:
    """The CPU's model name: numbers measured here only hold on the same kind of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
    import base64
    import json

    import pandas as pd

    encoded = base64.b64encode(image.read_bytes()).decode()
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
    import base64

    import pandas as pd

    frame = pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode()] * batch})
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
                 repeats: int, v2: bool = False) -> PairedLoads:
    """`repeats` pairs of (in-process `batch`-image rate, `clients` concurrent clients)."""
    loads, ceilings = [], []
    for _ in range(repeats):
        ceilings.append(in_process_rate(model, image, batch))
        loads.append(bench_concurrency(image, url, clients, requests, v2=v2))
    return PairedLoads(loads, ceilings)


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


def bench_concurrency(image: Path, url: str, clients: int, requests: int, v2: bool = False
                      ) -> ConcurrentLoad:
    """`clients` threads each posting one-image requests until `requests` are answered
    (`v2`: MLServer's V2 inference protocol, whose requests its adaptive batching merges).

    Each client keeps its connection open between requests, as an HTTP client library's
    session does (a clinic viewer, a batch job); a failed request reconnects.
    """
    import base64
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from skinml.serving import MLSERVER_MODEL_NAME

    encoded = base64.b64encode(image.read_bytes()).decode()
    if v2:
        path = f"/v2/models/{MLSERVER_MODEL_NAME}/infer"
        body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"content_type": "str"},
                                       "data": [encoded]}]}).encode()
    else:
        path, body = "/invocations", json.dumps({"inputs": {"image": [encoded]}}).encode()
    connections = threading.local()

    def one(_: int) -> tuple[float, bool]:
        started = time.perf_counter()
        try:
            if not hasattr(connections, "client"):
                connections.client = _KeptConnection(url)
            ok = connections.client.post(path, body)
        except (OSError, http.client.HTTPException):
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


class _KeptConnection:
    """One HTTP/1.1 connection reused for every request of one client."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)

    def post(self, path: str, body: bytes) -> bool:
        """True for a 2xx answer (read whole, so the connection can carry the next one)."""
        self.connection.request("POST", path, body, {"Content-Type": "application/json"})
        reply = self.connection.getresponse()
        reply.read()
        return 200 <= reply.status < 300
