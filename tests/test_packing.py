"""Packed layers: the real tokens of a padded batch computed without the padding."""

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.model.backbone import Backbone, BackboneRef, find_layers
from continual_transformer.model.packing import PackedRows

from conftest import toy_rows, write_jsonl


@pytest.fixture(scope="module")
def learner(tiny_config, tmp_path_factory):
    tasks = load_stream(write_jsonl(tmp_path_factory.mktemp("s") / "toy.jsonl", toy_rows()))
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=2, batch_size=8), device="cpu")
    for task in tasks[:2]:
        learner.learn(task)
    return learner, tasks[:2]


TEXTS = ["a cat", "the big brown dog runs over the hill and far away", "hello there friend", "x"]


def test_packed_rows_round_trip_a_batch():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rows = PackedRows.of(mask)
    assert rows.rows.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    hidden = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    packed = rows.pack(hidden)
    assert packed.shape == (1, 8, 2)
    back = rows.unpack(packed)
    assert torch.equal(back[mask.bool()], hidden[mask.bool()])
    assert not back[~mask.bool()].any()  # the padding comes back zero


def test_packed_layers_compute_what_the_padded_layers_compute(learner):
    backbone = learner[0].backbone
    assert backbone.packing_refused is None
    batch = backbone.collate(backbone.tokenize(TEXTS))
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        hidden, call = backbone.start(**batch)
        padded = backbone.run_layers(hidden, call, 0, backbone.num_layers)
        assert backbone.packed_rows(call) is None
        with backbone.packed():
            assert backbone.packed_rows(call) is not None
            packed = backbone.run_layers(hidden, call, 0, backbone.num_layers)
    assert real.sum() < real.numel()  # the batch has padding to skip
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-5, atol=1e-5)
    assert not packed[~real].any()


def test_a_mixed_task_batch_packed_keeps_each_rows_own_scales(learner):
    model, tasks = learner
    names = [tasks[i % 2].name for i in range(len(TEXTS))]
    padded = torch.stack(model.logits(TEXTS, names, precision="fp32"))
    with model.backbone.packed():
        packed = torch.stack(model.logits(TEXTS, names, precision="fp32"))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    # each row under its own task: the same as the row predicted alone with its task
    alone = torch.stack([model.logits([t], n, precision="fp32")[0] for t, n in zip(TEXTS, names)])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    swapped = torch.stack(model.logits(TEXTS, names[1:] + names[:1], precision="fp32"))
    assert not torch.allclose(swapped[:, :2], packed[:, :2])  # the scales really differ per row


def test_bf16_prediction_packs_and_fp32_does_not(learner):
    model, _ = learner
    backbone = model.backbone
    batch = backbone.collate(backbone.tokenize(TEXTS))
    for precision, packs in (("bf16", True), ("fp32", False)):
        with model.model.inference(precision):
            _, call = backbone.start(**batch)
            assert (backbone.packed_rows(call) is not None) is packs, precision


def test_an_encoder_whose_layers_do_more_than_attention_is_not_packed(tiny_config):
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    torch.manual_seed(0)
    encoder = MPNetModel(MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64))
    tokenizer = AutoTokenizer.from_pretrained(tiny_config.name)
    backbone = Backbone(encoder, tokenizer, BackboneRef("path", "tiny-mpnet", "0" * 64, "mpnet"), tiny_config)
    # MPNet adds a relative position bias to the attention scores: packed, it cannot run
    assert "do not run on packed tokens" in backbone.packing_refused
    ids = torch.tensor([[2, 5, 9, 7, 3], [2, 6, 4, 0, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        hidden, call = backbone.start(ids, mask)
        padded = backbone.run_layers(hidden, call, 0, len(find_layers(encoder)))
        with backbone.packed():
            assert backbone.packed_rows(call) is None
            again = backbone.run_layers(hidden, call, 0, len(find_layers(encoder)))
    assert torch.equal(again, padded)
