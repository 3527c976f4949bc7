"""continual-tiny-transformer: learn text-classification tasks one after another on one frozen,
tiny pretrained transformer, adding a few kilobytes per task and forgetting nothing.

Importing this package loads no model and reads no environment; heavy modules load lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ContinualLearner": "learner",
    "Prediction": "types",
    "TaskRecord": "types",
    "BackboneConfig": "config",
    "TrainConfig": "config",
    "Task": "types",
    "Example": "types",
    "StreamError": "types",
    "load_stream": "data.stream",
    "load_tasks": "data.source",
    "ReadOptions": "data.source",
    "default_stream_path": "data.stream",
    "run_stream": "experiment.run",
    "CheckpointError": "io.store",
    "TrainingError": "training.loop",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .config import BackboneConfig, TrainConfig
    from .data.source import ReadOptions, load_tasks
    from .data.stream import default_stream_path, load_stream
    from .io.store import CheckpointError
    from .experiment.run import run_stream
    from .learner import ContinualLearner
    from .types import Example, Prediction, StreamError, Task, TaskRecord
    from .training.loop import TrainingError
