"""Optional engines (MLflow, TensorBoard, PEFT, scikit-learn, ONNX, pyarrow, datasets): imported
only where used, and a missing one says which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional package a command needs is not installed; the message says how to get it."""


def import_extra(module: str, extra: str) -> ModuleType:
    """`import module`, or `MissingExtra` naming `pip install 'continual-tiny-transformer[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"this needs the optional package {module.split('.')[0]!r}, which is not installed: "
            f"pip install 'continual-tiny-transformer[{extra}]'"
        ) from exc
