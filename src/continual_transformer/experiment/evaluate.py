"""Evaluating a stream as it is learned, at a cost that grows linearly with the stream.

After task i is learned the accuracy matrix needs row i: every task seen so far, with the task
given (R) and without it (the task-free matrix). Three facts make most of it free:

- A task-free answer is right exactly when its input goes to its own task and the label that
  task predicts is right (`test_pass`), so one pass per test text serves both
  matrices: the task-given labels and the router's input.
- The router reads the trunk, which no task changes: its input for a test text never changes,
  so re-routing every test text after a new task costs the router alone, not a forward pass.
- When the method isolates tasks (`ia3`: nothing is shared), learning a task cannot change an
  earlier task's task-given predictions, so they are not recomputed: each test text makes one
  forward pass in the whole run. A method that shares some state names the earlier tasks a
  learn changed (`Method.changed_tasks`; `ia3` with a pool: the tasks of a merged entry) and
  only those are passed again. Methods that share state everywhere (the baselines,
  `analytic`) redo the pass for every task seen, as they must.

`StreamEvaluation.after_task(i)` returns row i and what was reused. Tests check the reused
figures against a full recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..learner import ContinualLearner
from ..model.calibration import expected_calibration_error
from ..model.backbone import masked_mean
from ..model.batching import collated
from ..types import Task


@dataclass(frozen=True)
class TestPass:
    """Per test row of one task: whether the label predicted with the task given is right, and
    what routing needs: the router's input (N, H), or the task the method itself names."""

    correct: list[bool]
    features: torch.Tensor | None
    inferred: list[str] | None
    ids: list[list[int]]  # the texts' token ids (the router reads their words)


def test_pass(learner: ContinualLearner, task: Task, precision: str | None = None) -> TestPass:
    """One pass over the task's test texts that yields what both accuracies need, computed
    as `predict` computes them at `precision` (default: the learner's).

    A task-free answer is right exactly when its row goes to its own task and the label
    predicted under that task is right, so the task-given labels and the router's input
    (or, for methods without a router, the task they name) are enough for both.
    """
    learner.require(task.name)
    if not task.test:
        raise ValueError(f"task {task.name!r} has no test examples")
    words = learner.backbone.tokenize_whole([e.text for e in task.test])  # as `predict` reads them
    ids = learner.backbone.encoder_view(words)
    index = task.label_index()
    correct = [False] * len(ids)
    features = torch.empty(len(ids), learner.backbone.hidden_size) if learner.router is not None else None
    inferred: list[str] | None = None if learner.router is not None else [""] * len(ids)
    key = learner.method.adapter_key(task.name)
    with learner.model.inference(learner.prediction_precision(precision)):
        for rows, batch in collated(learner.backbone, ids):  # as `predict` batches them
            inputs = learner.model.trunk(batch)
            pooled = learner.model.top_pooled(inputs, [key] * len(rows), torch.float32)  # (B, H)
            logits = learner.head_logits(pooled, [task.name] * len(rows))
            logits = learner.model.fused_logits([task.name] * len(rows), [words[i] for i in rows], logits)
            for i, row in zip(rows, logits):
                correct[i] = int(row.argmax()) == index[task.test[i].label]
            if features is not None:
                features[rows] = masked_mean(inputs.hidden.float(), inputs.attention_mask).cpu()
            else:
                for i, (name, _) in zip(rows, learner.method.infer_tasks(learner.model, pooled)):
                    inferred[i] = name
    return TestPass(correct, features, inferred, ids)


@dataclass
class EvaluatedRow:
    """Row i of both accuracy matrices, the routing confusion, and what it cost."""

    given: list[float]  # R[i, j], j <= i
    free: list[float]  # task-free accuracy on task j after task i
    confusion: np.ndarray  # (T, T) true task x routed task, counts over test texts
    info: dict = field(default_factory=dict)
    # The router's expected calibration error over the test texts seen (None: no router).
    routing_ece: float | None = None


class StreamEvaluation:
    """Keeps, per task evaluated so far, its test texts' task-given outcomes and router input."""

    def __init__(self, learner: ContinualLearner, tasks: list[Task]):
        self.learner = learner
        self.tasks = tasks
        self.index = {t.name: j for j, t in enumerate(tasks)}
        self.isolated = not learner.method.shares_state
        self._correct: dict[str, list[bool]] = {}
        self._features: dict[str, torch.Tensor] = {}  # router input per test text
        self._ids: dict[str, list[list[int]]] = {}  # and its token ids
        self._inferred: dict[str, list[str]] = {}  # methods without a router: the task they name
        self._routed: dict[str, list[str]] = {}
        # Isolated tasks' float32 task-given accuracy, taken as each task is learned (it cannot
        # change later): the run's closing precision comparison then has no pass left to make.
        self.fp32: dict[str, float] = {}
        self._confidence: dict[str, list[float]] = {}  # the routed task's probability per text

    def restore(self, done: int, routes: list[int] | None = None) -> None:
        """Rebuild what `after_task` keeps after the first `done` tasks (a resumed run): one
        pass over their test texts, the same pass, batches and numbers as the first time.
        `routes` (from `routes()` after task `done - 1`) are what `routes_changed` compares
        against next; without them the restored router routes again, which differs when the
        model already holds a later task."""
        for task in self.tasks[:done]:
            self._record(task)
        if not done:
            return
        if routes is None:
            self._route(self.tasks[:done])
            return
        start = 0
        for task in self.tasks[:done]:
            self._routed[task.name] = [self.tasks[j].name
                                       for j in routes[start : start + len(task.test)]]
            start += len(task.test)

    def routes(self) -> list[int]:
        """The routed task (stream index) of every test text evaluated so far, in stream order."""
        return [self.index[name] for task in self.tasks if task.name in self._routed
                for name in self._routed[task.name]]

    def after_task(self, i: int) -> EvaluatedRow:
        """Row i, after the i-th task (0-based) of the stream has been learned."""
        seen = self.tasks[: i + 1]
        touched = self.learner.method.changed_tasks(self.learner.tasks[seen[-1].name].stats)
        passes = seen if touched is None else [t for t in seen[:-1] if t.name in touched] + [seen[-1]]
        for task in passes:
            self._record(task)
        if self.isolated and self.learner.prediction_precision() != "fp32":
            self.fp32[seen[-1].name] = self.learner.evaluate(seen[-1], precision="fp32")
        changed = self._route(seen)
        T = len(self.tasks)
        confusion = np.zeros((T, T), dtype=int)
        given, free = [], []
        for task in seen:
            correct, routed = self._correct[task.name], self._routed[task.name]
            given.append(sum(correct) / len(correct))
            free.append(sum(c and r == task.name for c, r in zip(correct, routed)) / len(correct))
            for name in routed:
                confusion[self.index[task.name], self.index[name]] += 1
        rows = sum(len(t.test) for t in seen)
        ece = None
        if all(t.name in self._confidence for t in seen):
            # Rounded: the routes are exact, but a probability's last bits follow the thread
            # count of the matrix products (a parallel run's own process takes threads back
            # when its workers finish), and an estimate from hundreds of texts means nothing
            # past the sixth decimal.
            ece = round(expected_calibration_error(
                np.concatenate([self._confidence[t.name] for t in seen]),
                np.concatenate([[r == t.name for r in self._routed[t.name]] for t in seen])), 6)
        info = {
            "forward_passes": [t.name for t in passes],
            "test_texts_run": sum(len(t.test) for t in passes),
            "task_given_reused": [t.name for t in seen if t not in passes],
            "test_texts_rerouted": rows if self.learner.router is not None else 0,
            "routes_changed": changed,
        }
        return EvaluatedRow(given, free, confusion, info, ece)

    def _record(self, task: Task) -> None:
        result = test_pass(self.learner, task)
        self._correct[task.name] = result.correct
        if result.features is not None:
            self._features[task.name] = result.features
            self._ids[task.name] = result.ids
        else:
            self._inferred[task.name] = result.inferred

    def _route(self, seen: list[Task]) -> int:
        """Route every test text seen so far; return how many go elsewhere than before."""
        if self.learner.router is None:
            routed = {t.name: self._inferred[t.name] for t in seen}
        else:
            if not self.learner.tasks:
                raise ValueError("no task given and no task learned yet")
            with torch.inference_mode():
                ranked = self.learner.router.rank(torch.cat([self._features[t.name] for t in seen]),
                                                  ids=[row for t in seen for row in self._ids[t.name]])
            routed, start = {}, 0
            for task in seen:
                rows = ranked[start : start + len(task.test)]
                routed[task.name] = [r[0][0] for r in rows]
                self._confidence[task.name] = [r[0][1] for r in rows]
                start += len(task.test)
        changed = sum(
            a != b for name, now in routed.items()
            for a, b in zip(now, self._routed.get(name, now)))
        self._routed.update(routed)
        return changed


def precision_comparison(learner: ContinualLearner, tasks: list[Task], final: list[float],
                         known_fp32: dict[str, float] | None = None) -> dict:
    """Each task's final task-given accuracy at the precision the run predicted in (`final`)
    and in float32: what the faster path costs, per task. In float32 they are the same.
    `known_fp32`: float32 accuracies already taken (`StreamEvaluation.fp32`), not taken again."""
    used = learner.prediction_precision()
    known = known_fp32 or {}
    fp32 = list(final) if used == "fp32" else [
        known[t.name] if t.name in known else learner.evaluate(t, precision="fp32") for t in tasks]
    per_task = {t.name: {used: float(a), "fp32": float(b)} for t, a, b in zip(tasks, final, fp32)}
    return {"prediction": used, "per_task": per_task,
            "largest_difference": max((abs(a - b) for a, b in zip(final, fp32)), default=0.0)}
