"""Training a network: the epoch loop, the recipe's building blocks (optimiser, schedule,
balancing losses, precision, EMA), checkpoints, devices and torchrun. No MLflow, no Optuna:
progress leaves through a callback that the workflows connect to tracking or tuning."""
