"""Calibration of the router's task probabilities: a temperature, a confidence map, and how far
off they are.

The router's probabilities are the softmax of its decision scores. A shared-covariance
classifier on thousands of random features is sure of itself far beyond its accuracy (its
scores are log-likelihood ratios summed over many correlated dimensions), so its scores are
divided by one temperature, fitted by maximum likelihood on texts it did not learn from (a
validation split of the tasks' training texts). Dividing by a positive number never changes
which task is highest: routes stay as they were; only the stated probabilities change.

Expected calibration error (ECE): the test texts binned by the probability of the routed task
(15 equal-width bins); the mean over texts of |accuracy of its bin - mean probability of its
bin|. 0 means "a stated 80 % is right 80 % of the time".
"""

from __future__ import annotations

import numpy as np
import torch

ECE_BINS = 15
# Temperatures tried, log-spaced: 0.01 .. 1000 (scores of any scale), then refined around the best.
_GRID = np.exp(np.linspace(np.log(1e-2), np.log(1e3), 121))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of stated `confidence` (N,) in [0, 1] against whether each answer was `correct` (N,)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} must be equal 1-D shapes")
    if not len(confidence):
        raise ValueError("no answers to measure calibration on")
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # bin of each answer
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(confidence))


def negative_log_likelihood(scores: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of the true classes `y` (N,) under softmax(scores / T)."""
    return _nll(_finite(scores), y, temperature)


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """float64 scores with -inf (a class not allowed) as a large finite negative number."""
    scores = scores.detach().double()
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -1e30))


def _nll(scores: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(scores / temperature, y))


def fit_temperature(scores: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the mean negative log-likelihood of
    softmax(scores / T) for the true classes `y` (N,) of `scores` (N, K)."""
    if scores.ndim != 2 or len(scores) != len(y) or not len(y):
        raise ValueError(f"scores {tuple(scores.shape)} and labels ({len(y)},) do not match")
    scores = _finite(scores)  # once, not per temperature tried
    losses = [_nll(scores, y, t) for t in _GRID]
    best = int(np.argmin(losses))
    low, high = _GRID[max(best - 1, 0)], _GRID[min(best + 1, len(_GRID) - 1)]
    fine = np.exp(np.linspace(np.log(low), np.log(high), 41))  # one grid step either side
    return float(fine[int(np.argmin([_nll(scores, y, t) for t in fine]))])


# The confidence map is fitted only when the held-out answers hold at least this many right and
# this many wrong ones; with fewer, the map is the identity (the tempered probability stands).
MAP_MIN_EACH = 10


def _log_odds(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp(1e-12, 1 - 1e-12)
    return torch.log(p) - torch.log1p(-p)


def fit_confidence_map(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[float, float]:
    """(a, b) of q = sigmoid(a * logit(p) + b): the routed task's tempered probability p mapped
    to how often such answers are right, fitted by maximum likelihood on held-out answers
    (`confidence` (N,), `correct` (N,) bool). One temperature cannot do this at many tasks: the
    classifier's tempered probabilities are too low where it hesitates and too high where it is
    sure (measured on the 100-task stream: README, "Task-free prediction"). (1, 0) is the identity, returned
    when fewer than `MAP_MIN_EACH` answers are right or wrong."""
    confidence, correct = torch.as_tensor(confidence), torch.as_tensor(correct).double()
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} "
                         "must be equal 1-D shapes")
    right = int(correct.sum())
    if min(right, len(correct) - right) < MAP_MIN_EACH:
        return 1.0, 0.0
    with torch.inference_mode(False), torch.enable_grad():  # callers may be predicting
        z, truth = _log_odds(confidence.clone()), correct.clone()
        ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([ab], max_iter=100, line_search_fn="strong_wolfe")

        def loss():
            optimizer.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * z + ab[1], truth)
            value.backward()
            return value

        optimizer.step(loss)
        a, b = (float(v) for v in ab.detach())
    if not (np.isfinite(a) and np.isfinite(b) and a > 0):  # a map that reverses the order is no map
        return 1.0, 0.0
    return a, b


def map_confidence(p: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """`fit_confidence_map`'s q for probabilities p (any shape), float64; (1, 0) returns p."""
    if (a, b) == (1.0, 0.0):
        return p.double()
    return torch.sigmoid(a * _log_odds(p) + b)
