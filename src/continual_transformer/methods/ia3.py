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

    def begin_task(self, model, task: Task, states) -> None:
        model.adapter.add(task.name)
        super().begin_task(model, task, states)

    def param_groups(self, model, task: Task) -> list[dict]:
        return [
            {"params": model.adapter.parameters_of(task.name), "lr": self.train.lr},
            {"params": list(model.heads.heads[task.name].parameters()), "lr": self.train.head_lr},
        ]

    def delete(self, model, task: str) -> None:
        if task in model.adapter.entries():
            model.adapter.remove(task)
        if task in model.heads:
            model.heads.remove(task)

    def task_tensors(self, model, task: str) -> dict[str, torch.Tensor]:
        tensors = {ADAPTER + k: v for k, v in model.adapter.state_of(task).items()}
        head = model.heads.heads[task]
        tensors[HEAD + "weight"] = head.weight.detach().cpu()
        tensors[HEAD + "bias"] = head.bias.detach().cpu()
        return tensors

    def load_task_tensors(self, model, task: str, labels, tensors) -> None:
        adapter = {k[len(ADAPTER):]: v for k, v in tensors.items() if k.startswith(ADAPTER)}
        model.adapter.load_state_of(task, adapter)
        load_head(model, task, labels, tensors)


def load_head(model, task: str, labels, tensors: dict[str, torch.Tensor]) -> None:
    weight, bias = tensors.get(HEAD + "weight"), tensors.get(HEAD + "bias")
    if weight is None or bias is None:
        raise ValueError(f"task {task!r}: head tensors missing")
    if tuple(weight.shape) != (len(labels), model.backbone.hidden_size):
        raise ValueError(
            f"task {task!r}: head shape {tuple(weight.shape)} does not fit {len(labels)} labels "
            f"and hidden size {model.backbone.hidden_size}"
        )
    model.heads.add(task, labels, seed=0, device=model.device)
    with torch.no_grad():
        model.heads.heads[task].weight.copy_(weight)
        model.heads.heads[task].bias.copy_(bias)
