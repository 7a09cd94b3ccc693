"""`skinml cache`: what the cache folder holds (image caches, run checkpoints, MLServer
folders), and freeing it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

CACHE_DIR = click.option("--cache-dir", type=click.Path(path_type=Path),
                         help="Cache folder [default: $SKINML_CACHE or ~/.cache/skinml].")
CHECKPOINT_DIR = click.option("--checkpoint-dir", type=click.Path(path_type=Path),
                              help="Where runs wrote checkpoints, if they set "
                                   "runtime.checkpoint_dir [default: CACHE_DIR/checkpoints].")
_TITLES = {"images": "image caches", "checkpoints": "checkpoints",
           "mlserver": "MLServer folders"}
_TIME_WORDS = {"images": "used", "checkpoints": "written", "mlserver": "written"}


@click.group()
def cache() -> None:
    """List and free the cache: image caches, run checkpoints, MLServer folders."""


@cache.command("ls")
@CACHE_DIR
@CHECKPOINT_DIR
def ls(cache_dir: Path | None, checkpoint_dir: Path | None) -> None:
    """List what the cache holds, with sizes.

    One line per entry, by kind; each checkpoint with its run's status in this tracking store.
    """
    from skinml.workflows.cache import KINDS

    listing = _listing(cache_dir, checkpoint_dir)
    for kind in KINDS:
        entries = listing.of_kind(kind)
        click.echo(f"{_TITLES[kind]} in {_folder_of(listing, kind)}")
        width = max((len(entry.name) for entry in entries), default=0)
        for entry in entries:
            click.echo(f"  {entry.name:<{width}}  {_size(entry.nbytes):>9}  "
                       f"{_TIME_WORDS[kind]} {_when(entry.last_used)}  {entry.about}")
        if not entries:
            click.echo("  (none)")
    click.echo(f"total {_size(listing.nbytes)} in {_count(len(listing.entries))}")


@cache.command()
@CACHE_DIR
@CHECKPOINT_DIR
@click.option("--images", is_flag=True,
              help="Image caches (the next run on the same images builds its cache again).")
@click.option("--checkpoints", is_flag=True,
              help="Checkpoints of runs that ended in this tracking store (a killed run "
                   "then cannot --resume); not of running runs or runs it does not hold.")
@click.option("--mlserver", is_flag=True, help="MLServer folders.")
@click.option("--older-than", type=float, metavar="DAYS",
              help="Only what was not used for DAYS days (of every kind unless one is named).")
@click.option("--all", "everything", is_flag=True,
              help="Everything of the named kinds (of every kind if none is named): the "
                   "checkpoints of running and unknown runs and an image cache being built "
                   "included.")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
def prune(cache_dir: Path | None, checkpoint_dir: Path | None, images: bool, checkpoints: bool,
          mlserver: bool, older_than: float | None, everything: bool, dry_run: bool) -> None:
    """Free space in the cache.

    By default the checkpoints of runs that FINISHED in this tracking store (their best
    weights are in the logged model) and the MLServer folders; more with a kind,
    --older-than or --all.
    """
    from skinml.workflows.cache import remove_entry, select_for_pruning

    listing = _listing(cache_dir, checkpoint_dir)
    kinds = [kind for kind, named in
             (("images", images), ("checkpoints", checkpoints), ("mlserver", mlserver)) if named]
    chosen = select_for_pruning(listing, kinds, older_than, everything)
    verb = "would remove" if dry_run else "removed"
    for entry in chosen:
        if not dry_run:
            remove_entry(entry)
        click.echo(f"{verb} {_TITLES[entry.kind].removesuffix('s')} {entry.path} "
                   f"({_size(entry.nbytes)}, {entry.about})")
    freed = sum(entry.nbytes for entry in chosen)
    click.echo(f"{'would free' if dry_run else 'freed'} {_size(freed)} "
               f"({_count(len(chosen))})")
    kept = len(listing.entries) - len(chosen)
    if kept:
        click.echo(f"kept {_count(kept)}, {_size(listing.nbytes - freed)} "
                   "(`skinml cache ls` lists them)")


def _listing(cache_dir: Path | None, checkpoint_dir: Path | None):
    from skinml.core.errors import SkinmlError
    from skinml.data.cache import cache_root
    from skinml.workflows.cache import list_cache

    for option, folder in (("--cache-dir", cache_dir), ("--checkpoint-dir", checkpoint_dir)):
        if folder is not None and not folder.expanduser().is_dir():
            raise SkinmlError(f"{option} {folder}: no such folder")
    return list_cache(cache_dir or cache_root(), checkpoint_dir)


def _folder_of(listing, kind: str) -> Path:
    return {"images": listing.root, "checkpoints": listing.checkpoint_root,
            "mlserver": listing.root / "mlserver"}[kind]


def _size(nbytes: int) -> str:
    """1023 B, 23.1 MiB, 1.2 GiB."""
    size, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{nbytes} B" if unit == "B" else f"{size:.1f} {unit}"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _count(entries: int) -> str:
    return f"{entries} {'entry' if entries == 1 else 'entries'}"
