"""`analytic`: no gradient training. The frozen backbone's pooled embedding (optionally expanded
by a fixed random projection) feeds one streaming shared-covariance (LDA) or ridge classifier
over the labels of every task seen.

Learning a task is one backbone forward per training example plus adding to sufficient
statistics, so the classifier after any sequence of tasks equals the one fitted on all their
data at once (see `analytic.AnalyticClassifier`). It is class-incremental: without a task it
predicts over all labels of all tasks; given a task it restricts to that task's labels.
"""

from __future__ import annotations

import torch

from ..model.batching import BATCH_ROWS, collated
from ..model.closed_form import AnalyticClassifier
from ..training import distributed
from ..types import Task
from .base import Method

SEP = "\x1f"  # between task and label in a class key; task names cannot contain it


def class_key(task: str, label: str) -> str:
    return f"{task}{SEP}{label}"


class AnalyticMethod(Method):
    name = "analytic"
    routes_itself = True
    shares_state = True
    sums_statistics = True
    shares = ("one classifier over every task's labels: a task adds its examples to the shared "
              "statistics batch by batch, after the tasks before it, and its record reports the "
              "classifier solved over all of them")
    head_number_bytes = 8  # class sums and counts are float64

    # Defaults measured on the bundled stream (benchmarks/analytic_choices.py): LDA beats ridge,
    # and a random expansion (1024-4096 features) adds under a point for 10-200x the state.
    def __init__(self, n_features: int = 0, solver: str = "lda", shrinkage: float | None = None,
                 seed: int = 0):
        self.options = {"n_features": n_features, "solver": solver, "shrinkage": shrinkage,
                        "seed": seed}
        self.classifier: AnalyticClassifier | None = None
        self.labels: dict[str, tuple[str, ...]] = {}

    def hyperparameters(self) -> dict:
        return dict(self.options)

    def adapter_key(self, task: str) -> None:
        return None  # the plain frozen backbone

    def _classifier(self, model) -> AnalyticClassifier:
        if self.classifier is None:
            self.classifier = AnalyticClassifier(in_dim=model.backbone.hidden_size, **self.options)
        return self.classifier

    @torch.inference_mode()
    def learn(self, model, task: Task, states, progress, checkpointing=None) -> dict:
        del checkpointing  # one pass, no steps: nothing to save within the task
        classifier = self._classifier(model)
        ids = states.ids
        batches = collated(model.backbone, ids)
        total = -(-len(ids) // BATCH_ROWS)
        parallel = distributed.current()
        passes = (((rows, model.backbone(**batch)) for rows, batch in batches)  # (B, H) each
                  if parallel is None else _shared_passes(model, batches, len(ids), parallel))
        for step, (rows, pooled) in enumerate(passes, start=1):
            classifier.partial_fit(pooled, [class_key(task.name, task.train[i].label) for i in rows])
            if progress is not None:
                progress(step, total, float("nan"))
        self.labels[task.name] = tuple(task.labels)
        classifier.solution()  # solve now, so learning time includes it
        return {"examples": len(ids), "ridge_alpha": classifier.alpha_,
                "classes": len(classifier.classes_)}

    def _columns(self, task: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.classifier.classes_)}
        return [index[class_key(task, label)] for label in self.labels[task]]

    def head_logits(self, model, pooled: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        scores = self.classifier.decision_function(pooled).to(torch.float32)  # (B, K_all)
        columns = {t: self._columns(t) for t in dict.fromkeys(tasks)}
        return [scores[i, columns[t]] for i, t in enumerate(tasks)]

    def infer_tasks(self, model, pooled: torch.Tensor, among=None) -> list[tuple[str, float]]:
        """The task of the best class over all labels of all tasks (class-incremental), with
        the task's probability (its classes' posterior summed); `among` (per row, None: all)
        limits a row to the labels of some tasks."""
        task_of = [c.split(SEP, 1)[0] for c in self.classifier.classes_]
        classes = None
        if among is not None:
            classes = [None if names is None else
                       {c for c, t in zip(self.classifier.classes_, task_of) if t in names}
                       for names in among]
        scores = self.classifier.scores(pooled, classes)  # (B, K)
        posterior = torch.softmax(scores, dim=1)
        names = list(dict.fromkeys(task_of))
        owner = torch.tensor([[t == name for name in names] for t in task_of],
                             dtype=posterior.dtype)  # (K, tasks): the task each class belongs to
        per_task = posterior @ owner  # (B, tasks)
        return [(task_of[best], float(per_task[row, names.index(task_of[best])]))
                for row, best in enumerate(scores.argmax(1).tolist())]

    def delete(self, model, task: str) -> None:
        if task in self.labels:
            self.classifier.remove_classes([class_key(task, label) for label in self.labels[task]])
            del self.labels[task]

    def footprint(self, model, task: str) -> tuple[int, int]:
        return 0, len(self.labels[task]) * self.classifier.state_numbers()["per_class"]

    def shared_numbers(self, model) -> int:
        return self._classifier(model).state_numbers()["shared"]

    def task_tensors(self, model, task: str) -> dict[str, torch.Tensor]:
        keys = [class_key(task, label) for label in self.labels[task]]
        return self.classifier.class_state(keys)

    def load_task_tensors(self, model, task: str, labels, tensors) -> None:
        self._classifier(model).load_class_state([class_key(task, l) for l in labels], tensors)
        self.labels[task] = tuple(labels)

    def shared_tensors(self, model) -> dict[str, torch.Tensor]:
        return self._classifier(model).shared_state()

    def load_shared_tensors(self, model, tensors) -> None:
        self._classifier(model).load_shared_state(tensors)

    def add_shared_tensors(self, model, increment) -> None:
        self._classifier(model).add_shared_state(increment)


def _shared_passes(model, batches, n: int, parallel) -> list[tuple[list[int], torch.Tensor]]:
    """(rows, pooled) of every pass, each pass run by one process of a data-parallel run and
    the results combined: the statistics then add the numbers one process adds, in its order."""
    pooled = torch.zeros(n, model.backbone.hidden_size, device=model.device)  # (N, H)
    passes = []
    for k, (rows, batch) in enumerate(batches):
        if parallel.owns(k):
            pooled[rows] = model.backbone(**batch).float()
        passes.append(rows)
    parallel.combine(pooled)
    return [(rows, pooled[rows]) for rows in passes]
