"""skinml: skin-lesion classification on HAM10000 with MLflow and Optuna."""

__version__ = "0.1.0"
