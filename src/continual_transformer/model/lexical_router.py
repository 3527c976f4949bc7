"""Lexical evidence for the router: a streaming multinomial naive Bayes over token n-grams.

Per task it keeps the summed (sublinear) counts of the task's training texts' hashed token-id
unigrams and bigrams (the columns of `lexical.row_features`, 2^18 of them), stored sparse: the
columns the task's texts used and their sums, plus the total. That is all: nothing is shared
between tasks, so learning a task leaves every other task's statistics as they were, and
deleting a task removes exactly its share. A task keeps its `max_columns` most frequent columns
(4,096 by default: 32 KiB a task); the rest of its counts stay in its total, so those n-grams are
scored as unseen. Measured at 100 overlapping tasks (benchmarks/routing_scale.py's data):
routing 63.48 % with every column (45 KB a task on average, and 500 KB or more for a task of a
thousand long texts), 63.70 % with 4,096, 63.62 % with 2,048, 63.07 % with 1,024. A task's texts
given in several calls are pruned after each.

    log p(x | task) = sum_j x_j log ((c_tj + a) / (N_t + a V))          (V = 2^18, a = `alpha`)

It reads token ids, which every prediction path has (the server predicts from ids).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .lexical import HASH_BITS, row_features

PREFIX = "router.lexical."
BUCKETS = 1 << HASH_BITS
MAX_COLUMNS = 4096


class LexicalRouter:
    """Per-task hashed n-gram counts; `log_likelihoods` scores texts under every task."""

    def __init__(self, *, alpha: float = 0.1, max_columns: int = MAX_COLUMNS):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not (isinstance(max_columns, int) and max_columns >= 1):
            raise ValueError(f"max_columns must be an integer >= 1, got {max_columns!r}")
        self.alpha = alpha
        self.max_columns = max_columns
        # task -> (columns (M,) int32 sorted, sums (M,) float32, total float)
        self.tasks_: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}

    def partial_fit(self, ids_rows: Sequence[Sequence[int]], task: str, skip: frozenset[int]) -> None:
        """Add texts (token ids) of `task`; a task's texts may come in several calls."""
        parts = [row_features(ids, skip) for ids in ids_rows]
        columns = np.concatenate([c for c, _ in parts] or [np.zeros(0, np.int64)])
        values = np.concatenate([v for _, v in parts] or [np.zeros(0)])
        if task in self.tasks_:
            old_columns, old_sums, _ = self.tasks_[task]
            columns = np.concatenate([old_columns.astype(np.int64), columns])
            values = np.concatenate([old_sums.astype(np.float64), values])
        kept, where = np.unique(columns, return_inverse=True)
        sums = np.bincount(where, weights=values, minlength=len(kept)).astype(np.float32)
        total = float(sums.sum(dtype=np.float64))
        if len(kept) > self.max_columns:  # the most frequent; ties: the lower column
            top = np.sort(np.argsort(-sums, kind="stable")[: self.max_columns])
            kept, sums = kept[top], sums[top]
        self.tasks_[task] = (kept.astype(np.int32), sums, total)

    def remove(self, task: str) -> None:
        self.tasks_.pop(task, None)

    @property
    def tasks(self) -> list[str]:
        return list(self.tasks_)

    def log_likelihoods(self, ids_rows: Sequence[Sequence[int]], skip: frozenset[int],
                        tasks: Sequence[str] | None = None, *, mean: bool = False) -> torch.Tensor:
        """(N, T) log p(text | task) for the `tasks` (default: all, in learning order); with
        `mean`, divided by the text's count mass sum_j x_j (at least 1): the mean log-probability
        of its n-grams, on one scale for a tweet and a long document."""
        tasks = list(self.tasks_) if tasks is None else list(tasks)
        parts = [row_features(ids, skip) for ids in ids_rows]
        row = np.repeat(np.arange(len(parts)), [len(c) for c, _ in parts])
        col = np.concatenate([c for c, _ in parts] or [np.zeros(0, np.int64)])
        tf = np.concatenate([v for _, v in parts] or [np.zeros(0)])
        length = np.bincount(row, weights=tf, minlength=len(parts))  # (N,) sum_j x_j
        out = np.empty((len(parts), len(tasks)))
        for t, name in enumerate(tasks):
            columns, sums, total = self.tasks_[name]
            log_unseen = np.log(self.alpha) - np.log(total + self.alpha * BUCKETS)
            # x . log theta = (sum x) log_unseen + sum over seen columns x_j log((c_j + a) / a)
            position = np.minimum(np.searchsorted(columns, col), max(len(columns) - 1, 0))
            hit = (columns[position] == col) if len(columns) else np.zeros(len(col), bool)
            gain = np.zeros(len(col))
            gain[hit] = tf[hit] * np.log1p(sums[position[hit]] / self.alpha)
            out[:, t] = length * log_unseen + np.bincount(row, weights=gain, minlength=len(parts))
        if mean:
            out /= np.maximum(length, 1.0)[:, None]
        return torch.from_numpy(out)

    # -- persistence -------------------------------------------------------------------------
    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        columns, sums, total = self.tasks_[task]
        return {PREFIX + "columns": torch.from_numpy(columns.copy()),
                PREFIX + "sums": torch.from_numpy(sums.copy()),
                PREFIX + "total": torch.tensor([total], dtype=torch.float64)}

    def load_task_tensors(self, task: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Install a task's counts; False when `tensors` hold none (a task saved before the
        router read words)."""
        if PREFIX + "columns" not in tensors:
            return False
        columns, sums = tensors[PREFIX + "columns"], tensors[PREFIX + "sums"]
        if (columns.dtype != torch.int32 or sums.dtype != torch.float32 or columns.shape != sums.shape
                or columns.ndim != 1 or len(columns) > self.max_columns):
            raise ValueError(f"lexical router counts of task {task!r}: columns {columns.dtype} "
                             f"{tuple(columns.shape)}, sums {sums.dtype} {tuple(sums.shape)}; "
                             f"expected int32 and float32 of one shape, at most {self.max_columns} long")
        self.tasks_[task] = (columns.numpy().copy(), sums.numpy().copy(),
                             float(tensors[PREFIX + "total"][0]))
        return True

    def nbytes(self, task: str | None = None) -> int:
        names = self.tasks_ if task is None else [task]
        return sum(self.tasks_[n][0].nbytes + self.tasks_[n][1].nbytes + 8 for n in names)
