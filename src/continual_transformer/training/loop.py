"""The one training loop shared by every gradient method.

A method says which parameters train (as optimizer groups) and what the loss of a batch is;
this loop owns the optimizer, the learning-rate schedule, batching order and progress, and the
three things that keep a long run alive:

- **Checkpointing.** Every `Checkpointing.every` steps the loop hands a `TrainState` to a save
  callback; given that state back, `fit` continues exactly where it stopped. The batch order
  is a pure function of (seed, epoch) and the learning rate a pure function of
  (step, lr_scale), so a step count is a complete position; the state adds the trained
  tensors, the optimizer's moments, the guard's snapshot and the RNG state.
- **The guard.** A step whose loss or gradient is not finite is skipped and counted. After
  `max_bad_steps` such steps in a row the loop goes back to the state it had at the start of
  the epoch, halves the learning rate and goes on; after `max_restores` restores it raises
  `TrainingError` (the learner then rolls the task back; earlier tasks are untouched).
- **Out-of-memory.** When a batch raises `torch.cuda.OutOfMemoryError`, it is split into
  micro-batches whose gradients are accumulated (weighted by their share of the batch), so the
  effective batch and the update stay the same; the smaller size is kept for the rest of the
  task.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from ..config import TrainConfig
from ..model.batching import even_parts, length_batches, padded
from ..model.memory import release_freed_memory
from . import distributed

Progress = Callable[[int, int, float], None]  # (steps done, total steps, last loss)


class TrainingError(RuntimeError):
    """A task that cannot be learned with the given settings (the message says why)."""


@dataclass
class TrainState:
    """Where `fit` stands within a task: enough to continue it exactly after a restart.

    `tensors` (all on the CPU) holds `param/<group>.<index>` (the trained parameters),
    `optim/<index>/<name>` (the optimizer's per-parameter state), the same two under
    `snapshot/` (the epoch-start state the guard restores to) and `rng/cpu` (+ `rng/cuda/<device>`).
    Everything else is plain numbers, saved as JSON by `meta()`.
    """

    step: int = 0  # batches done (taken or skipped); the position in the schedule
    lr_scale: float = 1.0  # halved by each guard restore
    skipped_steps: int = 0  # non-finite steps skipped, in total
    bad_in_row: int = 0  # non-finite steps since the last good one
    restores: int = 0
    micro_batch: int | None = None  # set after an out-of-memory split
    oom_splits: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0  # training time, summed over every process that worked on the task
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def meta(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tensors"}

    @classmethod
    def from_meta(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "TrainState":
        known = {name for name in cls.__dataclass_fields__ if name != "tensors"}
        if set(meta) != known:
            raise ValueError(
                f"train state fields {sorted(meta)} do not match the expected {sorted(known)}"
            )
        return cls(**meta, tensors=tensors)


@dataclass(frozen=True)
class Checkpointing:
    """Save a `TrainState` every `every` steps (0: never), and optionally start from one."""

    every: int
    save: Callable[[TrainState], None]
    resume_from: TrainState | None = None

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0 (0 disables saving), got {self.every!r}")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    skipped_steps: int = 0
    restores: int = 0
    lr_scale: float = 1.0
    oom_splits: int = 0
    micro_batch: int | None = None

    def stats(self) -> dict:
        """The figures a task record keeps (JSON-ready)."""
        return {"steps": self.steps, "first_loss": self.first_loss, "last_loss": self.last_loss,
                "skipped_steps": self.skipped_steps, "restores": self.restores,
                "lr_scale": self.lr_scale, "oom_splits": self.oom_splits,
                "micro_batch": self.micro_batch}


BUCKET_BATCHES = 32  # batches per length bucket
# Steps between hand-backs of freed memory: batches of other lengths leave free blocks in the
# allocator's heap that the next batches cannot reuse (see model/memory.py).
RELEASE_EVERY = 8


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


# -- state in and out of the loop ---------------------------------------------------------------
def _trained_tensors(param_groups: list[dict], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Copies (on the CPU) of the trained parameters and the optimizer's per-parameter state."""
    out = {}
    for g, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            out[f"param/{g}.{i}"] = p.detach().to("cpu", copy=True)
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name!r} is a {type(value).__name__}, not a tensor")
            out[f"optim/{index}/{name}"] = value.detach().to("cpu", copy=True)
    return out


def _restore_trained(
    param_groups: list[dict], optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
    prefix: str = "",
) -> None:
    with torch.no_grad():
        for g, group in enumerate(param_groups):
            for i, p in enumerate(group["params"]):
                key = f"{prefix}param/{g}.{i}"
                if key not in tensors:
                    raise ValueError(f"train state has no tensor {key!r}")
                if tensors[key].shape != p.shape:
                    raise ValueError(
                        f"train state tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
                p.copy_(tensors[key])
    state: dict[int, dict[str, torch.Tensor]] = {}
    start = f"{prefix}optim/"
    for key, value in tensors.items():
        if key.startswith(start):
            index, name = key[len(start):].split("/", 1)
            state.setdefault(int(index), {})[name] = value.clone()
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    """The global torch RNG states (CPU, and each CUDA device once CUDA is in use), as uint8."""
    out = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda/{index}"] = state
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    for key, state in tensors.items():
        if key == "rng/cpu":
            torch.set_rng_state(state)
        elif key.startswith("rng/cuda/") and torch.cuda.is_available():
            index = int(key.rsplit("/", 1)[1])
            if index < torch.cuda.device_count():  # resumed on fewer GPUs: those states go unused
                torch.cuda.set_rng_state(state, index)


# -- one step -------------------------------------------------------------------------------------
def _forward_backward(
    batch_loss: Callable[[list[int]], torch.Tensor], batch_rows: int, chunks: list[list[int]]
) -> float:
    """Loss and gradients of a batch of `batch_rows` rows, computed over its micro-batches
    `chunks` (all of its rows, or this process's share of them in a data-parallel run).

    `batch_loss` is a mean over the batch, so the batch's loss is the micro-batch losses
    weighted by their share of rows; the gradients add up the same way. Returns the batch's
    loss, or NaN as soon as one micro-batch's loss is not finite (nothing more is computed).
    """
    total = 0.0
    for chunk in chunks:
        loss = batch_loss(chunk)
        if not torch.isfinite(loss):
            return math.nan
        weight = len(chunk) / batch_rows  # 1.0 (exact) when the batch is not split
        (loss * weight).backward()
        total += loss.item() * weight
    return total


def _take_step(
    batch_loss: Callable[[list[int]], torch.Tensor], indices: list[int], optimizer, state: TrainState,
    lengths: list[int] | None = None, max_tokens: int | None = None, length_multiple: int = 1,
    batch_rows: int | None = None,
) -> float:
    """Forward and backward of the rows `indices` of a batch of `batch_rows` rows (default:
    they are the batch), in micro-batches of at most `max_tokens` padded tokens when given,
    halving the micro-batch on CUDA out-of-memory."""
    if not indices:  # a data-parallel process whose share of a small batch is empty
        return 0.0
    batch_rows = batch_rows if batch_rows is not None else len(indices)
    while True:
        micro = min(state.micro_batch or len(indices), len(indices))
        try:
            if max_tokens is not None and lengths is not None:
                width = padded(max(lengths[i] for i in indices), length_multiple)
                chunks = even_parts(indices, width, max_rows=micro, max_tokens=max_tokens)
            else:
                chunks = length_batches(lengths, rows=indices, max_rows=micro, sort=False)
            return _forward_backward(batch_loss, batch_rows, chunks)
        except torch.cuda.OutOfMemoryError as exc:
            if micro == 1:
                raise TrainingError(
                    f"out of memory even with micro-batches of one example ({exc}); use a "
                    "smaller max_length or another device"
                ) from exc
            # Retried outside the except block, so the failed attempt's tensors (held by the
            # traceback) are freed first.
            optimizer.zero_grad(set_to_none=True)
            state.micro_batch = (micro + 1) // 2
            state.oom_splits += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- the loop -------------------------------------------------------------------------------------
def fit(
    param_groups: list[dict],
    batch_loss: Callable[[list[int]], torch.Tensor],
    n_examples: int,
    config: TrainConfig,
    seed: int,
    progress: Progress | None = None,
    lengths: list[int] | None = None,
    checkpointing: Checkpointing | None = None,
    max_tokens: int | None = None,
    length_multiple: int = 1,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Minimise `batch_loss(indices)` (a mean over the batch) over `config.epochs` epochs.

    With `lengths` and `max_tokens`, a batch whose padded size (rows x its longest length,
    rounded up to `length_multiple`) would pass `max_tokens` tokens is computed in equal
    micro-batches whose gradients add up to the batch's: the same update, with the memory of a
    pass bounded.

    `param_groups` are AdamW groups (each with its own `lr`); every group's rate follows the
    same warm-up-then-linear-decay factor, times the guard's `lr_scale`. With
    `checkpointing.resume_from`, the parameters, optimizer, position and RNG are restored
    from that state first. `on_step(step, steps_per_epoch)` is called after every step;
    whatever it raises ends the training (a search's pruner stops a trial so).

    In a data-parallel run (`training/distributed.py`) every process makes the same batches,
    computes the gradient of its share of each and the shares' gradients are summed before
    the step: every process takes the step one process would take, up to float rounding.
    """
    params = [p for group in param_groups for p in group["params"]]
    if not params:
        raise ValueError("nothing to train: the method returned no parameters")
    parallel = distributed.current()
    optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    steps_per_epoch = math.ceil(n_examples / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = warmup_linear(total, config.warmup_ratio)

    resume = checkpointing.resume_from if checkpointing else None
    if resume is not None:
        if not 0 <= resume.step <= total:
            raise ValueError(f"train state is at step {resume.step}, outside this task's 0..{total}")
        state = TrainState(**{**resume.meta(), "tensors": {}})
        _restore_trained(param_groups, optimizer, resume.tensors)
        snapshot = {k[len("snapshot/"):]: v for k, v in resume.tensors.items()
                    if k.startswith("snapshot/")}
        if not snapshot:
            raise ValueError("train state has no epoch-start snapshot")
        restore_rng(resume.tensors)
    else:
        state = TrainState()
        snapshot = _trained_tensors(param_groups, optimizer)
    save_every = checkpointing.every if checkpointing else 0
    start = time.perf_counter()
    seconds_before = state.seconds

    def current_state() -> TrainState:
        state.seconds = seconds_before + time.perf_counter() - start
        tensors = {**_trained_tensors(param_groups, optimizer), **rng_tensors(),
                   **{f"snapshot/{k}": v for k, v in snapshot.items()}}
        return TrainState(**{**state.meta(), "tensors": tensors})

    order_epoch, order = -1, []
    while state.step < total:
        epoch, position = divmod(state.step, steps_per_epoch)
        if position == 0:  # parameters are always finite: skipped steps never change them
            snapshot = _trained_tensors(param_groups, optimizer)
        if epoch != order_epoch:
            order_epoch, order = epoch, batch_order(n_examples, config.batch_size, epoch, seed, lengths)
        optimizer.zero_grad(set_to_none=True)
        batch = order[position]
        rows = batch if parallel is None else parallel.rows(batch)  # this process's share
        loss = _take_step(batch_loss, rows, optimizer, state, lengths, max_tokens,
                          length_multiple, batch_rows=len(batch))
        if parallel is not None:  # the batch's loss and gradients: the sum over the processes
            loss = parallel.sum_gradients(params, loss)
        finite = math.isfinite(loss)
        if finite:
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            finite = bool(torch.isfinite(norm))
        if finite:
            factor = schedule(state.step) * state.lr_scale
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            optimizer.step()
            state.bad_in_row = 0
            state.last_loss = loss
            if state.first_loss is None:
                state.first_loss = loss
        else:
            optimizer.zero_grad(set_to_none=True)
            state.skipped_steps += 1
            state.bad_in_row += 1
        state.step += 1
        if state.step % RELEASE_EVERY == 0:
            release_freed_memory()
        if state.bad_in_row >= config.max_bad_steps:
            if state.restores >= config.max_restores:
                raise TrainingError(
                    f"loss or gradients not finite in {state.bad_in_row} steps in a row "
                    f"(step {state.step} of {total}), after {state.restores} restore(s) with the "
                    f"learning rate lowered to {state.lr_scale:g}x; {state.skipped_steps} steps "
                    "skipped in all. Lower the learning rates (lr, head_lr)"
                )
            # Back to the start of this epoch, with half the learning rate.
            _restore_trained(param_groups, optimizer, snapshot)
            state.step = epoch * steps_per_epoch
            state.restores += 1
            state.lr_scale /= 2
            state.bad_in_row = 0
        if progress is not None:
            progress(state.step, total, loss)
        if on_step is not None:
            on_step(state.step, steps_per_epoch)
        if save_every and state.step % save_every == 0 and state.step < total:
            checkpointing.save(current_state())
    state.seconds = seconds_before + time.perf_counter() - start
    return TrainResult(state.step, state.seconds, state.first_loss, state.last_loss,
                       state.skipped_steps, state.restores, state.lr_scale, state.oom_splits,
                       state.micro_batch)
