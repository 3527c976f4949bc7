"""`ia3`: one activation-scaling entry (in the top `adapt_layers` layers) and one head per task;
nothing is shared, so nothing learned for one task can change another's predictions."""

from __future__ import annotations

import torch

from ..types import Task
from .base import GradientMethod

ADAPTER = "adapter."
HEAD = "head."


class IA3Method(GradientMethod):
    name = "ia3"

    def adapter_key(self, task: str) -> str:
        return task

    def begin_task(self, learner, task: Task, states) -> None:
        learner.adapter.add(task.name)
        super().begin_task(learner, task, states)

    def param_groups(self, learner, task: Task) -> list[dict]:
        return [
            {"params": learner.adapter.parameters_of(task.name), "lr": self.train.lr},
            {"params": list(learner.heads.heads[task.name].parameters()), "lr": self.train.head_lr},
        ]

    def forget(self, learner, task: str) -> None:
        if task in learner.adapter.entries():
            learner.adapter.remove(task)
        if task in learner.heads:
            learner.heads.remove(task)

    def task_tensors(self, learner, task: str) -> dict[str, torch.Tensor]:
        tensors = {ADAPTER + k: v for k, v in learner.adapter.state_of(task).items()}
        head = learner.heads.heads[task]
        tensors[HEAD + "weight"] = head.weight.detach().cpu()
        tensors[HEAD + "bias"] = head.bias.detach().cpu()
        return tensors

    def load_task_tensors(self, learner, task: str, labels, tensors) -> None:
        adapter = {k[len(ADAPTER):]: v for k, v in tensors.items() if k.startswith(ADAPTER)}
        learner.adapter.load_state_of(task, adapter)
        load_head(learner, task, labels, tensors)


def load_head(learner, task: str, labels, tensors: dict[str, torch.Tensor]) -> None:
    weight, bias = tensors.get(HEAD + "weight"), tensors.get(HEAD + "bias")
    if weight is None or bias is None:
        raise ValueError(f"task {task!r}: head tensors missing")
    if tuple(weight.shape) != (len(labels), learner.backbone.hidden_size):
        raise ValueError(
            f"task {task!r}: head shape {tuple(weight.shape)} does not fit {len(labels)} labels "
            f"and hidden size {learner.backbone.hidden_size}"
        )
    learner.heads.add(task, len(labels), seed=0, device=learner.device)
    with torch.no_grad():
        learner.heads.heads[task].weight.copy_(weight)
        learner.heads.heads[task].bias.copy_(bias)
