import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.types import Example, Task


@pytest.fixture
def tasks(toy_stream):
    return load_stream(toy_stream)


def make(tiny_config, **train):
    return ContinualLearner(tiny_config, train=TrainConfig(epochs=2, batch_size=8, **train), device="cpu")


def test_learning_a_task_leaves_backbone_and_other_tasks_bit_identical(tiny_config, tasks):
    learner = make(tiny_config)
    backbone_before = {k: v.clone() for k, v in learner.backbone.encoder.state_dict().items()
                       if "scales" not in k}
    learner.learn(tasks[0])
    texts = [e.text for e in tasks[0].test]
    logits_before = torch.stack(learner.logits(texts, tasks[0].name))
    scales_before = [p.clone() for p in learner.model.adapter.parameters_of(tasks[0].name)]

    learner.learn(tasks[1])

    logits_after = torch.stack(learner.logits(texts, tasks[0].name))
    assert torch.equal(logits_before, logits_after)
    for old, new in zip(scales_before, learner.model.adapter.parameters_of(tasks[0].name)):
        assert torch.equal(old, new)
    for key, value in learner.backbone.encoder.state_dict().items():
        if "scales" not in key:
            assert torch.equal(value, backbone_before[key]), key


def test_training_moves_only_the_new_tasks_parameters(tiny_config, tasks):
    learner = make(tiny_config)
    learner.learn(tasks[0])
    moved = [p for p in learner.model.adapter.parameters_of(tasks[0].name) if not torch.all(p == 1)]
    assert moved, "scale vectors never left their initial value"
    record = learner.tasks[tasks[0].name]
    assert record.adapter_parameters == 2 * (32 + 32 + 64)
    assert record.head_parameters == 32 * 2 + 2
    assert record.stats["steps"] == 2 * 3  # 24 examples / batch 8, 2 epochs


def test_mixed_task_batch_matches_per_task_predictions(tiny_config, tasks):
    learner = make(tiny_config)
    for task in tasks:
        learner.learn(task)
    texts = [e.text for e in tasks[0].test[:4]] + [e.text for e in tasks[1].test[:4]]
    names = [tasks[0].name] * 4 + [tasks[1].name] * 4
    mixed = learner.logits(texts, names)
    separate = learner.logits(texts[:4], tasks[0].name) + learner.logits(texts[4:], tasks[1].name)
    for a, b in zip(mixed, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    predictions = learner.predict(texts, names)
    assert [p.task for p in predictions] == names
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in predictions)


def test_same_seed_same_numbers(tiny_config, tasks):
    runs = []
    for _ in range(2):
        learner = make(tiny_config)
        learner.learn(tasks[0])
        runs.append(torch.stack(learner.logits([e.text for e in tasks[0].test], tasks[0].name)))
    assert torch.equal(runs[0], runs[1])


def test_failed_task_leaves_earlier_tasks_intact(tiny_config, tasks):
    learner = make(tiny_config)
    learner.learn(tasks[0])
    texts = [e.text for e in tasks[0].test]
    before = torch.stack(learner.logits(texts, tasks[0].name))

    def crash(done, total, loss):
        if done == 2:
            raise RuntimeError("killed mid-task")

    with pytest.raises(RuntimeError, match="killed mid-task"):
        learner.learn(tasks[1], progress=crash)
    assert list(learner.tasks) == [tasks[0].name]
    assert learner.model.adapter.entries() == [tasks[0].name]
    assert tasks[1].name not in learner.model.heads
    assert torch.equal(before, torch.stack(learner.logits(texts, tasks[0].name)))
    learner.learn(tasks[1])  # and the task can be learned afterwards
    assert list(learner.tasks) == [t.name for t in tasks]


def test_errors_name_the_problem(tiny_config, tasks):
    learner = make(tiny_config)
    learner.learn(tasks[0])
    with pytest.raises(ValueError, match="task 'kinds' is already learned; delete it first"):
        learner.learn(tasks[0])
    with pytest.raises(KeyError, match="unknown task 'nope'; known: \\['kinds'\\]"):
        learner.predict(["x"], task="nope")
    with pytest.raises(ValueError, match="2 texts but 1 task names"):
        learner.predict(["x", "y"], task=["kinds"])
    bad = Task("odd", ("a", "b"), (Example("t", "c"),), (Example("t", "a"),))
    with pytest.raises(ValueError, match="train example 0 has label 'c' outside \\['a', 'b'\\]"):
        learner.learn(bad)


def test_delete_removes_the_task_only(tiny_config, tasks):
    learner = make(tiny_config)
    for task in tasks:
        learner.learn(task)
    texts = [e.text for e in tasks[1].test]
    kept = torch.stack(learner.logits(texts, tasks[1].name))
    learner.delete(tasks[0].name)
    assert list(learner.tasks) == [tasks[1].name]
    assert learner.model.adapter.entries() == [tasks[1].name]
    assert torch.equal(kept, torch.stack(learner.logits(texts, tasks[1].name)))


def test_footprint_reports_share_of_backbone(tiny_config, tasks):
    learner = make(tiny_config)
    learner.learn(tasks[0])
    fp = learner.footprint(tasks[0].name)
    assert fp["bytes_added"] == 4 * (fp["adapter_parameters"] + fp["head_parameters"]) + fp["router_bytes"]
    assert fp["router_numbers"] == 2048 + 1  # one class mean and count in the router
    sample = learner.router.samples_[tasks[0].name]  # and its calibration sample, float32
    ids = learner.router.sample_ids_[tasks[0].name]  # and its words: counts, the sample's ids
    words = learner.router.lexical.nbytes(tasks[0].name) + 4 * (sum(map(len, ids)) + len(ids))
    assert words > 0
    fingerprint = 32  # SHA-256 of its features, for exact deletion
    assert fp["router_bytes"] == 8 * fp["router_numbers"] + 4 * sample.numel() + words + fingerprint
    assert fp["adapter_percent_of_backbone"] == pytest.approx(
        100 * fp["adapter_parameters"] / learner.backbone_parameters)


def test_bf16_training_learns_and_predicts_in_float32(tiny_config, tasks):
    learner = make(tiny_config, precision="bf16")
    learner.learn(tasks[0])
    logits = learner.logits([e.text for e in tasks[0].test], tasks[0].name)
    assert logits[0].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in learner.model.adapter.parameters_of(tasks[0].name))
    assert any(not torch.all(p == 1) for p in learner.model.adapter.parameters_of(tasks[0].name))
    with pytest.raises(ValueError, match="precision must be one of \\['auto', 'fp32', 'bf16'\\], got 'fp8'"):
        TrainConfig(precision="fp8")


def test_task_learned_on_a_separate_learner_imports_exactly(tiny_config, tasks):
    """The server's learn-while-serving path: train on a copy, import the finished task."""
    live = make(tiny_config)
    live.learn(tasks[0])
    texts = [e.text for e in tasks[0].test]
    old_logits = torch.stack(live.logits(texts, tasks[0].name))

    side = make(tiny_config)  # its own backbone copy and adapter entries
    side.learn(tasks[1])
    record, tensors = side.task_state(tasks[1].name)
    live.import_task(record, tensors, side.shared_tensors())

    assert list(live.tasks) == [tasks[0].name, tasks[1].name]
    assert torch.equal(old_logits, torch.stack(live.logits(texts, tasks[0].name)))
    new_texts = [e.text for e in tasks[1].test]
    assert torch.equal(torch.stack(side.logits(new_texts, tasks[1].name)),
                       torch.stack(live.logits(new_texts, tasks[1].name)))
    # the same task trained in place gives the same numbers: nothing depends on the other tasks
    in_place = make(tiny_config)
    in_place.learn(tasks[0])
    in_place.learn(tasks[1])
    assert torch.equal(torch.stack(in_place.logits(new_texts, tasks[1].name)),
                       torch.stack(live.logits(new_texts, tasks[1].name)))
    # the router's statistics merge exactly too: task-free predictions are the same
    assert torch.equal(in_place.router.classifier.gram_, live.router.classifier.gram_)
    assert in_place.predict(texts + new_texts) == live.predict(texts + new_texts)

    with pytest.raises(ValueError, match="task 'topics' is already learned; delete it first"):
        live.import_task(record, tensors)


def test_take_out_leaves_the_learner_as_built_for_the_next_task(tiny_config, tasks):
    """A worker learns task after task on one learner: each as a fresh learner learns it."""
    worker = make(tiny_config)
    worker.learn(tasks[0])
    first = worker.take_out(tasks[0].name)
    assert not worker.tasks and worker.model.adapter.entries() == []
    assert worker.router.classifier.n_examples == 0 and not worker.router.classifier.gram_upper_.any()
    worker.learn(tasks[1])
    second = worker.take_out(tasks[1].name)
    for task, (record, tensors, increment) in zip(tasks, (first, second)):
        fresh = make(tiny_config)
        fresh.learn(task)
        assert record.name == task.name
        assert tensors.keys() == fresh.task_tensors(task.name).keys()
        assert all(torch.equal(v, fresh.task_tensors(task.name)[k]) for k, v in tensors.items())
        assert torch.equal(increment["router.gram_upper"], fresh.shared_tensors()["router.gram_upper"])
    live = make(tiny_config)
    live.import_task(*first)
    with pytest.raises(ValueError, match=r"take_out needs a learner that holds only task 'topics'; "
                                         r"this one holds \['kinds'\]"):
        live.take_out("topics")


def test_failed_import_leaves_the_learner_as_it_was(tiny_config, tasks):
    live = make(tiny_config)
    live.learn(tasks[0])
    side = make(tiny_config)
    side.learn(tasks[1])
    record, tensors = side.task_state(tasks[1].name)
    broken = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match="head tensors missing"):
        live.import_task(record, broken)
    assert list(live.tasks) == [tasks[0].name]
    assert live.model.adapter.entries() == [tasks[0].name] and tasks[1].name not in live.model.heads
