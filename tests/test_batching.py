"""The one batching path (`model.batching`): training micro-batches, inference passes and the
server's dynamic batches are all cut by `length_batches`."""

import torch

from continual_transformer.model.batching import collated, even_parts, length_batches, padded


def test_micro_batches_bound_rows_and_padded_tokens_in_the_order_given():
    lengths = [3, 5, 8, 8, 20, 2]
    rows = [0, 1, 2, 3, 4]

    def split(rows, micro, lengths=None, max_tokens=None):
        return length_batches(lengths, rows=rows, max_rows=micro, max_tokens=max_tokens, sort=False)

    assert split(rows, 5) == [rows]
    assert split(rows, 2) == [[0, 1], [2, 3], [4]]
    # 2 rows of 8 tokens fill 16; a 20-token row passes the budget alone
    assert split(rows, 5, lengths, max_tokens=16) == [[0, 1], [2, 3], [4]]
    assert split([5, 0, 1], 5, lengths, max_tokens=16) == [[5, 0, 1]]  # 3 x 5 = 15
    assert split(rows, 5, lengths, max_tokens=None) == [rows]


def test_length_batches_bound_padding_and_keep_every_row():
    lengths = [5, 120, 7, 60, 6, 128, 64, 8]
    groups = length_batches(lengths, max_tokens=130, max_rows=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [[0, 4, 2], [7, 3], [6], [1], [5]]  # sorted; 3 rows at most; 2 x 60 fits
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= 130 or len(group) == 1
    assert length_batches([300], max_tokens=100, max_rows=64) == [[0]]  # too long: alone
    assert length_batches([], max_tokens=100, max_rows=64) == []


def test_collated_batches_are_length_sorted_and_padded_to_their_longest_row(tiny_config):
    from continual_transformer.model.backbone import Backbone

    backbone = Backbone.load(tiny_config, "cpu")
    texts = ["a much longer text with many more words in it than the others", "short",
             "a text of middling length", "tiny", "another rather long text with quite a few words"]
    ids = backbone.tokenize(texts)
    seen = []
    for rows, batch in collated(backbone, ids, max_rows=2):
        assert len(rows) <= 2
        lengths = [len(ids[i]) for i in rows]
        assert batch["input_ids"].shape == (len(rows), max(lengths))
        assert batch["attention_mask"].sum(1).tolist() == lengths
        for r, i in enumerate(rows):
            assert torch.equal(batch["input_ids"][r, : len(ids[i])], torch.tensor(ids[i]))
        seen += rows
    assert sorted(seen) == list(range(len(texts)))
    assert [len(ids[i]) for i in seen] == sorted(len(row) for row in ids)  # shortest first


def test_even_parts_are_equal_within_the_budgets_and_keep_order():
    rows = list(range(10, 42))  # a training batch of 32 rows
    assert even_parts(rows, 64, max_rows=32, max_tokens=2048) == [rows]  # 32 x 64 fits
    halves = even_parts(rows, 128, max_rows=32, max_tokens=2048)
    assert halves == [rows[:16], rows[16:]]  # two passes of 16, never 16 + 16 + 0 or 25 + 7
    parts = even_parts(rows, 80, max_rows=32, max_tokens=2048)  # 25 rows fit: 2 parts
    assert [len(p) for p in parts] == [16, 16] and sum(parts, []) == rows
    parts = even_parts(rows[:7], 128, max_rows=32, max_tokens=256)  # 2 rows a pass
    assert [len(p) for p in parts] == [2, 2, 2, 1] and sum(parts, []) == rows[:7]
    assert even_parts(rows[:3], 4096, max_rows=32, max_tokens=1024) == [[10], [11], [12]]
    assert [len(p) for p in even_parts(rows, 16, max_rows=10, max_tokens=4096)] == [8, 8, 8, 8]


def test_inference_passes_are_bounded_in_padded_tokens(tiny_config):
    from continual_transformer.model.backbone import Backbone

    backbone = Backbone.load(tiny_config, "cpu")
    backbone.length_multiple = 16
    ids = [[101] + [7] * n + [102] for n in (3, 40, 90, 5, 120, 60, 14, 100)]
    seen = []
    for rows, batch in collated(backbone, ids, max_rows=64, max_tokens=256):
        assert batch["input_ids"].shape[1] % 16 == 0
        assert batch["input_ids"].numel() <= 256 or len(rows) == 1
        assert batch["input_ids"].shape[1] == padded(max(len(ids[i]) for i in rows), 16)
        seen += rows
    assert sorted(seen) == list(range(len(ids)))
