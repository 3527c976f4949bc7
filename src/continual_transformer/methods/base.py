"""What every method provides, and the shared shape of gradient methods."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, ClassVar

import torch
from torch.nn import functional as F

from ..config import TrainConfig
from ..data import Task
from ..train import Checkpointing, Progress, TrainResult, fit

if TYPE_CHECKING:
    from ..learner import ContinualLearner


def task_seed(seed: int, task: str) -> int:
    """A seed for one task's random choices that does not depend on the tasks before it."""
    return zlib.crc32(f"{seed}:{task}".encode())


class Method:
    """How tasks are learned, and which learned state a task owns.

    `adapter_key(task)` names the activation-scaling entry a task's rows use (None: the plain
    backbone). `task_tensors` is the state saved in the task's own checkpoint file;
    `shared_tensors` the state shared by all tasks (empty when nothing is shared).
    """

    name: ClassVar[str]

    def hyperparameters(self) -> dict:
        raise NotImplementedError

    def adapter_key(self, task: str) -> str | None:
        raise NotImplementedError

    def learn(
        self, learner: "ContinualLearner", task: Task, progress: Progress | None,
        checkpointing: Checkpointing | None = None,
    ) -> dict:
        """Learn the task; return its stats. Methods that train in steps save and resume through
        `checkpointing`; the others learn a task in one go and ignore it."""
        raise NotImplementedError

    def forget(self, learner: "ContinualLearner", task: str) -> None:
        """Remove everything the task owns; used to delete a task or undo a failed one."""
        raise NotImplementedError

    def task_tensors(self, learner: "ContinualLearner", task: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_task_tensors(
        self, learner: "ContinualLearner", task: str, labels: tuple[str, ...],
        tensors: dict[str, torch.Tensor],
    ) -> None:
        raise NotImplementedError

    def shared_tensors(self, learner: "ContinualLearner") -> dict[str, torch.Tensor]:
        return {}

    def load_shared_tensors(self, learner: "ContinualLearner", tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"method {self.name!r} has no shared state, got {sorted(tensors)[:3]}")


class GradientMethod(Method):
    """A method trained by the shared loop: it names its parameters and its loss."""

    def __init__(self, train: TrainConfig | None = None):
        self.train = train or TrainConfig()

    def hyperparameters(self) -> dict:
        return {"train": self.train.to_dict()}

    def begin_task(self, learner: "ContinualLearner", task: Task) -> None:
        learner.heads.add(task.name, len(task.labels), task_seed(self.train.seed, task.name),
                          learner.device)

    def param_groups(self, learner: "ContinualLearner", task: Task) -> list[dict]:
        raise NotImplementedError

    def loss(
        self, learner: "ContinualLearner", task: Task, batch: dict, labels: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(learner.task_logits(batch, task.name), labels)

    def end_task(self, learner: "ContinualLearner", task: Task) -> None:
        pass

    def learn(
        self, learner: "ContinualLearner", task: Task, progress: Progress | None,
        checkpointing: Checkpointing | None = None,
    ) -> dict:
        self.begin_task(learner, task)
        ids = learner.backbone.tokenize([e.text for e in task.train])
        index = task.label_index()
        labels = torch.tensor([index[e.label] for e in task.train], device=learner.device)

        def batch_loss(indices: list[int]) -> torch.Tensor:
            batch = learner.backbone.collate([ids[i] for i in indices])
            return self.loss(learner, task, batch, labels[indices])

        result: TrainResult = fit(
            self.param_groups(learner, task), batch_loss, len(ids), self.train,
            task_seed(self.train.seed, task.name), progress, lengths=[len(row) for row in ids],
            checkpointing=checkpointing,
        )
        self.end_task(learner, task)
        return result.stats()
