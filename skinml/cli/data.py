"""`skinml data`: check, cache and synthesize HAM10000 folders."""

from __future__ import annotations

import time
from pathlib import Path

import click

from skinml.cli.options import ALLOW_MISSING, data_dir_argument, one_data_dir


@click.group()
def data() -> None:
    """Inspect, cache and synthesize HAM10000 folders (default: the bundled sample)."""


@data.command()
@data_dir_argument
@ALLOW_MISSING
@click.option("--decode/--no-decode", default=True, show_default=True,
              help="Decode every image fully to count corrupt files.")
def check(data_dir: Path | None, data_dir_option: Path | None, allow_missing: bool,
          decode: bool) -> None:
    """Summarise a HAM10000 folder: images, lesions and per-class counts."""
    from skinml.data.decode import find_corrupt
    from skinml.data.errors import CorruptImageError
    from skinml.data.metadata import default_data_dir, frame_from_scan, scan_folder

    scan = scan_folder(one_data_dir(data_dir, data_dir_option) or default_data_dir())
    frame = frame_from_scan(scan, allow_missing=allow_missing)
    corrupt = find_corrupt(frame["path"].map(Path).tolist()) if decode else []
    if corrupt:  # the error alone: a table would count images that cannot be read
        raise CorruptImageError(f"{corrupt[0]} ({len(corrupt)} corrupt image(s) in all; "
                                "`skinml data prepare --skip-corrupt` leaves them out)")
    click.echo(_summary(scan.root, frame, missing=len(scan.missing), unlisted=len(scan.unlisted),
                        corrupt=0 if decode else None))


@data.command()
@data_dir_argument
@click.option("--size", type=click.IntRange(min=8),
              help="Shorter side of the cached images, in pixels [default: data.cache_size of "
                   "the demo config, the one `skinml train` and `mlflow run .` read].")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Cache folder [default: $SKINML_CACHE or ~/.cache/skinml].")
@ALLOW_MISSING
@click.option("--skip-corrupt", is_flag=True, help="Leave undecodable images out, with a warning.")
@click.option("--workers", type=click.IntRange(min=1), help="Decoding threads [default: cores].")
def prepare(data_dir: Path | None, data_dir_option: Path | None, size: int | None,
            cache_dir: Path | None, allow_missing: bool, skip_corrupt: bool,
            workers: int | None) -> None:
    """Decode every image once into the on-disk cache that training reads."""
    from skinml.core.config import load_config
    from skinml.data.cache import prepare_cache
    from skinml.data.metadata import load_ham10000

    frame = load_ham10000(one_data_dir(data_dir, data_dir_option), allow_missing=allow_missing)
    started = time.perf_counter()
    size = size or load_config("demo").data.cache_size  # the cache a bare `skinml train` reads
    cache = prepare_cache(frame, size=size, root=cache_dir, skip_corrupt=skip_corrupt,
                          workers=workers)
    _, height, width, _ = cache.images.shape
    verb = "reused" if cache.reused else "built"
    click.echo(f"{verb} image cache {cache.path}: {len(cache.image_ids)} images at "
               f"{width}x{height} px, {cache.nbytes / 2**20:.1f} MiB, "
               f"in {time.perf_counter() - started:.2f} s")


@data.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "n", required=True, type=int, help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--width", default=600, show_default=True, type=int)
@click.option("--height", default=450, show_default=True, type=int)
@click.option("--layout", default="flat", show_default=True, type=click.Choice(["flat", "parts"]),
              help="Images at the root, or in HAM10000_images_part_1/ and _part_2/.")
def synth(out: Path, n: int, seed: int, width: int, height: int, layout: str) -> None:
    """Write a synthetic HAM10000-shaped folder (for scale tests, not for claims about skin)."""
    from skinml.data.synth import write_synthetic

    write_synthetic(out, n, seed=seed, width=width, height=height, layout=layout)
    click.echo(f"wrote {n} synthetic images and their metadata to {out}")


def _summary(root: Path, frame, *, missing: int, unlisted: int, corrupt: int | None) -> str:
    import pandas as pd

    from skinml.core.labels import CLASSES, DIAGNOSES

    table = pd.DataFrame({
        "diagnosis": [DIAGNOSES[dx] for dx in CLASSES],
        "images": frame["dx"].value_counts().reindex(CLASSES, fill_value=0),
        "lesions": frame.groupby("dx")["lesion_id"].nunique().reindex(CLASSES, fill_value=0),
    })
    table.loc["total"] = ["", len(frame), frame["lesion_id"].nunique()]
    table.index.name = "dx"
    corrupt_text = "not checked" if corrupt is None else str(corrupt)
    return "\n".join([
        f"HAM10000 folder  {root}",
        f"images           {len(frame)} (missing {missing}, corrupt {corrupt_text}, "
        f"without metadata {unlisted})",
        f"lesions          {frame['lesion_id'].nunique()}",
        "",
        table.to_string(),
    ])
