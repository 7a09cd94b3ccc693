"""Networks for the seven classes, built by name from a plain registry (no MLflow, no data)."""

from skinml.models.fusion import ClinicalEncoder, FusionNet, run_network
from skinml.models.resnext import (
    ARCHITECTURES,
    ModelError,
    SmallResNeXt,
    build_model,
    require_weights,
)

__all__ = ["ARCHITECTURES", "ClinicalEncoder", "FusionNet", "ModelError", "SmallResNeXt",
           "build_model", "require_weights", "run_network"]
