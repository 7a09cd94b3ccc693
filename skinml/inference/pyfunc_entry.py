"""MLflow models-from-code entry: MLflow runs this file to build the served model."""

from mlflow.models import set_model

from skinml.inference.pyfunc import SkinLesionModel

set_model(SkinLesionModel())
