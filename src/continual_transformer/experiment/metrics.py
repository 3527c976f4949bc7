"""Continual-learning metrics as pure functions of the accuracy matrix.

`R[i, j]` is the accuracy on task j after learning task i (tasks in stream order). Entries above
the diagonal (tasks not learned yet) are NaN and never read, except where a function says so.
"""

from __future__ import annotations

import numpy as np


def _square(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {R.shape}")
    if np.isnan(np.tril(R)).any():
        raise ValueError("accuracy matrix has NaN on or below the diagonal")
    return R


def average_accuracy(R) -> float:
    """ACC: mean accuracy over all tasks after learning the last one."""
    R = _square(R)
    return float(R[-1].mean())


def backward_transfer(R) -> float:
    """BWT: mean change on earlier tasks from just after learning them to the end (<0: forgetting)."""
    R = _square(R)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))


def forgetting(R) -> float:
    """Mean over earlier tasks of (best accuracy it ever had) - (final accuracy); >= 0."""
    R = _square(R)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[j : T - 1, j].max() - R[-1, j] for j in range(T - 1)]))


def forward_transfer(before, reference) -> float:
    """FWT: mean over tasks 2..T of (accuracy on task i just before learning it, R[i-1, i])
    minus a reference accuracy b_i for that task (GEM's definition).

    `before[i]` is R[i-1, i] (before[0] is unused); `reference[i]` is b_i.
    """
    before, reference = np.asarray(before, dtype=float), np.asarray(reference, dtype=float)
    if before.shape != reference.shape:
        raise ValueError(f"shapes differ: {before.shape} vs {reference.shape}")
    if before.shape[0] < 2:
        return 0.0
    return float(np.mean(before[1:] - reference[1:]))


def average_incremental_accuracy(R) -> float:
    """Mean over steps i of the mean accuracy on tasks 0..i after learning task i."""
    R = _square(R)
    return float(np.mean([R[i, : i + 1].mean() for i in range(R.shape[0])]))


def routing_accuracy(confusion) -> dict:
    """Per true task and overall share of inputs routed to their own task.

    `confusion[j, k]` counts task j's inputs routed to task k.
    """
    C = np.asarray(confusion, dtype=float)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {C.shape}")
    totals = C.sum(1)
    per_task = [float(C[j, j] / totals[j]) if totals[j] else None for j in range(len(C))]
    overall = float(np.trace(C) / C.sum()) if C.sum() else None
    return {"per_task": per_task, "overall": overall}


CONFUSED_SHARE = 0.10  # a pair is named when this share of one task's inputs go to the other


def confused_pairs(confusion, names: list[str], share: float = CONFUSED_SHARE) -> list[dict]:
    """The task pairs the router confuses: each (task, routed_to) where at least `share` of
    `task`'s inputs went to `routed_to`, largest share first. Text alone does not tell these
    tasks apart; a caller can name the task for their inputs."""
    C = np.asarray(confusion, dtype=float)
    if C.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix of shape {C.shape} for {len(names)} task names")
    pairs = []
    for j, total in enumerate(C.sum(1)):
        for k in range(len(names)):
            if k != j and total and C[j, k] / total >= share:
                pairs.append({"task": names[j], "routed_to": names[k],
                              "share": round(float(C[j, k] / total), 4)})
    return sorted(pairs, key=lambda p: -p["share"])


def summary(R, before=None, reference=None) -> dict:
    out = {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
    }
    if before is not None and reference is not None:
        out["fwt"] = forward_transfer(before, reference)
    return out
