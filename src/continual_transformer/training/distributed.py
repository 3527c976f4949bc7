"""Data-parallel learning of one task across processes, with torch.distributed.

    torchrun --nproc-per-node 2 -m continual_transformer run stream.jsonl

`torchrun` starts W processes and describes each in its environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `process_group` joins them (gloo on the CPU, NCCL on
CUDA, one GPU per process by LOCAL_RANK). Every process reads the same stream and holds the
same model. Within a task:

- **Trunk passes.** The task's texts are cut into the batches one process would make; process
  r runs the trunk on batches r, r + W, r + 2W, ... and `combine` puts the pieces together,
  so every process holds every text's stored trunk output and router features, bit for bit
  what one process computes (each byte is written by exactly one process, so summing them is
  exact). The router, and `analytic`'s statistics, are then fitted on the same numbers, in the
  same order, as in one process.
- **Steps.** Every process makes the global batch one process would train on (`batch_order`
  of the seed and epoch) and takes its share (`rows`): with b rows and W processes, process r
  takes rows [r*b // W, (r+1)*b // W) (contiguous shares whose sizes differ by at most one; when
  b < W some processes get none and add zero). Each weighs its loss by its rows' share of the
  batch (n_r / b), so `sum_gradients` (an all-reduce sum) gives the gradient of the global
  batch's mean loss, which one process computes; every process then takes the identical
  optimizer step. Only the order of float additions differs from one process.
- **Files.** Only rank 0 writes (checkpoints, training states, the report) and shows progress;
  see `experiment/run.py`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from ..model.backbone import pick_device

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
COMBINE_BYTES = 64 * 2**20  # bytes per collective when combining stored trunk outputs
# How long a process waits for the others in a collective: while rank 0 evaluates and saves a
# task, the others wait at the start of the next one (NCCL's own default is 10 minutes).
WAIT = timedelta(minutes=60)


@dataclass(frozen=True)
class Launch:
    """One process of a `torchrun` launch, as its environment describes it."""

    rank: int
    world_size: int
    local_rank: int


def launched(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch `torchrun` described in the environment; None for a plain process."""
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return None
    if len(present) != len(LAUNCH_VARIABLES):
        missing = [name for name in LAUNCH_VARIABLES if name not in environ]
        raise ValueError(f"{present} set but {missing} not: start data-parallel runs with torchrun")
    values = {}
    for name in LAUNCH_VARIABLES:
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ValueError(f"{name}={environ[name]!r} is not a whole number") from None
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ValueError(f"RANK={launch.rank}, WORLD_SIZE={launch.world_size}, "
                         f"LOCAL_RANK={launch.local_rank}: expected 0 <= RANK < WORLD_SIZE")
    return launch


@contextmanager
def process_group(device: str | None) -> Iterator["DataParallel | None"]:
    """Join the processes of a `torchrun` launch for the duration of the block (None, and
    nothing done, in a plain process). On CUDA each process takes the GPU of its LOCAL_RANK,
    which "cuda" then means; `device` naming one GPU is refused for more than one process."""
    launch = launched()
    if launch is None:
        yield None
        return
    chosen = pick_device(device)
    if chosen.type == "cuda":
        if chosen.index is not None and launch.world_size > 1:
            raise ValueError(f"device {device!r} names one GPU, but with torchrun each process "
                             "uses the GPU of its LOCAL_RANK: use --device cuda or auto")
        torch.cuda.set_device(launch.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=WAIT)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def current() -> "DataParallel | None":
    """The processes learning together, when this process is one of them; None otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or a plain process)."""
    parallel = current()
    return parallel is None or parallel.rank == 0


@dataclass(frozen=True)
class DataParallel:
    """This process's place among W processes that learn one task together."""

    rank: int
    world_size: int
    device: torch.device  # where collectives run (CPU for gloo, this process's GPU for NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: Sequence[int]) -> list[int]:
        """This process's share of a global batch: a contiguous run of its rows."""
        b, w = len(batch), self.world_size
        return list(batch[self.rank * b // w : (self.rank + 1) * b // w])

    def owns(self, pass_index: int) -> bool:
        """Whether this process runs the `pass_index`-th of a list of inference passes."""
        return pass_index % self.world_size == self.rank

    def combine(self, tensor: torch.Tensor) -> None:
        """Fill in, on every process, the parts of `tensor` the other processes computed.

        Each process holds its own parts and zeros elsewhere; the bytes are summed (as uint8),
        so each number arrives exactly as the process that computed it wrote it."""
        if not tensor.is_contiguous():
            raise ValueError("combine needs a contiguous tensor")
        flat = tensor.reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), COMBINE_BYTES):
            part = flat[start : start + COMBINE_BYTES]
            if part.device == self.device:
                dist.all_reduce(part)
            else:
                moved = part.to(self.device)
                dist.all_reduce(moved)
                part.copy_(moved)

    def sum_gradients(self, params: Sequence[torch.Tensor], loss: float) -> float:
        """Sum the gradients of `params` and the (weighted) `loss` over the processes; returns
        the summed loss, NaN on every process if it was not finite on one.

        One collective: [loss, one flag per parameter (1: it has a gradient here), the
        gradients]. A parameter no process has a gradient for keeps None, as in one process
        (AdamW then leaves it alone)."""
        if not params:
            raise ValueError("nothing to sum: no parameters")
        home = params[0].device
        grads = [p.grad for p in params]
        # float64: the sum of two float32 numbers rounds to the float32 sum exactly, and the
        # loss keeps the precision it has in one process.
        pieces = [torch.tensor([loss] + [0.0 if g is None else 1.0 for g in grads],
                               dtype=torch.float64, device=home)]
        pieces += [torch.zeros(p.numel(), dtype=torch.float64, device=home) if g is None
                   else g.detach().reshape(-1).double() for p, g in zip(params, grads)]
        buffer = torch.cat(pieces).to(self.device)
        dist.all_reduce(buffer)
        summed = buffer.to(home)
        have = summed[1 : 1 + len(params)].tolist()
        offset = 1 + len(params)
        for p, flag in zip(params, have):
            n = p.numel()
            p.grad = summed[offset : offset + n].view_as(p).to(p.dtype) if flag else None
            offset += n
        return float(summed[0])

    def barrier(self) -> None:
        dist.barrier()
