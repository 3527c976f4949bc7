"""How a task-free answer is stated: the routed task's probability, the runner-up tasks, and
"ambiguous" instead of a guess when the router is not sure enough (`min_task_confidence`).

The router's probabilities are calibrated (`model/calibration.py`), so a threshold means what it
says: among answers given at probability >= 0.9, about 9 in 10 went to the right task.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from .types import Prediction

if TYPE_CHECKING:  # the server imports this module before any model is loaded
    import torch

AMBIGUOUS = "ambiguous"
OK = "ok"


class TaskFreeAnswer:
    """Turns a row's task, logits and routed candidates into a `Prediction`."""

    def __init__(self, top_k: int = 1, min_task_confidence: float | None = None, joint_k: int = 1):
        for name, value in (("top_k", top_k), ("joint_k", joint_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if min_task_confidence is not None and not 0.0 <= min_task_confidence <= 1.0:
            raise ValueError(f"min_task_confidence must be in [0, 1], got {min_task_confidence!r}")
        self.top_k, self.min_task_confidence = top_k, min_task_confidence
        self.joint_k = joint_k  # how many candidate tasks' heads weigh in (1: the router alone)

    @property
    def candidates_needed(self) -> int:
        """How many candidate tasks to rank: an ambiguous answer names at least two."""
        return max(self.top_k, 2) if self.min_task_confidence is not None else self.top_k

    def prediction(self, task: str, labels: Sequence[str], logits: torch.Tensor,
                   candidates: list[tuple[str, float]] | None) -> Prediction:
        """`logits` (C,) of `task`; `candidates`: None for a row whose task was given."""
        import torch

        label = labels[int(logits.argmax())]
        probabilities = dict(zip(labels, torch.softmax(logits, dim=-1).tolist()))
        if candidates is None:
            return Prediction(task, label, probabilities)
        return self.restate(Prediction(task, label, probabilities, candidates[0][1], tuple(candidates)))

    def restate(self, prediction: Prediction) -> Prediction:
        """A routed prediction made with at least `candidates_needed` candidates, stated as
        this answer asks (a server predicts a pass of several requests at the largest k)."""
        if prediction.task_probability is None or prediction.status == AMBIGUOUS:
            return prediction
        if self.min_task_confidence is not None and prediction.task_probability < self.min_task_confidence:
            return Prediction(None, None, {}, prediction.task_probability,
                              prediction.candidates[: self.candidates_needed], AMBIGUOUS)
        return replace(prediction, candidates=prediction.candidates[: self.top_k])
