"""Temperature scaling (Guo et al. 2017): one scalar T, fitted on validation data, that
makes softmax probabilities mean what they say without changing any prediction."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(probs: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """The T minimising the NLL of softmax(log(probs) / T) on these labels.

    log(probs) equals the logits up to a per-row constant, which softmax ignores, so the
    fit works from probabilities alone.
    """
    log_p = torch.log(torch.as_tensor(np.asarray(probs), dtype=torch.float64).clamp_min(1e-12))
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(log_p / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


def clamp_warning(temperature: float) -> str | None:
    """What a temperature at the edge of its range means, or None inside it."""
    if temperature >= MAX_TEMPERATURE * 0.999:
        return (f"temperature {temperature:g} is at its upper limit: on validation the model's "
                "confidence carries almost no information (a model near chance, or too few "
                "validation images), so the served probabilities are close to uniform")
    if temperature <= MIN_TEMPERATURE * 1.001:
        return (f"temperature {temperature:g} is at its lower limit: validation asks for sharper "
                "probabilities than the range allows (often a tiny validation split); the "
                "served probabilities are sharpened by the limit, not by a fitted value")
    return None


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): T > 1 softens over-confident probabilities."""
    log_p = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    log_p -= log_p.max(axis=1, keepdims=True)
    exp = np.exp(log_p)
    return exp / exp.sum(axis=1, keepdims=True)
