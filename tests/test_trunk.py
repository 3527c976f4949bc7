"""The trunk/top split: K = all layers is the original method (to float rounding), the stored trunk
output trains the same parameters as recomputing it, and checkpoints written before the split
load and predict as they did."""

import json
import sys
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


# Float rounding only: a newer transformers or numpy moves the last bits; any change to the
# method moves the scales by ~1e-2 after two epochs. (In one environment they are equal.)
TOLERANCE = {"fp32": dict(rtol=1e-4, atol=1e-6), "bf16": dict(rtol=1e-2, atol=1e-4)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_all_layers_reproduce_the_original_method(tiny_config, tasks, precision):
    # tests/data/golden_all_layers.* were written by the all-layer ia3 before the split
    # (tests/data/make_fixtures.py): the same tensors and the same answers.
    from safetensors.torch import load_file

    sys.path.insert(0, str(DATA))
    from make_fixtures import sample

    golden = load_file(DATA / "golden_all_layers.safetensors")
    routed = json.loads((DATA / "golden_all_layers.json").read_text())[precision]["routed"]
    torch.manual_seed(0)
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=2, precision=precision),
                               device="cpu")
    assert learner.model.trunk_layers == 0 and learner.model.top_layers == 2
    # The golden router was written before it held calibration rows out of its statistics
    # and before it read words: with none held out and no words it must be that router.
    learner.router.hold_out = False
    learner.router.reads_words = False
    for task in tasks:
        learner.learn(task)
    learner.precision = "fp32"  # the golden answers were predicted in float32
    got = {}
    for owner, named in [(t.name, learner.task_tensors(t.name)) for t in tasks] + [
            ("shared", learner.shared_tensors())]:
        # The golden files predate the router's fingerprint of a task's features (32 bytes).
        got.update({f"{precision}/{owner}/{k}": sample(k, v) for k, v in named.items()
                    if k != "router.fingerprint"})
    expected = {k: v for k, v in golden.items() if k.startswith(f"{precision}/")}
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, **TOLERANCE[precision], msg=name)
    texts = [e.text for t in tasks for e in t.test]
    assert [[p.task, p.label] for p in learner.predict(texts)] == routed


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
    learner = ContinualLearner.load(model, device="cpu", precision="fp32")  # as the golden
    assert (learner.model.trunk_layers, learner.model.top_layers) == (0, 6)  # every layer, as it was written
    assert learner.method.hyperparameters()["adapt_layers"] == 6
    texts = expected["texts"]
    for task, rows in expected["logits"].items():
        got = torch.stack(learner.logits(texts, task))
        torch.testing.assert_close(got, torch.tensor(rows), **TOLERANCE["fp32"])
    routed = learner.predict(texts)
    assert [[p.task, p.label] for p in routed] == [[t, label] for t, label, _ in expected["routed"]]
    for p, (_, _, probabilities) in zip(routed, expected["routed"]):
        assert p.probabilities == pytest.approx(probabilities, rel=1e-4, abs=1e-6)
    # Saved again, it is a current checkpoint of the same all-layer model.
    learner.save(model)
    assert read_manifest(model)["format_version"] == 2
    again = ContinualLearner.load(model, device="cpu", precision="fp32")
    torch.testing.assert_close(torch.stack(again.logits(texts, "kinds")),
                               torch.stack(learner.logits(texts, "kinds")), rtol=0, atol=0)


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
