"""Optuna studies over training runs: the only code that imports Optuna."""
