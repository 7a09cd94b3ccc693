"""`skinml bench`: loader, training-step, serving and whole-GPU-path benchmarks."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from skinml.cli.options import blank_is_none


@click.group()
def bench() -> None:
    """Measure the input pipeline and training throughput on this machine."""


_BENCH_CONFIG = click.option(
    "--config", "config_path", help="YAML config or a shipped name [default: ham10000 on a "
    "CUDA machine (ResNeXt-50, 224 px), demo elsewhere (minutes, not hours, on a CPU)].")
_BENCH_SETS = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                           help="Config overrides, e.g. --set model.image_size=128.")
_BENCH_DATA = click.option("--data-dir", callback=blank_is_none,
                           help="HAM10000 folder [default: the bundled sample].")


def _bench_overrides(config_path: str | None, data_dir: str | None, sets: tuple[str, ...]
                     ) -> tuple[str, list[str]]:
    """The config a benchmark runs: (config name or path, overrides)."""
    import torch

    config_path = config_path or ("ham10000" if torch.cuda.is_available() else "demo")
    # Benchmarks never download weights: throughput does not depend on them.
    items = ["model.pretrained=false", "runtime.progress=false", *sets]
    if data_dir:
        items.append(f"data.dir={data_dir}")
    return config_path, items


def _bench_config(config_path: str | None, data_dir: str | None, sets: tuple[str, ...]):
    from skinml.training.choices import load_run_config

    return load_run_config(*_bench_overrides(config_path, data_dir, sets))


@bench.command("loader")
@_BENCH_CONFIG
@_BENCH_DATA
@_BENCH_SETS
@click.option("--batches", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=os.cpu_count() or 1, show_default=True,
              type=click.IntRange(min=0), help="DataLoader workers for the seed's path.")
def bench_loader(config_path: str | None, data_dir: str | None, sets: tuple[str, ...], batches: int,
                 workers: int) -> None:
    """Images/s delivered (decoded, augmented, batched): ours vs the seed's per-image path."""
    from skinml.bench.throughput import bench_loader as run
    from skinml.bench.throughput import machine

    config = _bench_config(config_path, data_dir, sets)
    click.echo(f"measuring {batches} batches of {config.optim.batch_size} at "
               f"{config.model.image_size} px, ours then the seed path ({workers} workers)",
               err=True)
    ours, seed = run(config, batches, workers)
    click.echo(f"machine: {machine()}; {config.model.image_size} px, batch "
               f"{config.optim.batch_size}, {batches} batches")
    for result in (ours, seed):
        click.echo(f"{result.per_second:10.1f} images/s  {result.name}")
    click.echo(f"ratio: {ours.per_second / seed.per_second:.1f}x (target >= 20x)")


@bench.command("train")
@_BENCH_CONFIG
@_BENCH_DATA
@_BENCH_SETS
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1))
def bench_train(config_path: str | None, data_dir: str | None, sets: tuple[str, ...],
                steps: int) -> None:
    """Training images/s end to end vs the same model fed from tensors on the device."""
    from skinml.bench.throughput import bench_train as run
    from skinml.bench.throughput import machine

    config = _bench_config(config_path, data_dir, sets)
    click.echo(f"measuring {steps} steps of {config.model.arch} at {config.model.image_size} px"
               f"{', compiling first' if config.runtime.compile else ''}", err=True)
    result = run(config, steps)
    end_to_end, ceiling = result.end_to_end, result.ceiling
    click.echo(f"machine: {machine()}; {config.model.arch}, {config.model.image_size} px, "
               f"batch {config.optim.batch_size}, amp {config.runtime.amp}, channels_last "
               f"{config.runtime.channels_last}, compile {config.runtime.compile}")
    for throughput in (end_to_end, ceiling):
        click.echo(f"{throughput.per_second:10.1f} images/s  {throughput.name}")
    click.echo(f"end to end / ceiling: {100 * end_to_end.per_second / ceiling.per_second:.0f}% "
               "(target >= 90% on a GPU)")


@bench.command("tune")
@_BENCH_CONFIG
@_BENCH_DATA
@_BENCH_SETS
@click.option("--trials", default=6, show_default=True, type=click.IntRange(min=2),
              help="COMPLETE trials of each study.")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1),
              help="Epochs of each trial (optim.epochs).")
@click.option("--workers", "counts", default="1,2", show_default=True, metavar="N[,N...]",
              help="Worker counts to compare, each a study of its own (the first is the "
                   "baseline of the speed-up).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the studies' stores here [default: a temp folder].")
def bench_tune(config_path: str | None, data_dir: str | None, sets: tuple[str, ...],
               trials: int, epochs: int, counts: str, work_dir: Path | None) -> None:
    """Trials per hour with 1 worker against N on this machine, and each trial's time
    outside its epochs (what a study pays beyond training)."""
    import tempfile

    from skinml.bench.throughput import machine
    from skinml.bench.tuning import bench_tune as run
    from skinml.bench.tuning import timing_lines

    worker_counts = _client_counts(counts, "--workers")
    if not worker_counts:
        raise click.BadParameter("at least one count >= 1", param_hint="--workers")
    config_path, items = _bench_overrides(config_path, data_dir, (*sets,
                                                                  f"optim.epochs={epochs}"))
    with contextlib.ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        click.echo(f"measuring {len(worker_counts)} studies of {trials} trials "
                   f"({epochs} epochs each) in {work}", err=True)
        results = run(config_path, items, trials, worker_counts, work)
    config = _bench_config(config_path, None, tuple(items))
    click.echo(f"machine: {machine()}; {config.model.arch} at {config.model.image_size} px, "
               f"{trials} trials of {epochs} epochs per study (config {config_path})")
    for line in timing_lines(results):
        click.echo(line)


@bench.command("serve")
@click.argument("model_uri", default="models:/skin-lesion-classifier@champion")
@click.option("--url", help="A running server [default: start each of --servers on a free "
                            "port].")
@click.option("--servers", default="mlflow,mlserver", show_default=True, metavar="S[,S...]",
              help="Servers to start and measure: mlflow (mlflow models serve, one server "
                   "per --workers count) and mlserver (skinml serve --mlserver).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Request image [default: one of the bundled sample].")
@click.option("--requests", "count", default=100, show_default=True, type=click.IntRange(min=5),
              help="One-image requests timed one by one; each concurrent load sends at least "
                   "25 per client (shorter loads measure their own start-up).")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--concurrency", default="1,4,16", show_default=True, metavar="N[,N...]",
              help="Concurrent one-image clients to measure (0: skip), on each endpoint, "
                   "with keep-alive and with a new connection per request.")
@click.option("--workers", metavar="N[,N...]",
              help="mlflow models serve processes, a server per count [default: as skinml "
                   "serve].")
@click.option("--mlserver", is_flag=True, help="Only MLServer (as --servers mlserver).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Loads per client count, each held against an in-process batch rate "
                   "measured just before it (the share's range is over these pairs).")
def bench_serve(model_uri: str, url: str | None, servers: str, image: Path | None, count: int,
                batch: int, concurrency: str, workers: str | None, mlserver: bool,
                repeats: int) -> None:
    """REST latency (p50/p95) vs in-process predict, batch throughput, and throughput
    under concurrent one-image clients, for each server and endpoint."""
    from skinml.bench.serve import bench_paired, serves_v2
    from skinml.bench.serve import bench_serve as run
    from skinml.bench.throughput import machine
    from skinml.data.metadata import default_data_dir
    from skinml.serving.server import running_server
    from skinml.tracking.logged_model import load_model

    image = image or next(iter(sorted(default_data_dir().glob("*.jpg"))))
    clients = _client_counts(concurrency)
    targets = _serve_targets("mlserver" if mlserver else servers, workers, url)
    model = load_model(model_uri)
    own_url = url.rstrip("/") if url else ""  # the target without options is --url's server
    results = []
    for name, options in targets:
        server = running_server(model_uri, **options) if options is not None else None
        with server or contextlib.nullcontext(own_url) as base:
            latency = run(model, image, base, count, batch)
            endpoints = ["invocations", *(["v2"] if serves_v2(base) else [])]
            loads = [(n, endpoint, keep, bench_paired(
                model, image, base, n, max(count, 25 * n), batch, repeats,
                v2=endpoint == "v2", keep_alive=keep))
                for n in clients for endpoint in endpoints for keep in (True, False)]
        results.append((name, latency, loads))
    click.echo(f"machine: {machine()}; model {model_uri} ({results[0][1].model}); "
               f"{count} one-image requests; loads against in-process {batch}-image batches "
               f"in {repeats} alternating pair(s)")
    for name, latency, loads in results:
        click.echo(name)
        for line in _latency_lines(latency, batch):
            click.echo(f"  {line}")
        for n, endpoint, keep, load in loads:
            line = _load_line(n, keep, load, batch, repeats)
            click.echo(f"  {ENDPOINT_NAMES[endpoint]:<13} {line}")


ENDPOINT_NAMES = {"invocations": "/invocations", "v2": "V2"}


def _serve_targets(servers: str, workers: str | None, url: str | None
                   ) -> list[tuple[str, dict | None]]:
    """(name, running_server options) of each server to measure; None: --url's server."""
    from skinml.serving.server import default_workers

    if url:
        return [("a server of your own", None)]
    names = [part.strip() for part in servers.split(",") if part.strip()]
    unknown = sorted(set(names) - {"mlflow", "mlserver"})
    if unknown or not names:
        raise click.BadParameter(f"{servers!r}: choose from mlflow, mlserver",
                                 param_hint="--servers")
    counts = _client_counts(workers, "--workers") if workers else [default_workers()]
    if not counts:
        raise click.BadParameter("at least one count >= 1", param_hint="--workers")
    targets: list[tuple[str, dict | None]] = []
    if "mlflow" in names:
        targets += [(f"mlflow models serve, {n} worker(s)", {"workers": n}) for n in counts]
    if "mlserver" in names:
        targets.append(("MLServer (skinml serve --mlserver)", {"mlserver": True}))
    return targets


def _latency_lines(result, batch: int) -> list[str]:
    import numpy as np

    rest50, rest95 = (float(v) for v in np.percentile(result.rest_ms, [50, 95]))
    local50, local95 = (float(v) for v in np.percentile(result.local_ms, [50, 95]))
    goal = 1.25 * local50 + 2
    return [f"REST        p50 {rest50:7.1f} ms   p95 {rest95:7.1f} ms   "
            f"{batch}-image requests {result.rest_batch_images_per_second:8.1f} images/s",
            f"in-process  p50 {local50:7.1f} ms   p95 {local95:7.1f} ms   "
            f"{batch}-image batches  {result.local_batch_images_per_second:8.1f} images/s",
            f"REST p50 / in-process p50: {rest50 / local50:.2f}x; goal REST p50 <= 1.25x + 2 "
            f"ms = {goal:.1f} ms: {'met' if rest50 <= goal else 'not met'}"]


def _load_line(clients: int, keep_alive: bool, load, batch: int, repeats: int) -> str:
    import numpy as np

    p50, p95, p99 = (float(v) for v in np.percentile(load.latencies_ms, [50, 95, 99]))
    shares = 100 * load.shares
    connection = "keep-alive" if keep_alive else "new connection each"
    return (f"{clients:3d} clients, {connection:<19} {load.per_second:8.1f} requests/s "
            f"({np.median(shares):.0f}% of in-process {batch}-image batches at "
            f"{np.median(load.ceilings):.0f} images/s, {shares.min():.0f}-{shares.max():.0f}% "
            f"over {repeats} pair(s); goal 70%)  p50 {p50:.1f} p95 {p95:.1f} p99 {p99:.1f} ms  "
            f"errors {load.errors}")


def _client_counts(text: str, option: str = "--concurrency") -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of numbers",
                                 param_hint=option) from None
    if any(n < 0 for n in counts):
        raise click.BadParameter("counts must be >= 0", param_hint=option)
    return [n for n in counts if n > 0]


@bench.command("predict")
@click.argument("model_uri", default="models:/skin-lesion-classifier@champion")
@click.option("--images", default=2000, show_default=True, type=click.IntRange(min=64),
              help="Synthetic 600x450 JPEGs scored by `skinml predict --out`.")
@click.option("--rows", default="1000,20000", show_default=True, metavar="N[,N...]",
              help="Row counts whose peak memory is measured (a fresh process each).")
@click.option("--mlflow-predict/--no-mlflow-predict", default=True, show_default=True,
              help="Also measure `mlflow models predict` memory at each row count.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the synthetic images here [default: a temp folder].")
def bench_predict(model_uri: str, images: int, rows: str, mlflow_predict: bool,
                  work_dir: Path | None) -> None:
    """Scoring at scale: decode threads (1 vs all cores), peak memory against the row count
    (in-process and `mlflow models predict`), and `skinml predict --out` against the
    in-process ceiling: the same calls on the images already in memory (target >= 90 %)."""
    import tempfile

    import numpy as np

    from skinml.bench import scoring
    from skinml.bench.throughput import machine
    from skinml.tracking.store import require_tracking_store
    from skinml.workflows.score import FILE_CHUNK

    counts = _client_counts(rows, "--rows")
    require_tracking_store(model_uri)
    with contextlib.ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        click.echo(f"making {images} synthetic 600x450 JPEGs in {work}", err=True)
        folder = work / f"synthetic-{images}"
        files = scoring.synthetic_images(folder, images)
        click.echo("measuring decode threads, memory, then skinml predict", err=True)
        decode = scoring.decode_rates(model_uri, files)
        memory = [scoring.memory_use(model_uri, folder, n) for n in counts]
        served = ([scoring.mlflow_predict_memory(model_uri, files, n, work) for n in counts]
                  if mlflow_predict else [])
        rate = scoring.predict_rate(model_uri, folder, images)
    click.echo(f"machine: {machine()}; model {model_uri}; 600x450 synthetic JPEGs")
    click.echo(f"decode     {decode.one_thread:8.1f} images/s with 1 thread, "
               f"{decode.all_threads:8.1f} with {decode.threads} "
               f"({decode.all_threads / decode.one_thread:.2f}x; one 512-row predict call)")
    for use in memory:
        click.echo(f"memory     in-process {use.rows:6d} rows: input {use.input_mb:7.1f} MB, "
                   f"resident before {use.before_mb:7.1f} MB, peak while predicting "
                   f"{use.peak_mb:7.1f} MB (+{use.growth_mb:.1f} MB), {use.seconds:.1f} s")
    for use in served:
        click.echo(f"memory     mlflow models predict {use.rows:6d} rows: input "
                   f"{use.input_mb:7.1f} MB of base64, peak resident {use.peak_mb:7.1f} MB "
                   f"(JSON parsing included), {use.seconds:.1f} s")
    shares = 100 * np.array(rate.shares)
    click.echo(f"predict    skinml predict --out {np.median(rate.predict):8.1f} files/s vs "
               f"in-process {FILE_CHUNK}-row calls on the images in memory "
               f"{np.median(rate.ceiling):8.1f} images/s: "
               f"{np.median(shares):.0f}% ({shares.min():.0f}-{shares.max():.0f}% over "
               f"{len(shares)} pairs, {rate.images} images; target >= 90%)")


@bench.command("spark")
@click.argument("model_uri", default="models:/skin-lesion-classifier@champion")
@click.option("--images", default=2000, show_default=True, type=click.IntRange(min=64),
              help="Synthetic 600x450 JPEGs scored through Spark, then in-process.")
@click.option("--master", default="local[2]", show_default=True, help="Spark master URL.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the synthetic images here [default: a temp folder].")
def bench_spark(model_uri: str, images: int, master: str, work_dir: Path | None) -> None:
    """Images/s through mlflow.pyfunc.spark_udf on a Spark session against in-process
    predict of the same files (needs pip install -e '.[spark]' and Java)."""
    import tempfile

    from skinml.bench import scoring
    from skinml.bench.throughput import machine
    from skinml.core.errors import SkinmlError
    from skinml.tracking.store import require_tracking_store

    try:
        from skinml.bench.spark import bench_spark as run
    except ImportError:
        raise SkinmlError("bench spark needs PySpark: pip install -e '.[spark]'") from None
    require_tracking_store(model_uri)
    with contextlib.ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        click.echo(f"making {images} synthetic 600x450 JPEGs in {work}", err=True)
        files = scoring.synthetic_images(work / f"synthetic-{images}", images)
        click.echo(f"scoring them through Spark ({master}), then in-process", err=True)
        result = run(model_uri, files, master=master)  # the settings docs/scaling.md gives
    click.echo(f"machine: {machine()}; model {model_uri}; {result.images} 600x450 JPEGs")
    click.echo(f"spark       {result.spark_per_second:8.1f} images/s on {result.master} "
               f"({result.partitions} tasks; session start {result.startup_seconds:.1f} s and "
               f"first batch {result.first_batch_seconds:.1f} s not counted)")
    click.echo(f"in-process  {result.in_process_per_second:8.1f} images/s "
               f"(largest probability difference {result.max_difference:.1e})")


@bench.command("gpu")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table as JSON here.")
@click.option("--quick", is_flag=True, help="Fewer steps and requests (about 3 minutes).")
@click.option("--device", "device_name", default="auto", show_default=True,
              help="cuda, cuda:N, cpu, or auto (CUDA when there is one).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the synthetic data, caches and runs here [default: a temp folder].")
def bench_gpu(out: Path | None, quick: bool, device_name: str, work_dir: Path | None) -> None:
    """The GPU path in one command: loader, train step (eager and compiled), fp16, a real
    MLflow run and its resume, serving, DDP. One row per step, printed when all have run;
    exit 0 only if all ran."""
    import torch

    from skinml.bench import gpu, table
    from skinml.bench.throughput import machine
    from skinml.training.device import resolve_device

    try:
        device = resolve_device(device_name)
    except RuntimeError:
        raise click.BadParameter(f"{device_name!r} is not a device",
                                 param_hint="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("this machine has no CUDA device", param_hint="--device")
    click.echo(f"measuring the GPU path on {device}{', quick' if quick else ''}; the table "
               "follows the last step", err=True)
    with table.work_folder(work_dir) as work:
        rows = gpu.run_bench(device, quick, work)
    # Printed after the work, so the steps' training logs (stderr) never split the table.
    click.echo(f"machine: {machine()}; device {device}{', quick' if quick else ''}")
    click.echo(table.header())
    for row in rows:
        click.echo(table.format_row(row))
    if out is not None:
        table.write_report(out, table.report(rows, device, quick, machine()))
        click.echo(f"wrote {out}", err=True)
    failed = [row for row in rows if row.failed]
    for row in failed:
        click.echo(f"error: {row.step}: {row.status.removeprefix('failed: ')}", err=True)
    if failed:
        sys.exit(1)
