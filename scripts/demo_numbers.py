"""Record what the main job gives, for the docs and the demo config to quote.

    python scripts/demo_numbers.py          # trains the demo (about 2 minutes on 2 cores)

Runs the main job's training (`skinml train`, the shipped demo config, the bundled sample)
in a temporary tracking store, predicts the docs' sample image with the logged model, and
writes `benchmarks/demo-numbers.json` with a digest of the code and data that produced it.
`tests/test_demo_numbers.py` fails when that digest no longer matches the code (run this
again) or when docs/registry-and-serving.md or demo.yaml quote other numbers than the record.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "demo-numbers.json"
SAMPLE_IMAGE = "skinml/sample/ISIC_0024336.jpg"
# What the numbers depend on besides the Python code: the config and the bundled images.
INPUTS = ("skinml/core/configs/demo.yaml", "skinml/sample")


def _skinml_imports(path: Path) -> set[str]:
    """The skinml modules a source file imports (top-level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "skinml")
    return found


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def training_sources() -> list[Path]:
    """Every skinml source file that `skinml train` and the served model can reach."""
    todo = ["skinml.workflows.train", "skinml.tracking.pyfunc", "skinml.tracking.pyfunc_entry"]
    seen: set[Path] = set()
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_skinml_imports(path))
    return sorted(seen)


def code_digest() -> str:
    """sha256 over the training code, the demo config and the bundled sample."""
    files = list(training_sources())
    for name in INPUTS:
        path = ROOT / name
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(_content(path))
    return digest.hexdigest()


def _content(path: Path) -> bytes:
    """A YAML file by its values (its comments quote these numbers), others byte for byte."""
    if path.suffix == ".yaml":
        return json.dumps(yaml.safe_load(path.read_text()), sort_keys=True).encode()
    return path.read_bytes()


def _skinml(*args: str, env: dict[str, str], cwd: str) -> str:
    done = subprocess.run([sys.executable, "-m", "skinml", *args], env=env, cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"skinml {args[0]} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def record() -> dict:
    import torch
    from mlflow import MlflowClient

    from skinml.bench.throughput import cpu_name

    work = tempfile.mkdtemp(prefix="demo-numbers-")
    uri = f"sqlite:///{work}/mlflow.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT))
    out = _skinml("train", env=env, cwd=work)
    run_id = re.search(r"^run (\w+):", out, re.M).group(1)
    model_uri = re.search(r"model (\S+)$", out.strip()).group(1)
    prediction = json.loads(_skinml("predict", model_uri, str(ROOT / SAMPLE_IMAGE), "--json",
                                    env=env, cwd=work))[0]
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    keep = ("best_epoch", "best_val_balanced_accuracy", "test_balanced_accuracy",
            "test_balanced_accuracy_ci_low", "test_balanced_accuracy_ci_high", "test_auc",
            "test_auc_ci_low", "test_auc_ci_high")
    return {
        "code_digest": code_digest(),
        "recorded": date.today().isoformat(),
        # The CPU and its vector unit matter: floating-point differences between kernels
        # grow over 40 epochs into different models (see docs/tuning.md, "What tuning ... shows").
        "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores, {platform.machine()} "
                   f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}",
        "metrics": {k: metrics[k] for k in keep},
        "sample_image": SAMPLE_IMAGE,
        "sample_prediction": {k: v for k, v in prediction.items() if k != "image"},
    }


if __name__ == "__main__":
    numbers = record()
    tmp = RECORD.with_suffix(".tmp")
    tmp.write_text(json.dumps(numbers, indent=2) + "\n")
    tmp.replace(RECORD)
    print(json.dumps(numbers, indent=2))
