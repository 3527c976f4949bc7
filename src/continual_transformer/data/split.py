"""A test split drawn from a task's examples, for files without a split column.

Stratified: every label gives the same share of its examples to the test split (up to rounding),
and every label keeps at least one train example, so no test label is unseen in training.
Reproducible: the same seed draws the same examples, on any machine and in any process.
"""

from __future__ import annotations

import math
import random

from ..types import StreamError, Task


def hold_out_test(task: Task, fraction: float, seed: int, source: str) -> Task:
    """`task` with `fraction` of its train examples moved to its test split (both kept in file
    order). `source` names the file in the message when the task is too small to split."""
    if not 0 < fraction < 1:
        raise ValueError(f"test fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    if len(task.train) - len(task.labels) < 1:  # each label keeps one train example
        raise StreamError(f"{source}: task {task.name!r} has {len(task.train)} examples for "
                          f"{len(task.labels)} labels: too few to hold out a test split")
    test_positions = held_out_positions(task, fraction, seed)
    train = tuple(e for i, e in enumerate(task.train) if i not in test_positions)
    test = tuple(e for i, e in enumerate(task.train) if i in test_positions)
    return Task(task.name, task.labels, train, test)


def held_out_positions(task: Task, fraction: float, seed: int) -> set[int]:
    """Positions of about `fraction` of `task.train`, stratified by label and seeded, each
    label keeping at least one example (a validation split); empty when none can be spared."""
    positions: dict[str, list[int]] = {label: [] for label in task.labels}
    for i, example in enumerate(task.train):
        positions[example.label].append(i)
    capacity = len(task.train) - len(task.labels)
    if capacity < 1:
        return set()
    target = min(max(1, round(fraction * len(task.train))), capacity)
    taken = _allocate({label: len(p) for label, p in positions.items()}, fraction, target)
    drawn: set[int] = set()
    for label in task.labels:
        # One generator per label: a label's draw does not depend on the others' sizes.
        rng = random.Random(f"{seed}:{task.name}:{label}")
        drawn.update(rng.sample(positions[label], taken[label]))
    return drawn


def _allocate(counts: dict[str, int], fraction: float, target: int) -> dict[str, int]:
    """Test examples per label, `target` in all: each label's share `fraction * count` rounded
    by largest remainder (ties: label order), at most `count - 1`."""
    quota = {label: fraction * n for label, n in counts.items()}
    taken = {label: min(math.floor(q), counts[label] - 1) for label, q in quota.items()}
    by_remainder = sorted(counts, key=lambda label: -(quota[label] - math.floor(quota[label])))
    while sum(taken.values()) < target:
        grew = False
        for label in by_remainder:
            if sum(taken.values()) < target and taken[label] < counts[label] - 1:
                taken[label] += 1
                grew = True
        if not grew:  # every label is at its cap; cannot happen while target <= capacity
            break
    return taken
