"""The ground floor: the config tree and shipped configs, the class labels, the error type,
atomic file writes. Imports nothing else of skinml, and no MLflow, Optuna or torch."""
