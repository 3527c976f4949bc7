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


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 matrix products in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:  # not Linux: no cheap way to tell, so stay in float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_autocast(precision: str, device: torch.device):
    """A context-manager factory for training forward passes in the configured precision."""
    use_bf16 = precision == "bf16" or (precision == "auto" and native_bf16(device))
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


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
    # True when the method classifies over all tasks' labels and so predicts the task itself;
    # otherwise the learner routes task-free inputs with its router.
    routes_itself: ClassVar[bool] = False
    # True when learning one task can change what another task's inputs meet (shared state).
    shares_state: ClassVar[bool] = False
    # Bytes per number of the state counted as the task's "head" (float32 weights by default).
    head_number_bytes: ClassVar[int] = 4

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

    def head_logits(
        self, learner: "ContinualLearner", pooled: torch.Tensor, tasks: list[str]
    ) -> list[torch.Tensor]:
        """Logits per row from the pooled backbone output (B, H), each under its own task."""
        return learner.heads.per_row(pooled, tasks)

    def infer_tasks(self, learner: "ContinualLearner", pooled: torch.Tensor) -> list[str]:
        raise NotImplementedError(f"method {self.name!r} does not predict tasks; use the router")

    def footprint(self, learner: "ContinualLearner", task: str) -> tuple[int, int]:
        """(scale-vector parameters, head parameters) the task owns."""
        key = self.adapter_key(task)
        adapter = learner.adapter.num_parameters(key) if key == task else 0
        head = learner.heads.num_parameters(task) if task in learner.heads else 0
        return adapter, head

    def shared_numbers(self, learner: "ContinualLearner") -> int:
        """Numbers of state shared by all tasks."""
        return 0

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

    def shared_json(self, learner: "ContinualLearner") -> dict | None:
        """Shared state that is not tensors (replay's stored texts), saved as JSON; None: none."""
        return None

    def load_shared_json(self, learner: "ContinualLearner", data: dict) -> None:
        raise ValueError(f"method {self.name!r} has no JSON state, got keys {sorted(data)[:3]}")


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

    def batch_loss(
        self, learner: "ContinualLearner", task: Task, indices: list[int],
        ids: list[list[int]], labels: torch.Tensor,
    ) -> torch.Tensor:
        """Loss of the training batch `indices` into the task's token ids and labels; a method
        that adds rows (replay) or per-example targets (distillation) overrides this."""
        batch = learner.backbone.collate([ids[i] for i in indices])
        return self.loss(learner, task, batch, labels[indices])

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

        autocast = training_autocast(self.train.precision, learner.device)

        def batch_loss(indices: list[int]) -> torch.Tensor:
            with autocast():
                return self.batch_loss(learner, task, indices, ids, labels).float()

        result: TrainResult = fit(
            self.param_groups(learner, task), batch_loss, len(ids), self.train,
            task_seed(self.train.seed, task.name), progress, lengths=[len(row) for row in ids],
            checkpointing=checkpointing,
        )
        self.end_task(learner, task)
        return result.stats()
