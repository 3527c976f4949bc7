import pytest
import torch

from continual_transformer.model.scaling import IA3
from continual_transformer.model.backbone import Backbone


@pytest.fixture
def backbone(tiny_config):
    return Backbone.load(tiny_config, device="cpu")


def _pooled(backbone, texts):
    return backbone(**backbone.collate(backbone.tokenize(texts)))


def test_wraps_keys_values_and_ffn_of_every_layer(backbone):
    adapter = IA3(backbone.encoder, "bert")
    names = sorted(adapter.layers)
    assert len(names) == 3 * 2  # 2 layers x (key, value, FFN)
    assert sum(n.endswith("self__key") for n in names) == 2
    assert sum(n.endswith("output__dense") and "attention" not in n for n in names) == 2
    adapter.add("a")
    # key/value scale their outputs (hidden 32), the FFN its input (intermediate 64)
    assert adapter.num_parameters("a") == 2 * (32 + 32 + 64)


def test_fresh_entry_equals_plain_backbone(backbone):
    texts = ["a short text", "another one that is longer than the first"]
    with torch.no_grad():
        plain = _pooled(backbone, texts)
        adapter = IA3(backbone.encoder, "bert")
        adapter.add("a")
        with adapter.select(["a", "a"]):
            scaled = _pooled(backbone, texts)
    assert torch.equal(plain, scaled)


def test_mixed_batch_uses_each_rows_entry(backbone):
    adapter = IA3(backbone.encoder, "bert")
    adapter.add("a")
    adapter.add("b")
    with torch.no_grad():
        for p in adapter.parameters_of("b"):
            p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    texts = ["first text here", "second text here"]
    with torch.no_grad():
        with adapter.select(["a", "b"]):
            mixed = _pooled(backbone, texts)
        with adapter.select(["a", "a"]):
            only_a = _pooled(backbone, texts)
        with adapter.select(["b", "b"]):
            only_b = _pooled(backbone, texts)
    torch.testing.assert_close(mixed[0], only_a[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], only_b[1], rtol=0, atol=1e-6)
    assert not torch.allclose(only_a[1], only_b[1])


def test_unknown_and_duplicate_entries(backbone):
    adapter = IA3(backbone.encoder, "bert")
    adapter.add("a")
    with pytest.raises(ValueError, match="adapter entry 'a' already exists"):
        adapter.add("a")
    with pytest.raises(KeyError, match="unknown adapter entry 'zz'; known: \\['a'\\]"):
        with adapter.select(["zz"]):
            pass
    adapter.remove("a")
    assert adapter.entries() == []


def test_unknown_architecture(backbone):
    with pytest.raises(ValueError, match="does not know architecture 'gpt2'"):
        IA3(backbone.encoder, "gpt2")


def test_backbone_is_frozen_and_stays_in_eval(backbone):
    assert all(not p.requires_grad for p in backbone.encoder.parameters())
    backbone.train()
    assert not backbone.encoder.training
