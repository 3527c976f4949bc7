"""Task-free prediction: the router (ia3) and the analytic method's class-incremental argmax."""

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.model.backbone import masked_mean


from continual_transformer.methods import make_method
from conftest import toy_rows, write_jsonl

ROUTER = {"n_features": 256}  # small random-feature maps keep unit tests fast


def analytic():
    return make_method("analytic", {"n_features": 256})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return load_stream(write_jsonl(tmp_path_factory.mktemp("s") / "toy.jsonl", toy_rows()))


@pytest.fixture(scope="module")
def ia3(tiny_config, tasks):
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=2, batch_size=8), device="cpu",
                               router=ROUTER)
    for task in tasks:
        learner.learn(task)
    return learner


def test_router_reads_the_trunk_output_of_the_prediction_pass(ia3, tasks):
    # All layers adapted: the trunk is the embedding layer, as the original router read it.
    backbone = ia3.backbone
    assert ia3.model.trunk_layers == 0
    texts = [e.text for e in tasks[0].test]
    batch = backbone.collate(backbone.tokenize(texts))
    seen = []
    rank = ia3.router.rank
    ia3.router.rank = lambda features, among=None, k=1, ids=None: (seen.append(features)
                                                                    or rank(features, among, k, ids))
    try:
        with torch.inference_mode():
            ia3.row_logits(batch, [None] * len(texts), ids=backbone.tokenize(texts))
    finally:
        del ia3.router.rank
    assert len(seen) == 1  # once per pass, from inside it
    with torch.inference_mode():
        embedded = backbone.encoder.embeddings(input_ids=batch["input_ids"])
    assert torch.equal(seen[0], masked_mean(embedded, batch["attention_mask"]))
    states = ia3.trunk_states(backbone.tokenize(texts), store=False)
    assert torch.equal(states.features, seen[0])  # what the router learns from


def test_task_free_prediction_routes_each_row(ia3, tasks):
    texts = [e.text for t in tasks for e in t.test]
    truth = [t.name for t in tasks for e in t.test]
    predictions = ia3.predict(texts)  # no task
    routed = [p.task for p in predictions]
    assert sum(r == t for r, t in zip(routed, truth)) / len(truth) >= 0.9
    for p in predictions:
        assert p.label in ia3.tasks[p.task].labels


def test_routed_rows_get_the_routed_tasks_logits(ia3, tasks):
    texts = [e.text for e in tasks[0].test[:4]] + [e.text for e in tasks[1].test[:4]]
    given = [tasks[0].name, None, None, tasks[0].name, None, tasks[1].name, None, None]
    predictions = ia3.predict(texts, given)
    assert [p.task for i, p in enumerate(predictions) if given[i]] == [g for g in given if g]
    for text, p in zip(texts, predictions):
        alone = ia3.predict([text], p.task)[0]
        assert alone.label == p.label
        for label in p.probabilities:
            assert p.probabilities[label] == pytest.approx(alone.probabilities[label], abs=1e-5)


def test_evaluate_task_free_counts_only_correctly_routed_rows(ia3, tasks):
    accuracy, routed = ia3.evaluate_task_free(tasks[0])
    aware = ia3.evaluate(tasks[0])
    assert len(routed) == len(tasks[0].test)
    assert accuracy <= aware + 1e-9 or any(r != tasks[0].name for r in routed)


def test_router_is_saved_and_deleted_with_its_task(ia3, tasks, tmp_path):
    texts = [e.text for t in tasks for e in t.test]
    before = ia3.predict(texts)
    ia3.save(tmp_path / "m")
    assert ContinualLearner.load(tmp_path / "m", device="cpu").router.hyperparameters()["n_features"] == 256
    loaded = ContinualLearner.load(tmp_path / "m", device="cpu")
    assert loaded.predict(texts) == before
    loaded.delete(tasks[0].name)
    assert loaded.router.tasks == [tasks[1].name]
    assert {p.task for p in loaded.predict(texts)} == {tasks[1].name}


def test_a_solved_router_is_saved_and_loaded_instead_of_solved_again(ia3, tasks, tmp_path):
    import torch
    from safetensors import safe_open

    from continual_transformer.io.checkpoint import CheckpointError, read_manifest

    texts = [e.text for t in tasks for e in t.test]
    before = ia3.predict(texts)  # routes: the router is solved
    solved = ia3.router.classifier.solution()
    ia3.save(tmp_path / "plain")  # a run's save: statistics only
    assert not ContinualLearner.load(tmp_path / "plain", device="cpu").router.classifier.solved
    ia3.save(tmp_path / "m", router_solution=True)  # a server's save
    loaded = ContinualLearner.load(tmp_path / "m", device="cpu")
    assert loaded.router.classifier.solved  # before any prediction
    assert all(torch.equal(a, b) for a, b in zip(loaded.router.classifier.solution(), solved))
    assert loaded.predict(texts) == before
    # and it is what solving the loaded statistics again gives, bit for bit
    loaded.router.classifier.load_shared_state(loaded.router.classifier.shared_state())
    assert not loaded.router.classifier.solved
    assert all(torch.equal(a, b) for a, b in zip(loaded.router.classifier.solution(), solved))

    # A solution that does not fit the statistics is refused, naming the file.
    shared = tmp_path / "m" / read_manifest(tmp_path / "m")["shared_file"]
    with safe_open(shared, "pt") as file:
        tensors = {k: file.get_tensor(k) for k in file.keys()}
    assert sorted(tensors) == ["router.gram_upper", "router.solution.alpha",
                               "router.solution.coef", "router.solution.confidence_map",
                               "router.solution.intercept", "router.solution.lexical_weight",
                               "router.solution.temperature"]
    assert loaded.router.confidence_map == ia3.router.confidence_map
    assert loaded.router.lexical_weight == ia3.router.lexical_weight
    saved = loaded.state(router_solution=True)
    saved.shared_tensors["router.solution.coef"] = saved.shared_tensors["router.solution.coef"][:, :1]
    with pytest.raises(CheckpointError, match="solution 'coef' is .* expected \\(256, 2\\) float64 for 2 classes"):
        ContinualLearner.from_state(saved, "cpu")


def test_failed_task_leaves_router_unchanged(tiny_config, tasks):
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu",
                               router=ROUTER)
    learner.learn(tasks[0])

    def crash(done, total, loss):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        learner.learn(tasks[1], progress=crash)
    assert learner.router.tasks == [tasks[0].name]


def test_analytic_method_learns_without_gradients_and_routes_itself(tiny_config, tasks, tmp_path):
    learner = ContinualLearner(tiny_config, method=analytic(), device="cpu")
    assert learner.router is None
    for task in tasks:
        learner.learn(task)
    assert all(not p.requires_grad or p.grad is None for p in learner.backbone.parameters())
    for task in tasks:
        assert learner.evaluate(task) >= 0.75
        free, routed = learner.evaluate_task_free(task)
        assert free >= 0.6
    record = learner.tasks[tasks[0].name]
    assert record.adapter_parameters == 0 and record.stats["examples"] == len(tasks[0].train)
    texts = [e.text for t in tasks for e in t.test]
    learner.save(tmp_path / "a")
    loaded = ContinualLearner.load(tmp_path / "a", device="cpu")
    assert loaded.predict(texts) == learner.predict(texts)
    assert loaded.predict(texts, tasks[0].name) == learner.predict(texts, tasks[0].name)


def test_analytic_task_order_gives_the_same_model(tiny_config, tasks):
    first = ContinualLearner(tiny_config, method=analytic(), device="cpu")
    second = ContinualLearner(tiny_config, method=analytic(), device="cpu")
    for task in tasks:
        first.learn(task)
    for task in reversed(tasks):
        second.learn(task)
    texts = [e.text for t in tasks for e in t.test]
    a, b = first.method.classifier, second.method.classifier
    permutation = [b.classes_.index(c) for c in a.classes_]
    scale = float(a.solution()[0].abs().max())
    torch.testing.assert_close(b.solution()[0][:, permutation], a.solution()[0], rtol=0,
                               atol=1e-7 * scale)
    assert [p.label for p in first.predict(texts)] == [p.label for p in second.predict(texts)]


def test_analytic_rejects_training_options(tiny_config):
    with pytest.raises(ValueError, match="method 'analytic' is not trained by gradient"):
        ContinualLearner(tiny_config, method="analytic", train=TrainConfig(), device="cpu")


@pytest.mark.parametrize("kind", ["ia3", "analytic"])
def test_routing_among_some_tasks_is_the_same_classifier_restricted(kind, ia3, tiny_config, tasks):
    """A caller that may see only some tasks (a tenant) gets rows routed among those only; a row
    whose best task is allowed keeps that answer, and a named task is never changed."""
    learner = ia3
    if kind == "analytic":
        learner = ContinualLearner(tiny_config, method=analytic(), device="cpu")
        for task in tasks:
            learner.learn(task)
    texts = [e.text for t in tasks for e in t.test]
    free = learner.predict(texts)
    first, second = tasks[0].name, tasks[1].name
    only_first = learner.predict(texts, among=[first])
    assert {p.task for p in only_first} == {first}
    for p, q in zip(free, only_first):
        if p.task == first:
            assert q.label == p.label
            assert q.probabilities == pytest.approx(p.probabilities, abs=1e-6)
    per_row = learner.predict(texts, among=[{first}, None] * (len(texts) // 2) + [None] * (len(texts) % 2))
    assert all(p.task == first for p in per_row[::2])
    assert [p.task for p in per_row[1::2]] == [p.task for p in free[1::2]]
    named = learner.predict(texts, task=second, among=[first])
    assert {p.task for p in named} == {second}
    with pytest.raises(ValueError, match="no learned task to route to"):
        learner.predict(texts, among=["nothing"])


def _three_tasks():
    import random

    from conftest import WORDS
    from continual_transformer.types import Example, Task

    def task(name, labels, seed):
        rng = random.Random(seed)
        rows = [Example(" and ".join(rng.sample(WORDS[labels[i % 2]], 3)), labels[i % 2])
                for i in range(28)]
        return Task(name, labels, tuple(rows[:20]), tuple(rows[20:]))

    return [task("kinds", ("animal", "food"), 0), task("mixed", ("animal", "color"), 1),
            task("topics", ("color", "sport"), 2)]


def test_deleting_a_task_with_its_texts_gives_the_router_that_never_learned_it(tiny_config, tmp_path):
    kinds, mixed, topics = _three_tasks()
    train = TrainConfig(epochs=1, batch_size=8, precision="fp32")

    def learner(tasks):
        method = make_method("ia3", {"train": train.to_dict(), "adapt_layers": 1})
        made = ContinualLearner(tiny_config, method=method, device="cpu", router=ROUTER)
        for task in tasks:
            made.learn(task)
        return made

    never, once = learner([kinds, topics]), learner([kinds, mixed, topics])
    once.save(tmp_path / "m")
    once = ContinualLearner.load(tmp_path / "m", device="cpu")  # the fingerprint is saved
    wrong = [e.text for e in mixed.train][::-1]  # the same texts in another order
    with pytest.raises(ValueError, match="20 texts given are not the ones task 'mixed' was "
                                         "learned from.*nothing was deleted"):
        once.delete("mixed", texts=wrong)
    assert once.router.tasks == ["kinds", "mixed", "topics"]
    kept_background = ContinualLearner.load(tmp_path / "m", device="cpu")
    kept_background.delete("mixed")
    once.delete("mixed", texts=[e.text for e in mixed.train])
    a, b, c = once.router.classifier, never.router.classifier, kept_background.router.classifier
    assert a.classes_ == b.classes_ == ["kinds", "topics"]
    assert torch.equal(a.sums_, b.sums_) and torch.equal(a.counts_, b.counts_)
    assert torch.allclose(a.gram_upper_, b.gram_upper_, rtol=1e-12, atol=1e-9)
    assert not torch.allclose(c.gram_upper_, b.gram_upper_, rtol=1e-6)  # without texts: background
    texts = [e.text for t in (kinds, mixed, topics) for e in t.test]
    ids = once.backbone.tokenize(texts)
    features = once.trunk_states(ids, store=False).features
    p, q = once.router.rank(features, k=2, ids=ids), never.router.rank(features, k=2, ids=ids)
    assert [[t for t, _ in row] for row in p] == [[t for t, _ in row] for row in q]
    assert max(abs(x[1] - y[1]) for r, s in zip(p, q) for x, y in zip(r, s)) < 1e-9
    with pytest.raises(ValueError, match="has no fingerprint"):
        never.router.fingerprints_.pop("kinds")
        never.delete("kinds", texts=[e.text for e in kinds.train])
    assert never.router.tasks == ["kinds", "topics"]
