"""Learning methods, by name."""

from __future__ import annotations

from ..config import TrainConfig
from .base import GradientMethod, Method
from .ia3 import IA3Method

METHODS: dict[str, type[Method]] = {"ia3": IA3Method}


def make_method(name: str, hyperparameters: dict | None = None) -> Method:
    """Build a method from its name and the hyperparameters stored by `Method.hyperparameters`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    hyperparameters = dict(hyperparameters or {})
    if issubclass(cls, GradientMethod) and "train" in hyperparameters:
        hyperparameters["train"] = TrainConfig.from_dict(hyperparameters["train"])
    return cls(**hyperparameters)


__all__ = ["METHODS", "GradientMethod", "Method", "make_method"]
