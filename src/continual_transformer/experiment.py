"""Run a stream: learn each task in order, evaluate every task seen so far, write the results.

    DIR/model/              the checkpoint (saved after every task)
    DIR/report.json         accuracy matrix, metrics, per-task figures, config, versions
    DIR/accuracy_matrix.png labelled heatmap of the accuracy matrix
"""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__, metrics
from .data import Task
from .learner import ContinualLearner, TaskRecord

FWT_REFERENCE = (
    "b_i = test accuracy on task i of the initial model (frozen backbone, untouched shared state, "
    "the task's freshly initialised head); R[i-1,i] = the same just before learning task i "
    "(GEM, Lopez-Paz & Ranzato 2017)"
)


class RunEvents:
    """Hooks a front end overrides to show progress; the defaults do nothing."""

    def task_started(self, index: int, total: int, task: Task) -> None: ...

    def train_step(self, done: int, total: int, loss: float) -> None: ...

    def evaluation_started(self, index: int, tasks: list[Task]) -> None: ...

    def evaluated(self, task: Task, accuracy: float) -> None: ...

    def task_finished(self, index: int, record: TaskRecord, matrix: np.ndarray, names: list[str]) -> None: ...


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def library_versions() -> dict:
    import transformers

    return {
        "continual_transformer": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def shares_state(learner: ContinualLearner) -> bool:
    """Whether learning one task can change the model another task meets (baselines do)."""
    return bool(getattr(learner.method, "shares_state", False))


def run_stream(
    tasks: list[Task],
    learner: ContinualLearner,
    out: str | Path | None = None,
    events: RunEvents | None = None,
    run_config: dict | None = None,
) -> dict:
    """Learn `tasks` in order on `learner`, evaluating after each; return (and write) the report."""
    events = events or RunEvents()
    out = Path(out) if out is not None else None
    names = [t.name for t in tasks]
    T = len(tasks)
    R = np.full((T, T), np.nan)
    before = np.full(T, np.nan)  # R[i-1, i]
    start = time.perf_counter()
    # Methods that share nothing meet every new task with the initial model, so the initial
    # model's accuracy (b_i) is exactly the accuracy just before learning (R[i-1, i]).
    reference = (
        np.array([learner.evaluate_unlearned(t) for t in tasks]) if shares_state(learner) else None
    )
    per_task = []
    for i, task in enumerate(tasks):
        events.task_started(i, T, task)
        before[i] = learner.evaluate_unlearned(task) if i > 0 else np.nan
        record = learner.learn(task, progress=events.train_step)
        events.evaluation_started(i, tasks[: i + 1])
        eval_start = time.perf_counter()
        for j in range(i + 1):
            R[i, j] = learner.evaluate(tasks[j])
            events.evaluated(tasks[j], R[i, j])
        eval_seconds = time.perf_counter() - eval_start
        if out is not None:
            learner.save(out / "model")
        per_task.append({
            "task": task.name,
            "labels": list(task.labels),
            "train_examples": len(task.train),
            "test_examples": len(task.test),
            "train_seconds": record.train_seconds,
            "eval_seconds": round(eval_seconds, 3),
            "accuracy_just_learned": R[i, i],
            "accuracy_before_learning": None if i == 0 else before[i],
            **learner.footprint(task.name),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "train_stats": record.stats,
        })
        events.task_finished(i, record, R[: i + 1, : i + 1], names[: i + 1])
    if reference is None:
        reference = before.copy()
    summary = metrics.summary(R, before, reference)
    report = {
        "tasks": names,
        "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in R],
        "metrics": summary,
        "fwt_reference": FWT_REFERENCE,
        "reference_accuracy": [None if np.isnan(v) else float(v) for v in reference],
        "per_task": per_task,
        "backbone": {**learner.backbone.ref.to_dict(), "parameters": learner.backbone_parameters,
                     "config": learner.backbone.config.to_dict()},
        "method": {"name": learner.method.name, "hyperparameters": learner.method.hyperparameters()},
        "device": str(learner.device),
        "config": run_config or {},
        "versions": library_versions(),
        "total_seconds": round(time.perf_counter() - start, 2),
    }
    if out is not None:
        from .report import write_heatmap

        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
        write_heatmap(R, names, out / "accuracy_matrix.png",
                      f"{learner.method.name}: accuracy on task j after learning task i")
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
