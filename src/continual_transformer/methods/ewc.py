"""`ewc`: elastic weight consolidation (Kirkpatrick et al. 2017), online form (Schwarz et al. 2018).

Training task t minimises

    cross-entropy  +  (lambda / 2) * sum_k F_k * (theta_k - theta*_k)^2

over the shared scale vectors theta, where theta* is their value at the end of the previous
task and F is the accumulated diagonal Fisher information: at the end of each task,
F <- decay * F + F_task, with F_task the empirical Fisher of that task, the mean over (a seeded
sample of) its training examples of the squared gradient of log p(label | text) with respect
to theta. Heads are not penalised: each task has its own.

Per-example gradients come from one batched pass: every row of a batch gets a temporary copy
of the shared entry of its own (the adapter gathers one entry per row), so the gradient of
the summed loss with respect to row i's copy is exactly example i's gradient.

Defaults: lambda = 1000, decay = 1 (every task counts fully), Fisher from up to 512 examples
per task; training as `finetune`. lambda was chosen on the first three tasks of the default
stream (240 training examples each, 2 epochs): mean final accuracy 61.6 / 60.3 / 59.8 / 50.1 %
for lambda = 0 / 1e3 / 1e4 / 1e5, first task 90.0 / 91.5 / 92.2 / 92.0 %: 1e5 blocks the later
tasks; 1e3 protects the first task at the smallest cost. On this stream the shared scale entry
forgets little even unprotected, which limits what any penalty can win.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..model.batching import length_batches
from ..types import Task
from .base import task_seed
from .shared_adapter import SHARED, SharedAdapterMethod

FISHER = "ewc.fisher."
ANCHOR = "ewc.anchor."
FISHER_BATCH = 32
_COPY = "__ewc_row_{}"


class EWCMethod(SharedAdapterMethod):
    name = "ewc"
    shares = ("every task trains the one shared scale entry in turn, penalised towards where the "
              "tasks before it left it (their Fisher information)")

    def __init__(self, train=None, adapt_layers=None, ewc_lambda: float = 1000.0, decay: float = 1.0,
                 fisher_examples: int = 512):
        super().__init__(train, adapt_layers)
        if not ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        if fisher_examples < 1:
            raise ValueError(f"fisher_examples must be >= 1, got {fisher_examples!r}")
        self.ewc_lambda, self.decay, self.fisher_examples = float(ewc_lambda), float(decay), fisher_examples
        self.fisher: list[torch.Tensor] | None = None  # per shared parameter, same shapes
        self.anchor: list[torch.Tensor] | None = None  # theta* after the last learned task
        self._state_before: tuple = (None, None)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "ewc_lambda": self.ewc_lambda, "decay": self.decay,
                "fisher_examples": self.fisher_examples}

    def penalty(self, model) -> torch.Tensor:
        """(lambda / 2) * sum F * (theta - theta*)^2; zero before the first task has ended."""
        if self.fisher is None:
            return torch.zeros((), device=model.device)
        params = model.adapter.parameters_of(SHARED)
        total = sum(((f * (p - a) ** 2).sum() for p, f, a in zip(params, self.fisher, self.anchor)))
        return 0.5 * self.ewc_lambda * total

    def loss(self, model, task: Task, inputs, labels: torch.Tensor) -> torch.Tensor:
        return super().loss(model, task, inputs, labels) + self.penalty(model)

    def begin_task(self, model, task: Task, states) -> None:
        self._state_before = (self.fisher, self.anchor)
        super().begin_task(model, task, states)

    def rollback(self, model, task: str) -> None:
        if self.began(task):
            self.fisher, self.anchor = self._state_before
        super().rollback(model, task)
        if SHARED not in model.adapter.entries():  # no task left
            self.fisher = self.anchor = None

    def delete(self, model, task: str) -> None:
        super().delete(model, task)
        if SHARED not in model.adapter.entries():  # no task left
            self.fisher = self.anchor = None

    def end_task(self, model, task: Task, states) -> None:
        fisher = self.fisher_diagonal(model, task, states)
        if self.fisher is not None:
            fisher = [self.decay * old + new for old, new in zip(self.fisher, fisher)]
        anchor = [p.detach().clone() for p in model.adapter.parameters_of(SHARED)]
        self.fisher, self.anchor = fisher, anchor

    def fisher_diagonal(self, model, task: Task, states) -> list[torch.Tensor]:
        """Mean squared per-example gradient of the log-likelihood w.r.t. the shared entry."""
        n = len(task.train)
        generator = torch.Generator().manual_seed(task_seed(self.train.seed, task.name) + 1)
        chosen = sorted(torch.randperm(n, generator=generator)[: self.fisher_examples].tolist())
        index = task.label_index()
        labels = torch.tensor([index[task.train[i].label] for i in chosen], device=model.device)
        shared = model.adapter.state_of(SHARED)
        fisher = [torch.zeros_like(p) for p in model.adapter.parameters_of(SHARED)]
        copies = [_COPY.format(i) for i in range(min(FISHER_BATCH, len(chosen)))]
        for key in copies:
            model.adapter.load_state_of(key, shared)
        try:
            # In the sampled order: the sum's float rounding does not depend on text lengths.
            for rows in length_batches(None, rows=range(len(chosen)), max_rows=FISHER_BATCH,
                                       sort=False):
                keys = copies[: len(rows)]
                pooled = model.top_pooled(states.batch([chosen[i] for i in rows]), keys)  # (B, H)
                nll = F.cross_entropy(model.heads(pooled, task.name), labels[rows], reduction="sum")
                params = [p for key in keys for p in model.adapter.parameters_of(key)]
                grads = torch.autograd.grad(nll, params)
                per_row = len(fisher)
                for r in range(len(rows)):
                    for k, g in enumerate(grads[r * per_row : (r + 1) * per_row]):
                        fisher[k] += g.detach() ** 2
        finally:
            for key in copies:
                model.adapter.remove(key)
        return [f / len(chosen) for f in fisher]

    def shared_numbers(self, model) -> int:
        extra = 0 if self.fisher is None else 2 * sum(f.numel() for f in self.fisher)
        return super().shared_numbers(model) + extra

    def shared_tensors(self, model) -> dict[str, torch.Tensor]:
        tensors = super().shared_tensors(model)
        if self.fisher is not None:
            for name, f, a in zip(model.adapter.layers, self.fisher, self.anchor):
                tensors[FISHER + name] = f.detach().cpu()
                tensors[ANCHOR + name] = a.detach().cpu()
        return tensors

    def load_shared_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in tensors.items() if k.startswith((FISHER, ANCHOR))}
        super().load_shared_tensors(model, {k: v for k, v in tensors.items() if k not in own})
        if not own:
            return
        names = list(model.adapter.layers)
        expected = {FISHER + n for n in names} | {ANCHOR + n for n in names}
        if set(own) != expected:
            raise ValueError(f"method 'ewc': Fisher/anchor tensors do not fit this backbone: "
                             f"missing {sorted(expected - set(own))[:3]}, "
                             f"unexpected {sorted(set(own) - expected)[:3]}")
        device = model.device
        self.fisher = [own[FISHER + n].to(device) for n in names]
        self.anchor = [own[ANCHOR + n].to(device) for n in names]
