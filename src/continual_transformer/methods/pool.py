"""`ia3` with a bounded pool of scale entries (`pool_size`): at most P entries, shared by tasks.

Each task keeps its own head (and lexical branch) and records the entry its rows use. Before a
task is learned every entry is scored on its training texts, with no training
(methods/transfer.py): TransRate of the entry's pooled top-layer features, relative to
TransRate of the plain backbone's (an entry of all ones): `gain = TrR(entry) / TrR(ones) - 1`.
The best entry is the one with the highest TransRate; LEEP of its tasks' heads is reported.

The rule, with `best` the best entry and `gain` its gain:
- the pool has room: a new entry, started from `best` when `gain > transfer_margin`, else
  from all ones; it and the head are trained ("new");
- the pool is full and `gain > reuse_margin`: the task reads `best` as it is and trains its
  head only ("reuse"); no old task's model changes;
- the pool is full otherwise: a new entry is trained from all ones, then merged into `best` by
  distillation on the task's texts (methods/pool_merge.py) ("merge"). If afterwards an old task's
  head agrees with its former predictions on fewer than `merge_agreement` of those texts, the
  merge is undone and the task reuses `best` instead ("merge refused: reuse");
- but once `max_refused_merges` merges into `best` were refused in a row, with `best` and the
  tasks reading it unchanged since, the task reuses `best` without trying ("merge skipped:
  reuse"). A refused merge ends exactly as a reuse (the same head, trained the same way) and
  costs a trained entry and a distillation on top; the heads that must keep agreeing only grow
  in number while nothing changes, so the next merge is likely refused again (on the 100-task
  stream, none of the 65 merges tried into an entry that had refused one was accepted). An
  accepted merge, or a task of the entry deleted, lets merges be tried again.

A merge changes what old tasks read: with a pool, BWT is measured, not zero by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..types import Task
from . import pool_merge
from ..model.lexical import LexicalBranch
from .base import task_seed
from .ia3 import ADAPTER, HEAD, IA3Method, load_head
from .transfer import (heads_probs, label_entropy, label_source, leep, pooled_features,
                       start_head_from, transrate)

POOL = "pool."  # shared tensors: "pool.<entry>.<layer key>"
MERGING = "merging"  # the entry a task trains before it is merged (never saved)
DEFAULT_TRANSFER_MARGIN = 0.0
DEFAULT_REUSE_MARGIN = 0.05
DEFAULT_MERGE_AGREEMENT = 0.9
DEFAULT_MAX_REFUSED_MERGES = 2
SCORE_TEXTS = 512  # at most this many of a task's training texts are scored on


@dataclass
class _Before:
    """What a task's `learn` may change, as it was: put back if the learn fails."""

    task: str
    added: list[str] = field(default_factory=list)  # entries the learn created
    merged: tuple[str, dict[str, torch.Tensor]] | None = None  # an old entry and its tensors
    refused: dict[str, int] = field(default_factory=dict)  # the method's `refused` as it was


class PooledIA3Method(IA3Method):
    """`ia3` whose tasks share at most `pool_size` scale entries (see the module's rule)."""

    shares_state = True

    def __init__(self, train=None, adapt_layers=None, lexical: bool = True, search: int = 0,
                 search_budget=None, *, pool_size: int,
                 transfer_margin: float = DEFAULT_TRANSFER_MARGIN,
                 reuse_margin: float = DEFAULT_REUSE_MARGIN,
                 merge_agreement: float = DEFAULT_MERGE_AGREEMENT,
                 max_refused_merges: int = DEFAULT_MAX_REFUSED_MERGES):
        super().__init__(train, adapt_layers, lexical, search, search_budget)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a whole number >= 1, got {pool_size!r}")
        if search:
            raise ValueError("pool_size does not combine with search: a searched trial would "
                             "train a shared entry")
        for name, value in (("transfer_margin", transfer_margin), ("reuse_margin", reuse_margin)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 <= merge_agreement <= 1:
            raise ValueError(f"merge_agreement must be in [0, 1], got {merge_agreement!r}")
        if (isinstance(max_refused_merges, bool) or not isinstance(max_refused_merges, int)
                or max_refused_merges < 1):
            raise ValueError(f"max_refused_merges must be a whole number >= 1, got "
                             f"{max_refused_merges!r}")
        self.pool_size = pool_size
        self.max_refused_merges = max_refused_merges
        self.transfer_margin, self.reuse_margin = float(transfer_margin), float(reuse_margin)
        self.merge_agreement = float(merge_agreement)
        self.shares = (f"its tasks share a pool of at most {pool_size} scale entries, and a "
                       "full pool merges a new task's entry into an old one")
        self.assignment: dict[str, str] = {}  # task -> the pool entry its rows use
        # entry -> merges into it refused in a row, since it or the tasks reading it last changed
        self.refused: dict[str, int] = {}
        self._before: _Before | None = None
        self._head_only = False

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "pool_size": self.pool_size,
                "transfer_margin": self.transfer_margin, "reuse_margin": self.reuse_margin,
                "merge_agreement": self.merge_agreement,
                "max_refused_merges": self.max_refused_merges}

    def adapter_key(self, task: str) -> str:
        return self.assignment.get(task, task)  # an unassigned name (a probe) has no entry

    def entries(self, model) -> list[str]:
        return [e for e in model.adapter.entries() if e != MERGING]

    def tasks_of(self, entry: str) -> list[str]:
        return [t for t, e in self.assignment.items() if e == entry]

    # -- learning ------------------------------------------------------------------------------
    def learn(self, model, task: Task, states, progress=None, checkpointing=None) -> dict:
        self._before = None  # nothing of this task to put back until it changes the pool
        index = task.label_index()
        labels = torch.tensor([index[e.label] for e in task.train])
        scores, ones = self.scores(model, task, states, labels)
        best = max(scores, key=lambda e: scores[e]["transrate"]) if scores else None
        gain = scores[best]["gain"] if best is not None else None
        self._before = before = _Before(task.name, refused=dict(self.refused))
        pool = {"scores": scores, "ones_transrate": ones, "best": best}
        source, shared = label_source(model.heads, task.labels, task.name)  # as begin_task starts it
        pool["head_start"] = {"task": source, "labels": len(shared)} if source else None
        if len(scores) < self.pool_size:
            entry = next(f"entry{k}" for k in range(self.pool_size + 1)
                         if f"entry{k}" not in scores)
            start = best if gain is not None and gain > self.transfer_margin else None
            self._add_entry(model, entry, start, before)
            stats = self._train(model, task, states, entry, progress, checkpointing)
            pool.update(decision="new", entry=entry, start=start or "ones")
        elif gain > self.reuse_margin:
            stats = self._reuse(model, task, states, best, progress, checkpointing)
            pool.update(decision="reuse", entry=best)
        elif self.refused.get(best, 0) >= self.max_refused_merges:
            stats = self._reuse(model, task, states, best, progress, checkpointing)
            pool.update(decision="merge skipped: reuse", entry=best,
                        refused_in_a_row=self.refused[best])
        else:
            stats, outcome = self._merge(model, task, states, labels, best, progress, checkpointing)
            pool.update(outcome)
        # The pool after the task: entries and scale numbers (constant once it is full).
        pool.update(entries=len(self.entries(model)), scale_numbers=self.shared_numbers(model))
        stats["pool"] = pool
        return stats

    def changed_tasks(self, stats: dict) -> list[str] | None:
        """Only a merge changes what earlier tasks read: the tasks of the merged entry. A new
        entry is a copy, a reuse trains the task's head alone, and a refused merge puts the
        old entry back as it was (the same numbers)."""
        pool = stats.get("pool")
        if not isinstance(pool, dict) or "decision" not in pool:
            return None  # a record without its pool decision: anything may have changed
        return list(pool["merge"]["old_tasks"]) if pool["decision"] == "merge" else []

    def scores(self, model, task: Task, states, labels: torch.Tensor) -> tuple[dict, float]:
        """Per entry: TransRate, its gain over all ones, and LEEP (and LEEP's gain over a
        source that knows nothing) of the heads reading it, on the task's training texts;
        and the plain backbone's TransRate. On at most `SCORE_TEXTS` of the texts."""
        if len(labels) > SCORE_TEXTS:  # a seeded sample: scoring costs P + 1 forward passes
            generator = torch.Generator().manual_seed(task_seed(self.train.seed, task.name))
            rows = sorted(torch.randperm(len(labels), generator=generator)[:SCORE_TEXTS].tolist())
            states, labels = states.subset(rows), labels[rows]
        ones = transrate(pooled_features(model, states, None), labels)
        entropy = label_entropy(labels, len(task.labels))
        out = {}
        for entry in self.entries(model):
            features = pooled_features(model, states, entry)  # (N, H)
            rate = transrate(features, labels)
            readers = self.tasks_of(entry)
            value = leep(heads_probs(model, readers, features), labels, len(task.labels)) \
                if readers else None
            out[entry] = {"transrate": rate, "gain": rate / ones - 1 if ones > 0 else 0.0,
                          "leep": value, "leep_gain": None if value is None else value + entropy,
                          "tasks": readers}
        return out, ones

    def _add_entry(self, model, entry: str, start: str | None, before: _Before) -> None:
        model.adapter.add(entry)
        before.added.append(entry)
        if start is not None:
            model.adapter.load_state_of(entry, model.adapter.state_of(start))

    def _train(self, model, task, states, entry, progress, checkpointing) -> dict:
        self.assignment[task.name] = entry
        return super().learn(model, task, states, progress, checkpointing)

    def _reuse(self, model, task, states, entry, progress, checkpointing) -> dict:
        """Learn the task's head (and lexical branch) on `entry` as it is."""
        frozen = model.adapter.parameters_of(entry)
        self._head_only = True
        for p in frozen:  # no gradient flows into the shared entry, nor through its layers
            p.requires_grad_(False)
        try:
            return self._train(model, task, states, entry, progress, checkpointing)
        finally:
            self._head_only = False
            for p in frozen:
                p.requires_grad_(True)

    def _merge(self, model, task, states, labels, target, progress, checkpointing):
        before = self._before
        before.merged = (target, {k: v.clone() for k, v in model.adapter.state_of(target).items()})
        self._add_entry(model, MERGING, None, before)
        stats = self._train(model, task, states, MERGING, progress, checkpointing)
        old_tasks = self.tasks_of(target)
        result = pool_merge.distill_into(model, task, states, labels.to(model.device), target, MERGING,
                                    old_tasks, self.train, progress)
        model.adapter.remove(MERGING)
        before.added.remove(MERGING)
        outcome = {"entry": target, "start": "ones", "merge": {
            "old_tasks": old_tasks, "old_agreement": result.old_agreement,
            "new_train_accuracy": result.new_train_accuracy, "distillation": result.stats,
            "trained_entry": dict(stats)}}
        worst = min(result.old_agreement.values(), default=1.0)
        if worst >= self.merge_agreement:
            self.assignment[task.name] = target
            self.refused.pop(target, None)  # the entry changed: merges may be tried again
            return stats, {**outcome, "decision": "merge"}
        self.refused[target] = self.refused.get(target, 0) + 1
        # Undone: the old entry as it was, and the task learns its head on it afresh.
        model.adapter.load_state_of(target, before.merged[1])
        self._drop_task(model, task.name)
        stats = self._reuse(model, task, states, target, progress, None)
        return stats, {**outcome, "decision": "merge refused: reuse"}

    def begin_task(self, model, task: Task, states) -> None:
        super(IA3Method, self).begin_task(model, task, states)  # the head only: entries are the pool's
        source, shared = label_source(model.heads, task.labels, task.name)
        if source is not None:  # the rows of labels an old head knows start from it
            start_head_from(model.heads, task.name, source, shared)

    def param_groups(self, model, task: Task, train, top_layers=None) -> list[dict]:
        head = {"params": list(model.heads.heads[task.name].parameters()), "lr": train.head_lr}
        if self._head_only:
            return [head]
        return [{"params": model.adapter.parameters_of(self.adapter_key(task.name), top_layers),
                 "lr": train.lr}, head]

    # -- undo and delete -----------------------------------------------------------------------
    def _drop_task(self, model, task: str) -> None:
        if task in model.heads:
            model.heads.remove(task)
        model.lexical.pop(task, None)
        self.assignment.pop(task, None)

    def rollback(self, model, task: str) -> None:
        before = self._before
        if before is None or before.task != task:
            self.delete(model, task)
            return
        self._before = None
        self._drop_task(model, task)
        self.refused = dict(before.refused)
        for entry in before.added:
            if entry in model.adapter.entries():
                model.adapter.remove(entry)
        if before.merged is not None:
            model.adapter.load_state_of(*before.merged)

    def delete(self, model, task: str) -> None:
        """Remove the task's head, branch and place in the pool; its entry goes only with the
        last task that reads it (what the task taught a shared entry stays)."""
        if self._before is not None and self._before.task == task:
            self._before = None
        entry = self.assignment.get(task)
        self._drop_task(model, task)
        self.refused.pop(entry, None)  # fewer heads must agree: merges may be tried again
        if entry is not None and not self.tasks_of(entry) and entry in model.adapter.entries():
            model.adapter.remove(entry)

    # -- footprint and checkpoint --------------------------------------------------------------
    def footprint(self, model, task: str) -> tuple[int, int]:
        return 0, model.heads.num_parameters(task)  # the entries: `shared_numbers`

    def shared_numbers(self, model) -> int:
        return sum(model.adapter.num_parameters(e) for e in self.entries(model))

    def task_tensors(self, model, task: str) -> dict[str, torch.Tensor]:
        head = model.heads.heads[task]
        tensors = {HEAD + "weight": head.weight.detach().cpu(), HEAD + "bias": head.bias.detach().cpu()}
        if task in model.lexical:
            tensors.update(model.lexical[task].tensors())
        return tensors

    def load_task_tensors(self, model, task: str, labels, tensors) -> None:
        if task not in self.assignment:
            raise ValueError(f"task {task!r} has no pool entry in the saved assignment "
                             f"{sorted(self.assignment)}")
        if any(k.startswith(ADAPTER) for k in tensors):
            raise ValueError(f"task {task!r}: scale tensors in a task file of a pool model "
                             "(its entry is saved with the pool)")
        load_head(model, task, labels, tensors)
        branch = LexicalBranch.from_tensors(tensors)
        if branch is not None:
            model.lexical[task] = branch

    def shared_tensors(self, model) -> dict[str, torch.Tensor]:
        return {f"{POOL}{entry}.{layer}": value for entry in self.entries(model)
                for layer, value in model.adapter.state_of(entry).items()}

    def load_shared_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if not key.startswith(POOL) or key.count(".") != 2:
                raise ValueError(f"method 'ia3' with a pool: unexpected shared tensor {key!r}")
            _, entry, layer = key.split(".")
            entries.setdefault(entry, {})[layer] = value
        if len(entries) > self.pool_size:
            raise ValueError(f"{len(entries)} pool entries saved, more than pool_size "
                             f"{self.pool_size}")
        for entry, layers in entries.items():
            model.adapter.load_state_of(entry, layers)

    def shared_json(self, model) -> dict:
        return {"assignment": dict(self.assignment), "refused": dict(self.refused)}

    def load_shared_json(self, model, data: dict) -> None:
        assignment, refused = data.get("assignment"), data.get("refused", {})  # none: saved before
        if (not isinstance(assignment, dict) or not set(data) <= {"assignment", "refused"}
                or not isinstance(refused, dict)
                or not all(isinstance(n, int) and n >= 1 for n in refused.values())):
            raise ValueError(f"pool state must be {{'assignment': {{task: entry}}, 'refused': "
                             f"{{entry: count >= 1}}}}, got {data!r:.200}")
        unknown = sorted(set(assignment.values()) - set(self.entries(model)))
        if unknown:
            raise ValueError(f"tasks assigned to pool entries {unknown} that were not saved; "
                             f"saved: {self.entries(model)}")
        stray = sorted(set(refused) - set(self.entries(model)))
        if stray:
            raise ValueError(f"refused merges counted for pool entries {stray} that were not "
                             f"saved; saved: {self.entries(model)}")
        self.assignment, self.refused = dict(assignment), dict(refused)
