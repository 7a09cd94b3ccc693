"""The decode-once cache: contents, reuse, invalidation, corrupt images, interrupted builds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from skinml.data import CorruptImageError, load_ham10000
from skinml.data.cache import cache_root, open_cache, prepare_cache
from skinml.data.decode import fit_to_frame, open_rgb

from ..conftest import skinml_in_process


def complete_caches(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if not p.name.startswith(".")] if root.exists() else []


def test_cache_holds_every_image_resized_to_the_frame(make_folder):
    frame = load_ham10000(make_folder())
    cache = prepare_cache(frame, size=64, progress=False)
    assert cache.images.shape == (len(frame), 64, 85, 3)  # the sample's 4:3 frame
    assert isinstance(cache.images, np.memmap) and not cache.images.flags.writeable
    rows = cache.rows(frame["image_id"])
    for row, path in zip(rows[:5], frame["path"][:5], strict=True):
        expected = np.asarray(fit_to_frame(open_rgb(path), 64, 85))
        np.testing.assert_array_equal(cache.images[row], expected)


def test_unchanged_data_reuses_the_cache(make_folder):
    frame = load_ham10000(make_folder())
    first = prepare_cache(frame, size=32, progress=False)
    second = prepare_cache(frame.sample(frac=1, random_state=0), size=32, progress=False)
    assert not first.reused and second.reused
    assert second.path == first.path
    np.testing.assert_array_equal(first.images, second.images)
    assert len(complete_caches(cache_root())) == 1


def test_cli_says_it_reused_the_cache(make_folder):
    root = make_folder()
    first = skinml_in_process("data", "prepare", str(root), "--size", "32")
    second = skinml_in_process("data", "prepare", str(root), "--size", "32")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.startswith("built image cache")
    assert second.stdout.startswith("reused image cache")


def test_a_changed_file_or_size_gets_a_new_cache(make_folder):
    root = make_folder()
    frame = load_ham10000(root)
    first = prepare_cache(frame, size=32, progress=False)
    changed = Path(frame["path"][0])
    open_rgb(changed).rotate(90).save(changed, quality=80)
    rebuilt = prepare_cache(load_ham10000(root), size=32, progress=False)
    resized = prepare_cache(frame, size=40, progress=False)
    assert not rebuilt.reused and not resized.reused
    assert len({first.path, rebuilt.path, resized.path}) == 3
    row = rebuilt.rows([changed.stem])[0]
    assert not np.array_equal(rebuilt.images[row], first.images[row])


def test_a_corrupt_image_is_named_and_leaves_no_cache(make_folder):
    root = make_folder()
    frame = load_ham10000(root)
    broken = Path(frame["path"].iloc[-1])
    broken.write_bytes(broken.read_bytes()[:300])  # truncated JPEG
    with pytest.raises(CorruptImageError, match=broken.name):
        prepare_cache(frame, size=32, progress=False)
    assert list(cache_root().iterdir()) == []  # the build raised mid-write: nothing left


def test_skip_corrupt_leaves_the_image_out(make_folder):
    root = make_folder()
    frame = load_ham10000(root)
    broken = Path(frame["path"][3])
    broken.write_bytes(b"not a jpeg")
    cache = prepare_cache(frame, size=32, skip_corrupt=True, progress=False)
    assert cache.skipped == (broken.stem,)
    with pytest.raises(CorruptImageError, match="--skip-corrupt"):
        prepare_cache(frame, size=32, progress=False)  # the reused cache still says so
    result = skinml_in_process("data", "prepare", str(root), "--size", "32")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_check_counts_corrupt_images_and_exits_2(make_folder):
    root = make_folder()
    broken = next(root.glob("*.jpg"))
    broken.write_bytes(broken.read_bytes()[:300])
    result = skinml_in_process("data", "check", str(root))
    assert result.returncode == 2
    assert result.stdout == ""  # no table that is wrong: the error line alone
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {broken}")


def test_a_killed_build_leaves_nothing_that_looks_like_a_cache(make_folder):
    root = make_folder(lesions_per_class=40)  # most of the sample: a build of a few seconds
    process = subprocess.Popen(
        [sys.executable, "-m", "skinml", "data", "prepare", str(root), "--size", "600",
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = cache_root()
    deadline = time.monotonic() + 60
    while not list(cache.glob(".tmp-*/images.npy")) and time.monotonic() < deadline:
        assert process.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.01)
    time.sleep(0.3)
    assert process.poll() is None, "prepare finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert complete_caches(cache) == []
    assert list(cache.glob(".tmp-*"))  # the half-written build is there, and ignored

    rebuilt = prepare_cache(load_ham10000(root), size=600, progress=False)
    assert not rebuilt.reused
    assert list(cache.glob(".tmp-*")) == []  # the killed build's leftovers were removed
    assert open_cache(rebuilt.path).images.shape[0] == len(rebuilt.image_ids)


def test_a_damaged_cache_is_rebuilt(make_folder):
    frame = load_ham10000(make_folder())
    cache = prepare_cache(frame, size=32, progress=False)
    images = cache.path / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    rebuilt = prepare_cache(frame, size=32, progress=False)
    assert not rebuilt.reused
    assert rebuilt.images.shape[0] == len(frame)
