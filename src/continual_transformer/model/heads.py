"""Per-task linear heads on the pooled backbone output."""

from __future__ import annotations

import torch
from typing import Sequence

from torch import nn


class TaskHeads(nn.Module):
    """One `nn.Linear(hidden, n_labels)` per task, keyed by task name, and the task's labels
    in the order of the head's outputs."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.heads = nn.ModuleDict()
        self.labels: dict[str, tuple[str, ...]] = {}

    def add(self, task: str, labels: Sequence[str], seed: int,
            device: torch.device | str = "cpu") -> None:
        if task in self.heads:
            raise ValueError(f"a head for task {task!r} already exists")
        num_labels = len(labels)
        # Seeded per task, so a task's initial head does not depend on what was learned before.
        generator = torch.Generator().manual_seed(seed)
        head = nn.Linear(self.hidden_size, num_labels)
        with torch.no_grad():
            bound = 1.0 / self.hidden_size**0.5
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.zero_()
        self.heads[task] = head.to(device)
        self.labels[task] = tuple(labels)

    def remove(self, task: str) -> None:
        del self.heads[task]
        del self.labels[task]

    def __contains__(self, task: str) -> bool:
        return task in self.heads

    def forward(self, pooled: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](pooled)  # (B, H) -> (B, C_task)

    def per_row(self, pooled: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        """Logits for each row under its own task's head (rows grouped by task)."""
        out: list[torch.Tensor | None] = [None] * len(tasks)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            logits = self.heads[task](pooled[rows])  # (B_task, C_task)
            for i, row in zip(rows, logits):
                out[i] = row
        return out  # type: ignore[return-value]

    def num_parameters(self, task: str) -> int:
        return sum(p.numel() for p in self.heads[task].parameters())
