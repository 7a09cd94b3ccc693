"""Serving a logged model over REST: `mlflow models serve` and MLServer processes."""
