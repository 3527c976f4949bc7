"""The bounded pool of scale entries (`ia3` with `pool_size`), on the tiny random BERT."""

import dataclasses
import random

import pytest
import torch

from conftest import WORDS
from continual_transformer.config import TrainConfig
from continual_transformer.learner import ContinualLearner
from continual_transformer.methods import make_method
from continual_transformer.methods.ia3 import IA3Method
from continual_transformer.methods.pool import PooledIA3Method
from continual_transformer.methods.transfer import leep, transrate
from continual_transformer.types import Example, Task

TRAIN = TrainConfig(epochs=2, batch_size=8, precision="fp32")
PAIRS = {"kinds": ("animal", "food"), "topics": ("color", "sport"),
         "mixed": ("animal", "color"), "other": ("food", "sport")}


def _task(name: str, n_train: int = 24, n_test: int = 12, seed: int = 0) -> Task:
    rng = random.Random(f"{seed}:{name}")
    labels = PAIRS[name]

    def examples(n):
        return tuple(Example(" and ".join(rng.sample(WORDS[labels[i % 2]], 3)), labels[i % 2])
                     for i in range(n))

    return Task(name, labels, examples(n_train), examples(n_test))


def _learner(tiny_config, **pool) -> ContinualLearner:
    hyper = {"train": TRAIN.to_dict(), "adapt_layers": 1, **pool}
    return ContinualLearner(tiny_config, method=make_method("ia3", hyper), device="cpu")


def _entries(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.method.shared_tensors(learner.model).items()}


def test_unset_pool_size_is_todays_method(tiny_config):
    plain = make_method("ia3", {"train": TRAIN.to_dict(), "adapt_layers": 1})
    unset = make_method("ia3", {"train": TRAIN.to_dict(), "adapt_layers": 1, "pool_size": None})
    assert type(unset) is IA3Method and unset.hyperparameters() == plain.hyperparameters()
    a = ContinualLearner(tiny_config, method=plain, device="cpu")
    b = ContinualLearner(tiny_config, method=unset, device="cpu")
    task = _task("kinds")
    a.learn(task)
    b.learn(task)
    texts = [e.text for e in task.test]
    for x, y in zip(a.logits(texts, "kinds"), b.logits(texts, "kinds")):
        assert torch.equal(x, y)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="pool_size must be a whole number >= 1, got 0"):
        make_method("ia3", {"pool_size": 0})
    with pytest.raises(ValueError, match=r"merge_agreement must be in \[0, 1\], got 2"):
        make_method("ia3", {"pool_size": 2, "merge_agreement": 2})
    with pytest.raises(ValueError, match="max_refused_merges must be a whole number >= 1, got 0"):
        make_method("ia3", {"pool_size": 2, "max_refused_merges": 0})


def test_scores_see_separated_labels():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1] * 20)
    separated = torch.randn(40, 8) * 0.1 + labels[:, None].float() * torch.ones(8)
    mixed = torch.randn(40, 8)
    assert transrate(separated, labels) > transrate(mixed, labels) >= 0
    sure = torch.nn.functional.one_hot(labels, 2).float()  # a source that knows the labels
    assert leep(sure, labels, 2) == pytest.approx(0.0, abs=1e-9)
    assert leep(torch.full((40, 2), 0.5), labels, 2) == pytest.approx(-0.6931, abs=1e-3)


def test_full_pool_never_grows(tiny_config, monkeypatch):
    from continual_transformer.methods import pool

    monkeypatch.setattr(pool, "SCORE_TEXTS", 16)  # scored on a sample, as large tasks are
    learner = _learner(tiny_config, pool_size=2, merge_agreement=0.0)
    sizes = []
    for name in PAIRS:
        learner.learn(_task(name))
        sizes.append(learner.shared_state_numbers()["method"])
        assert len(learner.model.adapter.entries()) <= 2
    assert sizes[1] == sizes[2] == sizes[3] == 2 * sizes[0]
    decisions = [learner.tasks[n].stats["pool"]["decision"] for n in PAIRS]
    assert decisions[:2] == ["new", "new"]
    assert all(d in ("reuse", "merge") for d in decisions[2:])
    assert set(learner.method.assignment) == set(PAIRS)


def test_reuse_trains_only_the_head(tiny_config):
    learner = _learner(tiny_config, pool_size=1, reuse_margin=-1e9)
    learner.learn(_task("kinds"))
    old = _task("kinds")
    texts = [e.text for e in old.test]
    before, entries = learner.logits(texts, "kinds"), _entries(learner)
    learner.learn(_task("topics"))
    pool = learner.tasks["topics"].stats["pool"]
    assert pool["decision"] == "reuse" and pool["entry"] == "entry0"
    assert learner.method.assignment == {"kinds": "entry0", "topics": "entry0"}
    after = _entries(learner)
    assert after.keys() == entries.keys() and all(torch.equal(after[k], entries[k]) for k in after)
    for x, y in zip(before, learner.logits(texts, "kinds")):
        assert torch.equal(x, y)  # the old task is untouched, bit for bit
    assert learner.evaluate(_task("topics")) > 0.5  # its head learned on the shared entry


def test_merge_reports_what_it_cost_old_tasks(tiny_config):
    learner = _learner(tiny_config, pool_size=1, reuse_margin=1e9, merge_agreement=0.0)
    learner.learn(_task("kinds"))
    kinds = _task("kinds")
    old_accuracy = learner.evaluate(kinds)
    entries = _entries(learner)
    new = _task("mixed")
    texts = [e.text for e in new.train]
    before = [p.label for p in learner.predict(texts, task="kinds")]
    learner.learn(new)
    pool = learner.tasks["mixed"].stats["pool"]
    assert pool["decision"] == "merge" and pool["entry"] == "entry0"
    assert learner.model.adapter.entries() == ["entry0"]  # the trained entry merged, then gone
    assert any(not torch.equal(entries[k], v) for k, v in _entries(learner).items())
    # The reported agreement is what the old head does on the new task's texts.
    after = [p.label for p in learner.predict(texts, task="kinds")]
    agreement = sum(a == b for a, b in zip(before, after)) / len(texts)
    assert pool["merge"]["old_agreement"]["kinds"] == pytest.approx(agreement, abs=1 / len(texts))
    # Within that tolerance on the old task's own test texts too (plus one text of slack).
    tolerance = 1 - pool["merge"]["old_agreement"]["kinds"] + 1 / len(kinds.test)
    assert learner.evaluate(kinds) >= old_accuracy - tolerance
    assert learner.evaluate(new) > 0.5


def test_refused_merge_leaves_old_entry_and_reuses(tiny_config):
    learner = _learner(tiny_config, pool_size=1, reuse_margin=1e9, merge_agreement=1.01 - 0.01)
    learner.learn(_task("kinds"))
    entries = _entries(learner)
    learner.learn(_task("mixed"))
    pool = learner.tasks["mixed"].stats["pool"]
    if pool["decision"] == "merge":  # the distillation kept every old prediction: allowed
        assert min(pool["merge"]["old_agreement"].values()) == 1.0
    else:
        assert pool["decision"] == "merge refused: reuse"
        after = _entries(learner)
        assert all(torch.equal(after[k], entries[k]) for k in after)


def test_merges_into_an_entry_that_refused_them_are_skipped_with_the_same_result(tiny_config,
                                                                                monkeypatch, tmp_path):
    from continual_transformer.methods import pool_merge

    distill = pool_merge.distill_into

    def refused(*args, **kwargs):  # the real merge, judged as if every old head disagreed
        return dataclasses.replace(distill(*args, **kwargs), old_agreement={t: 0.0 for t in args[6]})

    monkeypatch.setattr(pool_merge, "distill_into", refused)
    skipping = _learner(tiny_config, pool_size=1, reuse_margin=1e9, max_refused_merges=2)
    trying = _learner(tiny_config, pool_size=1, reuse_margin=1e9, max_refused_merges=10)
    for learner in (skipping, trying):
        learner.learn(_task("kinds"))
        for name in ("topics", "mixed"):
            learner.learn(_task(name))
            assert learner.tasks[name].stats["pool"]["decision"] == "merge refused: reuse"
    assert skipping.method.refused == {"entry0": 2}
    skipping.save(tmp_path / "model")
    assert ContinualLearner.load(tmp_path / "model", device="cpu").method.refused == {"entry0": 2}
    entries = _entries(skipping)
    trying.learn(_task("other"))
    assert trying.tasks["other"].stats["pool"]["decision"] == "merge refused: reuse"
    monkeypatch.setattr(pool_merge, "distill_into", lambda *a, **k: pytest.fail("a merge was tried"))
    skipping.learn(_task("other"))
    pool = skipping.tasks["other"].stats["pool"]
    assert pool["decision"] == "merge skipped: reuse" and pool["refused_in_a_row"] == 2
    assert all(torch.equal(v, entries[k]) for k, v in _entries(skipping).items())
    texts = [e.text for e in _task("other").test]
    for x, y in zip(skipping.logits(texts, "other"), trying.logits(texts, "other")):
        assert torch.equal(x, y)  # what the refused merge would have ended with, bit for bit
    skipping.delete("topics")  # fewer heads must agree now: the next merge is tried again
    assert skipping.method.refused == {}


def test_checkpoint_with_a_pool_round_trips_exactly(tiny_config, tmp_path):
    learner = _learner(tiny_config, pool_size=2, merge_agreement=0.0)
    for name in ("kinds", "topics", "mixed"):
        learner.learn(_task(name))
    learner.save(tmp_path / "model")
    # In the precision it was trained and predicted in (a load predicts in "auto": bfloat16
    # where the CPU computes it natively).
    loaded = ContinualLearner.load(tmp_path / "model", device="cpu", precision="fp32")
    assert isinstance(loaded.method, PooledIA3Method)
    assert loaded.method.assignment == learner.method.assignment
    saved, back = _entries(learner), _entries(loaded)
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    texts = [e.text for n in ("kinds", "topics", "mixed") for e in _task(n).test]
    rows = [n for n in ("kinds", "topics", "mixed") for _ in _task(n).test]
    for x, y in zip(learner.logits(texts, rows), loaded.logits(texts, rows)):
        assert torch.equal(x, y)  # a mixed batch, each row under its task's entry
    loaded.learn(_task("other"))  # and it keeps learning
    assert len(loaded.model.adapter.entries()) == 2


def test_delete_keeps_a_shared_entry_until_its_last_task(tiny_config):
    learner = _learner(tiny_config, pool_size=1, reuse_margin=-1e9)
    learner.learn(_task("kinds"))
    learner.learn(_task("topics"))
    entries = _entries(learner)
    learner.delete("kinds")
    assert learner.model.adapter.entries() == ["entry0"]
    assert all(torch.equal(v, entries[k]) for k, v in _entries(learner).items())
    assert "kinds" not in learner.router.tasks and learner.evaluate(_task("topics")) > 0.5
    learner.delete("topics")
    assert learner.model.adapter.entries() == [] and learner.method.assignment == {}


def test_failed_learn_puts_the_pool_back(tiny_config, monkeypatch):
    from continual_transformer.methods import pool_merge

    learner = _learner(tiny_config, pool_size=1, reuse_margin=1e9, merge_agreement=0.0)
    learner.learn(_task("kinds"))
    entries = _entries(learner)
    distill = pool_merge.distill_into

    def distill_then_fail(*args, **kwargs):
        distill(*args, **kwargs)  # the old entry is changed by now
        raise RuntimeError("killed during the merge")

    monkeypatch.setattr(pool_merge, "distill_into", distill_then_fail)
    with pytest.raises(RuntimeError, match="killed during the merge"):
        learner.learn(_task("mixed"))
    assert learner.method.assignment == {"kinds": "entry0"}
    assert learner.model.adapter.entries() == ["entry0"] and "mixed" not in learner.model.heads
    assert all(torch.equal(v, entries[k]) for k, v in _entries(learner).items())


def test_tasks_cannot_be_learned_apart(tiny_config):
    from continual_transformer.experiment.ray_pool import refusal

    learner = _learner(tiny_config, pool_size=2)
    assert "share a pool of at most 2 scale entries" in refusal(learner)
    learner.learn(_task("kinds"))
    with pytest.raises(ValueError, match="shares state between tasks"):
        learner.take_out("kinds")


def test_a_new_head_starts_from_the_old_head_that_knows_its_labels(tiny_config):
    from continual_transformer.model.heads import TaskHeads
    from continual_transformer.methods.transfer import label_source, start_head_from

    heads = TaskHeads(8)
    heads.add("en", ("admin", "games", "math"), seed=1)
    heads.add("other", ("admin", "x", "y"), seed=2)
    heads.add("fr", ("math", "new", "games", "admin"), seed=3)
    # "en" knows 3 of fr's 4 labels, "other" 1; at least half must be known
    assert label_source(heads, heads.labels["fr"], "fr") == ("en", ["math", "games", "admin"])
    assert label_source(heads, ("x", "q", "r"), "none") == (None, [])
    fresh = heads.heads["fr"].weight.detach().clone()
    start_head_from(heads, "fr", "en", ["math", "games", "admin"])
    en, fr = heads.heads["en"], heads.heads["fr"]
    for new_row, old_row in ((0, 2), (2, 1), (3, 0)):
        assert torch.equal(fr.weight[new_row], en.weight[old_row]) and fr.bias[new_row] == en.bias[old_row]
    assert torch.equal(fr.weight[1], fresh[1])  # a label no old head knows starts fresh

    # In a pool, the task's record names the head it started from.
    learner = _learner(tiny_config, pool_size=2)
    learner.learn(_task("kinds"))
    learner.learn(_task("mixed"))  # shares "animal" (half its labels) with kinds
    learner.learn(_task("topics"))  # shares "color" with mixed: the earliest with the most
    assert learner.tasks["kinds"].stats["pool"]["head_start"] is None
    assert learner.tasks["mixed"].stats["pool"]["head_start"] == {"task": "kinds", "labels": 1}
    assert learner.tasks["topics"].stats["pool"]["head_start"] == {"task": "mixed", "labels": 1}


def test_a_stream_passes_again_only_the_tasks_a_merge_changed(tiny_config, monkeypatch):
    from continual_transformer.experiment.run import run_stream

    names = ("kinds", "topics", "mixed", "other")
    reports = {}
    for recompute in (False, True):
        learner = _learner(tiny_config, pool_size=2, reuse_margin=1e9, merge_agreement=0.0)
        if recompute:  # every task seen passed again after every task, as shared state needs
            monkeypatch.setattr(PooledIA3Method, "changed_tasks", lambda self, stats: None)
        reports[recompute] = run_stream([_task(n) for n in names], learner)
    passes = [r["evaluation"]["forward_passes"] for r in reports[False]["per_task"]]
    pools = [r["train_stats"]["pool"] for r in reports[False]["per_task"]]
    assert [p["decision"] for p in pools] == ["new", "new", "merge", "merge"]
    assert passes[:2] == [["kinds"], ["topics"]]  # a new entry changes no earlier task
    for i in (2, 3):  # a merge: the tasks of the merged entry, then the task itself
        assert passes[i] == [n for n in names[:i] if n in pools[i]["merge"]["old_tasks"]] + [names[i]]
    assert [r["evaluation"]["forward_passes"] for r in reports[True]["per_task"]][-1] == list(names)
    # The figures are those of passing every task again.
    assert reports[False]["accuracy_matrix"] == reports[True]["accuracy_matrix"]
    assert reports[False]["task_free_accuracy_matrix"] == reports[True]["task_free_accuracy_matrix"]
