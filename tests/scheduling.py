"""How the suite is spread over pytest-xdist's workers: markers and groups from each test's
fixtures, the longest groups first (from tests/durations.json), and recording those
durations (`--record-durations`). Hooks re-exported by tests/conftest.py."""

from __future__ import annotations

import collections
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_STORE = ("demo", "demo_store", "champion_server")
# Each xdist group's total test time in the last `--record-durations` run (seconds on the
# 2-core machine): the order the groups are handed out in.
DURATIONS = Path(__file__).parent / "durations.json"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than the cores. A fifth of the suite's time is spent
    waiting (on a server starting, a subprocess importing torch, a process being killed),
    and a third worker fills it: on the 2-core machine 11:18 instead of 12:23 wall, for the
    same CPU time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) + 1


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-durations", action="store_true",
                     help=f"after a whole-suite run on xdist workers, write each group's total "
                          f"test time to tests/{DURATIONS.name} (groups are handed out in "
                          "that order, the longest first)")


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection imported (torch, MLflow, ...: ~600,000 objects) lives as long as the
    process: out of the garbage collector's sight. pytest ends a session with five full
    collections; over that heap they ran past the 5 s execnet gives a finishing xdist worker,
    which then sent itself SIGINT (a PytestUnraisableExceptionWarning at the end)."""
    gc.freeze()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers and scheduling, from the fixtures and markers of each test.

    Tests that use the PostgreSQL server are marked `postgres`. pytest-xdist runs one
    module per worker (`--dist loadgroup`, each module its own group), so a module's
    fixtures are built once; the modules that use the shared demo store form one group, so
    the store is trained, and its champion served, once per test run; the modules with a
    `spark` test form another, so one worker starts a JVM. The longest groups go first
    (tests/durations.json; a group not recorded there is guessed from its tests), so the
    workers finish together instead of one waiting for a long group handed out last.
    """
    def modules_where(has: Callable[[pytest.Item], bool]) -> set[str]:
        return {item.module.__name__ for item in items if has(item)}

    shared = modules_where(lambda item: bool(set(SHARED_STORE)
                                             & set(getattr(item, "fixturenames", ()))))
    spark = modules_where(lambda item: item.get_closest_marker("spark") is not None)
    groups: dict[pytest.Item, str] = {}
    for item in items:
        if "postgres" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
        module = item.module.__name__
        groups[item] = ("demo-store" if module in shared else "spark" if module in spark
                        else module)
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    expected = expected_seconds(items, groups)
    first_seen = {group: i for i, group in reversed(list(enumerate(groups.values())))}
    items.sort(key=lambda item: (-expected[groups[item]], first_seen[groups[item]]))


def expected_seconds(items: list[pytest.Item], groups: dict[pytest.Item, str]
                     ) -> dict[str, float]:
    """Each group's recorded time; one not recorded yet (a new module) is guessed at 15 s a
    slow test and 1 s any other."""
    recorded = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    guess: collections.Counter[str] = collections.Counter()
    for item in items:
        guess[groups[item]] += 15 if item.get_closest_marker("slow") else 1
    return {group: recorded.get(group, seconds) for group, seconds in guess.items()}


_group_seconds: collections.Counter[str] = collections.Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Under --dist loadgroup a test's id ends in "@group" (setup, call and teardown count).
    _group_seconds[report.nodeid.rpartition("@")[2]] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if (config.getoption("record_durations") and config.getoption("dist", "no") == "loadgroup"
            and not hasattr(config, "workerinput")):  # the controller: every worker's reports
        DURATIONS.write_text(json.dumps({group: round(seconds) for group, seconds
                                         in sorted(_group_seconds.items())}, indent=1) + "\n")
