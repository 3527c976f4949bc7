"""Run a stream: learn each task in order, evaluate every task seen so far, write the results.

    DIR/model/              the checkpoint (saved after every task)
    DIR/resume/             what the run has done so far (see io/runstate.py)
    DIR/report.json         accuracy matrix, metrics, per-task figures, config, versions
    DIR/accuracy_matrix.png labelled heatmap of the accuracy matrix

A run writing to DIR can be killed at any moment and continued by running it again on the same
DIR (see resume.py); the report and its pictures: report.py.

In a data-parallel run (`torchrun`, training/distributed.py) every process learns each task
with the others; only rank 0 evaluates, writes and reports, the others return None.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import DEFAULT_SAVE_EVERY
from ..learner import ContinualLearner, LearnedTask
from ..model.memory import release_freed_memory
from ..training import distributed
from ..training.loop import Checkpointing, TrainState
from ..types import Task, TaskRecord
from . import metrics
from .evaluate import StreamEvaluation, precision_comparison
from .report import joint_report, json_default, matrices, stream_report, write_outputs
from .resources import peak_rss_mb, start_peak_window, window_peak_rss_mb
from .resume import manifest_sha256, open_run, save_progress


class RunEvents:
    """Hooks a front end overrides to show progress; the defaults do nothing."""

    def task_started(self, index: int, total: int, task: Task) -> None: ...

    def train_step(self, done: int, total: int, loss: float) -> None: ...

    def evaluation_started(self, index: int, tasks: list[Task]) -> None: ...

    def evaluated(self, task: Task, accuracy: float) -> None: ...

    def task_finished(self, index: int, record: TaskRecord, matrix: np.ndarray, names: list[str]) -> None: ...

    def resumed(self, done: list[str], task: str | None, step: int | None) -> None:
        """A saved run continues: `done` tasks are finished; `task` resumes at `step` (None: the
        task starts afresh)."""


class TaskPool(Protocol):
    """Learns tasks in other processes (`experiment.ray_pool`): `submit` them all, then
    `learned(name)` gives each, once done, as `ContinualLearner.import_task` takes it;
    `release()` once the last is taken lets the workers go while the run finishes."""

    def submit(self, tasks: list[Task]) -> None: ...

    def learned(self, task: str) -> LearnedTask: ...

    def release(self) -> None: ...


def run_stream(
    tasks: list[Task],
    learner: ContinualLearner,
    out: str | Path | None = None,
    events: RunEvents | None = None,
    run_config: dict | None = None,
    save_every: int = DEFAULT_SAVE_EVERY,
    resume: bool = False,
    keep_versions: int | None = None,
    pool: TaskPool | None = None,
) -> dict | None:
    """Learn `tasks` in order on `learner`, evaluating after each; return (and write) the report
    (None on the processes of a data-parallel run but rank 0).

    With `pool`, the tasks are learned there, concurrently, and each is imported in stream
    order where the run would have learned it; all else (evaluation, saves, the report) is
    the same, so for methods whose tasks own all they learn the model is the same bit for bit.

    With `out`, the model is saved after every task and the training state every `save_every`
    steps (0: only after tasks). A saved run found in `out` is continued (`resume=True`
    requires one), after checking that `tasks`, the learner and `run_config` (but for
    `runstate.NOT_COMPARED`) are those it was started with.
    """
    if save_every < 0:
        raise ValueError(f"save_every must be >= 0 (0: save only after each task), got {save_every!r}")
    events = events or RunEvents()
    out = Path(out) if out is not None else None
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat in the stream: {names}")
    session_start = time.perf_counter()
    config = json.loads(json.dumps(run_config or {}, default=json_default))
    parallel = distributed.current()
    main = parallel is None or parallel.is_main
    state, train_state, continued = open_run(tasks, learner, out, config, resume, measure=main)
    if parallel is not None:
        parallel.barrier()  # every process has read the saved run before rank 0 writes to it
        if not main:
            _follow(tasks, learner, state.completed, state.current, train_state)
            return None
    if continued:
        current = state.current["task"] if state.current else None
        events.resumed(names[: len(state.completed)], current,
                       train_state.step if train_state is not None else None)
    seconds_before = state.seconds

    def write(train: TrainState | None = None) -> None:
        if out is None:
            return
        state.seconds = seconds_before + time.perf_counter() - session_start
        save_progress(out, state, train)

    write(train_state)  # records this session; keeps the interrupted task's training state
    T = len(tasks)
    evaluation = StreamEvaluation(learner, tasks)
    evaluation.restore(len(state.completed),
                       state.completed[-1].get("routes") if state.completed else None)
    measure_before = state.reference is not None
    if pool is not None:
        pool.submit([t for t in tasks[len(state.completed):] if t.name not in learner.tasks])
    for i in range(len(state.completed), T):
        task = tasks[i]
        events.task_started(i, T, task)
        start_peak_window()
        current = state.current if state.current and state.current["task"] == task.name else None
        if task.name in learner.tasks:
            # Saved to the model by a run killed before it recorded the task as finished.
            record = learner.tasks[task.name]
            before = current["before"]
        else:
            if current is None:
                before = learner.evaluate_unlearned(task) if measure_before and i > 0 else None
                state.current = {"task": task.name, "before": before}
                write()
            else:
                before = current["before"]
            if pool is not None:  # a training state saved by a sequential session is not needed
                learner.import_task(*pool.learned(task.name))
                record = learner.tasks[task.name]
                if i == T - 1:
                    pool.release()
            else:
                resume_from = train_state if current is not None else None
                checkpointing = Checkpointing(save_every if out is not None else 0, write, resume_from)
                record = learner.learn(task, progress=events.train_step, checkpointing=checkpointing)
        train_state = None
        events.evaluation_started(i, tasks[: i + 1])
        eval_start = time.perf_counter()
        evaluated = evaluation.after_task(i)
        release_freed_memory()  # the evaluation's activations
        row, free_row, confusion = evaluated.given, evaluated.free, evaluated.confusion
        for j in range(i + 1):
            events.evaluated(tasks[j], row[j])
        eval_seconds = time.perf_counter() - eval_start
        if out is not None:
            learner.save(out / "model", keep_versions)
            state.model_manifest_sha256 = manifest_sha256(out)
        entry = {
            "task": task.name,
            "labels": list(task.labels),
            "train_examples": len(task.train),
            "test_examples": len(task.test),
            "train_seconds": record.train_seconds,
            "eval_seconds": round(eval_seconds, 3),
            "accuracy_just_learned": row[i],
            "task_free_accuracy_just_learned": free_row[i],
            "accuracy_before_learning": before,
            **learner.footprint(task.name),
            "peak_rss_mb": round(peak_rss_mb(), 1),  # the process's, so far
            "task_peak_rss_mb": round(window_peak_rss_mb(), 1),  # while this task was learned and evaluated
            "train_stats": record.stats,
            "evaluation": evaluated.info,
            "routing_ece": evaluated.routing_ece,
            "confused_pairs": metrics.confused_pairs(confusion[: i + 1, : i + 1], names[: i + 1]),
        }
        for done in state.completed:  # only the latest routes are needed to resume
            done.pop("routes", None)
        state.completed.append({"row": row, "free_row": free_row, "before": before,
                                "confusion": confusion.tolist(), "entry": entry,
                                "routing_ece": evaluated.routing_ece,
                                "routes": evaluation.routes()})
        state.current = None
        write()
        R, _, _ = matrices(state.completed, T)
        events.task_finished(i, record, R[: i + 1, : i + 1], names[: i + 1])
    R, _, _ = matrices(state.completed, T)
    compared = precision_comparison(learner, tasks, list(R[-1]), evaluation.fp32) if T else None
    report = stream_report(state, learner, names, time.perf_counter() - session_start + seconds_before)
    report["precision"] = compared
    if out is not None:
        R, F, _ = matrices(state.completed, T)
        write_outputs(out, report, R, F, "accuracy on task j after learning task i")
    return report


def _follow(tasks: list[Task], learner: ContinualLearner, completed: list, current: dict | None,
            train_state: TrainState | None) -> None:
    """What a data-parallel run's processes but rank 0 do: learn the tasks not finished yet
    together with rank 0 (the interrupted one from its training state); nothing is evaluated,
    written or shown."""
    for task in tasks[len(completed):]:
        if task.name not in learner.tasks:  # else saved to the model before the run was killed
            resume_from = train_state if current is not None and current["task"] == task.name else None
            learner.learn(task, checkpointing=Checkpointing(0, _no_save, resume_from))
        train_state = None


def _no_save(state: TrainState) -> None:
    raise AssertionError("a process that does not write was asked to save")


def run_joint(
    tasks: list[Task],
    learner: ContinualLearner,
    out: str | Path | None = None,
    events: RunEvents | None = None,
    run_config: dict | None = None,
) -> dict | None:
    """Learn all `tasks` at once (`joint`), evaluate each; a report shaped like `run_stream`'s
    (None on the processes of a data-parallel run but rank 0, which only learn)."""
    if not distributed.is_main():
        learner.learn_jointly(tasks)
        return None
    events = events or RunEvents()
    out = Path(out) if out is not None else None
    names = [t.name for t in tasks]
    T = len(tasks)
    R = np.full((T, T), np.nan)
    F = np.full((T, T), np.nan)
    start = time.perf_counter()
    union = Task(f"all {T} tasks", tuple(sorted({l for t in tasks for l in t.labels})),
                 tuple(e for t in tasks for e in t.train), tuple(e for t in tasks for e in t.test))
    events.task_started(T - 1, T, union)
    records = learner.learn_jointly(tasks, progress=events.train_step)
    events.evaluation_started(T - 1, tasks)
    eval_start = time.perf_counter()
    evaluated = StreamEvaluation(learner, tasks).after_task(T - 1)
    R[-1], F[-1], confusion = evaluated.given, evaluated.free, evaluated.confusion
    for j, task in enumerate(tasks):
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
        sum(r.bytes_added for r in records), records[-1].stats)
    events.task_finished(T - 1, joint_record, R, names)
    compared = precision_comparison(learner, tasks, list(R[-1]))
    report = joint_report(names, R, F, confusion, per_task, learner, run_config,
                          time.perf_counter() - start)
    report["precision"] = compared
    if out is not None:
        write_outputs(out, report, R, F, "accuracy after learning all tasks at once")
    return report
