"""What a federated client computes on its own shard of a task; its texts never leave it.

`ia3`: the task's scales and head, trained for a few local epochs starting from the global ones
(FedProx's proximal term mu/2 ||w - w_global||^2 added to the loss when mu > 0), and, once, the
router's statistics of the shard's texts. `analytic`: the shard's sufficient statistics (class
sums and counts, Gram matrix). Everything here runs without Flower.

A reply's tensors are keyed `trained/<name>` (averaged by the server), `task/<name>` (the
task's statistics, summed) and `shared/<name>` (its increment of shared statistics, summed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import BackboneConfig, LearnerSpec, TrainConfig
from ..data.source import load_tasks
from ..methods.ia3 import ADAPTER, HEAD, IA3Method
from ..model.router import FINGERPRINT
from ..types import StreamError, Task, TaskRecord

TRAINED, TASK, SHARED = "trained/", "task/", "shared/"
METHODS = ("ia3", "analytic")


class ProximalIA3(IA3Method):
    """`ia3` without a lexical branch (a bag of one client's words cannot be averaged) that
    starts a task from `start` (the global scales and head; None: the usual initial ones) and,
    with `mu` > 0, adds mu/2 ||w - w_start||^2 to every batch's loss (FedProx)."""

    def __init__(self, train: TrainConfig | None = None, adapt_layers: int | str | None = None,
                 *, start: dict[str, torch.Tensor] | None = None, mu: float = 0.0):
        super().__init__(train, adapt_layers, lexical=False)
        self.base_train = self.train
        self.configure(start, mu, self.train)
        self._anchor: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def configure(self, start: dict[str, torch.Tensor] | None, mu: float, train: TrainConfig) -> None:
        """What the next task learned starts from, its proximal weight and its training."""
        if not mu >= 0:
            raise ValueError(f"proximal mu must be >= 0, got {mu!r}")
        self.start, self.mu, self.train = start, mu, train

    def begin_task(self, model, task: Task, states) -> None:
        super().begin_task(model, task, states)
        head = model.heads.heads[task.name]
        if self.start is not None:
            check_trained(self.start, self.task_tensors(model, task.name), "the global tensors")
            model.adapter.load_state_of(task.name, {k[len(ADAPTER):]: v for k, v in self.start.items()
                                                    if k.startswith(ADAPTER)})
            with torch.no_grad():
                head.weight.copy_(self.start[HEAD + "weight"])
                head.bias.copy_(self.start[HEAD + "bias"])
        params = model.adapter.parameters_of(task.name) + list(head.parameters())
        self._anchor = [(p, p.detach().clone()) for p in params]

    def loss(self, model, task: Task, inputs, labels) -> torch.Tensor:
        loss = super().loss(model, task, inputs, labels)
        if self.mu:
            proximal = sum(((p.float() - w) ** 2).sum() for p, w in self._anchor)
            loss = loss + self.mu / 2 * proximal
        return loss

    def end_task(self, model, task: Task, states) -> None:
        self._anchor = []


def initial_tensors(model, method: IA3Method, task: Task) -> dict[str, torch.Tensor]:
    """The scales and head a task starts from (ones; the head seeded by task name), as
    `method.task_tensors` names them; nothing is left in `model`."""
    IA3Method.begin_task(method, model, task, None)
    try:
        return {k: v.clone() for k, v in method.task_tensors(model, task.name).items()}
    finally:
        method.delete(model, task.name)


def check_trained(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  what: str) -> None:
    """ValueError naming the first tensor of `tensors` that is missing, extra, of another shape
    than `expected`'s, or not finite."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{what}: missing tensors {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{what}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[name].shape)}")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else "?"
            raise ValueError(f"{what}: tensor {name!r} has {bad} values that are NaN or Inf")


def read_shard(path: str | Path, task: str, seed: int = 0) -> Task:
    """The training texts of `task` in a client's shard file (any stream format; test rows are
    optional), validated row by row: a bad row raises `StreamError` naming file and line."""
    tasks = load_tasks(path, seed=seed, require_test=False)
    for found in tasks:
        if found.name == task:
            return found
    raise StreamError(f"{path}: no task {task!r} in this shard; it has {[t.name for t in tasks]}")


@dataclass
class LocalUpdate:
    """A client's reply: tensors keyed as the module says, its number of training texts, its
    record of the round (for the finished task's record) and its last training loss."""

    tensors: dict[str, torch.Tensor]
    examples: int
    record: TaskRecord
    loss: float | None = None


def client_learner(spec: LearnerSpec, backbone_sha256: str | None = None, device: str | None = None):
    """The learner a client process learns its shard with: one per spec and process (it holds
    the loaded backbone), so rounds after the first load nothing. With `backbone_sha256`, the
    backbone must have those weights (the server's)."""
    from ..learner import ContinualLearner
    from ..model.backbone import BackboneError

    key = (json.dumps(_spec_dict(spec), sort_keys=True), device)
    learner = _LEARNERS.get(key)
    if learner is None:
        if spec.method not in METHODS:
            raise ValueError(f"federated learning supports methods {list(METHODS)}, not {spec.method!r}")
        if spec.method == "ia3":
            hyper = spec.hyperparameters
            method = ProximalIA3(TrainConfig.from_dict(hyper.get("train") or {}), hyper.get("adapt_layers"))
            learner = ContinualLearner(spec.backbone, method=method, device=device, router=spec.router)
        else:
            learner = ContinualLearner.from_spec(spec, device=device)
        if learner.router is not None:
            # No calibration sample: texts' features do not leave a client, and all its texts
            # go into the statistics, which sum over clients to those of the union. No word
            # counts either: they would tell the server the client's vocabulary. The global
            # router then weighs no words (`Router.lexical_weight` is 0).
            learner.router.hold_out = False
            learner.router.reads_words = False
        _LEARNERS[key] = learner
    if backbone_sha256 is not None and learner.backbone.ref.sha256 != backbone_sha256:
        raise BackboneError(
            f"backbone {learner.backbone.ref.name!r} here has SHA-256 {learner.backbone.ref.sha256[:12]}…, "
            f"the server's {backbone_sha256[:12]}…; refusing to learn on other weights")
    return learner


_LEARNERS: dict[tuple, object] = {}


def spec_json(spec: LearnerSpec) -> str:
    """A learner spec as JSON text (what the server sends its clients)."""
    return json.dumps(_spec_dict(spec), sort_keys=True)


def spec_from_json(text: str) -> LearnerSpec:
    data = json.loads(text)
    return LearnerSpec(BackboneConfig(**data["backbone"]), data["method"], data["hyperparameters"],
                       data["router"])


def _spec_dict(spec: LearnerSpec) -> dict:
    return {"backbone": spec.backbone.to_dict(), "method": spec.method,
            "hyperparameters": spec.hyperparameters, "router": spec.router}


def learn_locally(learner, shard: Task, labels: tuple[str, ...], *,
                  start: dict[str, torch.Tensor] | None = None, epochs: int | None = None,
                  mu: float = 0.0, server_round: int = 1, statistics: bool = True) -> LocalUpdate:
    """One client's work in one round, on `client_learner`'s learner, which is left as it was.

    `labels` is the task's label set over all clients (a shard may lack some labels). `ia3`
    trains `epochs` epochs (default: the spec's) from `start` (None: the initial tensors),
    its batch order seeded by the round; `statistics` adds the router's statistics of the
    shard (sent once). `analytic` learns the shard's statistics (one round is all it needs).
    """
    labels = tuple(labels)
    unknown = sorted({e.label for e in shard.train} - set(labels))
    if unknown:
        raise ValueError(f"shard of task {shard.name!r} has labels {unknown} outside {list(labels)}")
    shared_before = {k: v.clone() for k, v in learner.shared_tensors().items()}
    method = learner.method
    if isinstance(method, ProximalIA3):
        method.configure(start, mu, replace(
            method.base_train, seed=method.base_train.seed + server_round - 1,
            **({"epochs": epochs} if epochs is not None else {})))
    try:
        return _learn(learner, shard, labels, statistics)
    finally:
        if shard.name in learner.tasks:
            learner.delete(shard.name)
        learner.load_shared_tensors(shared_before)


def _learn(learner, shard: Task, labels: tuple[str, ...], statistics: bool) -> LocalUpdate:
    def shared_increment() -> dict[str, torch.Tensor]:
        # The learner's shared statistics were zero before (or restored to what they were):
        # `learn_locally` puts them back, so what they hold now is this shard's increment.
        return {SHARED + k: v.clone() for k, v in learner.shared_tensors().items()}

    if learner.method.name == "analytic":
        present = tuple(label for label in labels if any(e.label == label for e in shard.train))
        record = learner.learn(Task(shard.name, present, shard.train))
        # Rows in the order of `labels`, zeros for labels this shard lacks: they add up.
        own = learner.task_tensors(shard.name)
        sums = torch.zeros(len(labels), own["sums"].shape[1], dtype=own["sums"].dtype)
        counts = torch.zeros(len(labels), dtype=own["counts"].dtype)
        rows = [labels.index(label) for label in present]
        sums[rows], counts[rows] = own["sums"], own["counts"]
        tensors = {TASK + "sums": sums, TASK + "counts": counts, **shared_increment()}
        return LocalUpdate(tensors, len(shard.train), record)
    record = learner.learn(Task(shard.name, labels, shard.train))
    tensors = {}
    for name, tensor in learner.task_tensors(shard.name).items():
        if name == FINGERPRINT:
            continue  # of this shard's features alone: no fingerprint of the task's texts
        if name.startswith("router."):
            if statistics:
                tensors[TASK + name] = tensor
        else:
            tensors[TRAINED + name] = tensor
    if statistics:
        tensors.update(shared_increment())
    return LocalUpdate(tensors, len(shard.train), record, record.stats.get("last_loss"))
