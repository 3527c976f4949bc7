"""Run a stream: learn each task in order, evaluate every task seen so far, write the results.

    DIR/model/              the checkpoint (saved after every task)
    DIR/resume/             what the run has done so far (see runstate.py)
    DIR/report.json         accuracy matrix, metrics, per-task figures, config, versions
    DIR/accuracy_matrix.png labelled heatmap of the accuracy matrix

A run writing to DIR can be killed at any moment and continued by running it again on the same
DIR: finished tasks are not redone, the interrupted task continues from its last save (every
`save_every` training steps), and the result equals an uninterrupted run's. A run is continued
only with the settings it was started with.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..io import runstate
from . import metrics
from ..config import DEFAULT_SAVE_EVERY
from ..types import Task, TaskRecord
from .evaluate import StreamEvaluation
from ..learner import ContinualLearner
from ..io.runstate import RunState
from ..training.loop import Checkpointing, TrainState, restore_rng, rng_tensors

# Report fields that measure time or memory: they differ between any two runs.
TIMING_FIELDS = frozenset({"train_seconds", "eval_seconds", "peak_rss_mb", "total_seconds",
                           "sessions", "learned_at"})

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

    def resumed(self, done: list[str], task: str | None, step: int | None) -> None:
        """A saved run continues: `done` tasks are finished; `task` resumes at `step` (None: the
        task starts afresh)."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux's VmHWM where there is one: `getrusage`'s ru_maxrss survives exec, so a process
    started by a larger one would report its parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # KiB
    except OSError:
        pass
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


def run_identity(tasks: list[Task], learner: ContinualLearner) -> dict:
    """What a run learns: the exact data, the method and its settings, the backbone's weights."""
    config = learner.backbone.config.to_dict()
    config.pop("name")  # a moved folder is the same backbone; its hash says whether it is
    return {
        "tasks": [t.name for t in tasks],
        "tasks_sha256": runstate.tasks_digest(tasks),
        "method": {"name": learner.method.name, "hyperparameters": learner.method.hyperparameters()},
        "backbone": {"sha256": learner.backbone.ref.sha256, "config": config},
    }


def run_stream(
    tasks: list[Task],
    learner: ContinualLearner,
    out: str | Path | None = None,
    events: RunEvents | None = None,
    run_config: dict | None = None,
    save_every: int = DEFAULT_SAVE_EVERY,
    resume: bool = False,
) -> dict:
    """Learn `tasks` in order on `learner`, evaluating after each; return (and write) the report.

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
    config = json.loads(json.dumps(run_config or {}, default=_json_default))
    identity = run_identity(tasks, learner)
    saved = runstate.read(out) if out is not None else None
    train_state: TrainState | None = None
    if saved is None:
        if resume:
            raise ValueError(f"{out}: no saved run to resume ({runstate.state_dir(out) / runstate.STATE} "
                             "does not exist)")
        state = _start(tasks, learner, out, config, identity)
    else:
        state, train_state = saved
        _continue(tasks, learner, out, state, train_state, config, identity)
        if train_state is None:
            restore_rng(runstate.decode_rng(state.rng, runstate.state_dir(out)))
        current = state.current["task"] if state.current else None
        events.resumed(names[: len(state.completed)], current,
                       train_state.step if train_state is not None else None)
    seconds_before = state.seconds

    def write(train: TrainState | None = None) -> None:
        if out is None:
            return
        state.seconds = seconds_before + time.perf_counter() - session_start
        state.rng = runstate.encode_rng(rng_tensors())
        runstate.write(out, state, train)

    write(train_state)  # records this session; keeps the interrupted task's training state
    T = len(tasks)
    evaluation = StreamEvaluation(learner, tasks)
    evaluation.restore(len(state.completed),
                       state.completed[-1].get("routes") if state.completed else None)
    measure_before = state.reference is not None
    for i in range(len(state.completed), T):
        task = tasks[i]
        events.task_started(i, T, task)
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
            resume_from = train_state if current is not None else None
            checkpointing = Checkpointing(save_every if out is not None else 0, write, resume_from)
            record = learner.learn(task, progress=events.train_step, checkpointing=checkpointing)
        train_state = None
        events.evaluation_started(i, tasks[: i + 1])
        eval_start = time.perf_counter()
        evaluated = evaluation.after_task(i)
        row, free_row, confusion = evaluated.given, evaluated.free, evaluated.confusion
        for j in range(i + 1):
            events.evaluated(tasks[j], row[j])
        eval_seconds = time.perf_counter() - eval_start
        if out is not None:
            learner.save(out / "model")
            state.model_manifest_sha256 = _manifest_sha256(out)
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
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "train_stats": record.stats,
            "evaluation": evaluated.info,
        }
        for done in state.completed:  # only the latest routes are needed to resume
            done.pop("routes", None)
        state.completed.append({"row": row, "free_row": free_row, "before": before,
                                "confusion": confusion.tolist(), "entry": entry,
                                "routes": evaluation.routes()})
        state.current = None
        write()
        R, _, _ = _matrices(state.completed, T)
        events.task_finished(i, record, R[: i + 1, : i + 1], names[: i + 1])
    report = _report(state, learner, names, time.perf_counter() - session_start + seconds_before)
    if out is not None:
        R, F, _ = _matrices(state.completed, T)
        _write_outputs(out, report, R, F, "accuracy on task j after learning task i")
    return report


def _fwt_reference(learner: ContinualLearner) -> str:
    # FWT needs the model's accuracy on a task before learning it. Methods that share nothing
    # meet every task with the initial model, so it is 0 without measuring; methods that
    # classify over all tasks' labels have nothing to measure it with.
    if not shares_state(learner):
        return FWT_BY_CONSTRUCTION
    if learner.method.routes_itself:
        return FWT_UNDEFINED
    return FWT_REFERENCE


def _start(tasks: list[Task], learner: ContinualLearner, out: Path | None, config: dict,
           identity: dict) -> RunState:
    if out is not None:
        if learner.tasks:
            raise ValueError(f"a run writing to {out} needs a learner without tasks; this one has "
                             f"{list(learner.tasks)}")
        if (out / "model").exists():
            raise ValueError(f"{out / 'model'} exists, but {out} holds no saved run to continue; "
                             "use a new --out (or remove that directory)")
    # Only methods with a measured FWT need b_i, measured now, before anything is learned.
    reference = ([learner.evaluate_unlearned(t) for t in tasks]
                 if _fwt_reference(learner) == FWT_REFERENCE else None)
    return RunState(config=config, identity=identity, reference=reference)


def _continue(tasks: list[Task], learner: ContinualLearner, out: Path, state: RunState,
              train_state: TrainState | None, config: dict, identity: dict) -> None:
    """Check that the saved run is this run, and load its finished tasks into `learner`."""
    from ..io import checkpoint

    changed = (runstate.differences(state.config, config, runstate.NOT_COMPARED)
               or runstate.differences(state.identity, identity))
    if changed:
        raise ValueError(
            f"cannot continue the run saved in {out}: it was started with other settings; "
            + "; ".join(changed) + ". Use the saved settings, or a new --out"
        )
    names = [t.name for t in tasks]
    done = len(state.completed)
    model = out / "model"
    if (model / "manifest.json").is_file():
        learner.load_state(checkpoint.read(model))
    have = list(learner.tasks)
    current = state.current["task"] if state.current else None
    if have == names[:done]:
        if done and _manifest_sha256(out) != state.model_manifest_sha256:
            raise ValueError(f"{model / 'manifest.json'} changed since this run saved it; "
                             "refusing to continue on a model the run did not write")
    elif not (have == names[: done + 1] and current == names[done]):
        raise ValueError(f"{model} holds tasks {have}, but the run in {out} has finished "
                         f"{names[:done]}; refusing to continue")
    state.sessions += 1


def _manifest_sha256(out: Path) -> str:
    from ..io.store import sha256_bytes

    return sha256_bytes((out / "model" / "manifest.json").read_bytes())


def _matrices(completed: list[dict], T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R (task given), F (task-free: routed) and R[i-1, i] from the finished tasks' rows."""
    R = np.full((T, T), np.nan)
    F = np.full((T, T), np.nan)
    before = np.full(T, np.nan)
    for i, done in enumerate(completed):
        R[i, : i + 1] = done["row"]
        F[i, : i + 1] = done["free_row"]
        before[i] = np.nan if done["before"] is None else done["before"]
    return R, F, before


def _matrix_json(M: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in M]


def _report(state: RunState, learner: ContinualLearner, names: list[str], seconds: float) -> dict:
    T = len(names)
    R, F, before = _matrices(state.completed, T)
    fwt_reference = _fwt_reference(learner)
    if state.reference is not None:
        reference = np.array(state.reference, dtype=float)
        summary = metrics.summary(R, before, reference)
    else:
        reference = None
        summary = metrics.summary(R)
        summary["fwt"] = 0.0 if fwt_reference == FWT_BY_CONSTRUCTION else None
    confusion = np.array(state.completed[-1]["confusion"]) if state.completed else np.zeros((T, T), int)
    routing = metrics.routing_accuracy(confusion)
    summary.update({
        "task_free_acc": metrics.average_accuracy(F),
        "task_free_bwt": metrics.backward_transfer(F),
        "routing_acc": routing["overall"],
    })
    return {
        "tasks": names,
        "accuracy_matrix": _matrix_json(R),
        "task_free_accuracy_matrix": _matrix_json(F),
        "routing": _routing_json(names, routing, confusion),
        "metrics": summary,
        "fwt_reference": fwt_reference,
        "reference_accuracy": None if reference is None else [float(v) for v in reference],
        "per_task": [done["entry"] for done in state.completed],
        **_model_fields(learner),
        "config": state.config,
        "versions": library_versions(),
        "sessions": state.sessions,
        "total_seconds": round(seconds, 2),
    }


def _routing_json(names: list[str], routing: dict, confusion: np.ndarray) -> dict:
    return {"per_task": dict(zip(names, routing["per_task"])), "overall": routing["overall"],
            "confusion": confusion.tolist(),
            "confusion_axes": "rows: true task, columns: routed task (final model)"}


def _model_fields(learner: ContinualLearner) -> dict:
    """The report's description of the model that produced it."""
    return {
        "shared_state_numbers": learner.shared_state_numbers(),
        "backbone": {**learner.backbone.ref.to_dict(), "parameters": learner.backbone_parameters,
                     "config": learner.backbone.config.to_dict()},
        "method": {"name": learner.method.name, "hyperparameters": learner.method.hyperparameters()},
        "device": str(learner.device),
    }


def _write_outputs(out: Path, report: dict, R: np.ndarray, F: np.ndarray, title: str) -> None:
    """report.json (atomically) and the two heatmaps."""
    from ..io import store
    from .plots import write_heatmap

    names, method = report["tasks"], report["method"]["name"]
    store.atomic_write(out / "report.json", json.dumps(report, indent=2, default=_json_default).encode())
    write_heatmap(R, names, out / "accuracy_matrix.png", f"{method}: {title}")
    write_heatmap(F, names, out / "task_free_accuracy_matrix.png",
                  f"{method}: task-free accuracy (task predicted, not given)")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
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
        "routing": _routing_json(names, routing, confusion),
        "metrics": summary,
        "fwt_reference": JOINT_MATRIX,
        "reference_accuracy": None,
        "per_task": per_task,
        **_model_fields(learner),
        "config": run_config or {},
        "versions": library_versions(),
        "total_seconds": round(time.perf_counter() - start, 2),
    }
    if out is not None:
        _write_outputs(out, report, R, F, "accuracy after learning all tasks at once")
    return report
