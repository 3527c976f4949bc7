"""The trunk/top split: K = all layers is the original method bit for bit, the stored trunk
output trains the same parameters as recomputing it, and checkpoints written before the split
load and predict as they did."""

import json
from pathlib import Path

import pytest
import torch

from continual_transformer import ContinualLearner, load_stream
from continual_transformer.model.backbone import Backbone
from continual_transformer.config import BackboneConfig, TrainConfig
from continual_transformer.model.trunk import TrunkStates

DATA = Path(__file__).parent / "data"


@pytest.fixture
def tasks(toy_stream):
    return load_stream(toy_stream)


def _sha(tensors):
    import hashlib

    from safetensors.torch import save

    return hashlib.sha256(save({k: v.contiguous() for k, v in sorted(tensors.items())})).hexdigest()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_all_layers_reproduce_the_original_method_bit_for_bit(tiny_config, tasks, precision):
    # tests/data/golden_all_layers.json was written by the all-layer ia3 before the split
    # (tests/data/make_fixtures.py): the same tensors, byte for byte, and the same answers.
    golden = json.loads((DATA / "golden_all_layers.json").read_text())[precision]
    torch.manual_seed(0)
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=2, precision=precision),
                               device="cpu")
    assert learner.model.trunk_layers == 0 and learner.model.top_layers == 2
    for task in tasks:
        learner.learn(task)
    assert {t.name: _sha(learner.task_tensors(t.name)) for t in tasks} == golden["tasks"]
    assert _sha(learner.shared_tensors()) == golden["shared"]
    texts = [e.text for t in tasks for e in t.test]
    assert [[p.task, p.label] for p in learner.predict(texts)] == golden["routed"]


def _learn(tiny_config, tasks, **train):
    torch.manual_seed(0)
    learner = ContinualLearner(tiny_config, method="ia3", device="cpu",
                               train=TrainConfig(epochs=2, precision="fp32", **train))
    learner.method.adapt_layers = 1
    return learner


def test_top_k_adapts_only_the_top_layers(tiny_config, tasks):
    from continual_transformer.methods import make_method

    learner = ContinualLearner(tiny_config, method=make_method("ia3", {"adapt_layers": 1}),
                               device="cpu")
    assert (learner.model.trunk_layers, learner.model.top_layers) == (1, 1)
    assert sorted(learner.model.adapter.layers) and all(".layer__1__" in f".{n}" or n.startswith("encoder__layer__1__")
                                                   for n in learner.model.adapter.layers)
    record = learner.learn(tasks[0])
    assert record.adapter_parameters == 32 + 32 + 64  # one layer: key, value, FFN
    assert learner.method.hyperparameters()["adapt_layers"] == 1


@pytest.mark.parametrize("budget_mb", [0.0, 0.02])
def test_stored_trunk_trains_the_same_parameters_as_recomputing_it(tiny_config, tasks, budget_mb):
    from continual_transformer.methods import make_method

    def learn(cache_mb):
        torch.manual_seed(0)
        train = TrainConfig(epochs=2, precision="fp32", trunk_cache_mb=cache_mb)
        learner = ContinualLearner(tiny_config, device="cpu",
                                   method=make_method("ia3", {"adapt_layers": 1, "train": train.to_dict()}))
        record = learner.learn(tasks[0])
        return learner, record

    stored, stored_record = learn(1024.0)
    other, other_record = learn(budget_mb)
    assert stored_record.stats["trunk_cache"]["stored"] == len(tasks[0].train)
    assert other_record.stats["trunk_cache"]["stored"] < len(tasks[0].train)
    for name, value in stored.task_tensors(tasks[0].name).items():
        # Only float rounding differs (the trunk ran in other batches): far below any change
        # training makes (the scales move by ~1e-2).
        torch.testing.assert_close(other.task_tensors(tasks[0].name)[name], value, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_checkpoint_from_before_the_split_loads_and_predicts_as_before(tmp_path):
    # Written by the all-layer ia3 before the split (tests/data/make_fixtures.py), on MiniLM.
    import shutil

    from continual_transformer.io.checkpoint import read_manifest

    expected = json.loads((DATA / "checkpoint_v1_predictions.json").read_text())
    model = shutil.copytree(DATA / "checkpoint_v1", tmp_path / "model")
    assert read_manifest(model)["format_version"] == 1
    learner = ContinualLearner.load(model, device="cpu")
    assert (learner.model.trunk_layers, learner.model.top_layers) == (0, 6)  # every layer, as it was written
    assert learner.method.hyperparameters()["adapt_layers"] == 6
    texts = expected["texts"]
    for task, rows in expected["logits"].items():
        got = torch.stack(learner.logits(texts, task))
        assert torch.equal(got, torch.tensor(rows)), (got - torch.tensor(rows)).abs().max()
    routed = learner.predict(texts)
    assert [[p.task, p.label] for p in routed] == [[t, label] for t, label, _ in expected["routed"]]
    for p, (_, _, probabilities) in zip(routed, expected["routed"]):
        assert p.probabilities == probabilities
    # Saved again, it is a current checkpoint of the same all-layer model.
    learner.save(model)
    assert read_manifest(model)["format_version"] == 2
    again = ContinualLearner.load(model, device="cpu")
    assert torch.equal(torch.stack(again.logits(texts, "kinds")), torch.tensor(expected["logits"]["kinds"]))


def test_trunk_runs_with_the_encoders_own_attention_while_learning(tiny_config, tasks):
    # Learning switches the top layers to plain-matrix attention; the trunk pass is inference
    # and keeps the encoder's own (fused) attention: the same states either way, and no
    # (B, heads, T, T) scores stored in memory while learning.
    from continual_transformer.methods import make_method

    learner = ContinualLearner(tiny_config, device="cpu", method=make_method("ia3", {"adapt_layers": 1}))
    ids = learner.backbone.tokenize([e.text for e in tasks[0].train])
    default = learner.backbone.encoder.config._attn_implementation
    outside = learner.model.trunk_states(ids, cache_mb=1.0)
    seen = []
    original = learner.backbone.run_layers

    def spy(hidden, call, begin, end):
        seen.append(learner.backbone.encoder.config._attn_implementation)
        return original(hidden, call, begin, end)

    learner.backbone.run_layers = spy
    with learner.model.training_kernels():
        inside = learner.model.trunk_states(ids, cache_mb=1.0)
        assert learner.backbone.encoder.config._attn_implementation == "eager"
    assert seen and set(seen) == {default} != {"eager"}
    assert torch.equal(inside.features, outside.features)
    assert torch.equal(inside.batch(list(range(8))).hidden, outside.batch(list(range(8))).hidden)
