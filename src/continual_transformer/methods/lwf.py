"""`lwf`: learning without forgetting (Li & Hoiem 2016).

At the start of each task the shared entry is frozen into a snapshot (the teacher). Training
the new task minimises

    cross-entropy(new head)  +  alpha * sum over earlier tasks j of T^2 * KL(teacher_j || student_j)

where student_j / teacher_j are earlier task j's head's logits on the *new* task's inputs,
under the current shared entry / the snapshot, both softened by temperature T. As in the
paper, the earlier heads train too (the distillation reaches them); no old data is kept.

The teacher never changes during a task, so its logits are computed once, at the start, for
every training input of the task (one inference pass over the task's data) instead of once per
batch and epoch: the same targets, a fraction of the cost.

Defaults: alpha = 1, T = 2 (the paper's values); training as `finetune`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..model.batching import length_batches
from ..types import Task
from .shared_adapter import SHARED, SharedAdapterMethod, shared_pooled


class LwFMethod(SharedAdapterMethod):
    name = "lwf"
    shares = ("every task trains the one shared scale entry in turn, distilled from the heads of "
              "the tasks before it")
    trains_old_heads = True

    def __init__(self, train=None, adapt_layers=None, alpha: float = 1.0, temperature: float = 2.0):
        super().__init__(train, adapt_layers)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.snapshot: dict[str, torch.Tensor] | None = None  # the shared entry at task start
        self.teacher: dict[str, torch.Tensor] = {}  # earlier task -> (N, C_task) teacher logits

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "alpha": self.alpha, "temperature": self.temperature}

    def begin_task(self, model, task: Task, states) -> None:
        earlier = list(model.heads.heads)  # the tasks learned before this one
        super().begin_task(model, task, states)
        self.snapshot = {k: v.clone() for k, v in model.adapter.state_of(SHARED).items()}
        self.teacher = self.teacher_logits(model, states, earlier) if earlier else {}

    @torch.inference_mode()
    def teacher_logits(self, model, states, earlier: list[str]) -> dict[str, torch.Tensor]:
        """Logits of every earlier head on each training input of the task, under the shared
        entry as it is now (before training): {task: (N, C_task)}."""
        n = len(states)
        out = {name: torch.empty(n, len(model.heads.labels[name]), device=model.device)
               for name in earlier}
        for rows in length_batches(states.lengths):  # little padding
            pooled = shared_pooled(model, states.batch(rows))
            for name in earlier:
                out[name][rows] = model.heads(pooled, name).float()
        return out

    def distillation(self, model, pooled: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """alpha * sum_j T^2 KL(teacher_j || student_j) over the batch rows `indices` (B, H)."""
        total = pooled.new_zeros(())
        T = self.temperature
        for name, logits in self.teacher.items():
            student = F.log_softmax(model.heads(pooled, name) / T, dim=-1)  # (B, C_j)
            target = F.softmax(logits[indices] / T, dim=-1)
            total = total + F.kl_div(student, target, reduction="batchmean") * T * T
        return self.alpha * total

    def batch_loss(self, model, task: Task, indices, states, labels) -> torch.Tensor:
        pooled = shared_pooled(model, states.batch(indices))
        loss = F.cross_entropy(model.heads(pooled, task.name), labels[indices])
        return loss + self.distillation(model, pooled, indices)

    def end_task(self, model, task: Task, states) -> None:
        self.teacher = {}  # only needed while the task trains
