"""What the federated server does with its clients' replies. No Flower here.

`Federation` holds one task's global state across rounds: the trained tensors (`ia3`: scales
and head), averaged each round over the accepted replies weighted by their examples, and the
statistics (the router's, or `analytic`'s), each client's kept once and summed in the end. A
reply with a tensor missing, extra, of the wrong shape, NaN or Inf is refused whole, with the
reason: it is never averaged in. `finish` adds the task to the model like any other task and
saves it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..io import checkpoint
from ..io.store import CheckpointError
from ..types import Task, TaskRecord
from .local import SHARED, TASK, TRAINED, check_trained, initial_tensors


@dataclass
class Refusal:
    client: str
    round: int
    reason: str


@dataclass
class Federation:
    """One task learned across clients into `learner` (the model's learner, on the server)."""

    learner: object
    task: str
    labels: tuple[str, ...]
    trained: dict[str, torch.Tensor] = field(init=False)
    statistics: dict[str, dict[str, torch.Tensor]] = field(init=False, default_factory=dict)
    examples: dict[str, int] = field(init=False, default_factory=dict)
    refusals: list[Refusal] = field(init=False, default_factory=list)
    rounds: list[dict] = field(init=False, default_factory=list)
    started: float = field(init=False, default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.task in self.learner.tasks:
            raise ValueError(f"task {self.task!r} is already learned; delete it first")
        if len(self.labels) < 2:
            raise ValueError(f"task {self.task!r} needs at least 2 labels, got {list(self.labels)}")
        method = self.learner.method
        if method.name == "ia3":
            start = initial_tensors(self.learner.model, method, Task(self.task, self.labels, ()))
            self.trained = {TRAINED + k: v for k, v in start.items() if not k.startswith("lexical.")}
        elif method.name == "analytic":
            self.trained = {}
        else:
            raise ValueError(f"federated learning supports methods 'ia3' and 'analytic', "
                             f"not {method.name!r}")
        self._expected_statistics = _expected_statistics(self.learner, len(self.labels))

    @property
    def one_round(self) -> bool:
        """`analytic` is learned in one round: its statistics are all there is."""
        return not self.trained

    def needs_statistics(self, client: str) -> bool:
        return client not in self.statistics

    def check(self, client: str, tensors: dict[str, torch.Tensor], with_statistics: bool) -> None:
        """ValueError saying why `client`'s reply cannot be used."""
        trained = {k: v for k, v in tensors.items() if k.startswith(TRAINED)}
        check_trained(trained, self.trained, f"client {client}")
        statistics = {k: v for k, v in tensors.items() if not k.startswith(TRAINED)}
        if with_statistics:
            check_trained(statistics, self._expected_statistics, f"client {client}")
            if bool((statistics[_counts_key(statistics)] < 0).any()):
                raise ValueError(f"client {client}: negative example counts")
        elif statistics:
            raise ValueError(f"client {client}: unexpected statistics {sorted(statistics)[:3]}")

    def aggregate(self, server_round: int, replies: list[tuple[str, dict[str, torch.Tensor], int]],
                  failures: list[tuple[str, str]], min_clients: int) -> dict[str, torch.Tensor]:
        """Average the usable replies (client, tensors, examples) into the global tensors;
        refuse the others (recorded with their reason, as are `failures`: clients that sent
        no reply). Fewer than `min_clients` usable replies fail the round (RuntimeError)."""
        accepted = []
        for client, reason in failures:
            self.refusals.append(Refusal(client, server_round, reason))
        for client, tensors, examples in replies:
            with_statistics = self.needs_statistics(client) and any(
                not k.startswith(TRAINED) for k in tensors)
            try:
                if not (isinstance(examples, int) and examples > 0):
                    raise ValueError(f"client {client}: {examples!r} training examples")
                self.check(client, tensors, with_statistics)
            except ValueError as exc:
                self.refusals.append(Refusal(client, server_round, str(exc)))
                continue
            accepted.append((client, tensors, examples))
        if len(accepted) < min_clients:
            raise RuntimeError(
                f"round {server_round}: {len(accepted)} usable replies, fewer than min_clients="
                f"{min_clients}; refused: "
                + "; ".join(f"{r.client}: {r.reason}" for r in self.refusals if r.round == server_round))
        if self.trained:
            total = sum(examples for _, _, examples in accepted)
            averaged = {}
            for name, current in self.trained.items():
                acc = torch.zeros(current.shape, dtype=torch.float64)
                for _, tensors, examples in accepted:
                    acc += tensors[name].to(torch.float64) * (examples / total)
                averaged[name] = acc.to(current.dtype)
            self.trained = averaged
        for client, tensors, examples in accepted:
            if self.needs_statistics(client) and any(not k.startswith(TRAINED) for k in tensors):
                self.statistics[client] = {k: v.to(torch.float64) for k, v in tensors.items()
                                           if not k.startswith(TRAINED)}
                self.examples[client] = examples
        self.rounds.append({"round": server_round, "accepted": [c for c, _, _ in accepted],
                            "refused": [r.client for r in self.refusals if r.round == server_round]})
        return self.trained

    def summed_statistics(self) -> dict[str, torch.Tensor]:
        """Every client's statistics added up, in the order of the clients' names."""
        if not self.statistics:
            raise RuntimeError("no client's statistics were accepted")
        total: dict[str, torch.Tensor] = {}
        for client in sorted(self.statistics):
            for name, tensor in self.statistics[client].items():
                total[name] = total[name] + tensor if name in total else tensor.clone()
        return total

    def task_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the task's tensors, the shared increment), as `ContinualLearner.import_task` takes."""
        statistics = self.summed_statistics()
        tensors = {k[len(TRAINED):]: v for k, v in self.trained.items()}
        tensors.update({k[len(TASK):]: v for k, v in statistics.items() if k.startswith(TASK)})
        shared = {k[len(SHARED):]: v for k, v in statistics.items() if k.startswith(SHARED)}
        return tensors, shared

    def record(self, stats: dict | None = None) -> TaskRecord:
        tensors, _ = self.task_tensors()
        adapter = sum(v.numel() for k, v in tensors.items() if k.startswith("adapter."))
        head = sum(v.numel() for k, v in tensors.items()
                   if not k.startswith(("adapter.", "router.")))
        return TaskRecord(
            name=self.task, labels=self.labels,
            learned_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            train_examples=sum(self.examples.values()),
            train_seconds=round(time.perf_counter() - self.started, 3),
            adapter_parameters=adapter, head_parameters=head,
            bytes_added=self.learner.task_bytes(adapter, head),
            stats={"federated": {"clients": len(self.statistics),
                                 "examples_per_client": dict(sorted(self.examples.items())),
                                 "rounds": self.rounds,
                                 "refused": [vars(r) for r in self.refusals]},
                   **(stats or {})})

    def evaluate(self, task: Task) -> float:
        """Test accuracy (task given) of the current global tensors: the task is added to the
        learner, evaluated and taken out again, the shared statistics put back as they were."""
        tensors, shared = self.task_tensors()
        before = {k: v.clone() for k, v in self.learner.shared_tensors().items()}
        self.learner.import_task(self.record(), tensors, shared)
        try:
            return self.learner.evaluate(task)
        finally:
            self.learner.delete(self.task)
            self.learner.load_shared_tensors(before)

    def finish(self, model_dir: str | Path, stats: dict | None = None,
               keep_versions: int | None = None) -> TaskRecord:
        """Add the task to the learner and save the model to `model_dir` as a new version;
        the saved task is read back and must equal what was added."""
        record = self.record(stats)
        tensors, shared = self.task_tensors()
        self.learner.import_task(record, tensors, shared)
        self.learner.save(model_dir, keep_versions=keep_versions)
        saved = {t.record.name: t for t in checkpoint.read(Path(model_dir)).tasks}[self.task]
        mine = self.learner.task_tensors(self.task)
        if set(saved.tensors) != set(mine) or not all(
                torch.equal(saved.tensors[k], mine[k]) for k in mine):
            raise CheckpointError(f"{model_dir}: task {self.task!r} read back differs from what was saved")
        return record


def _counts_key(statistics: dict) -> str:
    return next(k for k in statistics if k.endswith("counts"))


def _expected_statistics(learner, n_labels: int) -> dict[str, torch.Tensor]:
    """Zero tensors of the shapes a client's statistics must have: its increment of the shared
    statistics (a packed Gram matrix of dimension D), and the task's class sums and counts
    (one class, the task, for the router; one per label for `analytic`)."""
    shared = learner.shared_tensors()
    (name, packed), = shared.items()
    dim = (math.isqrt(8 * packed.numel() + 1) - 1) // 2  # D (D + 1) / 2 numbers
    prefix, rows = ("router.", 1) if name.startswith("router.") else ("", n_labels)
    return {SHARED + name: torch.zeros(packed.shape, dtype=torch.float64),
            TASK + prefix + "sums": torch.zeros(rows, dim, dtype=torch.float64),
            TASK + prefix + "counts": torch.zeros(rows, dtype=torch.float64)}
