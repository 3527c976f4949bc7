"""The plain data every part of the package passes around. Imports nothing of the package."""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class StreamError(ValueError):
    """A stream file (or an uploaded task) that cannot be used, with where and why."""


@dataclass(frozen=True, slots=True)  # slots: a large stream holds millions of these
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Task:
    """One classification task: its name, its label set and its examples."""

    name: str
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...] = ()

    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def subsample_train(self, max_train: int | None, seed: int) -> "Task":
        """At most `max_train` training examples, stratified by label, reproducible by seed."""
        if max_train is None or len(self.train) <= max_train:
            return self
        if max_train < len(self.labels):
            raise ValueError(
                f"max_train={max_train} is below the {len(self.labels)} labels of task {self.name!r}"
            )
        kept = _stratified(self.train, self.labels, max_train, random.Random(f"{seed}:{self.name}"))
        return Task(self.name, self.labels, kept, self.test)

    def subsample_test(self, max_test: int | None, seed: int) -> "Task":
        """At most `max_test` test examples, stratified by label, reproducible by seed (a
        quicker evaluation; the accuracies are then those of the subsample)."""
        if max_test is None or len(self.test) <= max_test:
            return self
        if max_test < 1:
            raise ValueError(f"max_test must be >= 1, got {max_test!r}")
        kept = _stratified(self.test, self.labels, max_test, random.Random(f"{seed}:{self.name}:test"))
        return Task(self.name, self.labels, self.train, kept)


def check_task_name(name: object, where: str = "") -> str:
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise StreamError(
            f"{prefix}invalid task name {name!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Prediction:
    # None only when status is "ambiguous": no task was chosen, so no label either.
    task: str | None
    label: str | None
    probabilities: dict[str, float]
    # For a routed text: the probability of the task it was routed to; None: the task was given.
    task_probability: float | None = None
    # For a routed text: its most likely tasks with their probabilities, most likely first
    # (as many as asked for: `top_k`); empty when the task was given.
    candidates: tuple[tuple[str, float], ...] = ()
    # "ok", or "ambiguous": the routed task's probability was below the caller's threshold.
    status: str = "ok"


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
    bytes_added: int  # the task's own state as stored (scales and heads float32, statistics float64)
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TaskRecord":
        data = dict(data)
        data["labels"] = tuple(data["labels"])
        return cls(**data)


def _stratified(examples: tuple[Example, ...], labels: tuple[str, ...], n: int,
                rng: random.Random) -> tuple[Example, ...]:
    """n of `examples`, drawn round-robin over `labels` (shuffled within each by `rng`), so the
    label proportions are as even as the data allows; in their original order."""
    by_label: dict[str, list[Example]] = {label: [] for label in labels}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    for group in by_label.values():
        rng.shuffle(group)
    kept: list[Example] = []
    depth = 0
    while len(kept) < n:
        for group in by_label.values():
            if depth < len(group) and len(kept) < n:
                kept.append(group[depth])
        depth += 1
    order = {id(e): i for i, e in enumerate(examples)}
    kept.sort(key=lambda e: order[id(e)])
    return tuple(kept)
