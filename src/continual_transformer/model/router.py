"""The router: which task does an input belong to, when the caller does not say?

It classifies the *trunk's* output (the mean over tokens of the layers below the adapted top),
expanded by fixed random features, with a streaming shared-covariance classifier over task ids
(`analytic.AnalyticClassifier`). No task changes the trunk, so the router reads it from the
prediction pass itself: routing costs no extra backbone pass, and the rows of one batch can go
to different tasks in that same pass. A model whose every layer is adapted has an empty trunk:
its router reads the embedding layer.

It learns as tasks arrive, from the trunk features of each task's training texts that learning
computed anyway; its state is constant in the number of examples.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from .closed_form import AnalyticClassifier

PREFIX = "router."
SOLUTION = PREFIX + "solution."  # saved shared tensors: the solved router, not statistics
PREDICT_ROWS = 2048


class Router:
    # Measured on the bundled stream (benchmarks/analytic_choices.py): LDA on 2048 random
    # features of the embedding layer routes 95.4% of test inputs right, on the raw 384
    # features 93.4%; on the 3-layer trunk's output, 96.5%.
    def __init__(self, in_dim: int, *, n_features: int = 2048, solver: str = "lda",
                 shrinkage: float | None = None, seed: int = 0):
        self.classifier = AnalyticClassifier(in_dim=in_dim, n_features=n_features, solver=solver,
                                             shrinkage=shrinkage, seed=seed)

    def hyperparameters(self) -> dict:
        options = self.classifier.hyperparameters()
        del options["in_dim"]  # a property of the backbone
        return options

    @property
    def tasks(self) -> list[str]:
        return list(self.classifier.classes_)

    def partial_fit(self, features: torch.Tensor, task: str) -> None:
        """Add one task's training features (n, H)."""
        self.classifier.partial_fit(features, [task] * len(features))

    def predict(self, features: torch.Tensor,
                among: Sequence[Collection[str] | None] | None = None) -> list[str]:
        """The most likely task per row (n, H) -> n names; `among` (one entry per row, None:
        every task) limits a row to some tasks: a caller that may see only those."""
        return [name for name, _ in self.choose(features, among)]

    def choose(self, features: torch.Tensor,
               among: Sequence[Collection[str] | None] | None = None) -> list[tuple[str, float]]:
        """`predict`'s task per row with its probability among the tasks the row may go to."""
        if len(self.classifier.classes_) == 1:
            return [(self.classifier.classes_[0], 1.0)] * len(features)
        # In chunks: the expanded features are float64, 16 KiB per row.
        return [choice for start in range(0, len(features), PREDICT_ROWS)
                for choice in self.classifier.choose(
                    features[start : start + PREDICT_ROWS],
                    None if among is None else among[start : start + PREDICT_ROWS])]

    def prepare(self) -> None:
        """Solve now what the first routed prediction would otherwise solve (seconds at 2048
        features), e.g. before a server swaps this router in."""
        if len(self.classifier.classes_) > 1:
            self.classifier.solution()

    def solution_tensors(self) -> dict[str, torch.Tensor]:
        """The solved router (solved now if need be), to save beside its statistics: a model
        loaded with it routes at once and exactly as the one that saved it."""
        if len(self.classifier.classes_) < 2:
            return {}
        return {SOLUTION + k: v for k, v in self.classifier.solution_state().items()}

    def load_solution_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install `solution_tensors()` saved with the statistics now loaded."""
        self.classifier.load_solution_state({k[len(SOLUTION):]: v for k, v in tensors.items()})

    def remove(self, task: str) -> None:
        if task in self.classifier.classes_:
            self.classifier.remove_classes([task])

    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.classifier.class_state([task]).items()}

    def load_task_tensors(self, task: str, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        self.classifier.load_class_state([task], state)

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.classifier.shared_state().items()}

    def load_shared_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        self.classifier.load_shared_state(state)

    def add_shared_tensors(self, increment: dict[str, torch.Tensor]) -> None:
        """Add shared statistics gathered elsewhere (by a router that saw only new data)."""
        state = {k[len(PREFIX):]: v for k, v in increment.items() if k.startswith(PREFIX)}
        self.classifier.add_shared_state(state)

    def snapshot(self) -> tuple:
        """Everything `restore` needs to undo later changes (copies)."""
        return self.classifier.snapshot()

    def restore(self, snapshot: tuple) -> None:
        self.classifier.restore(snapshot)

    def state_numbers(self) -> dict[str, int]:
        return self.classifier.state_numbers()
