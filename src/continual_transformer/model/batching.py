"""The one batching path: token ids -> length-bucketed rows -> padded batches.

Every forward pass over many texts (training passes, prediction, evaluation, the trunk cache,
the router, the baselines' extra passes, the server's dynamic batches) is cut here:

    ids = backbone.tokenize(texts)                     # once per request, once per task
    for rows, batch in collated(backbone, ids):        # rows: indices into ids
        ...                                            # batch: input_ids, attention_mask (B, T)

Rows are sorted by length so that a batch pads little: on a CPU, padding a 20-token text to a
128-token batch-mate costs more than another pass (on the default stream's mixed texts,
length-bucketing made batches of 32 and 64 texts about 2x faster).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    import torch

    from .backbone import Backbone

BATCH_ROWS = 64  # rows per inference pass
# Padded tokens per inference pass: a pass's activations are then the same size whatever the
# texts' length, so long texts do not raise the process's memory (64 rows of 128 tokens would
# make 4x larger blocks than 64 rows of 32).
BATCH_TOKENS = 2048


def length_batches(
    lengths: Sequence[int] | None,
    *,
    rows: Sequence[int] | None = None,
    max_rows: int = BATCH_ROWS,
    max_tokens: int | None = None,
    sort: bool = True,
) -> list[list[int]]:
    """Row indices cut into batches that pad little.

    `rows` are the indices to batch (all of `lengths` by default), shortest first unless
    `sort` is False (then in the order given). A batch closes at `max_rows` rows, or before
    its padded size (rows x its longest row) would pass `max_tokens`; a row longer than
    `max_tokens` is a batch of its own. Without `lengths` only `max_rows` applies.
    """
    if rows is None:
        if lengths is None:
            raise ValueError("length_batches needs `lengths` or `rows`")
        rows = range(len(lengths))
    if sort and lengths is not None:
        rows = sorted(rows, key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in rows:
        width = max(longest, lengths[i]) if lengths is not None else 0
        if current and (len(current) == max_rows or (
                max_tokens is not None and width * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current, width = [], lengths[i] if lengths is not None else 0
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def even_parts(rows: Sequence[int], width: int, *, max_rows: int, max_tokens: int) -> list[list[int]]:
    """`rows` (consecutive, in order) cut into the fewest parts of near-equal size whose padded
    size (rows x `width`) stays within `max_tokens` and whose row count within `max_rows`.

    Equal parts keep the set of pass shapes small (a batch of 32 rows of 128 tokens is two
    passes of 16, never 25 + 7): the CPU kernels are built per shape (see memory.py).
    """
    per_part = max(1, min(max_rows, max_tokens // max(width, 1)))
    n = -(-len(rows) // per_part)
    size, extra = divmod(len(rows), n)
    parts, start = [], 0
    for k in range(n):
        end = start + size + (k < extra)
        parts.append(list(rows[start:end]))
        start = end
    return parts


def padded(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (the backbone pads batches so)."""
    return -(-length // multiple) * multiple


def collated(
    backbone: "Backbone",
    ids: Sequence[Sequence[int]],
    *,
    max_rows: int = BATCH_ROWS,
    max_tokens: int | None = BATCH_TOKENS,
    sort: bool = True,
) -> Iterator[tuple[list[int], dict[str, "torch.Tensor"]]]:
    """(rows, batch) for tokenised texts: `length_batches` of them, each padded by the
    backbone's `collate` (input_ids and attention_mask, (B, T), on the backbone's device)."""
    multiple = backbone.length_multiple  # sizes as padded: equal passes have equal shapes
    for rows in length_batches([padded(len(row), multiple) for row in ids], max_rows=max_rows,
                               max_tokens=max_tokens, sort=sort):
        yield rows, backbone.collate([ids[i] for i in rows])
