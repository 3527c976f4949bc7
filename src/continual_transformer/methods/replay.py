"""`replay`: experience replay with a reservoir buffer (Chaudhry et al. 2019, "tiny episodic
memories"; reservoir sampling, Vitter 1985).

A buffer of at most `buffer_size` past training examples (task, text, label) is a uniform
sample of every example of every task learned so far: after a task ends, each of its examples
is offered to the reservoir. While a task trains, every batch of its own examples gets
`replay_batch_size` examples drawn from the buffer; the rows of such a batch belong to
different tasks, yet it is one forward pass under the shared entry, each row through its own
task's head (the earlier heads train on their replayed rows). The loss is the mean
cross-entropy over all rows.

Defaults: buffer of 1000 examples (about 15% of the default stream), 32 replayed rows per
batch (as many as new ones); training as `finetune`. The buffer holds raw texts, saved in the
checkpoint as JSON. Deleting a task removes its examples from the buffer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..types import Task
from ..model.trunk import gather
from .base import task_seed
from .shared_adapter import SharedAdapterMethod, rows_cross_entropy, shared_pooled


@dataclass(frozen=True)
class Memory:
    task: str
    text: str
    label: str


class ReservoirBuffer:
    """At most `capacity` items; after n offers, each offered item is held with probability
    capacity / n (Algorithm R). The choice at the n-th offer depends only on (seed, n), so the
    buffer is reproducible and needs no random state beyond the count."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity!r}")
        self.capacity, self.seed = capacity, seed
        self.items: list[Memory] = []
        self.seen = 0

    def __len__(self) -> int:
        return len(self.items)

    def offer(self, item: Memory) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return
        slot = random.Random(f"{self.seed}:{self.seen}").randrange(self.seen)
        if slot < self.capacity:
            self.items[slot] = item

    def remove_task(self, task: str) -> None:
        self.items = [m for m in self.items if m.task != task]

    def copy(self) -> "ReservoirBuffer":
        clone = ReservoirBuffer(self.capacity, self.seed)
        clone.items, clone.seen = list(self.items), self.seen
        return clone

    def to_json(self) -> dict:
        return {"capacity": self.capacity, "seed": self.seed, "seen": self.seen,
                "items": [[m.task, m.text, m.label] for m in self.items]}

    @classmethod
    def from_json(cls, data: dict) -> "ReservoirBuffer":
        buffer = cls(int(data["capacity"]), int(data["seed"]))
        buffer.seen = int(data["seen"])
        buffer.items = [Memory(*row) for row in data["items"]]
        if len(buffer.items) > buffer.capacity or buffer.seen < len(buffer.items):
            raise ValueError(f"replay buffer state is inconsistent: {len(buffer.items)} items, "
                             f"capacity {buffer.capacity}, {buffer.seen} seen")
        return buffer


class ReplayMethod(SharedAdapterMethod):
    name = "replay"
    shares = ("every task trains the one shared scale entry in turn, with texts replayed from the "
              "tasks before it")
    trains_old_heads = True

    def __init__(self, train=None, adapt_layers=None, buffer_size: int = 1000, replay_batch_size: int = 32):
        super().__init__(train, adapt_layers)
        if replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1, got {replay_batch_size!r}")
        self.buffer = ReservoirBuffer(buffer_size, self.train.seed)
        self.replay_batch_size = replay_batch_size
        self._buffer_before: ReservoirBuffer | None = None
        self._replay: tuple | None = None  # (trunk states, tasks, labels) of the buffer, per task

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "buffer_size": self.buffer.capacity,
                "replay_batch_size": self.replay_batch_size}

    def data_parallel_refusal(self) -> str | None:
        return ("each batch draws its replayed rows from one random stream, which the "
                "processes' shares of a batch cannot split")

    def begin_task(self, model, task: Task, states) -> None:
        self._buffer_before = self.buffer.copy()
        super().begin_task(model, task, states)
        items = self.buffer.items
        memory = (model.trunk_states(model.backbone.tokenize([m.text for m in items]),
                                     precision=self.precision, cache_mb=self.trunk_cache_mb,
                                     with_features=False)
                  if items else None)
        labels = [model.heads.labels[m.task].index(m.label) for m in items]
        self._replay = (memory, [m.task for m in items], torch.tensor(labels, device=model.device))
        self._generator = torch.Generator().manual_seed(task_seed(self.train.seed, task.name) + 2)

    def batch_loss(self, model, task: Task, indices, states, labels) -> torch.Tensor:
        rows = [(states, i) for i in indices]
        tasks = [task.name] * len(indices)
        targets = labels[indices]
        memory, memory_tasks, memory_labels = self._replay
        if memory is not None:
            k = min(self.replay_batch_size, len(memory))
            drawn = torch.randperm(len(memory), generator=self._generator)[:k].tolist()
            rows += [(memory, i) for i in drawn]
            tasks += [memory_tasks[i] for i in drawn]
            targets = torch.cat([targets, memory_labels[drawn]])
        pooled = shared_pooled(model, gather(rows))  # (B + k, H)
        return rows_cross_entropy(model, pooled, tasks, targets)

    def end_task(self, model, task: Task, states) -> None:
        self._replay = None
        for example in task.train:
            self.buffer.offer(Memory(task.name, example.text, example.label))

    def rollback(self, model, task: str) -> None:
        if self.began(task):
            self.buffer = self._buffer_before
        super().rollback(model, task)

    def delete(self, model, task: str) -> None:
        self.buffer.remove_task(task)
        super().delete(model, task)

    def shared_json(self, model) -> dict | None:
        return {"buffer": self.buffer.to_json()} if self.buffer.seen else None

    def load_shared_json(self, model, data: dict) -> None:
        if set(data) != {"buffer"}:
            raise ValueError(f"method 'replay': expected JSON state with key 'buffer', got {sorted(data)}")
        self.buffer = ReservoirBuffer.from_json(data["buffer"])
