"""Experiment tracking: a run's settings, its metrics as tasks finish, its results as artifacts.

    ctt run --track mlflow [--tracking-uri URI]      # default store: ./mlruns (SQLite + files)
    ctt run --track tensorboard [--tracking-uri DIR] # default: DIR/tensorboard of the run
    ctt bench --track mlflow                         # a parent run, one child run per method

Per task, at step i (the i-th task learned): `acc_seen` (mean accuracy over the tasks seen),
`acc/<task>` (R[i, j] for every task j seen), `train_seconds`. At the end: the report's
metrics (ACC, BWT, forgetting, FWT, task-free ACC, routing), total seconds, peak RSS, and the
report and heatmaps as artifacts. Trackers are optional engines (`pip install
'continual-tiny-transformer[mlflow]'` or `[tensorboard]`); this module imports them only when a
tracker is opened.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from ..extras import import_extra
from ..types import Task, TaskRecord
from .bench import BenchEvents
from .run import RunEvents

TRACKERS = ("mlflow", "tensorboard")
EXPERIMENT = "continual-tiny-transformer"
DEFAULT_MLFLOW_DIR = Path("mlruns")
# Report figures logged as final metrics (None or NaN ones are left out: they do not apply).
FINAL_METRICS = ("acc", "bwt", "forgetting", "fwt", "average_incremental_accuracy",
                 "task_free_acc", "task_free_bwt", "routing_acc")
BENCH_METRICS = ("acc", "bwt", "forgetting", "fwt", "task_free_acc", "train_seconds",
                 "peak_rss_mb", "wall_seconds")


class Tracker:
    """One run in a tracking backend. `child` opens a nested run (a bench's methods)."""

    def log_params(self, params: dict) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        raise NotImplementedError

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        raise NotImplementedError

    def child(self, name: str) -> "Tracker":
        raise NotImplementedError

    def end(self, ok: bool = True) -> None:
        raise NotImplementedError


class MLflowTracker(Tracker):
    """A run in an MLflow store, written through `MlflowClient` (no global MLflow state)."""

    def __init__(self, name: str, uri: str | None = None, *, client=None, experiment_id=None,
                 parent_id: str | None = None):
        if client is None:
            mlflow = import_extra("mlflow", "mlflow")
            artifacts = None
            if uri is None:  # a local store: SQLite for runs, files for artifacts
                folder = DEFAULT_MLFLOW_DIR.resolve()
                folder.mkdir(parents=True, exist_ok=True)
                uri = f"sqlite:///{folder / 'mlflow.db'}"
                artifacts = (folder / "artifacts").as_uri()
            client = mlflow.MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            experiment_id = (experiment.experiment_id if experiment is not None else
                             client.create_experiment(EXPERIMENT, artifact_location=artifacts))
        self.client, self.experiment_id, self.uri = client, experiment_id, uri
        tags = {"mlflow.parentRunId": parent_id} if parent_id else {}
        self.run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, _param_text(v)) for k, v in flatten(params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=flat[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in _finite(metrics).items():
            self.client.log_metric(self.run_id, key, value, step=step or 0)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))

    def child(self, name: str) -> "MLflowTracker":
        return MLflowTracker(name, self.uri, client=self.client, experiment_id=self.experiment_id,
                             parent_id=self.run_id)

    def end(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class TensorBoardTracker(Tracker):
    """Event files under `log_dir`: scalars per step, settings as text, heatmaps as images."""

    def __init__(self, log_dir: Path):
        import_extra("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: dict) -> None:
        rows = "\n".join(f"| {k} | {_param_text(v)} |" for k, v in flatten(params).items())
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + rows)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in _finite(metrics).items():
            self.writer.add_scalar(key, value, global_step=step or 0)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        from matplotlib import image

        for path in map(Path, paths):
            if not path.is_file():
                continue
            if path.suffix == ".png":
                self.writer.add_image(path.stem, image.imread(path)[..., :3], dataformats="HWC")
            elif path.suffix in (".json", ".md"):
                self.writer.add_text(path.name, "```\n" + path.read_text()[:100_000] + "\n```")

    def child(self, name: str) -> "TensorBoardTracker":
        return TensorBoardTracker(self.log_dir / name)

    def end(self, ok: bool = True) -> None:
        self.writer.close()


def open_tracker(kind: str, name: str, out: Path, uri: str | None = None) -> Tracker:
    """A tracker of `kind` ("mlflow" or "tensorboard") for the run `name` writing to `out`."""
    if kind == "mlflow":
        return MLflowTracker(name, uri)
    if kind == "tensorboard":
        return TensorBoardTracker(Path(uri) if uri else Path(out) / "tensorboard")
    raise ValueError(f"unknown tracker {kind!r}; known: {list(TRACKERS)}")


# -- a stream run ----------------------------------------------------------------------------------
class TrackedRun(RunEvents):
    """Forwards every event of a run to `inner` and logs each finished task's figures."""

    def __init__(self, inner: RunEvents, tracker: Tracker):
        self.inner, self.tracker = inner, tracker

    def task_started(self, index: int, total: int, task: Task) -> None:
        self.inner.task_started(index, total, task)

    def train_step(self, done: int, total: int, loss: float) -> None:
        self.inner.train_step(done, total, loss)

    def evaluation_started(self, index: int, tasks: list[Task]) -> None:
        self.inner.evaluation_started(index, tasks)

    def evaluated(self, task: Task, accuracy: float) -> None:
        self.inner.evaluated(task, accuracy)

    def resumed(self, done: list[str], task: str | None, step: int | None) -> None:
        self.inner.resumed(done, task, step)

    def task_finished(self, index: int, record: TaskRecord, matrix: np.ndarray,
                      names: list[str]) -> None:
        self.inner.task_finished(index, record, matrix, names)
        row = [float(v) for v in matrix[-1]]
        seen = [v for v in row if not math.isnan(v)]
        metrics = {f"acc/{name}": value for name, value in zip(names, row)}
        metrics["train_seconds"] = record.train_seconds
        if seen:
            metrics["acc_seen"] = sum(seen) / len(seen)
        self.tracker.log_metrics(metrics, step=index)


def run_artifacts(out: Path) -> list[Path]:
    """What a finished run leaves in `out` that a tracker keeps."""
    out = Path(out)
    return [out / "report.json", out / "accuracy_matrix.png", out / "task_free_accuracy_matrix.png"]


def log_report(tracker: Tracker, report: dict, out: Path | None) -> None:
    """A finished run's final metrics and, when it wrote to `out`, its files."""
    metrics = {k: report["metrics"].get(k) for k in FINAL_METRICS}
    metrics["total_seconds"] = report.get("total_seconds")
    metrics["peak_rss_mb"] = report.get("peak_rss_mb")
    tracker.log_metrics(metrics, step=len(report["tasks"]) - 1)
    if out is not None:
        tracker.log_artifacts(run_artifacts(out))


# -- a bench ---------------------------------------------------------------------------------------
class TrackedBench(BenchEvents):
    """Forwards every event of a bench to `inner`; each method is a child run of `tracker`."""

    def __init__(self, inner: BenchEvents, tracker: Tracker, out: Path):
        self.inner, self.tracker, self.out = inner, tracker, Path(out)
        self.method: Tracker | None = None

    def method_started(self, index: int, total: int, method: str) -> None:
        self.inner.method_started(index, total, method)
        self.method = self.tracker.child(method)
        self.method.log_params({"method": method})

    def task_started(self, method, index, total, task, train_examples) -> None:
        self.inner.task_started(method, index, total, task, train_examples)

    def train_step(self, done: int, total: int, loss: float) -> None:
        self.inner.train_step(done, total, loss)

    def evaluating(self, method: str, tasks: int) -> None:
        self.inner.evaluating(method, tasks)

    def task_finished(self, method: str, index: int, accuracies: list[float | None]) -> None:
        self.inner.task_finished(method, index, accuracies)
        seen = [a for a in accuracies if a is not None]
        if seen:
            self.method.log_metrics({"acc_seen": sum(seen) / len(seen)}, step=index)

    def method_finished(self, method: str, row: dict) -> None:
        self.inner.method_finished(method, row)
        self.method.log_metrics({k: row.get(k) for k in BENCH_METRICS},
                                step=len(row.get("first_task_accuracy") or [0]) - 1)
        self.method.log_artifacts(run_artifacts(self.out / method))
        self.method.end()
        self.method = None

    def close(self, ok: bool) -> None:
        """End the run of a method the bench did not finish (it failed), then the bench's."""
        if self.method is not None:
            self.method.end(ok=False)
            self.method = None
        self.tracker.end(ok)


def bench_artifacts(out: Path) -> list[Path]:
    out = Path(out)
    return [out / "bench.json", out / "bench.md", out / "bench_final_accuracy.png",
            out / "bench_accuracy_matrices.png", out / "bench_first_task.png"]


# -- helpers ---------------------------------------------------------------------------------------
def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    """Nested settings as flat keys: {"train": {"lr": 0.03}} -> {"train.lr": 0.03}."""
    flat: dict[str, object] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _param_text(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:500]  # MLflow refuses longer parameter values on some stores


def _finite(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
