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
    "Prediction": "learner",
    "TaskRecord": "learner",
    "BackboneConfig": "config",
    "TrainConfig": "config",
    "Task": "data",
    "Example": "data",
    "StreamError": "data",
    "load_stream": "data",
    "default_stream_path": "data",
    "run_stream": "experiment",
    "CheckpointError": "checkpoint",
    "TrainingError": "train",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .config import BackboneConfig, TrainConfig
    from .data import Example, StreamError, Task, default_stream_path, load_stream
    from .checkpoint import CheckpointError
    from .experiment import run_stream
    from .learner import ContinualLearner, Prediction, TaskRecord
    from .train import TrainingError
