"""What every baseline has in common: ONE activation-scaling entry shared by all tasks, learned
task after task, plus one linear head per task.

All baselines (`finetune`, `ewc`, `lwf`, `replay`, `joint`) train exactly this parameter set,
with the same loop, learning rates and epochs as `ia3`, so that differences between them come
from the method alone. `ia3` trains the same number of scale parameters per task, but in an
entry of the task's own; here every task rewrites the one entry, so old tasks can be forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..types import Task
from ..model.trunk import TopInput
from .base import GradientMethod
from .ia3 import ADAPTER, HEAD, load_head

SHARED = "shared"  # the adapter entry every task's rows use


@dataclass(frozen=True)
class _Before:
    """What a task's `learn` may change, as it was before: restored if the learn fails."""

    task: str
    entry: dict[str, torch.Tensor] | None  # None: the task creates the shared entry
    heads: dict[str, dict[str, torch.Tensor]]


class SharedAdapterMethod(GradientMethod):
    """One shared scale entry (created with the first task) and a head per task.

    A failed `learn` puts the shared entry and every head back as they were before the task
    began; deleting a learned task removes its head only (what it taught the shared entry
    stays), and deleting the last task removes the shared entry too.
    """

    shares_state = True
    shares = "every task trains the one shared scale entry in turn, from where the tasks before it left it"
    # Whether the heads of earlier tasks train too (methods whose loss reaches them).
    trains_old_heads = False

    def __init__(self, train=None, adapt_layers=None):
        super().__init__(train, adapt_layers)
        self._before: _Before | None = None

    def adapter_key(self, task: str) -> str:
        return SHARED

    def begin_task(self, model, task: Task, states) -> None:
        entry = None
        if SHARED in model.adapter.entries():
            entry = {k: v.clone() for k, v in model.adapter.state_of(SHARED).items()}
        heads = {name: {k: v.detach().clone() for k, v in head.state_dict().items()}
                 for name, head in model.heads.heads.items()}
        self._before = _Before(task.name, entry, heads)
        if entry is None:
            model.adapter.add(SHARED)
        super().begin_task(model, task, states)

    def param_groups(self, model, task: Task, train, top_layers=None) -> list[dict]:
        heads = list(model.heads.heads) if self.trains_old_heads else [task.name]
        return [
            {"params": model.adapter.parameters_of(SHARED, top_layers), "lr": train.lr},
            {"params": [p for name in heads for p in model.heads.heads[name].parameters()],
             "lr": train.head_lr},
        ]

    def began(self, task: str) -> bool:
        """Whether the last `learn` to begin was `task`'s (what `rollback` restores is its)."""
        return self._before is not None and self._before.task == task

    def rollback(self, model, task: str) -> None:
        if self.began(task):
            before, self._before = self._before, None
            if task in model.heads:
                model.heads.remove(task)
            if before.entry is None:
                if SHARED in model.adapter.entries():
                    model.adapter.remove(SHARED)
            else:
                model.adapter.load_state_of(SHARED, before.entry)
            with torch.no_grad():
                for name, state in before.heads.items():
                    model.heads.heads[name].load_state_dict(state)
            return
        self.delete(model, task)  # nothing of it began: only what a load wrote, if anything

    def delete(self, model, task: str) -> None:
        if self.began(task):
            self._before = None  # a later failed learn of the same name must not restore it
        if task in model.heads:
            model.heads.remove(task)
        if not list(model.heads.heads) and SHARED in model.adapter.entries():
            model.adapter.remove(SHARED)  # no task left: back to the plain backbone

    def footprint(self, model, task: str) -> tuple[int, int]:
        return 0, model.heads.num_parameters(task)  # the shared entry: `shared_numbers`

    def shared_numbers(self, model) -> int:
        return model.adapter.num_parameters(SHARED) if SHARED in model.adapter.entries() else 0

    # -- checkpoint ----------------------------------------------------------------------------
    def task_tensors(self, model, task: str) -> dict[str, torch.Tensor]:
        head = model.heads.heads[task]
        return {HEAD + "weight": head.weight.detach().cpu(), HEAD + "bias": head.bias.detach().cpu()}

    def load_task_tensors(self, model, task: str, labels, tensors) -> None:
        unexpected = sorted(k for k in tensors if not k.startswith(HEAD))
        if unexpected:
            raise ValueError(f"task {task!r}: unexpected tensors {unexpected[:3]} for method "
                             f"{self.name!r} (a task owns only its head)")
        load_head(model, task, labels, tensors)

    def shared_tensors(self, model) -> dict[str, torch.Tensor]:
        if SHARED not in model.adapter.entries():
            return {}
        return {ADAPTER + k: v for k, v in model.adapter.state_of(SHARED).items()}

    def load_shared_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
        unexpected = sorted(k for k in tensors if not k.startswith(ADAPTER))
        if unexpected:
            raise ValueError(f"method {self.name!r}: unexpected shared tensors {unexpected[:3]}")
        adapter = {k[len(ADAPTER):]: v for k, v in tensors.items()}
        if adapter:
            model.adapter.load_state_of(SHARED, adapter)


def shared_pooled(model, inputs: TopInput) -> torch.Tensor:
    """The pooled output (B, H) of a batch under the shared entry; differentiable."""
    return model.top_pooled(inputs, [SHARED] * inputs.hidden.shape[0])


def rows_cross_entropy(model, pooled: torch.Tensor, tasks: list[str], labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over rows that may belong to different tasks, each row through its
    own task's head (one head call per distinct task, never per row)."""
    total = pooled.new_zeros(())
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        logits = model.heads(pooled[rows], task)  # (B_task, C_task)
        total = total + F.cross_entropy(logits, labels[rows], reduction="sum")
    return total / len(tasks)
