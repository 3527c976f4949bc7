"""`ia3`: one activation-scaling entry (in the top `adapt_layers` layers), one head and (with
`lexical`, the default) one lexical branch per task; nothing is shared, so nothing learned for
one task can change another's predictions.

With `lexical`, a validation split (`VALIDATION_FRACTION` of the training texts, stratified,
seeded) is held out: the scales and head learn on the rest, and the lexical branch's settings
and its weight in the fusion are chosen on the held-out texts (model/lexical.py). A task too
small to hold out `MIN_VALIDATION` texts learns on all of them without a branch.

Measured and left out (same streams, splits and seed; ACC bundled / first five scale-stream
tasks, against 78.03 / 81.20): training the scales and head again on all the training texts
once the branch is chosen (78.67 / 80.47); the mean of those weights and the fit split's
(- / 81.14); the mean of the weights over the last epoch's steps (77.92 / -). Each moved single
tasks by up to 2 points either way: the spread of training itself (`ctt bench --seeds`).

A head started from a linear probe instead of at random (LP-FT: a multinomial logistic
regression, C = 1, on the new task's pooled top output with every scale at 1, then the usual
training; 2026-12-07, bundled stream, seed 0): ACC 77.30 against 79.04, lower on every task
(94.0 -> 93.0 on WordNet glosses, 73.75 -> 70.0 on State of the Union eras). The probe already
fits the fit split (100 % of WordNet's training texts), so training starts with little loss left
for the scales to learn from; not pursued further."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import TrainConfig
from ..data.split import held_out_positions
from ..model import lexical
from ..model.batching import length_batches
from ..model.memory import release_freed_memory
from ..training.search import SearchConfig, run_search
from ..types import Task
from .base import GradientMethod

ADAPTER = "adapter."
HEAD = "head."
VALIDATION_FRACTION = 0.15
MIN_VALIDATION = 30
REPORTS_PER_EPOCH = 3  # validation scores a search trial reports per epoch


class IA3Method(GradientMethod):
    name = "ia3"

    def __init__(self, train: TrainConfig | None = None, adapt_layers: int | str | None = None,
                 lexical: bool = True, search: int = 0, search_budget: float | None = None):
        super().__init__(train, adapt_layers)
        if not isinstance(lexical, bool):
            raise ValueError(f"lexical must be true or false, got {lexical!r}")
        self.lexical = lexical
        if search:  # validated now, not when the first task is learned
            SearchConfig(search, search_budget, self.train.seed)
        elif search_budget is not None:
            raise ValueError("search_budget needs search (the number of trials) >= 1")
        self.search, self.search_budget = search, search_budget

    def hyperparameters(self) -> dict:
        options = {**super().hyperparameters(), "lexical": self.lexical}
        if self.search:  # absent otherwise: models without a search are saved as before
            options.update(search=self.search, search_budget=self.search_budget)
        return options

    def data_parallel_refusal(self) -> str | None:
        if self.search:
            return ("--search stops its study on a time budget, which the processes would "
                    "measure differently")
        return None

    def learn(self, model, task: Task, states, progress=None, checkpointing=None) -> dict:
        held = (held_out_positions(task, VALIDATION_FRACTION, self.train.seed)
                if self.lexical or self.search else set())
        if len(held) < MIN_VALIDATION:
            stats = super().learn(model, task, states, progress, checkpointing)
            why = f"fewer than {MIN_VALIDATION} texts to validate on"
            stats["lexical"] = None if not self.lexical else {"mix": 0.0, "why": why}
            if self.search:
                stats["search"] = {"why": why}
            return stats
        fit_rows = [i for i in range(len(task.train)) if i not in held]
        val_rows = sorted(held)
        fit_task = Task(task.name, task.labels, tuple(task.train[i] for i in fit_rows), task.test)
        index = task.label_index()
        candidates = None
        if self.lexical:  # the branch reads whole texts, not the encoder's first tokens
            words = model.backbone.tokenize_whole([e.text for e in task.train])
            candidates = lexical.Candidates(
                [words[i] for i in fit_rows], [index[task.train[i].label] for i in fit_rows],
                [words[i] for i in val_rows], [index[task.train[i].label] for i in val_rows],
                len(task.labels), model.special_ids, whole_text=True)
        if self.search:
            val_y = torch.tensor([index[task.train[i].label] for i in val_rows])
            stats, chosen = self._learn_searched(model, fit_task, states.subset(fit_rows),
                                                 states.subset(val_rows), val_y, candidates, progress)
        else:
            stats = super().learn(model, fit_task, states.subset(fit_rows), progress, checkpointing)
            chosen = candidates.choose(self._logits(model, task.name, states.subset(val_rows))) \
                if candidates is not None else None
        if candidates is not None:
            release_freed_memory()  # the training passes' blocks, before the branch's arrays
            branch = candidates.branch(chosen)
            if branch is not None:
                model.lexical[task.name] = branch
                chosen["bytes"] = branch.nbytes()
        stats["lexical"] = chosen
        return stats

    def _learn_searched(self, model, task: Task, fit_states, val_states, val_y, candidates, progress):
        """An Optuna study over this task's training choices, the defaults first (so the
        search keeps them unless a trial beats them, and its time budget is counted in their
        runs), each trial trained on the fit split and scored on the validation split (the
        fused accuracy when there is a lexical branch: its regularisation and weight, 0 meaning
        off, chosen per trial on the same split); the best trial's scales and head are kept.
        Returns (stats, lexical choice)."""
        depth = self.adapt_layers  # resolved to a number by the learner

        def space(trial) -> dict:
            return {"lr": trial.suggest_float("lr", 3e-3, 1e-1, log=True),
                    "head_lr": trial.suggest_float("head_lr", 1e-2, 3e-1, log=True),
                    "epochs": trial.suggest_int("epochs", 1, self.train.epochs),
                    "top_layers": trial.suggest_int("top_layers", 1, depth)}

        def score(logits: torch.Tensor) -> tuple[float, dict | None]:
            if candidates is None:
                return float((logits.argmax(-1) == val_y).float().mean()), None
            chosen = candidates.choose(logits)
            return chosen["val_accuracy"], chosen

        best: dict = {}

        def evaluate(params: dict, report) -> float:
            train = replace(self.train, lr=params["lr"], head_lr=params["head_lr"],
                            epochs=params["epochs"])
            checks = 0

            def on_step(step: int, steps_per_epoch: int) -> None:
                # Scored REPORTS_PER_EPOCH times an epoch: the pruner may stop a trial after a
                # fraction of one, which is what keeps a study's cost a few default runs.
                nonlocal checks
                every = max(1, steps_per_epoch // REPORTS_PER_EPOCH)
                if step % every == 0 and step < steps_per_epoch * train.epochs:
                    checks += 1
                    report(checks, score(self._logits(model, task.name, val_states))[0])

            try:
                stats = GradientMethod.learn(self, model, task, fit_states, progress, train=train,
                                             top_layers=params["top_layers"],
                                             on_step=on_step if report is not None else None)
                value, chosen = score(self._logits(model, task.name, val_states))
                if not best or value > best["value"]:
                    best.update(value=value, chosen=chosen, stats=stats, params=params,
                                tensors={k: v.clone() for k, v in self.task_tensors(model, task.name).items()})
                return value
            finally:
                self.delete(model, task.name)

        defaults = {"lr": self.train.lr, "head_lr": self.train.head_lr,
                    "epochs": self.train.epochs, "top_layers": depth}
        result = run_search(SearchConfig(self.search, self.search_budget, self.train.seed),
                            space, evaluate, first=defaults)
        model.adapter.add(task.name)
        self.load_task_tensors(model, task.name, task.labels, best["tensors"])
        stats = dict(best["stats"])
        stats["search"] = {**result.summary(), "validation_texts": len(val_y)}
        return stats, best["chosen"]

    @torch.inference_mode()
    def _logits(self, model, task: str, states) -> torch.Tensor:
        """(N, C) head logits of the texts of `states` under `task`, in float32 as predictions
        are (with the training passes' attention kernels: equal up to rounding)."""
        out = torch.empty(len(states), model.heads.heads[task].out_features)
        for rows in length_batches(states.lengths, max_tokens=model.pass_tokens):
            pooled = model.top_pooled(states.batch(rows), [self.adapter_key(task)] * len(rows))
            out[rows] = torch.stack(self.head_logits(model, pooled, [task] * len(rows))).float().cpu()
        return out

    def adapter_key(self, task: str) -> str:
        return task

    def begin_task(self, model, task: Task, states) -> None:
        model.adapter.add(task.name)
        super().begin_task(model, task, states)

    def param_groups(self, model, task: Task, train: TrainConfig, top_layers=None) -> list[dict]:
        return [
            {"params": model.adapter.parameters_of(task.name, top_layers), "lr": train.lr},
            {"params": list(model.heads.heads[task.name].parameters()), "lr": train.head_lr},
        ]

    def delete(self, model, task: str) -> None:
        if task in model.adapter.entries():
            model.adapter.remove(task)
        if task in model.heads:
            model.heads.remove(task)
        model.lexical.pop(task, None)

    def task_tensors(self, model, task: str) -> dict[str, torch.Tensor]:
        tensors = {ADAPTER + k: v for k, v in model.adapter.state_of(task).items()}
        head = model.heads.heads[task]
        tensors[HEAD + "weight"] = head.weight.detach().cpu()
        tensors[HEAD + "bias"] = head.bias.detach().cpu()
        if task in model.lexical:
            tensors.update(model.lexical[task].tensors())
        return tensors

    def load_task_tensors(self, model, task: str, labels, tensors) -> None:
        adapter = {k[len(ADAPTER):]: v for k, v in tensors.items() if k.startswith(ADAPTER)}
        model.adapter.load_state_of(task, adapter)
        load_head(model, task, labels, tensors)
        branch = lexical.LexicalBranch.from_tensors(tensors)
        if branch is not None:
            model.lexical[task] = branch


def load_head(model, task: str, labels, tensors: dict[str, torch.Tensor]) -> None:
    weight, bias = tensors.get(HEAD + "weight"), tensors.get(HEAD + "bias")
    if weight is None or bias is None:
        raise ValueError(f"task {task!r}: head tensors missing")
    if tuple(weight.shape) != (len(labels), model.backbone.hidden_size):
        raise ValueError(
            f"task {task!r}: head shape {tuple(weight.shape)} does not fit {len(labels)} labels "
            f"and hidden size {model.backbone.hidden_size}"
        )
    model.heads.add(task, labels, seed=0, device=model.device)
    with torch.no_grad():
        model.heads.heads[task].weight.copy_(weight)
        model.heads.heads[task].bias.copy_(bias)
