"""Log the fixture model with the skinml checked out here, for tests/fixtures/.

    python scripts/log_fixture_model.py OUT_PREFIX

Logs an untrained `resnext_small` at 32 px (seed 0; the residual branches' last BatchNorm
weights drawn from N(0.5, 0.1) and the head's weights times 40, so its answers are far
from uniform; temperature 1.3; weights stored as float16 to keep the file small) with
this checkout's `log_model`, packs the logged model's folder as `model/` into
OUT_PREFIX.tar.gz, and writes what it answers for four images of the bundled sample to
OUT_PREFIX.csv. `tests/tracking/test_legacy_model.py` loads each such model with today's
skinml and checks those answers: models logged by earlier code keep loading.
"""

from __future__ import annotations

import base64
import sys
import tarfile
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import torch

from skinml.core.config import ModelConfig
from skinml.data.metadata import default_data_dir
from skinml.models import build_model
from skinml.tracking.logged_model import log_model, model_meta

IMAGES = ("ISIC_0024336", "ISIC_0024372", "ISIC_0024381", "ISIC_0024446")


def main(prefix: Path) -> None:
    sample = default_data_dir()
    config = ModelConfig(arch="resnext_small", image_size=32, crop_pct=0.875)
    torch.manual_seed(0)
    network = build_model(config)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith("bn3.weight"):
                parameter.normal_(0.5, 0.1)
            if name.startswith("fc."):
                parameter.mul_(40)
    weights = {k: v.half() if v.is_floating_point() else v
               for k, v in network.state_dict().items()}
    with tempfile.TemporaryDirectory() as work:
        mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
        with mlflow.start_run():
            info = log_model(weights, model_meta(config, (40, 53), 1.3),
                             str(sample / f"{IMAGES[0]}.jpg"))
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri,
                                                          dst_path=f"{work}/download"))
        model = mlflow.pyfunc.load_model(str(folder))
        frame = pd.DataFrame({"image": [base64.b64encode((sample / f"{i}.jpg").read_bytes())
                                        .decode() for i in IMAGES]})
        answer = model.predict(frame)
        answer.insert(0, "image", list(IMAGES))
        answer.to_csv(prefix.with_suffix(".csv"), index=False)
        with tarfile.open(prefix.with_suffix(".tar.gz"), "w:gz") as archive:
            archive.add(folder, arcname="model",
                        filter=lambda m: None if "__pycache__" in m.name else m)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
