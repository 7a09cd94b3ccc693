"""The CUDA path: run with `pytest -m gpu` on a GPU machine; skipped with a reason elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from skinml.config import load_config
from skinml.packaging import encode_image
from skinml.train import train

from .conftest import tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on one)")]

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"


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


def test_one_cuda_epoch_and_the_cuda_pyfunc_equals_the_cpu_one(tracking, make_folder):
    folder = make_folder("small", lesions_per_class=5)
    result = train(load_config(DEMO, tiny(folder, "runtime.device=cuda", "runtime.amp=bf16",
                                          "optim.epochs=1", "optim.ema_decay=0.9")))
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"
    images = sorted(folder.glob("*.jpg"))[:16]
    frame = pd.DataFrame({"image": [encode_image(p.read_bytes()) for p in images]})
    model = mlflow.pyfunc.load_model(result.model_uri)
    python_model = model.unwrap_python_model()
    assert python_model.device.type == "cuda"
    on_cuda = model.predict(frame)
    on_cpu = python_model.to("cpu").predict(None, frame)
    columns = [c for c in on_cuda.columns if c.startswith("p_")]
    assert np.abs(on_cuda[columns].to_numpy() - on_cpu[columns].to_numpy()).max() < 1e-3
