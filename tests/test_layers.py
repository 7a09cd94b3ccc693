"""The layers are enforced, not hoped for: pyproject.toml's import-linter contracts hold for
the package, and break the moment a lower layer imports a higher one."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = REPO / "skinml"
CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the `skinml` package found in `root`, with the project's contracts."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())", "--config", str(REPO / "pyproject.toml"),
         "--no-cache"],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_package_keeps_every_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"Contracts: {len(CONTRACTS['contracts'])} kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward, contract", [
    ("core/labels.py", "from skinml.workflows import train", "layers"),
    ("workflows/prepared.py", "from skinml.workflows.cv import cross_validate", "workflows"),
    ("training/engine.py", "import mlflow", "no-tracking-below"),
    ("workflows/compare.py", "import optuna", "optuna-seam"),
    ("workflows/cv.py", "from mlflow.tracking import MlflowClient", "mlflow-seam"),
])
def test_an_upward_or_forbidden_import_breaks_the_contract(tmp_path, module, upward, contract):
    shutil.copytree(PACKAGE, tmp_path / "skinml",
                    ignore=shutil.ignore_patterns("__pycache__", "sample"))
    path = tmp_path / "skinml" / module
    path.write_text(path.read_text() + f"\n{upward}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    name = next(c["name"] for c in CONTRACTS["contracts"] if c["id"] == contract)
    assert f"{name} BROKEN" in " ".join(result.stdout.split()), result.stdout[-3000:]


def test_no_import_hides_from_the_contract():
    """Every skinml import is at module level (the CLI's commands excepted: they import what
    they run when they run, so `skinml --help` is quick) and none is TYPE_CHECKING-only."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "sample" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                hidden.append(f"{path.relative_to(REPO)}:{node.lineno} TYPE_CHECKING")
        if path.parent.name == "cli":
            continue
        for function in (n for n in ast.walk(tree)
                         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skinml"):
                    hidden.append(f"{path.relative_to(REPO)}:{node.lineno} {node.module}")
    assert hidden == []
