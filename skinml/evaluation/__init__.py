"""Judging predictions: metrics and lesion-bootstrap intervals, scoring a split,
temperature calibration, figures and tables, Grad-CAM. Arrays in, numbers and figures out;
no MLflow."""
