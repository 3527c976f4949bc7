"""`ContinualLearner`: one frozen backbone that learns tasks one after another.

    learner = ContinualLearner()                      # MiniLM-L6, method "ia3"
    for task in load_stream("stream.jsonl"):
        learner.learn(task)
    learner.predict(["the match ended 2-1"], task="news")
    learner.save("model/"); ContinualLearner.load("model/")
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from .adapters import IA3
from .backbone import Backbone
from .config import BackboneConfig, TrainConfig
from .data import Task, check_task_name
from .heads import TaskHeads
from .methods import Method, make_method
from .methods.base import task_seed
from .train import Checkpointing, Progress

INFERENCE_BATCH = 64


@dataclass(frozen=True)
class Prediction:
    task: str
    label: str
    probabilities: dict[str, float]


@dataclass
class TaskRecord:
    """What the learner knows about a learned task (saved in the checkpoint manifest)."""

    name: str
    labels: tuple[str, ...]
    learned_at: str
    train_examples: int
    train_seconds: float
    adapter_parameters: int
    head_parameters: int
    stats: dict = field(default_factory=dict)

    @property
    def bytes_added(self) -> int:
        return 4 * (self.adapter_parameters + self.head_parameters)  # float32

    def to_dict(self) -> dict:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TaskRecord":
        data = dict(data)
        data["labels"] = tuple(data["labels"])
        return cls(**data)


class ContinualLearner:
    """A frozen backbone, per-task state owned by a method, and predict/evaluate/save/load."""

    def __init__(
        self,
        backbone: str | BackboneConfig | Backbone = "default",
        *,
        method: str | Method = "ia3",
        train: TrainConfig | None = None,
        device: str | None = None,
    ):
        if isinstance(backbone, Backbone):
            self.backbone = backbone
        else:
            config = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig(backbone)
            self.backbone = Backbone.load(config, device)
        if isinstance(method, str):
            method = make_method(method, {"train": train.to_dict()} if train else None)
        elif train is not None:
            raise ValueError("pass `train` only with a method name, not with a Method object")
        self.method = method
        self.backbone_parameters = self.backbone.num_parameters()
        self.adapter = IA3(self.backbone.encoder, self.backbone.ref.model_type)
        self.heads = TaskHeads(self.backbone.hidden_size)
        self.tasks: dict[str, TaskRecord] = {}

    # -- learning ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def learn(
        self, task: Task, progress: Progress | None = None,
        checkpointing: Checkpointing | None = None,
    ) -> TaskRecord:
        """Learn one task. On any failure the learner is left exactly as it was before.

        With `checkpointing`, a gradient method saves its training state every
        `checkpointing.every` steps and, given `checkpointing.resume_from`, continues from it.
        """
        check_task_name(task.name)
        if task.name in self.tasks:
            raise ValueError(f"task {task.name!r} is already learned; delete it first")
        _check_task(task)
        resumed = checkpointing.resume_from if checkpointing else None
        start = time.perf_counter() - (resumed.seconds if resumed else 0.0)
        try:
            stats = self.method.learn(self, task, progress, checkpointing)
        except BaseException:
            self.method.forget(self, task.name)
            raise
        key = self.method.adapter_key(task.name)
        owns_entry = key == task.name
        record = TaskRecord(
            name=task.name,
            labels=tuple(task.labels),
            learned_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            train_examples=len(task.train),
            train_seconds=round(time.perf_counter() - start, 3),
            adapter_parameters=self.adapter.num_parameters(key) if owns_entry else 0,
            head_parameters=self.heads.num_parameters(task.name) if task.name in self.heads else 0,
            stats=stats,
        )
        self.tasks[task.name] = record
        return record

    def delete(self, task: str) -> None:
        self._require(task)
        self.method.forget(self, task)
        del self.tasks[task]

    # -- inference ---------------------------------------------------------------------------
    def task_logits(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """Logits of a single-task batch: (B, C_task). Differentiable (used in training)."""
        key = self.method.adapter_key(task)
        rows = batch["input_ids"].shape[0]
        if key is None:
            pooled = self.backbone(**batch)
        else:
            with self.adapter.select([key] * rows):
                pooled = self.backbone(**batch)  # (B, H)
        return self.heads(pooled, task)

    def row_logits(self, batch: dict[str, torch.Tensor], tasks: Sequence[str]) -> list[torch.Tensor]:
        """Logits per row, each row under its own task, in one backbone pass."""
        keys = [self.method.adapter_key(t) for t in tasks]
        if all(k is None for k in keys):
            pooled = self.backbone(**batch)
        else:
            if any(k is None for k in keys):
                raise ValueError("cannot mix adapter-free and adapted tasks in one batch")
            with self.adapter.select(keys):
                pooled = self.backbone(**batch)  # (B, H)
        return self.heads.per_row(pooled, list(tasks))

    @torch.inference_mode()
    def logits(self, texts: Sequence[str], task: str | Sequence[str]) -> list[torch.Tensor]:
        """Logits for each text under its task (one name for all, or one per text)."""
        row_tasks = self._row_tasks(texts, task)
        ids = self.backbone.tokenize(list(texts))
        out: list[torch.Tensor | None] = [None] * len(ids)
        # Length-sorted batches waste little on padding.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), INFERENCE_BATCH):
            chunk = order[start : start + INFERENCE_BATCH]
            batch = self.backbone.collate([ids[i] for i in chunk])
            for i, row in zip(chunk, self.row_logits(batch, [row_tasks[i] for i in chunk])):
                out[i] = row.float().cpu()
        return out  # type: ignore[return-value]

    def predict(self, texts: Sequence[str], task: str | Sequence[str] | None = None) -> list[Prediction]:
        """Label (and label probabilities) for each text under its task."""
        if task is None:
            raise ValueError(
                f"no task given; name one of {list(self.tasks)} (task-free prediction needs a router)"
            )
        row_tasks = self._row_tasks(texts, task)
        predictions = []
        for name, row in zip(row_tasks, self.logits(texts, row_tasks)):
            labels = self.tasks[name].labels
            probs = torch.softmax(row, dim=-1).tolist()
            best = int(row.argmax())
            predictions.append(Prediction(name, labels[best], dict(zip(labels, probs))))
        return predictions

    def evaluate(self, task: Task) -> float:
        """Accuracy on the task's test examples, with the task given."""
        if not task.test:
            raise ValueError(f"task {task.name!r} has no test examples")
        predictions = self.predict([e.text for e in task.test], task=task.name)
        return sum(p.label == e.label for p, e in zip(predictions, task.test)) / len(task.test)

    @torch.inference_mode()
    def evaluate_unlearned(self, task: Task) -> float:
        """Test accuracy of the model as it stands *before* learning `task`.

        The task's head is the freshly initialised one that learning would start from, and its
        rows go through the method's current state: this is R[i-1, i] of the accuracy matrix,
        the quantity forward transfer is measured with.
        """
        if task.name in self.tasks:
            raise ValueError(f"task {task.name!r} is already learned")
        probe = _probe_task(self.method, task.name)
        self.heads.add(probe, len(task.labels), _head_seed(self.method, task.name), self.device)
        try:
            ids = self.backbone.tokenize([e.text for e in task.test])
            index = task.label_index()
            correct = 0
            for start in range(0, len(ids), INFERENCE_BATCH):
                batch = self.backbone.collate(ids[start : start + INFERENCE_BATCH])
                key = self.method.adapter_key(probe)
                entries = self.adapter.entries()
                if key is not None and key in entries:
                    with self.adapter.select([key] * batch["input_ids"].shape[0]):
                        pooled = self.backbone(**batch)
                else:  # an entry that does not exist yet starts at 1: the plain backbone
                    pooled = self.backbone(**batch)
                predicted = self.heads(pooled, probe).argmax(-1).tolist()
                gold = [index[e.label] for e in task.test[start : start + INFERENCE_BATCH]]
                correct += sum(p == g for p, g in zip(predicted, gold))
        finally:
            self.heads.remove(probe)
        return correct / len(task.test)

    # -- footprint ---------------------------------------------------------------------------
    def footprint(self, task: str) -> dict:
        """Parameters and bytes a task added, also as a share of the backbone."""
        record = self._require(task)
        adapter, head = record.adapter_parameters, record.head_parameters
        return {
            "adapter_parameters": adapter,
            "head_parameters": head,
            "bytes_added": record.bytes_added,
            "adapter_percent_of_backbone": 100.0 * adapter / self.backbone_parameters,
            "total_percent_of_backbone": 100.0 * (adapter + head) / self.backbone_parameters,
        }

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from .checkpoint import save

        return save(self, Path(directory))

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> "ContinualLearner":
        from .checkpoint import load

        return load(Path(directory), device)

    # -- helpers -----------------------------------------------------------------------------
    def _require(self, task: str) -> TaskRecord:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {list(self.tasks)}")
        return self.tasks[task]

    def _row_tasks(self, texts: Sequence[str], task: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        row_tasks = [task] * len(texts) if isinstance(task, str) else list(task)
        if len(row_tasks) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(row_tasks)} task names")
        for name in dict.fromkeys(row_tasks):
            self._require(name)
        return row_tasks


def _check_task(task: Task) -> None:
    if len(task.labels) < 2:
        raise ValueError(f"task {task.name!r} needs at least 2 labels, got {list(task.labels)}")
    if len(set(task.labels)) != len(task.labels):
        raise ValueError(f"task {task.name!r} has duplicate labels {list(task.labels)}")
    known = set(task.labels)
    for i, example in enumerate(task.train):
        if example.label not in known:
            raise ValueError(
                f"task {task.name!r}: train example {i} has label {example.label!r} "
                f"outside {list(task.labels)}"
            )
    if not task.train:
        raise ValueError(f"task {task.name!r} has no training examples")


def _probe_task(method: Method, task: str) -> str:
    return f"__probe__{task}"


def _head_seed(method: Method, task: str) -> int:
    seed = getattr(getattr(method, "train", None), "seed", 0)
    return task_seed(seed, task)
