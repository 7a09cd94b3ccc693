"""Benchmarks: our input pipeline against the seed's per-image path, and training vs its ceiling.

Numbers depend on the machine; the CLI prints them with the device and CPU count so they
can be quoted honestly. Targets: loader >= 20x the seed path, training >= 90% of the
ceiling on a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from skinml.core.config import Config
from skinml.data.errors import DataError
from skinml.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from skinml.training.balance import epoch_order
from skinml.training.device import resolve_device, synchronize
from skinml.training.engine import train_one_epoch
from skinml.training.recipe import build_augment, preprocess_of
from skinml.workflows.prepared import PreparedData, batches_for, prepare_data
from skinml.workflows.train import build_recipe


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
    if started is None:
        raise ValueError(f"{name}: no batch came after the {warmup} warm-up ones")
    return Throughput(name, images, time.perf_counter() - started)


def bench_loader(config: Config, batches: int, workers: int, data: PreparedData | None = None
                 ) -> tuple[Throughput, Throughput]:
    """(ours, seed): images/s decoded, augmented and batched on the training device."""
    data = data or prepare_data(config)
    device = resolve_device(config.runtime.device)
    train = batches_for(data, "train", config.optim.batch_size, device)
    augment = build_augment(config.augment, preprocess_of(config)).to(device)

    def ours() -> Iterator:
        while True:
            generator = torch.Generator().manual_seed(0)
            for x, y, _ in train.epoch(epoch_order(train.labels, config.balance, generator)):
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
    train = batches_for(data, "train", config.optim.batch_size, device,
                        clinical=config.model.metadata != "none")
    if len(train.labels) < config.optim.batch_size:  # steps drop the last partial batch
        raise DataError(f"{data.source}: the training split has {len(train.labels)} images, "
                        f"fewer than one batch (optim.batch_size={config.optim.batch_size})")
    torch.manual_seed(0)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                   pretrained=False))
    recipe = build_recipe(config, train.labels, device)  # exactly what training builds
    model, tools = recipe.model, recipe.tools
    runner = model
    if config.runtime.compile:  # torch types the compiled Module as a callable; it is a Module
        runner = cast(nn.Module, torch.compile(model, backend=compile_backend))
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
    batch = next(iter(train.epoch(np.arange(config.optim.batch_size))))
    while True:
        yield batch


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


