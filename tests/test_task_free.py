"""Task-free answers: calibrated task probabilities, top-k candidate tasks, "ambiguous", the
tasks the router confuses, and the router's state (size, deletion)."""

import json
import math

import numpy as np
import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.experiment.metrics import confused_pairs
from continual_transformer.model.calibration import (
    expected_calibration_error, fit_confidence_map, fit_temperature, map_confidence)
from continual_transformer.model.lexical_router import LexicalRouter
from continual_transformer.model.router import CALIBRATION, CALIBRATION_ROWS, Router, calibration_rows
from continual_transformer.task_free import TaskFreeAnswer
from conftest import toy_rows, write_jsonl

ROUTER = {"n_features": 256}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return load_stream(write_jsonl(tmp_path_factory.mktemp("s") / "toy.jsonl", toy_rows()))


@pytest.fixture(scope="module")
def learner(tiny_config, tasks):
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu",
                               router=ROUTER)
    for task in tasks:
        learner.learn(task)
    return learner


def _texts(tasks):
    return [e.text for t in tasks for e in t.test]


def _features(learner, texts):
    return learner.trunk_states(learner.backbone.tokenize(texts), store=False).features


def test_top_k_one_routes_as_the_uncalibrated_classifier(learner, tasks):
    texts = _texts(tasks)
    # the route: the argmax of the decision scores plus the weighted words' log-likelihoods,
    # no temperature involved
    router = learner.router
    scores = router.classifier.scores(_features(learner, texts))  # (N, K)
    if router.lexical_weight:
        scores = scores + router.lexical_weight * router.lexical.log_likelihoods(
            learner.backbone.tokenize(texts), router.skip, router.classifier.classes_, mean=True)
    today = [router.classifier.classes_[i] for i in scores.argmax(1).tolist()]
    assert [p.task for p in learner.predict(texts)] == today
    ranked = learner.predict(texts, top_k=2)
    assert [p.task for p in ranked] == today
    assert [p.candidates[0][0] for p in ranked] == today
    assert learner.router.temperature != 1.0  # calibrated, yet the routes are the same


def test_top_k_names_k_tasks_with_probabilities_summing_to_at_most_one(learner, tasks):
    predictions = learner.predict(_texts(tasks)[:6], top_k=2)
    for p in predictions:
        assert len(p.candidates) == 2 and len({t for t, _ in p.candidates}) == 2
        probabilities = [q for _, q in p.candidates]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1 + 1e-9
        assert p.task_probability == probabilities[0] and p.status == "ok"
    # more than there are tasks: all of them, summing to 1
    p = learner.predict(_texts(tasks)[:1], top_k=5)[0]
    assert len(p.candidates) == len(learner.tasks)
    assert sum(q for _, q in p.candidates) == pytest.approx(1.0)
    # a given task has no candidates and is never ambiguous
    given = learner.predict(_texts(tasks)[:2], task=tasks[0].name, top_k=3, min_task_confidence=1.0)
    assert all(p.candidates == () and p.status == "ok" and p.task == tasks[0].name for p in given)


def test_below_the_threshold_the_answer_is_ambiguous_with_its_candidates(learner, tasks):
    texts = _texts(tasks)[:4]
    plain = learner.predict(texts)
    threshold = max(p.task_probability for p in plain) + 1e-9
    if threshold > 1:  # toy tasks: the router is certain; a huge temperature makes it unsure
        learner.router._temperature = 1e6
        plain = learner.predict(texts)
        threshold = 0.9
    try:
        strict = learner.predict(texts, min_task_confidence=threshold)
        for before, p in zip(plain, strict):
            assert p.status == "ambiguous" and p.task is None and p.label is None
            assert p.probabilities == {} and len(p.candidates) == 2
            assert p.candidates[0][0] == before.task and p.task_probability == before.task_probability
        lenient = learner.predict(texts, min_task_confidence=0.0)
        assert lenient == learner.predict(texts, top_k=1)
        assert all(p.status == "ok" for p in lenient)
    finally:
        learner.router._temperature = None  # fitted again when next needed
    with pytest.raises(ValueError, match="min_task_confidence must be in \\[0, 1\\], got 1.5"):
        learner.predict(texts, min_task_confidence=1.5)
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1, got 0"):
        learner.predict(texts, top_k=0)


def test_a_pass_ranked_for_a_larger_k_restates_as_a_smaller_request_asks(learner, tasks):
    texts = _texts(tasks)[:4]
    wide = learner.predict(texts, top_k=2)
    assert [TaskFreeAnswer(1).restate(p) for p in wide] == learner.predict(texts)
    assert [TaskFreeAnswer(1, 1.0).restate(p) for p in wide] == learner.predict(texts, min_task_confidence=1.0)


def test_router_state_does_not_grow_with_the_examples():
    torch.manual_seed(0)
    sizes = []
    for n in (500, 5000):  # both hold out a full calibration sample
        router = Router(8, n_features=64)
        for task in ("a", "b"):
            router.partial_fit(torch.randn(n, 8) + (task == "b"), task)
        sizes.append((router.state_numbers(), router.nbytes(), router.task_bytes("a"),
                      {k: tuple(v.shape) for k, v in router.task_tensors("a").items()},
                      {k: tuple(v.shape) for k, v in router.shared_tensors().items()}))
    assert sizes[0] == sizes[1]
    assert sizes[0][3][CALIBRATION] == (CALIBRATION_ROWS, 8)


def test_deleting_a_task_removes_exactly_its_own_router_state():
    # Every per-task part of the router (statistics, calibration sample) goes with the task:
    # what is left equals a router that learned only the other tasks. The shared Gram matrix
    # keeps the deleted task's examples (as background data of the covariance).
    torch.manual_seed(0)
    data = {t: torch.randn(40, 8) + i for i, t in enumerate(("a", "b", "c"))}
    learned, never = Router(8, n_features=64), Router(8, n_features=64)
    for task, x in data.items():
        learned.partial_fit(x, task)
        if task != "b":
            never.partial_fit(x, task)
    learned.remove("b")
    assert learned.tasks == never.tasks == ["a", "c"]
    for task in ("a", "c"):
        mine, theirs = learned.task_tensors(task), never.task_tensors(task)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert sorted(learned.samples_) == ["a", "c"]


def test_calibration_sample_is_held_out_evenly_and_saved_with_its_task(learner, tasks, tmp_path):
    assert calibration_rows(4) == [] and calibration_rows(10) == [4, 9]
    assert len(calibration_rows(10_000)) == CALIBRATION_ROWS
    learner.save(tmp_path / "m")
    loaded = ContinualLearner.load(tmp_path / "m", device="cpu")
    assert loaded.router.temperature == learner.router.temperature
    texts = _texts(tasks)
    assert loaded.predict(texts, top_k=2) == learner.predict(texts, top_k=2)
    # a checkpoint written before calibration samples: loads, routes the same, uncalibrated
    assert loaded.router.lexical_weight == learner.router.lexical_weight
    saved = learner.state()
    for task in saved.tasks:
        for key in [k for k in task.tensors if k.startswith(("router.lexical.", "router.calibration"))]:
            task.tensors.pop(key)
    old = ContinualLearner.from_state(saved, "cpu")
    assert old.router.temperature == 1.0 and old.router.temperature_source.startswith("none")
    assert old.router.lexical_weight == 0.0  # no word counts: the trunk's evidence alone
    assert [p.task for p in old.predict(texts)] == learner.router.classifier.predict(_features(learner, texts))
    bad = learner.state()
    bad.tasks[0].tensors[CALIBRATION] = bad.tasks[0].tensors[CALIBRATION].double()
    with pytest.raises(Exception, match="calibration sample of task .* is torch.float64"):
        ContinualLearner.from_state(bad, "cpu")


def test_temperature_fit_and_calibration_error():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (4000,))
    true_scores = torch.randn(4000, 3) + 2.0 * torch.nn.functional.one_hot(y, 3)
    # x ~ N(2 e_y, I): the true posterior is softmax(2 x); scores 5x sharper need T = 5
    assert fit_temperature(10 * true_scores, y) == pytest.approx(5.0, rel=0.1)
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([True, True])) == pytest.approx(0.1)
    assert expected_calibration_error(np.array([0.75] * 4), np.array([1, 1, 1, 0])) == pytest.approx(0.0)


def test_confidence_map_fixes_what_one_temperature_cannot_and_keeps_the_order():
    # Stated probabilities too low where unsure and too high where sure (as the router's at 100
    # tasks): right with probability sigmoid(0.5 logit(p) + 0.2), not p.
    torch.manual_seed(0)
    p = torch.rand(20000, dtype=torch.float64) * 0.98 + 0.01
    z = torch.log(p) - torch.log1p(-p)
    correct = torch.rand(20000, dtype=torch.float64) < torch.sigmoid(0.5 * z + 0.2)
    a, b = fit_confidence_map(p, correct)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(0.2, abs=0.05)
    before = expected_calibration_error(p.numpy(), correct.numpy())
    after = expected_calibration_error(map_confidence(p, a, b).numpy(), correct.numpy())
    assert before > 0.05 and after < 0.02
    assert torch.all(torch.diff(map_confidence(torch.sort(p).values, a, b)) >= 0)
    # too few wrong (or right) answers to fit: the identity
    assert fit_confidence_map(p[:50], torch.ones(50, dtype=torch.bool)) == (1.0, 0.0)
    assert torch.equal(map_confidence(p, 1.0, 0.0), p)


def test_router_states_mapped_probabilities_in_the_classifiers_order():
    torch.manual_seed(0)
    router = Router(8, n_features=64)
    centres = torch.randn(6, 8) * 0.6  # overlapping tasks: many wrong routes
    for t in range(6):
        router.partial_fit(centres[t] + torch.randn(200, 8), f"t{t}")
    a, b = router.confidence_map
    assert (a, b) != (1.0, 0.0)
    x = centres[torch.arange(600) % 6] + torch.randn(600, 8)
    ranked = router.rank(x, None, 6)
    assert [r[0][0] for r in ranked] == router.classifier.predict(x)  # the route is unchanged
    for row in ranked:
        probs = [p for _, p in row]
        assert sum(probs) <= 1 + 1e-9 and all(probs[0] >= q for q in probs[1:])
    # one allowed task: it is certain
    assert router.rank(x[:2], [{"t3"}, {"t3"}], 3) == [[("t3", 1.0)], [("t3", 1.0)]]


def test_confused_pairs_name_shares_of_ten_percent_or_more():
    confusion = np.array([[80, 20, 0], [5, 95, 0], [0, 10, 90]])
    assert confused_pairs(confusion, ["a", "b", "c"]) == [
        {"task": "a", "routed_to": "b", "share": 0.2}, {"task": "c", "routed_to": "b", "share": 0.1}]
    with pytest.raises(ValueError, match="confusion matrix of shape \\(3, 3\\) for 2 task names"):
        confused_pairs(confusion, ["a", "b"])


def test_ctt_predict_top_k_and_ambiguous(learner, tasks, tmp_path):
    from typer.testing import CliRunner

    from continual_transformer.cli import app

    texts = _texts(tasks)[:3]
    learner.router._temperature = 1e6  # saved with the solution: every routed answer is unsure
    try:
        learner.save(tmp_path / "model", router_solution=True)
    finally:
        learner.router._temperature = None
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(tmp_path / "model"), "--json", "--device", "cpu",
                                 "--precision", "fp32", "--top-k", "2", *texts], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    for line in lines:
        assert len(line["candidates"]) == 2 and line["status"] == "ok"
        assert sum(c["probability"] for c in line["candidates"]) <= 1 + 1e-9
        assert line["candidates"][0] == {"task": line["task"], "probability": line["task_probability"]}
    table = runner.invoke(app, ["predict", str(tmp_path / "model"), "--device", "cpu",
                                "--min-task-confidence", "0.9", texts[0]], catch_exceptions=False)
    assert table.exit_code == 0 and "ambiguous" in table.output and "candidate tasks" in table.output
    joint = runner.invoke(app, ["predict", str(tmp_path / "model"), "--json", "--device", "cpu",
                                "--precision", "fp32", "--joint-k", "2", *texts], catch_exceptions=False)
    assert joint.exit_code == 0, joint.output
    loaded = ContinualLearner.load(tmp_path / "model", device="cpu", precision="fp32")
    expected = loaded.predict(texts, joint_k=2)
    assert [json.loads(line)["task"] for line in joint.output.strip().splitlines()] == [p.task for p in expected]


def test_joint_decision_weighs_each_candidate_by_its_own_head(learner, tasks):
    texts = _texts(tasks)[:5] + _texts(tasks)[-5:]
    assert learner.predict(texts, joint_k=1) == learner.predict(texts)  # k = 1: today's answers
    joint = learner.predict(texts, joint_k=2, top_k=2)
    ranked = learner.predict(texts, top_k=2)
    names = list(learner.tasks)
    given = {name: learner.predict(texts, task=name) for name in names}  # each head, task given
    for i, (p, r) in enumerate(zip(joint, ranked)):
        router = dict(r.candidates)
        # the brute force: router probability x the head's certainty, 1 - entropy / log C
        def certainty(probabilities):
            q = [v for v in probabilities.values() if v > 0]
            return 1 - -sum(v * math.log(v) for v in q) / math.log(len(probabilities))
        best = max(names, key=lambda n: router[n] * certainty(given[n][i].probabilities))
        assert p.task == best and p.candidates[0][0] == best
        assert p.label == given[best][i].label
        assert p.probabilities == pytest.approx(given[best][i].probabilities, abs=1e-5)
        assert p.task_probability == router[best]
    # rows whose task is given are answered under it, as without the joint decision
    mixed = [tasks[0].name if i % 2 else None for i in range(len(texts))]
    for p, q in zip(learner.predict(texts, task=mixed, joint_k=2), learner.predict(texts, task=mixed)):
        if p.task_probability is None:
            assert p.label == q.label and p.probabilities == pytest.approx(q.probabilities, abs=1e-5)
    with pytest.raises(ValueError, match="joint_k must be a whole number >= 1, got 0"):
        learner.predict(texts, joint_k=0)


SPECIAL = frozenset({101, 102})


def _worded(tasks: int, n: int, seed: int) -> tuple[torch.Tensor, list[list[int]], list[str]]:
    """Rows whose trunk features cannot tell the tasks apart (one distribution for all) and
    whose words can: task t's texts draw most tokens from a vocabulary of its own."""
    g = torch.Generator().manual_seed(seed)
    features, ids, truth = [], [], []
    for t in range(tasks):
        features.append(torch.randn(n, 8, generator=g))
        for _ in range(n):
            own = torch.randint(1000 + 50 * t, 1050 + 50 * t, (4,), generator=g).tolist()
            shared = torch.randint(5000, 5100, (4,), generator=g).tolist()
            ids.append([101, *own, *shared, 102])
            truth.append(f"t{t}")
    return torch.cat(features), ids, truth


def _fitted_on_words(**options) -> Router:
    router = Router(8, n_features=64, skip=SPECIAL, **options)
    x, ids, truth = _worded(4, 60, seed=0)
    for t in range(4):
        rows = [i for i, name in enumerate(truth) if name == f"t{t}"]
        router.partial_fit(x[rows], f"t{t}", [ids[i] for i in rows])
    return router


def test_the_router_weighs_words_where_the_trunk_cannot_tell_tasks_apart():
    router, blind = _fitted_on_words(), _fitted_on_words(lexical_alpha=None)
    x, ids, truth = _worded(4, 50, seed=1)
    assert router.lexical_weight > 0 and blind.lexical_weight == 0  # chosen on the calibration texts
    right = np.mean([r == t for r, t in zip(router.predict(x, ids=ids), truth)])
    blind_right = np.mean([r == t for r, t in zip(blind.predict(x), truth)])
    assert right > 0.95 and blind_right < 0.5, (right, blind_right)
    with pytest.raises(ValueError, match=r"weighs the texts' words .*pass their token ids"):
        router.predict(x)
    # the words' counts leave out the calibration rows, as the statistics do
    _, ids, _ = _worded(4, 60, seed=0)  # task t0's rows come first
    held = calibration_rows(60)
    kept = LexicalRouter()
    kept.partial_fit([ids[i] for i in range(60) if i not in held], "t0", SPECIAL)
    assert all(np.array_equal(a, b) for a, b in zip(router.lexical.tasks_["t0"], kept.tasks_["t0"]))
    assert router.sample_ids_["t0"] == [ids[i] for i in held]


def test_the_routers_words_are_saved_with_each_task_and_deleted_with_it():
    router = _fitted_on_words()
    x, ids, _ = _worded(4, 10, seed=2)
    copy = Router(8, n_features=64, skip=SPECIAL)
    copy.load_shared_tensors(router.shared_tensors())
    for task in router.tasks:
        tensors = router.task_tensors(task)
        assert {"router.lexical.columns", "router.calibration_ids"} <= set(tensors)
        copy.load_task_tensors(task, tensors)
    assert copy.lexical_weight == router.lexical_weight
    assert copy.rank(x, None, 4, ids) == router.rank(x, None, 4, ids)
    # tasks saved before the router read words: no counts, so no words weighed for any task
    old = Router(8, n_features=64, skip=SPECIAL)
    old.load_shared_tensors(router.shared_tensors())
    for task in router.tasks:
        old.load_task_tensors(task, {k: v for k, v in router.task_tensors(task).items()
                                     if not k.startswith(("router.lexical.", "router.calibration_"))})
    assert old.lexical_weight == 0.0
    assert old.predict(x) == router.classifier.predict(x)  # routes without ids, on the trunk alone
    router.remove("t1")
    assert "t1" not in router.lexical.tasks_ and "t1" not in router.sample_ids_
    with pytest.raises(ValueError, match="calibration ids of task 't0'"):
        bad = router.task_tensors("t0")
        bad["router.calibration_lengths"] = bad["router.calibration_lengths"][:-1]
        Router(8, n_features=64).load_task_tensors("t0", bad)


def test_a_tasks_words_keep_its_most_frequent_columns_and_all_its_mass():
    rows = [[101, 7, 7, 7, 8, 9, 102], [101, 7, 8, 10, 11, 102]]
    every, capped = LexicalRouter(), LexicalRouter(max_columns=3)
    every.partial_fit(rows, "t", SPECIAL)
    capped.partial_fit(rows, "t", SPECIAL)
    columns, sums, total = every.tasks_["t"]
    kept, kept_sums, kept_total = capped.tasks_["t"]
    assert len(columns) > 3 and len(kept) == 3 and kept_total == total  # pruned mass stays
    top = np.sort(np.argsort(-sums, kind="stable")[:3])
    assert np.array_equal(kept, columns[top]) and np.array_equal(kept_sums, sums[top])
    assert np.all(np.diff(kept) > 0)  # still sorted: lookups bisect them
    # a pruned n-gram scores as one never seen; a kept one as before
    both = every.log_likelihoods([[101, 7, 102]], SPECIAL), capped.log_likelihoods([[101, 7, 102]], SPECIAL)
    assert torch.allclose(*both)
    with pytest.raises(ValueError, match="at most 3 long"):
        capped.load_task_tensors("u", every.task_tensors("t"))
    with pytest.raises(ValueError, match="max_columns must be an integer >= 1"):
        LexicalRouter(max_columns=0)
