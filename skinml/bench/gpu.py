"""`skinml bench gpu`: the whole GPU path proven in one command, one row per step.

A GPU is lent rarely and briefly, so every step runs on its own: a failure costs one row
(with its one-line reason), never the rest. The data is synthetic and made on the spot, so
the command needs nothing but the package. `--device cpu` runs the same code on the CPU
with a small model; rows that need CUDA say why they were skipped. Exit status 0 means
every step ran; the targets are reported, not enforced.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from skinml.bench.serve import bench_serve, in_process_rate
from skinml.bench.table import Row, Skipped
from skinml.bench.throughput import bench_loader, bench_train
from skinml.bench.tuning import bench_tune
from skinml.core.config import Config
from skinml.core.errors import first_line
from skinml.data.loader import Batch
from skinml.data.synth import write_synthetic
from skinml.inference.decoder import GPU_DECODE_ENV
from skinml.serving.server import running_server
from skinml.tracking import reader
from skinml.tracking.logged_model import load_model
from skinml.tracking.store import use_store
from skinml.training.checkpoint import Checkpoint, checkpoint_path
from skinml.training.choices import load_run_config
from skinml.training.engine import EpochResult, fit, train_one_epoch
from skinml.training.recipe import LoopSettings
from skinml.workflows.prepared import batches_for, prepare_data
from skinml.workflows.train import build_recipe, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What each step runs: full size on CUDA, a small model on the CPU, less with --quick."""

    device: torch.device
    quick: bool
    images: int
    arch: str
    image_size: int
    cache_size: int
    loader_batch: int
    loader_batches: int
    train_batch: int
    steps: int
    run_epochs: int
    run_image_size: int
    run_compile: bool
    serve_requests: int
    # The compiled train step's backend: inductor, except a quick CPU run, where inductor's
    # C++ code generation alone takes ~45 s; aot_eager still traces the step with dynamo
    # and AOTAutograd (what breaks when the model or the step changes), only without codegen.
    compile_backend: str = "inductor"
    # HAM10000's 600x450 photos; a quick CPU run draws the development set's 200x150, which
    # decode and draw ~9x faster and still exercise the same decode and resize path.
    source_size: tuple[int, int] = (600, 450)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def plan_for(device: torch.device, quick: bool) -> Plan:
    if device.type == "cuda":
        return Plan(device, quick, images=2000, arch="resnext50_32x4d", image_size=224,
                    cache_size=256, loader_batch=64, loader_batches=20 if quick else 50,
                    train_batch=128, steps=15 if quick else 40, run_epochs=2,
                    run_image_size=128 if quick else 224, run_compile=not quick,
                    serve_requests=30 if quick else 100)
    # The CPU check proves the code path, not the speed: the small ResNeXt at 32-64 px.
    return Plan(device, quick, images=200 if quick else 600, arch="resnext_small",
                image_size=64, cache_size=74, loader_batch=32, loader_batches=4 if quick else 10,
                train_batch=32, steps=3 if quick else 10, run_epochs=2, run_image_size=32,
                run_compile=False, serve_requests=8 if quick else 30,
                compile_backend="aot_eager" if quick else "inductor",
                source_size=(200, 150) if quick else (600, 450))


def config_for(plan: Plan, data_dir: Path, work: Path, *extra: str) -> Config:
    size = plan.image_size
    return load_run_config(None, [
        f"data.dir={data_dir}", f"data.cache_size={plan.cache_size}",
        f"model.arch={plan.arch}", "model.pretrained=false", f"model.image_size={size}",
        f"optim.batch_size={plan.loader_batch}", f"runtime.device={plan.device}",
        "runtime.amp=" + ("bf16" if plan.cuda else "off"), "runtime.channels_last=true",
        "runtime.progress=false", f"runtime.checkpoint_dir={work / 'checkpoints'}",
        "runtime.experiment=skinml-bench-gpu", "runtime.bootstrap=100", *extra])


def run_bench(device: torch.device, quick: bool, work: Path) -> list[Row]:
    """Every step in order; each returns its row even when it fails (and logs one line when
    it ends: the table itself is printed after the last step, so no step's log splits it)."""
    plan = plan_for(device, quick)
    work = work.resolve()  # the tuning step's workers run in a folder of their own
    os.environ["SKINML_CACHE"] = str(work / "cache")  # caches and checkpoints stay in `work`
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking  # also for the model server's process
    use_store(tracking)
    data_dir = work / "synthetic"
    shared: dict[str, object] = {}
    steps: list[tuple[str, Callable[[], Row]]] = [
        ("data: synthetic folder", lambda: _synth(plan, data_dir)),
        ("loader: ours vs seed path", lambda: _loader(plan, data_dir, work, shared)),
        ("train step: eager", lambda: _train_step(plan, data_dir, work, shared, False)),
        ("train step: torch.compile", lambda: _train_step(plan, data_dir, work, shared, True)),
        ("fp16 + GradScaler", lambda: _fp16(plan)),
        ("skinml train via MLflow", lambda: _train_run(plan, data_dir, work, shared)),
        ("resume from checkpoint", lambda: _resume(plan, data_dir, work, shared)),
        ("serving: in-process and REST", lambda: _serve(plan, data_dir, shared)),
        ("tuning: 1 vs N workers", lambda: _tune(plan, data_dir, work)),
        ("DDP: 2 processes, NCCL", lambda: _ddp(plan, data_dir, work)),
    ]
    rows = []
    for number, (name, step) in enumerate(steps, start=1):
        rows.append(_measured(name, step, plan))
        log.info("bench gpu step %d/%d, %s: %s in %.1f s", number, len(steps), name,
                 rows[-1].status.partition(":")[0], rows[-1].seconds)
    return rows


def _measured(name: str, step: Callable[[], Row], plan: Plan) -> Row:
    if plan.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(plan.device)
    started = time.perf_counter()
    try:
        row = step()
    except Skipped as why:
        row = Row(name, status=f"skipped: {why}")
    except Exception as exc:  # one step's failure must not cost the others
        row = Row(name, status=f"failed: {type(exc).__name__}: {first_line(exc)}"[:300])
        row.values["traceback"] = traceback.format_exc()[-2000:]
    row.step = name
    row.seconds = time.perf_counter() - started
    if plan.cuda and not row.status.startswith("skipped"):
        row.peak_gpu_mib = torch.cuda.max_memory_allocated(plan.device) / 2**20
    return row


def _synth(plan: Plan, data_dir: Path) -> Row:
    shutil.rmtree(data_dir, ignore_errors=True)
    started = time.perf_counter()
    width, height = plan.source_size
    write_synthetic(data_dir, plan.images, seed=0, width=width, height=height, progress=False)
    seconds = time.perf_counter() - started
    return Row("", figure=f"{plan.images} images {width}x{height} in {seconds:.1f} s",
               values={"images": plan.images, "seconds": seconds})


def _prepared(plan: Plan, data_dir: Path, work: Path, shared: dict):
    """The cache, built once and reused by the loader and train-step rows."""
    if "data" not in shared:
        shared["data"] = prepare_data(config_for(plan, data_dir, work))
    return shared["data"]


def _loader(plan: Plan, data_dir: Path, work: Path, shared: dict) -> Row:
    data = _prepared(plan, data_dir, work, shared)
    config = config_for(plan, data_dir, work)
    workers = os.cpu_count() or 1
    ours, seed = bench_loader(config, plan.loader_batches, workers, data=data)
    ratio = ours.per_second / seed.per_second
    return Row("", figure=f"{ours.per_second:,.0f} vs {seed.per_second:,.0f} img/s",
               ratio=f"{ratio:.1f}x (target >= 20x: {'met' if ratio >= 20 else 'missed'})",
               values={"ours_images_per_second": ours.per_second,
                       "seed_images_per_second": seed.per_second, "ratio": ratio,
                       "seed_workers": workers, "image_size": plan.image_size,
                       "batch": plan.loader_batch})


def _train_step(plan: Plan, data_dir: Path, work: Path, shared: dict, compile_: bool) -> Row:
    data = _prepared(plan, data_dir, work, shared)
    config = config_for(plan, data_dir, work, f"optim.batch_size={plan.train_batch}",
                        f"runtime.compile={str(compile_).lower()}")
    backend = plan.compile_backend if compile_ else "none"
    result = bench_train(config, plan.steps, data=data, compile_backend=plan.compile_backend)
    share = result.end_to_end.per_second / result.ceiling.per_second
    return Row("", figure=f"{result.end_to_end.per_second:,.0f} of "
                          f"{result.ceiling.per_second:,.0f} img/s",
               ratio=f"{100 * share:.0f}% of ceiling (target >= 90%"
                     f"{': met' if share >= 0.9 else ': missed'})",
               values={"end_to_end_images_per_second": result.end_to_end.per_second,
                       "ceiling_images_per_second": result.ceiling.per_second,
                       "share_of_ceiling": share, "warmup_seconds": result.warmup_seconds,
                       "arch": plan.arch, "image_size": plan.image_size,
                       "batch": plan.train_batch, "amp": config.runtime.amp,
                       "compile": str(compile_), "compile_backend": backend})


def _fp16(plan: Plan) -> Row:
    """20 fp16 steps through the engine's GradScaler path: finite loss, a sane scale."""
    torch.manual_seed(0)
    # fp16 on a CPU is emulated and slow: there a few small images prove the path.
    arch, size, batch = (plan.arch, 128, 32) if plan.cuda else ("resnext_small", 16, 4)
    config = load_run_config(None, [
        f"model.arch={arch}", f"model.image_size={size}", "model.crop_pct=1.0",
        f"data.cache_size={size}", "optim.lr=1e-3", "optim.warmup_epochs=0",
        f"optim.batch_size={batch}", "balance.strategy=none", "runtime.amp=fp16",
        "runtime.channels_last=true"])
    recipe = build_recipe(config, np.arange(20 * batch) % 7, plan.device)  # 20 steps an epoch
    model, tools = recipe.model, recipe.tools
    if not tools.precision.scaler.is_enabled():
        raise RuntimeError("amp=fp16 did not enable the GradScaler")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8,
                           generator=generator).to(plan.device)
    labels = torch.randint(0, 7, (batch,), generator=generator).to(plan.device)
    losses = [train_one_epoch(model, [Batch(images, labels, None)], tools).loss for _ in range(20)]
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite fp16 loss: {losses}")
    scale = tools.precision.scaler.get_scale()
    return Row("", figure=f"loss {losses[0]:.3f} -> {losses[-1]:.3f}",
               ratio=f"scale {scale:g}", values={"first_loss": losses[0],
                                                 "last_loss": losses[-1], "scale": scale})


def _run_config(plan: Plan, data_dir: Path, work: Path, epochs: int, *extra: str) -> Config:
    size = plan.run_image_size
    return config_for(plan, data_dir, work, f"model.image_size={size}",
                      f"data.cache_size={max(plan.cache_size, round(size / 0.875))}",
                      f"optim.epochs={epochs}", "optim.warmup_epochs=0.5",
                      f"optim.batch_size={plan.loader_batch}", "optim.ema_decay=0.99",
                      f"runtime.compile={str(plan.run_compile).lower()}", *extra)


def _train_run(plan: Plan, data_dir: Path, work: Path, shared: dict) -> Row:
    # The next row resumes from this run's checkpoint: keep it past the finished run.
    config = _run_config(plan, data_dir, work, plan.run_epochs, "runtime.keep_checkpoint=true")
    started = time.perf_counter()
    result = train(config, data=_prepared(plan, data_dir, work, shared))  # the same cache
    seconds = time.perf_counter() - started
    run = reader.get_run(result.run_id)
    artifacts = reader.artifact_names(result.run_id)
    needed = {"config.yaml", "confusion_matrix.png", "classification_report.txt"}
    if run.info.status != "FINISHED" or not needed <= artifacts:
        raise RuntimeError(f"run {result.run_id} is {run.info.status}; missing artifacts: "
                           f"{sorted(needed - artifacts)}")
    shared.update(run_id=result.run_id, model_uri=result.model_uri, config=config)
    return Row("", figure=f"{plan.run_epochs} epochs in {seconds:.1f} s",
               ratio=f"val bal. acc. {result.val_balanced_accuracy:.3f}",
               values={"seconds": seconds, "run_id": result.run_id,
                       "artifacts": len(artifacts), "image_size": plan.run_image_size,
                       "compile": str(plan.run_compile), "ema_decay": 0.99,
                       "amp": config.runtime.amp})


def _resume(plan: Plan, data_dir: Path, work: Path, shared: dict) -> Row:
    """Load the run's last checkpoint on the device and train one epoch more."""
    if "run_id" not in shared:
        raise RuntimeError("no training run to resume (the row above failed)")
    # Compiling again would only time the compiler; the checkpoint is what is checked here.
    config = _run_config(plan, data_dir, work, plan.run_epochs + 1, "runtime.compile=false")
    path = checkpoint_path(config, shared["run_id"])
    data = _prepared(plan, data_dir, work, shared)
    if data.config != config.data:
        data = prepare_data(config)
    clinical = config.model.metadata != "none"
    train = batches_for(data, "train", config.optim.batch_size, plan.device, clinical)
    val = batches_for(data, "val", config.runtime.eval_batch_size, plan.device, clinical)
    epochs: list[EpochResult] = []
    started = time.perf_counter()
    recipe = build_recipe(config, train.labels, plan.device)
    checkpoint = Checkpoint(path, config.to_dict())
    fit(recipe.model, recipe.tools, train, val, LoopSettings.from_config(config), checkpoint,
        state=checkpoint.restore(recipe.model, recipe.tools), on_epoch_end=epochs.append)
    seconds = time.perf_counter() - started
    if [e.epoch for e in epochs] != [plan.run_epochs + 1]:
        raise RuntimeError(f"resumed run trained epochs {[e.epoch for e in epochs]}, "
                           f"expected [{plan.run_epochs + 1}]")
    return Row("", figure=f"epoch {epochs[0].epoch} in {seconds:.1f} s",
               ratio=f"val bal. acc. {epochs[0].val['balanced_accuracy']:.3f}",
               values={"seconds": seconds, "epoch": epochs[0].epoch})


def _serve(plan: Plan, data_dir: Path, shared: dict) -> Row:
    if "model_uri" not in shared:
        raise RuntimeError("no logged model to serve (the training row failed)")
    image = next(iter(sorted(data_dir.glob("*.jpg"))))
    model_uri = str(shared["model_uri"])
    with running_server(model_uri) as url:
        result = bench_serve(load_model(model_uri), image, url, plan.serve_requests, 64)
    rest50, local50 = float(np.median(result.rest_ms)), float(np.median(result.local_ms))
    gpu_decode = _gpu_decode_rate(model_uri, image) if plan.cuda else None
    decoded = (f", {gpu_decode:,.0f} with GPU JPEG decode (target >= 1,500 for ResNeXt-50 "
               "at 224 px)" if gpu_decode else "")
    return Row("", figure=f"{result.local_batch_images_per_second:,.0f} img/s in-process "
                          f"(64-image requests){decoded}",
               ratio=f"p50 1 image: {local50:.1f} ms in-process, {rest50:.1f} ms REST",
               values={"in_process_images_per_second": result.local_batch_images_per_second,
                       "in_process_gpu_decode_images_per_second": gpu_decode,
                       "rest_images_per_second": result.rest_batch_images_per_second,
                       "in_process_p50_ms": local50, "rest_p50_ms": rest50,
                       "requests": plan.serve_requests})


def _gpu_decode_rate(model_uri: str, image: Path) -> float:
    """In-process 64-image predictions with the JPEGs decoded batched on the GPU."""
    os.environ[GPU_DECODE_ENV] = "1"  # read when the model loads
    try:
        model = load_model(model_uri)
    finally:
        del os.environ[GPU_DECODE_ENV]
    return in_process_rate(model, image, 64)


def _tune(plan: Plan, data_dir: Path, work: Path) -> Row:
    """The same study with 1 worker and with several on this device: trials per hour, and
    each trial's time outside its epochs."""
    workers, trials = (3, 6 if plan.quick else 9) if plan.cuda else (2, 2)
    # a quick CPU run proves the path: one short epoch a trial (process start-up dominates)
    epochs, size = (1, plan.run_image_size) if plan.quick and not plan.cuda else (
        2, plan.image_size)
    items = [f"data.dir={data_dir}", f"data.cache_size={plan.cache_size}",
             f"model.arch={plan.arch}", "model.pretrained=false",
             f"model.image_size={size}", f"optim.batch_size={plan.loader_batch}",
             f"optim.epochs={epochs}", "runtime.progress=false", "runtime.bootstrap=100",
             "runtime.experiment=skinml-bench-gpu-tune"]
    one, many = bench_tune("demo", items, trials, [1, workers], work / "tune")
    ratio = many.per_hour / one.per_hour
    goal = "target >= 2x: " + ("met" if ratio >= 2 else "missed") if plan.cuda else "CPU"
    return Row("", figure=f"{many.per_hour:,.0f} vs {one.per_hour:,.0f} trials/h",
               ratio=f"{ratio:.2f}x with {workers} workers ({goal})",
               values={"workers": workers, "trials": trials, "epochs": epochs,
                       "trials_per_hour_1": one.per_hour,
                       "trials_per_hour_n": many.per_hour, "ratio": ratio,
                       "outside_epochs_median_1": one.median_outside,
                       "outside_epochs_median_n": many.median_outside,
                       "epochs_seconds_median_1": float(np.median(one.in_epochs)),
                       "startup_seconds_n": many.startup_seconds,
                       "arch": plan.arch, "image_size": size})


def _ddp(plan: Plan, data_dir: Path, work: Path) -> Row:
    if not plan.cuda:
        raise Skipped("needs CUDA (NCCL); the CPU's gloo path is tested in the suite")
    if torch.cuda.device_count() < 2:
        raise Skipped(f"{torch.cuda.device_count()} GPU")
    config = _run_config(plan, data_dir, work, 1).to_dict()
    config["runtime"]["device"] = "auto"  # each rank takes its own GPU
    path = work / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "skinml", "train", "--nproc", "2",
                           "--config", str(path)], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"skinml train --nproc 2 exited {done.returncode}: {tail}")
    return Row("", figure=f"1 epoch in {seconds:.1f} s", values={"seconds": seconds})
