"""A run's report: accuracy matrices, metrics, per-task figures, config, versions; and its files.

    DIR/report.json                    the report (written atomically)
    DIR/accuracy_matrix.png            labelled heatmap of the accuracy matrix (task given)
    DIR/task_free_accuracy_matrix.png  the same with the task predicted, not given
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..io.runstate import RunState
from ..learner import ContinualLearner
from ..model.backbone import Backbone
from . import metrics
from .pool_report import pool_summary

# Report fields that measure time or memory: they differ between any two runs.
TIMING_FIELDS = frozenset({"train_seconds", "eval_seconds", "peak_rss_mb", "task_peak_rss_mb", "total_seconds",
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

JOINT_MATRIX = (
    "joint trains once on all tasks: only the last row of the accuracy matrix (after all tasks) "
    "is defined; BWT, forgetting and FWT do not apply"
)


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


def fwt_reference(learner: ContinualLearner) -> str:
    """How the report's FWT is defined for this learner's method (one of the FWT_* strings)."""
    # FWT needs the model's accuracy on a task before learning it. Methods that share nothing
    # meet every task with the initial model, so it is 0 without measuring; methods that
    # classify over all tasks' labels have nothing to measure it with.
    if not shares_state(learner):
        return FWT_BY_CONSTRUCTION
    if learner.method.routes_itself:
        return FWT_UNDEFINED
    return FWT_REFERENCE


def matrices(completed: list[dict], T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R (task given), F (task-free: routed) and R[i-1, i] from the finished tasks' rows."""
    R = np.full((T, T), np.nan)
    F = np.full((T, T), np.nan)
    before = np.full(T, np.nan)
    for i, done in enumerate(completed):
        R[i, : i + 1] = done["row"]
        F[i, : i + 1] = done["free_row"]
        before[i] = np.nan if done["before"] is None else done["before"]
    return R, F, before


def stream_report(state: RunState, learner: ContinualLearner, names: list[str], seconds: float) -> dict:
    """The report of a stream run from what its state records of the finished tasks."""
    T = len(names)
    R, F, before = matrices(state.completed, T)
    reference_text = fwt_reference(learner)
    if state.reference is not None:
        reference = np.array(state.reference, dtype=float)
        summary = metrics.summary(R, before, reference)
    else:
        reference = None
        summary = metrics.summary(R)
        summary["fwt"] = 0.0 if reference_text == FWT_BY_CONSTRUCTION else None
    confusion = np.array(state.completed[-1]["confusion"]) if state.completed else np.zeros((T, T), int)
    routing = metrics.routing_accuracy(confusion)
    summary.update({
        "task_free_acc": metrics.average_accuracy(F),
        "task_free_bwt": metrics.backward_transfer(F),
        "routing_acc": routing["overall"],
    })
    return {
        "tasks": names,
        "accuracy_matrix": matrix_json(R),
        "task_free_accuracy_matrix": matrix_json(F),
        "routing": _routing_json(names, routing, confusion,
                                 state.completed[-1].get("routing_ece") if state.completed else None),
        "metrics": summary,
        "fwt_reference": reference_text,
        "reference_accuracy": None if reference is None else [float(v) for v in reference],
        "per_task": [done["entry"] for done in state.completed],
        **({"pool": pool} if (pool := pool_summary([d["entry"] for d in state.completed], R, names))
           else {}),
        **_model_fields(learner),
        "config": state.config,
        "versions": library_versions(),
        "sessions": state.sessions,
        "total_seconds": round(seconds, 2),
    }


def joint_report(names: list[str], R: np.ndarray, F: np.ndarray, confusion: np.ndarray,
                 per_task: list[dict], learner: ContinualLearner, run_config: dict | None,
                 seconds: float) -> dict:
    """The report of a joint run, shaped like `stream_report`'s; only R's and F's last rows exist."""
    routing = metrics.routing_accuracy(confusion)
    summary = {
        "acc": float(R[-1].mean()), "bwt": None, "forgetting": None,
        "average_incremental_accuracy": None, "fwt": None,
        "task_free_acc": float(F[-1].mean()), "task_free_bwt": None,
        "routing_acc": routing["overall"],
    }
    return {
        "tasks": names,
        "accuracy_matrix": matrix_json(R),
        "task_free_accuracy_matrix": matrix_json(F),
        "matrix_note": JOINT_MATRIX,
        "routing": _routing_json(names, routing, confusion),
        "metrics": summary,
        "fwt_reference": JOINT_MATRIX,
        "reference_accuracy": None,
        "per_task": per_task,
        **_model_fields(learner),
        "config": run_config or {},
        "versions": library_versions(),
        "total_seconds": round(seconds, 2),
    }


def matrix_json(M: np.ndarray) -> list[list[float | None]]:
    """A matrix as JSON lists, NaN (not defined) as null."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in M]


def _routing_json(names: list[str], routing: dict, confusion: np.ndarray,
                  ece: float | None = None) -> dict:
    return {"per_task": dict(zip(names, routing["per_task"])), "overall": routing["overall"],
            "confusion": confusion.tolist(),
            "confusion_axes": "rows: true task, columns: routed task (final model)",
            "confused_pairs": metrics.confused_pairs(confusion, names),
            "confused_share": metrics.CONFUSED_SHARE,
            "ece": ece,
            "ece_note": "expected calibration error of the routed task's probability over the "
                        "test texts (15 bins); null: the method has no router"}


def backbone_json(backbone: Backbone) -> dict:
    """The report's description of a backbone: where it comes from, its size, its settings."""
    return {**backbone.ref.to_dict(), "parameters": backbone.num_parameters(),
            "config": backbone.config.to_dict()}


def _model_fields(learner: ContinualLearner) -> dict:
    """The report's description of the model that produced it."""
    return {
        "shared_state_numbers": learner.shared_state_numbers(),
        "backbone": backbone_json(learner.backbone),
        "method": {"name": learner.method.name, "hyperparameters": learner.method.hyperparameters()},
        "device": str(learner.device),
    }


def write_outputs(out: Path, report: dict, R: np.ndarray, F: np.ndarray | None, title: str) -> None:
    """report.json (atomically) and the two heatmaps (one without `F`: no task-free answers)."""
    from ..io import store
    from .plots import write_heatmap

    names, method = report["tasks"], report["method"]["name"]
    store.atomic_write(out / "report.json", json.dumps(report, indent=2, default=json_default).encode())
    write_heatmap(R, names, out / "accuracy_matrix.png", f"{method}: {title}")
    if F is None:
        return
    write_heatmap(F, names, out / "task_free_accuracy_matrix.png",
                  f"{method}: task-free accuracy (task predicted, not given)")


def json_default(value):
    """`json.dumps`'s fallback for the numpy scalars and paths a report or run config holds."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
