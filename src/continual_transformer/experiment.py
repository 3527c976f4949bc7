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
FWT_BY_CONSTRUCTION = (
    "0 by construction: the method shares no state between tasks, so the model that meets task i "
    "(R[i-1,i]) is the initial model (b_i)"
)
FWT_UNDEFINED = "undefined: the method has no classifier for a task before learning it"


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
    R = np.full((T, T), np.nan)  # task given
    F = np.full((T, T), np.nan)  # task-free: routed
    confusion = np.zeros((T, T), dtype=int)  # after the last task: true task x routed task
    before = np.full(T, np.nan)  # R[i-1, i]
    start = time.perf_counter()
    # FWT needs the model's accuracy on a task before learning it. Methods that share nothing
    # meet every task with the initial model, so it is 0 without measuring; methods that
    # classify over all tasks' labels have nothing to measure it with.
    if not shares_state(learner):
        fwt_reference, reference = FWT_BY_CONSTRUCTION, None
    elif learner.method.routes_itself:
        fwt_reference, reference = FWT_UNDEFINED, None
    else:
        fwt_reference = FWT_REFERENCE
        reference = np.array([learner.evaluate_unlearned(t) for t in tasks])
    index = {name: j for j, name in enumerate(names)}
    per_task = []
    for i, task in enumerate(tasks):
        events.task_started(i, T, task)
        if reference is not None and i > 0:
            before[i] = learner.evaluate_unlearned(task)
        record = learner.learn(task, progress=events.train_step)
        events.evaluation_started(i, tasks[: i + 1])
        eval_start = time.perf_counter()
        for j in range(i + 1):
            R[i, j] = learner.evaluate(tasks[j])
            F[i, j], routed = learner.evaluate_task_free(tasks[j])
            if i == T - 1:
                for name in routed:
                    confusion[j, index[name]] += 1
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
            "task_free_accuracy_just_learned": F[i, i],
            "accuracy_before_learning": None if np.isnan(before[i]) else before[i],
            **learner.footprint(task.name),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "train_stats": record.stats,
        })
        events.task_finished(i, record, R[: i + 1, : i + 1], names[: i + 1])
    summary = metrics.summary(R, before, reference) if reference is not None else metrics.summary(R)
    summary["fwt"] = summary.get("fwt", 0.0 if fwt_reference == FWT_BY_CONSTRUCTION else None)
    routing = metrics.routing_accuracy(confusion)
    summary.update({
        "task_free_acc": metrics.average_accuracy(F),
        "task_free_bwt": metrics.backward_transfer(F),
        "routing_acc": routing["overall"],
    })
    report = {
        "tasks": names,
        "accuracy_matrix": _matrix_json(R),
        "task_free_accuracy_matrix": _matrix_json(F),
        "routing": {"per_task": dict(zip(names, routing["per_task"])), "overall": routing["overall"],
                    "confusion": confusion.tolist(),
                    "confusion_axes": "rows: true task, columns: routed task (final model)"},
        "metrics": summary,
        "fwt_reference": fwt_reference,
        "reference_accuracy": None if reference is None else [float(v) for v in reference],
        "per_task": per_task,
        "shared_state_numbers": learner.shared_state_numbers(),
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
        write_heatmap(F, names, out / "task_free_accuracy_matrix.png",
                      f"{learner.method.name}: task-free accuracy (task predicted, not given)")
    return report


def _matrix_json(M: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in M]


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


JOINT_MATRIX = (
    "joint trains once on all tasks: only the last row of the accuracy matrix (after all tasks) "
    "is defined; BWT, forgetting and FWT do not apply"
)


def run_joint(
    tasks: list[Task],
    learner: ContinualLearner,
    out: str | Path | None = None,
    events: RunEvents | None = None,
    run_config: dict | None = None,
) -> dict:
    """Learn all `tasks` at once (`joint`), evaluate each; a report shaped like `run_stream`'s."""
    events = events or RunEvents()
    out = Path(out) if out is not None else None
    names = [t.name for t in tasks]
    T = len(tasks)
    R = np.full((T, T), np.nan)
    F = np.full((T, T), np.nan)
    confusion = np.zeros((T, T), dtype=int)
    start = time.perf_counter()
    union = Task(f"all {T} tasks", tuple(sorted({l for t in tasks for l in t.labels})),
                 tuple(e for t in tasks for e in t.train), tuple(e for t in tasks for e in t.test))
    events.task_started(T - 1, T, union)
    records = learner.learn_jointly(tasks, progress=events.train_step)
    events.evaluation_started(T - 1, tasks)
    index = {name: j for j, name in enumerate(names)}
    eval_start = time.perf_counter()
    for j, task in enumerate(tasks):
        R[-1, j] = learner.evaluate(task)
        F[-1, j], routed = learner.evaluate_task_free(task)
        for name in routed:
            confusion[j, index[name]] += 1
        events.evaluated(task, R[-1, j])
    eval_seconds = time.perf_counter() - eval_start
    if out is not None:
        learner.save(out / "model")
    per_task = [{
        "task": task.name,
        "labels": list(task.labels),
        "train_examples": len(task.train),
        "test_examples": len(task.test),
        "train_seconds": record.train_seconds,
        "eval_seconds": round(eval_seconds / T, 3),
        "accuracy_just_learned": R[-1, j],
        "task_free_accuracy_just_learned": F[-1, j],
        "accuracy_before_learning": None,
        **learner.footprint(task.name),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_stats": record.stats,
    } for j, (task, record) in enumerate(zip(tasks, records))]
    joint_record = TaskRecord(
        union.name, union.labels, records[-1].learned_at, len(union.train),
        round(sum(r.train_seconds for r in records), 3),
        sum(r.adapter_parameters for r in records), sum(r.head_parameters for r in records),
        records[-1].stats)
    events.task_finished(T - 1, joint_record, R, names)
    routing = metrics.routing_accuracy(confusion)
    summary = {
        "acc": float(R[-1].mean()), "bwt": None, "forgetting": None,
        "average_incremental_accuracy": None, "fwt": None,
        "task_free_acc": float(F[-1].mean()), "task_free_bwt": None,
        "routing_acc": routing["overall"],
    }
    report = {
        "tasks": names,
        "accuracy_matrix": _matrix_json(R),
        "task_free_accuracy_matrix": _matrix_json(F),
        "matrix_note": JOINT_MATRIX,
        "routing": {"per_task": dict(zip(names, routing["per_task"])), "overall": routing["overall"],
                    "confusion": confusion.tolist(),
                    "confusion_axes": "rows: true task, columns: routed task (final model)"},
        "metrics": summary,
        "fwt_reference": JOINT_MATRIX,
        "reference_accuracy": None,
        "per_task": per_task,
        "shared_state_numbers": learner.shared_state_numbers(),
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
                      f"{learner.method.name}: accuracy after learning all tasks at once")
        write_heatmap(F, names, out / "task_free_accuracy_matrix.png",
                      f"{learner.method.name}: task-free accuracy (task predicted, not given)")
    return report
