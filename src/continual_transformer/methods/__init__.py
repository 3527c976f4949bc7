"""Learning methods, by name."""

from __future__ import annotations

from ..config import TrainConfig
from .base import GradientMethod, Method
from .analytic import AnalyticMethod
from .ewc import EWCMethod
from .finetune import FinetuneMethod
from .ia3 import IA3Method
from .joint import JointMethod
from .lwf import LwFMethod
from .pool import PooledIA3Method
from .replay import ReplayMethod

METHODS: dict[str, type[Method]] = {
    "ia3": IA3Method,
    "analytic": AnalyticMethod,
    # baselines: one shared scale entry learned task after task, plus a head per task
    "finetune": FinetuneMethod,
    "ewc": EWCMethod,
    "lwf": LwFMethod,
    "replay": ReplayMethod,
    "joint": JointMethod,
}


def make_method(name: str, hyperparameters: dict | None = None) -> Method:
    """Build a method from its name and the hyperparameters stored by `Method.hyperparameters`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    hyperparameters = dict(hyperparameters or {})
    if name == "ia3" and hyperparameters.get("pool_size") is not None:
        cls = PooledIA3Method  # the same method with a bounded pool of entries (methods/pool.py)
    elif hyperparameters.get("pool_size", 0) is None:
        del hyperparameters["pool_size"]  # unset: one entry per task, as without the option
    if "train" in hyperparameters:
        if not issubclass(cls, GradientMethod):
            raise ValueError(f"method {name!r} is not trained by gradient; training options do not apply")
        hyperparameters["train"] = TrainConfig.from_dict(hyperparameters["train"])
    return cls(**hyperparameters)


__all__ = ["METHODS", "GradientMethod", "Method", "make_method"]
