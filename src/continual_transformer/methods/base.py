"""What every method provides, and the shared shape of gradient methods."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch.nn import functional as F

from ..config import DEFAULT_ADAPT_LAYERS, TrainConfig
from ..types import Task
from ..training.precision import training_autocast
from ..training.loop import Checkpointing, Progress, TrainResult, fit
from ..model.trunk import TopInput, TrunkStates

if TYPE_CHECKING:
    from ..model.adapted import AdaptedModel


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
    # True when the shared state is sums of statistics (`analytic`): a task learned elsewhere
    # joins by adding what it added to them (`add_shared_tensors`), exactly as learning it here.
    sums_statistics: ClassVar[bool] = False
    # What a method that shares state shares, in words: why its tasks cannot be learned apart.
    shares: ClassVar[str] = ""
    # True when the method learns all tasks at once (`learn_jointly`), never one by one.
    learns_jointly: ClassVar[bool] = False
    # Bytes per number of the state counted as the task's "head" (float32 weights by default).
    head_number_bytes: ClassVar[int] = 4
    # Precision of the passes that learning makes, and the memory (MiB) a task's stored trunk
    # output may take while it is learned (0: nothing is stored).
    precision: str = "fp32"
    trunk_cache_mb: float = 0

    def hyperparameters(self) -> dict:
        raise NotImplementedError

    def changed_tasks(self, stats: dict) -> list[str] | None:
        """The earlier tasks whose predictions the learn that returned `stats` may have
        changed: none when tasks are isolated, None (any of them) when state is shared."""
        return None if self.shares_state else []

    def data_parallel_refusal(self) -> str | None:
        """Why this method cannot learn a task across the processes of a data-parallel run
        (training/distributed.py); None when it can."""
        return None

    def resolve_adapt_layers(self, depth: int) -> int:
        """How many top layers of a `depth`-layer backbone carry per-task scales (0: none)."""
        return 0

    def adapter_key(self, task: str) -> str | None:
        raise NotImplementedError

    def learn(
        self, model: "AdaptedModel", task: Task, states: TrunkStates,
        progress: Progress | None, checkpointing: Checkpointing | None = None,
    ) -> dict:
        """Learn the task from its training texts' trunk states (the token ids, and the trunk's
        stored output); return its stats. Methods that train in steps save and resume through
        `checkpointing`; the others learn a task in one go and ignore it."""
        raise NotImplementedError

    def learn_jointly(self, model: "AdaptedModel", tasks: list[Task], states: TrunkStates,
                      progress: Progress | None) -> dict:
        """Learn `tasks` at once from the trunk states of all their training texts (task after
        task, in order); only for methods that declare `learns_jointly`."""
        raise NotImplementedError

    def head_logits(
        self, model: "AdaptedModel", pooled: torch.Tensor, tasks: list[str]
    ) -> list[torch.Tensor]:
        """Logits per row from the pooled backbone output (B, H), each under its own task."""
        return model.heads.per_row(pooled, tasks)

    def infer_tasks(self, model: "AdaptedModel", pooled: torch.Tensor, among=None) -> list[tuple[str, float]]:
        """Methods that classify over all tasks' labels: each row's task and its probability."""
        raise NotImplementedError(f"method {self.name!r} does not predict tasks; use the router")

    def footprint(self, model: "AdaptedModel", task: str) -> tuple[int, int]:
        """(scale-vector parameters, head parameters) the task owns."""
        key = self.adapter_key(task)
        adapter = model.adapter.num_parameters(key) if key == task else 0
        head = model.heads.num_parameters(task) if task in model.heads else 0
        return adapter, head

    def shared_numbers(self, model: "AdaptedModel") -> int:
        """Numbers of state shared by all tasks."""
        return 0

    def delete(self, model: "AdaptedModel", task: str) -> None:
        """Remove everything a learned task owns."""
        raise NotImplementedError

    def rollback(self, model: "AdaptedModel", task: str) -> None:
        """Undo a `learn` (or `learn_jointly`, or a load) of `task` that did not finish: the
        model and the method's state are put back as they were before it began. A method
        whose task owns all it writes undoes it by deleting it."""
        self.delete(model, task)

    def task_tensors(self, model: "AdaptedModel", task: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_task_tensors(
        self, model: "AdaptedModel", task: str, labels: tuple[str, ...],
        tensors: dict[str, torch.Tensor],
    ) -> None:
        raise NotImplementedError

    def shared_tensors(self, model: "AdaptedModel") -> dict[str, torch.Tensor]:
        return {}

    def load_shared_tensors(self, model: "AdaptedModel", tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"method {self.name!r} has no shared state, got {sorted(tensors)[:3]}")

    def add_shared_tensors(self, model: "AdaptedModel", increment: dict[str, torch.Tensor]) -> None:
        """Add shared statistics gathered elsewhere (only methods that `sums_statistics`)."""
        raise ValueError(f"method {self.name!r} does not sum statistics; got {sorted(increment)[:3]}")

    def shared_json(self, model: "AdaptedModel") -> dict | None:
        """Shared state that is not tensors (replay's stored texts), saved as JSON; None: none."""
        return None

    def load_shared_json(self, model: "AdaptedModel", data: dict) -> None:
        raise ValueError(f"method {self.name!r} has no JSON state, got keys {sorted(data)[:3]}")


class GradientMethod(Method):
    """A method trained by the shared loop: it names its parameters and its loss.

    `adapt_layers` is how many top layers of the backbone carry scale vectors: a number, "all",
    or None for the default (`DEFAULT_ADAPT_LAYERS`, or every layer of a shallower backbone);
    the layers below them are the shared trunk, run once per training text. The learner turns
    it into a number once it knows the backbone.
    """

    def __init__(self, train: TrainConfig | None = None, adapt_layers: int | str | None = None):
        self.train = train or TrainConfig()
        if adapt_layers not in (None, "all") and (
                isinstance(adapt_layers, bool) or not isinstance(adapt_layers, int) or adapt_layers < 1):
            raise ValueError(f"adapt_layers must be a whole number >= 1, 'all' or None (the "
                             f"default), got {adapt_layers!r}")
        self.adapt_layers = adapt_layers

    @property
    def precision(self) -> str:
        return self.train.precision

    @property
    def trunk_cache_mb(self) -> float:
        return self.train.trunk_cache_mb

    def hyperparameters(self) -> dict:
        return {"train": self.train.to_dict(), "adapt_layers": self.adapt_layers}

    def resolve_adapt_layers(self, depth: int) -> int:
        if self.adapt_layers is None:
            self.adapt_layers = min(DEFAULT_ADAPT_LAYERS, depth)
        elif self.adapt_layers == "all":
            self.adapt_layers = depth
        elif self.adapt_layers > depth:
            raise ValueError(f"adapt_layers={self.adapt_layers}, but the backbone has only "
                             f"{depth} layers")
        return self.adapt_layers

    def begin_task(self, model: "AdaptedModel", task: Task, states: TrunkStates) -> None:
        model.heads.add(task.name, task.labels, task_seed(self.train.seed, task.name), model.device)

    def param_groups(self, model: "AdaptedModel", task: Task, train: TrainConfig,
                     top_layers: int | None = None) -> list[dict]:
        """AdamW groups of the task's trainable parameters, at `train`'s rates."""
        raise NotImplementedError

    def logits(self, model: "AdaptedModel", inputs: TopInput, task: str) -> torch.Tensor:
        """Logits of a single-task batch: (B, C_task). Differentiable (used in training)."""
        keys = [self.adapter_key(task)] * inputs.hidden.shape[0]
        return model.heads(model.top_pooled(inputs, keys), task)

    def loss(
        self, model: "AdaptedModel", task: Task, inputs: TopInput, labels: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, inputs, task.name), labels)

    def batch_loss(
        self, model: "AdaptedModel", task: Task, indices: list[int], states: TrunkStates,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Loss of the training batch `indices` into the task's texts; a method that adds rows
        (replay) or per-example targets (distillation) overrides this."""
        return self.loss(model, task, states.batch(indices), labels[indices])

    def end_task(self, model: "AdaptedModel", task: Task, states: TrunkStates) -> None:
        pass

    def learn(
        self, model: "AdaptedModel", task: Task, states: TrunkStates,
        progress: Progress | None, checkpointing: Checkpointing | None = None,
        *, train: TrainConfig | None = None, top_layers: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Learn the task with the method's `TrainConfig`, or `train` (a search's trial);
        `top_layers` limits training to the scales of that many top layers (None: all the
        method adapts); `on_step` as in `training.loop.fit`."""
        train = train or self.train
        self.begin_task(model, task, states)
        index = task.label_index()
        labels = torch.tensor([index[e.label] for e in task.train], device=model.device)

        autocast = training_autocast(train.precision, model.device)

        def batch_loss(indices: list[int]) -> torch.Tensor:
            with autocast():
                return self.batch_loss(model, task, indices, states, labels).float()

        result: TrainResult = fit(
            self.param_groups(model, task, train, top_layers), batch_loss, len(states), train,
            task_seed(train.seed, task.name), progress, lengths=states.lengths,
            checkpointing=checkpointing, max_tokens=model.pass_tokens,
            length_multiple=model.backbone.length_multiple, on_step=on_step,
        )
        self.end_task(model, task, states)
        return result.stats()
