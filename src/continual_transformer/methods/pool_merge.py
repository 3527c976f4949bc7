"""Merging a newly trained scale entry into an old one by distillation on the new task's texts.

The merged entry starts as the old entry and is trained so that, on the new task's training
texts, (a) the heads of the tasks that already read the old entry give the logits they gave
under the old entry, and (b) the new task's head gives the distribution it gave under the new
entry, while also fitting the new task's labels. Matching head logits rather than raw features
leaves free the directions of the features no old head reads, which is where the new task's
knowledge can go. No old task's texts are needed (none are kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..config import TrainConfig
from ..training.loop import Progress, fit
from ..training.precision import training_autocast
from .base import task_seed
from .transfer import pooled_features


@dataclass(frozen=True)
class MergeResult:
    stats: dict  # the distillation's training figures
    # Per old task: the share of the new task's texts on which its head predicts the same label
    # under the merged entry as under the old one (1.0: nothing it reads changed there).
    old_agreement: dict[str, float]
    new_train_accuracy: float  # the new task's head on the merged entry, on its training texts


def distill_into(model, task, states, labels: torch.Tensor, target: str, source: str,
                 old_tasks: list[str], train: TrainConfig, progress: Progress | None) -> MergeResult:
    """Train entry `target` (read by `old_tasks`' heads) and `task`'s head so that `target`
    reproduces what those heads read from it and what `task`'s head read from entry `source`;
    `labels` (N,) are the task's label indices on the device."""
    device = model.device
    with torch.inference_mode():
        old_features = pooled_features(model, states, target).to(device)  # (N, H)
        new_features = pooled_features(model, states, source).to(device)  # (N, H)
        old_logits = {t: model.heads(old_features, t).float() for t in old_tasks}  # each (N, C_t)
        new_probs = torch.softmax(model.heads(new_features, task.name).float(), -1)  # (N, C)
    old_logits = {t: v.clone() for t, v in old_logits.items()}  # usable outside inference mode
    new_probs = new_probs.clone()
    autocast = training_autocast(train.precision, device)

    def batch_loss(indices: list[int]) -> torch.Tensor:
        with autocast():
            pooled = model.top_pooled(states.batch(indices), [target] * len(indices))  # (B, H)
            old = sum(F.mse_loss(model.heads(pooled, t).float(), old_logits[t][indices])
                      for t in old_tasks) / max(len(old_tasks), 1)
            logits = model.heads(pooled, task.name).float()  # (B, C)
            new = (F.kl_div(F.log_softmax(logits, -1), new_probs[indices], reduction="batchmean")
                   + F.cross_entropy(logits, labels[indices]))
            return old + new

    groups = [{"params": model.adapter.parameters_of(target), "lr": train.lr},
              {"params": list(model.heads.heads[task.name].parameters()), "lr": train.head_lr}]
    result = fit(groups, batch_loss, len(states), train, task_seed(train.seed, f"merge:{task.name}"),
                 progress, lengths=states.lengths, max_tokens=model.pass_tokens,
                 length_multiple=model.backbone.length_multiple)
    with torch.inference_mode():
        merged = pooled_features(model, states, target).to(device)  # (N, H)
        agreement = {t: float((model.heads(merged, t).argmax(-1) == old_logits[t].argmax(-1))
                              .float().mean()) for t in old_tasks}
        accuracy = float((model.heads(merged, task.name).argmax(-1) == labels).float().mean())
    return MergeResult(result.stats(), agreement, accuracy)
