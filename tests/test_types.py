"""The types are a contract the suite checks: mypy over skinml/ with the project's config
(pyproject.toml `[tool.mypy]`) reports nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow  # about a minute on 2 cores without mypy's cache (.mypy_cache, ignored)
def test_mypy_finds_no_error_in_the_package():
    done = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:]
    assert done.stdout.startswith("Success"), done.stdout[-4000:]
