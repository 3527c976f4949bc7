"""Label-skewed shards of one task, one file per client: how federated data usually looks
(each client sees mostly a few labels). No Flower here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..types import Example, Task


def label_skewed(task: Task, clients: int, alpha: float = 0.5, seed: int = 0) -> list[list[Example]]:
    """The task's training examples cut into `clients` shards: each label's examples are shared
    out in proportions drawn from Dirichlet(`alpha`) (small alpha: strong skew). Every shard gets
    at least two labels (a stream's task needs two), taking single examples from the largest
    holder of a label when the draw left it fewer."""
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if len(task.train) < 2 * clients:
        raise ValueError(f"task {task.name!r} has {len(task.train)} training texts, too few for "
                         f"{clients} shards of two labels")
    rng = np.random.default_rng(seed)
    shards: list[list[Example]] = [[] for _ in range(clients)]
    for label in task.labels:
        examples = [e for e in task.train if e.label == label]
        order = rng.permutation(len(examples))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(examples)).astype(int)
        for shard, part in zip(shards, np.split(order, cuts)):
            shard.extend(examples[i] for i in part)
    for shard in shards:
        while len({e.label for e in shard}) < 2:
            have = {e.label for e in shard}
            donor, label = max(((other, lab) for other in shards if other is not shard
                                for lab in task.labels if lab not in have),
                               key=lambda pair: sum(e.label == pair[1] for e in pair[0]))
            moved = next(e for e in donor if e.label == label)
            donor.remove(moved)
            shard.append(moved)
    return shards


def write_shards(task: Task, shards: list[list[Example]], directory: str | Path) -> list[Path]:
    """One JSONL stream file of training rows per shard: `directory/client-<i>.jsonl`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, shard in enumerate(shards):
        path = directory / f"client-{i}.jsonl"
        path.write_text("".join(json.dumps({"task": task.name, "split": "train", "text": e.text,
                                            "label": e.label}) + "\n" for e in shard))
        paths.append(path)
    return paths
