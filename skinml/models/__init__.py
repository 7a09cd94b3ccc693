"""Networks for the seven classes, built by name from a plain registry (no MLflow, no data)."""

from skinml.models.resnext import ARCHITECTURES, ModelError, SmallResNeXt, build_model

__all__ = ["ARCHITECTURES", "ModelError", "SmallResNeXt", "build_model"]
