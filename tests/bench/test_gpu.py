"""`skinml bench gpu` on the CPU: every row present, each step run or skipped with a reason.

This is how the GPU check is kept working between the rare sessions that have a GPU: the
same code runs here with the small ResNeXt, torch.compile (inductor on the CPU) and the
fp16 GradScaler path included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ..conftest import cuda_test, skinml_in_process

STEPS = ["data: synthetic folder", "loader: ours vs seed path", "train step: eager",
         "train step: torch.compile", "fp16 + GradScaler", "skinml train via MLflow",
         "resume from checkpoint", "serving: in-process and REST", "tuning: 1 vs N workers",
         "DDP: 2 processes, NCCL"]


@pytest.mark.slow
def test_bench_gpu_on_the_cpu_runs_every_step(tmp_path):
    out = tmp_path / "gpu.json"  # and a relative --work-dir, as a person types it
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}  # the bench makes its own store
    done = subprocess.run([sys.executable, "-m", "skinml", "bench", "gpu", "--device", "cpu",
                           "--quick", "--out", str(out), "--work-dir", "work"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["step"]: row for row in report["rows"]}
    assert list(rows) == STEPS and report["ok"] and report["device"] == "cpu"
    for name in STEPS[:-1]:
        assert rows[name]["status"] == "ok", (name, rows[name]["status"])
    assert rows[STEPS[-1]]["status"].startswith("skipped: needs CUDA")
    # stdout is the table alone, printed after the work: the machine, the header, one row
    # per step with the same figures as the JSON; the steps' logs went to stderr.
    machine, header, *printed = done.stdout.splitlines()
    assert machine.startswith("machine: ") and header.split()[:2] == ["step", "status"]
    assert [line.split("  ")[0] for line in printed] == STEPS, done.stdout
    assert rows["loader: ours vs seed path"]["figure"] in printed[1]
    assert "INFO: epoch 1/2  train_loss" in done.stderr
    assert f"INFO: bench gpu step 10/10, {STEPS[-1]}: skipped in" in done.stderr
    compiled = rows["train step: torch.compile"]["values"]
    assert compiled["compile"] == "True" and compiled["warmup_seconds"] > 0
    assert compiled["compile_backend"] == "aot_eager"  # --quick on the CPU: no C++ codegen
    assert compiled["end_to_end_images_per_second"] > 0
    fp16 = rows["fp16 + GradScaler"]["values"]
    assert fp16["scale"] > 0 and np.isfinite([fp16["first_loss"], fp16["last_loss"]]).all()
    assert rows["resume from checkpoint"]["values"]["epoch"] == 3
    serving = rows["serving: in-process and REST"]["values"]
    assert serving["rest_p50_ms"] > 0 and serving["in_process_images_per_second"] > 0
    assert serving["in_process_gpu_decode_images_per_second"] is None  # measured on CUDA only
    tuning = rows["tuning: 1 vs N workers"]["values"]
    assert tuning["workers"] == 2 and tuning["trials_per_hour_1"] > 0
    assert tuning["trials_per_hour_n"] > 0 and tuning["outside_epochs_median_n"] > 0
    assert not list(tmp_path.glob("mlflow.db"))  # nothing written outside --work-dir


def test_bench_gpu_refuses_a_device_it_does_not_have():
    done = skinml_in_process("bench", "gpu", "--device", "tpu")  # stops before any work
    assert done.returncode == 2
    assert "Invalid value for --device: 'tpu' is not a device" in done.stderr


@cuda_test
def test_bench_gpu_quick_runs_every_step_on_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-m", "skinml", "bench", "gpu", "--quick", "--out",
                           str(out), "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("cuda") and report["ok"]
    for row in report["rows"]:
        assert row["status"] == "ok" or row["status"].startswith("skipped: 1 GPU"), row
        assert row["peak_gpu_mib"] is not None or row["status"].startswith("skipped")
    serving = {row["step"]: row for row in report["rows"]}["serving: in-process and REST"]
    assert serving["values"]["in_process_gpu_decode_images_per_second"] > 0
