"""The one training loop shared by every gradient method.

A method says which parameters train (as optimizer groups) and what the loss of a batch is;
this loop owns the optimizer, the learning-rate schedule, batching order and progress.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .config import TrainConfig

Progress = Callable[[int, int, float], None]  # (steps done, total steps, last loss)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float


BUCKET_BATCHES = 32  # batches per length bucket


def batch_order(
    n: int, batch_size: int, epoch: int, seed: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """Shuffled index batches for one epoch; depends only on (seed, epoch).

    With `lengths`, examples are shuffled, cut into buckets of `BUCKET_BATCHES` batches, sorted
    by length within each bucket and batched, and the batches shuffled: batches hold texts of
    similar length, so little compute goes to padding, while the order stays random.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=generator).tolist()
    if lengths is None:
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, n, bucket):
        chunk = sorted(perm[start : start + bucket], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def warmup_linear(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, math.ceil(total * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def fit(
    param_groups: list[dict],
    batch_loss: Callable[[list[int]], torch.Tensor],
    n_examples: int,
    config: TrainConfig,
    seed: int,
    progress: Progress | None = None,
    lengths: list[int] | None = None,
) -> TrainResult:
    """Minimise `batch_loss(indices)` over `config.epochs` epochs of shuffled batches.

    `param_groups` are AdamW groups (each with its own `lr`); the schedule scales every group's
    rate by the same warm-up-then-linear-decay factor.
    """
    params = [p for group in param_groups for p in group["params"]]
    if not params:
        raise ValueError("nothing to train: the method returned no parameters")
    optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(n_examples / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total, config.warmup_ratio))
    start = time.perf_counter()
    first = last = float("nan")
    step = 0
    for epoch in range(config.epochs):
        for indices in batch_order(n_examples, config.batch_size, epoch, seed, lengths):
            loss = batch_loss(indices)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            last = loss.item()
            if step == 0:
                first = last
            step += 1
            if progress is not None:
                progress(step, total, last)
    return TrainResult(step, time.perf_counter() - start, first, last)
