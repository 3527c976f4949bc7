"""End-to-end on the real MiniLM-L6 backbone and a slice of the bundled default stream."""

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, default_stream_path, load_stream
from continual_transformer.config import DEFAULT_ADAPT_LAYERS
from continual_transformer.types import Task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slice_tasks():
    tasks = load_stream(default_stream_path())[:2]  # wordnet_supersense, bible_genre
    return [Task(t.name, t.labels, t.subsample_train(240, seed=0).train, t.test[:120]) for t in tasks]


@pytest.fixture(scope="module")
def learned(slice_tasks):
    learner = ContinualLearner(train=TrainConfig(epochs=3), device="cpu")
    first, second = slice_tasks
    learner.learn(first)
    texts = [e.text for e in first.test]
    logits_before = torch.stack(learner.logits(texts, first.name))
    accuracy_before = learner.evaluate(first)
    learner.learn(second)
    return learner, logits_before, accuracy_before


def test_learning_happens_far_above_chance(learned, slice_tasks):
    learner, _, accuracy_first = learned
    wordnet, bible = slice_tasks
    assert accuracy_first > 0.75  # 5 labels: chance 0.20
    assert learner.evaluate(bible) > 0.40  # 6 labels: chance 0.17


def test_first_task_logits_bit_identical_after_second_task(learned, slice_tasks):
    learner, logits_before, accuracy_before = learned
    first = slice_tasks[0]
    after = torch.stack(learner.logits([e.text for e in first.test], first.name))
    assert torch.equal(after, logits_before)
    assert learner.evaluate(first) == accuracy_before


def test_mixed_batch_equals_per_task(learned, slice_tasks):
    learner, _, _ = learned
    a, b = slice_tasks
    texts = [e.text for e in a.test[:10]] + [e.text for e in b.test[:10]]
    names = [a.name] * 10 + [b.name] * 10
    mixed = learner.logits(texts, names)
    separate = learner.logits(texts[:10], a.name) + learner.logits(texts[10:], b.name)
    for x, y in zip(mixed, separate):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)
    assert [p.label for p in learner.predict(texts, names)] == [
        p.label for p in learner.predict(texts[:10], a.name) + learner.predict(texts[10:], b.name)]


def test_checkpoint_round_trip_with_real_backbone(learned, slice_tasks, tmp_path):
    learner, _, _ = learned
    learner.save(tmp_path / "model")
    loaded = ContinualLearner.load(tmp_path / "model", device="cpu")
    assert loaded.backbone.ref == learner.backbone.ref
    assert loaded.backbone.ref.source == "package"
    for task in slice_tasks:
        texts = [e.text for e in task.test[:30]]
        assert torch.equal(torch.stack(loaded.logits(texts, task.name)),
                           torch.stack(learner.logits(texts, task.name)))


def test_footprint_within_a_tenth_of_a_percent(learned):
    learner, _, _ = learned
    for name in learner.tasks:
        footprint = learner.footprint(name)
        # keys, values and FFN activations of the top layers only
        assert learner.model.top_layers == DEFAULT_ADAPT_LAYERS < 6
        assert footprint["adapter_parameters"] == DEFAULT_ADAPT_LAYERS * (384 + 384 + 1536)
        assert footprint["adapter_percent_of_backbone"] < 0.1


def test_router_sends_inputs_to_their_task(learned, slice_tasks):
    learner, _, _ = learned
    for task in slice_tasks:
        free, routed = learner.evaluate_task_free(task)
        assert sum(r == task.name for r in routed) / len(routed) >= 0.9
        assert free >= learner.evaluate(task) - 0.1


def test_analytic_learns_in_one_pass(slice_tasks):
    learner = ContinualLearner(method="analytic", device="cpu")
    for task in slice_tasks:
        learner.learn(task)
    wordnet, bible = slice_tasks
    assert learner.evaluate(wordnet) > 0.75
    assert learner.evaluate(bible) > 0.40
    free, _ = learner.evaluate_task_free(wordnet)
    assert free > 0.6
