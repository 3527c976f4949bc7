"""`joint`: every task trained at once on the union of their data: the upper bound of what the
shared parameter set can do, not a continual method.

It trains the same parameters as the other baselines (one shared scale entry and a head per
task) with the same loop and settings; `epochs` passes over the union make as many optimiser
steps as learning the tasks one after another. Batches mix tasks: one forward pass under the
shared entry, each row through its own task's head, mean cross-entropy over the rows.

Because it sees every task before it is evaluated, its accuracy matrix has only its last row
(after all tasks); BWT, forgetting and FWT do not apply (`experiment.run_joint`).
"""

from __future__ import annotations

import torch

from ..types import Task
from ..training.loop import fit
from ..training.precision import training_autocast
from .base import task_seed
from .shared_adapter import SHARED, SharedAdapterMethod, rows_cross_entropy, shared_pooled


class JointMethod(SharedAdapterMethod):
    name = "joint"
    learns_jointly = True
    shares = "all tasks train the one shared scale entry at once"

    def learn_jointly(self, model, tasks: list[Task], states, progress) -> dict:
        if SHARED in model.adapter.entries() or list(model.heads.heads):
            raise ValueError("method 'joint' trains once, from the plain backbone; this model "
                             "already has learned state")
        model.adapter.add(SHARED)
        try:
            for task in tasks:
                model.heads.add(task.name, task.labels,
                                  task_seed(self.train.seed, task.name), model.device)
            row_tasks, labels = [], []
            for task in tasks:
                index = task.label_index()
                row_tasks += [task.name] * len(task.train)
                labels += [index[e.label] for e in task.train]
            targets = torch.tensor(labels, device=model.device)
            autocast = training_autocast(self.train.precision, model.device)

            def batch_loss(indices: list[int]) -> torch.Tensor:
                with autocast():
                    pooled = shared_pooled(model, states.batch(indices))
                    return rows_cross_entropy(model, pooled, [row_tasks[i] for i in indices],
                                              targets[indices]).float()

            groups = [
                {"params": model.adapter.parameters_of(SHARED), "lr": self.train.lr},
                {"params": list(model.heads.parameters()), "lr": self.train.head_lr},
            ]
            result = fit(groups, batch_loss, len(states), self.train,
                         task_seed(self.train.seed, "\x00joint"), progress, lengths=states.lengths,
                         max_tokens=model.pass_tokens)
        except BaseException:
            for task in tasks:
                if task.name in model.heads:
                    model.heads.remove(task.name)
            model.adapter.remove(SHARED)
            raise
        return {**result.stats(), "joint_examples": len(states)}
