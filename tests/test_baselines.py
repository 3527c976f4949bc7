"""The baselines (finetune, ewc, lwf, replay, joint): the classic bugs each could have."""

import json
import random
import shutil
from collections import Counter

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.io.checkpoint import CheckpointError
from continual_transformer.io.versions import prune
from continual_transformer.config import BackboneConfig
from continual_transformer.experiment.run import run_joint, run_stream
from continual_transformer.methods import make_method
from continual_transformer.methods.base import task_seed
from continual_transformer.methods.replay import Memory, ReservoirBuffer
from continual_transformer.methods.shared_adapter import SHARED

from conftest import WORDS, write_jsonl

BASELINES = ["finetune", "ewc", "lwf", "replay"]


@pytest.fixture
def tasks(toy_stream):
    return load_stream(toy_stream)


def make(config, method, hyperparameters=None, **train):
    train = {"epochs": 2, "batch_size": 8, **train}
    options = {"train": train, **(hyperparameters or {})}
    return ContinualLearner(config, method=make_method(method, options), device="cpu")


def shared_state(learner):
    return {k: v.clone() for k, v in learner.model.adapter.state_of(SHARED).items()}


@pytest.fixture(scope="module")
def sensitive_backbone(tmp_path_factory):
    """A tiny BERT whose layers matter: with the usual 0.02 initialisation a random encoder's
    layers barely change its output, so no scale vector can make it forget anything."""
    from transformers import BertConfig, BertModel

    from continual_transformer.model.backbone import default_model_dir

    folder = tmp_path_factory.mktemp("sensitive-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        initializer_range=0.3)
    BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    return BackboneConfig(str(folder), max_length=32)


# -- the shared parameter set ----------------------------------------------------------------
@pytest.mark.parametrize("method", BASELINES)
def test_baselines_train_one_shared_entry_and_a_head_per_task(tiny_config, tasks, method):
    learner = make(tiny_config, method)
    learner.learn(tasks[0])
    first = shared_state(learner)
    assert any(not torch.all(v == 1) for v in first.values()), "shared entry never trained"
    learner.learn(tasks[1])
    assert learner.model.adapter.entries() == [SHARED]
    assert any(not torch.equal(first[k], v) for k, v in shared_state(learner).items()), \
        "the second task did not train the shared entry"
    record = learner.tasks[tasks[1].name]
    assert (record.adapter_parameters, record.head_parameters) == (0, 32 * 2 + 2)
    assert learner.shared_state_numbers()["method"] >= 2 * (32 + 32 + 64)
    # one pass for a batch that mixes tasks equals one pass per task
    texts = [e.text for e in tasks[0].test[:3]] + [e.text for e in tasks[1].test[:3]]
    names = [tasks[0].name] * 3 + [tasks[1].name] * 3
    mixed = learner.logits(texts, names)
    separate = learner.logits(texts[:3], tasks[0].name) + learner.logits(texts[3:], tasks[1].name)
    for a, b in zip(mixed, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the router still answers task-free requests
    accuracy, routed = learner.evaluate_task_free(tasks[0])
    assert set(routed) <= {t.name for t in tasks} and 0 <= accuracy <= 1


@pytest.mark.parametrize("method", BASELINES)
def test_failed_task_restores_shared_entry_and_heads(tiny_config, tasks, method):
    learner = make(tiny_config, method)
    learner.learn(tasks[0])
    entry = shared_state(learner)
    head = {k: v.clone() for k, v in learner.model.heads.heads[tasks[0].name].state_dict().items()}
    texts = [e.text for e in tasks[0].test]
    before = torch.stack(learner.logits(texts, tasks[0].name))
    extra = json.dumps(learner.method.shared_json(learner.model), sort_keys=True)

    def crash(done, total, loss):
        if done == 2:
            raise RuntimeError("killed mid-task")

    with pytest.raises(RuntimeError, match="killed mid-task"):
        learner.learn(tasks[1], progress=crash)
    assert list(learner.tasks) == [tasks[0].name] and tasks[1].name not in learner.model.heads
    for k, v in shared_state(learner).items():
        assert torch.equal(v, entry[k])
    for k, v in learner.model.heads.heads[tasks[0].name].state_dict().items():
        assert torch.equal(v, head[k])
    assert torch.equal(before, torch.stack(learner.logits(texts, tasks[0].name)))
    assert json.dumps(learner.method.shared_json(learner.model), sort_keys=True) == extra
    learner.learn(tasks[1])
    assert list(learner.tasks) == [t.name for t in tasks]


@pytest.mark.parametrize("method", BASELINES)
def test_checkpoint_round_trip(tiny_config, tasks, method, tmp_path):
    learner = make(tiny_config, method)
    for task in tasks:
        learner.learn(task)
    learner.save(tmp_path / "model")
    loaded = ContinualLearner.load(tmp_path / "model", device="cpu")
    assert loaded.method.hyperparameters() == learner.method.hyperparameters()
    for task in tasks:
        texts = [e.text for e in task.test]
        assert torch.equal(torch.stack(loaded.logits(texts, task.name)),
                           torch.stack(learner.logits(texts, task.name)))
    assert loaded.shared_state_numbers() == learner.shared_state_numbers()
    if method == "ewc":
        for a, b in zip(loaded.method.fisher, learner.method.fisher):
            assert torch.equal(a, b)
        for a, b in zip(loaded.method.anchor, learner.method.anchor):
            assert torch.equal(a, b)
    if method == "replay":
        assert loaded.method.buffer.to_json() == learner.method.buffer.to_json()
        loaded.learn(tasks[0].__class__("third", tasks[0].labels, tasks[0].train, tasks[0].test))


def test_replay_state_file_is_listed_and_verified(tiny_config, tasks, tmp_path):
    learner = make(tiny_config, "replay")
    learner.learn(tasks[0])
    learner.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    name = manifest["shared_json_file"]
    assert name in manifest["files"] and name.endswith(".json")
    state = json.loads((tmp_path / "model" / name).read_text())
    assert len(state["buffer"]["items"]) == len(tasks[0].train)
    learner.learn(tasks[1])
    learner.save(tmp_path / "model")  # the superseded state file stays for version 1 ...
    assert (tmp_path / "model" / name).exists()
    prune(tmp_path / "model", keep=1)  # ... until that version is pruned
    assert not (tmp_path / "model" / name).exists()
    name = json.loads((tmp_path / "model" / "manifest.json").read_text())["shared_json_file"]
    path = tmp_path / "model" / name
    path.write_text(path.read_text().replace("kinds", "kindz", 1))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        ContinualLearner.load(tmp_path / "model", device="cpu")


# -- ewc ---------------------------------------------------------------------------------------
def test_ewc_penalty_is_nonzero_after_first_task_and_pulls_toward_old_parameters(sensitive_backbone, tasks):
    learner = make(sensitive_backbone, "ewc", {"ewc_lambda": 50.0})
    method = learner.method
    assert method.penalty(learner.model).item() == 0.0  # nothing to protect yet
    learner.learn(tasks[0])
    anchor = [a.clone() for a in method.anchor]
    params = learner.model.adapter.parameters_of(SHARED)
    for p, a in zip(params, anchor):
        assert torch.equal(p.detach(), a)  # theta* is the end of task 1
    assert all(torch.all(f >= 0) for f in method.fisher)
    assert sum(f.sum().item() for f in method.fisher) > 0

    penalties = []
    learner.learn(tasks[1], progress=lambda done, total, loss: penalties.append(
        method.penalty(learner.model).item()))
    assert penalties[0] > 0 and max(penalties) > 0  # task 2 moved theta away from theta*

    # the penalty's gradient points away from theta*: a step against it goes back
    with torch.no_grad():
        shifted = [a + 0.1 * torch.randn_like(a) for a in anchor]
    for p, s in zip(params, shifted):
        p.data.copy_(s)
    method.anchor = anchor
    fisher = [f.clone() for f in method.fisher]
    penalty = method.penalty(learner.model)
    expected = 0.5 * 50.0 * sum((f * (s - a) ** 2).sum() for f, s, a in zip(fisher, shifted, anchor))
    torch.testing.assert_close(penalty, expected)
    grads = torch.autograd.grad(penalty, params)
    for g, f, s, a in zip(grads, fisher, shifted, anchor):
        torch.testing.assert_close(g, 50.0 * f * (s - a))
    # descent (-grad) points from theta back toward theta*
    alignment = sum((-g * (a - s)).sum().item() for g, s, a in zip(grads, shifted, anchor))
    assert alignment > 0


def test_ewc_fisher_is_the_mean_of_per_example_squared_gradients(tiny_config, tasks):
    """The batched computation must equal a plain loop over single examples (a Fisher from
    batch-mean gradients would be about B times smaller)."""
    learner = make(tiny_config, "ewc", {"fisher_examples": 10})
    task = tasks[0]
    learner.learn(task)
    states = learner.trunk_states(learner.backbone.tokenize([e.text for e in task.train]))
    batched = learner.method.fisher_diagonal(learner.model, task, states)
    generator = torch.Generator().manual_seed(task_seed(0, task.name) + 1)
    chosen = sorted(torch.randperm(len(task.train), generator=generator)[:10].tolist())
    params = learner.model.adapter.parameters_of(SHARED)
    loop = [torch.zeros_like(p) for p in params]
    index = task.label_index()
    for i in chosen:
        batch = learner.backbone.collate(learner.backbone.tokenize([task.train[i].text]))
        nll = torch.nn.functional.cross_entropy(
            learner.method.logits(learner.model, learner.model.trunk(batch), task.name),
            torch.tensor([index[task.train[i].label]]))
        for acc, g in zip(loop, torch.autograd.grad(nll, params)):
            acc += g**2
    for a, b in zip(batched, loop):
        torch.testing.assert_close(a, b / len(chosen), rtol=1e-4, atol=1e-9)
    assert learner.model.adapter.entries() == [SHARED]  # the per-row copies are gone


# -- lwf ---------------------------------------------------------------------------------------
def test_lwf_distils_from_the_frozen_snapshot(sensitive_backbone, tasks):
    learner = make(sensitive_backbone, "lwf", {"alpha": 1.0, "temperature": 2.0})
    method = learner.method
    old, new = tasks
    learner.learn(old)
    at_start = shared_state(learner)
    distillation, snapshots = [], []

    def watch(done, total, loss):
        snapshots.append({k: v.clone() for k, v in method.snapshot.items()})
        ids = learner.backbone.tokenize([e.text for e in new.train[:8]])
        with torch.no_grad(), learner.model.adapter.select([SHARED] * 8):
            pooled = learner.backbone(**learner.backbone.collate(ids))
        distillation.append(method.distillation(learner.model, pooled, list(range(8))).item())

    learner.learn(new, progress=watch)
    # the snapshot is the entry as it was when the task began, and never moved
    for snap in snapshots:
        for k, v in snap.items():
            assert torch.equal(v, at_start[k])
    assert any(not torch.equal(v, at_start[k]) for k, v in shared_state(learner).items())
    # the student drifts from the teacher: the term becomes non-zero
    assert distillation[-1] > 1e-3

    # the teacher's logits are the old head's logits under the snapshot entry
    again = tasks[0].__class__("again", new.labels, new.train, new.test)
    method.begin_task(learner.model, again, learner.trunk_states(
        learner.backbone.tokenize([e.text for e in new.train])))
    probe = "__probe"
    learner.model.adapter.load_state_of(probe, method.snapshot)
    texts = [e.text for e in new.train]
    batch = learner.backbone.collate(learner.backbone.tokenize(texts))
    with torch.no_grad(), learner.model.adapter.select([probe] * len(texts)):
        expected = learner.model.heads(learner.backbone(**batch), old.name)
    torch.testing.assert_close(method.teacher[old.name], expected, rtol=1e-4, atol=1e-5)
    assert set(method.teacher) == {old.name, new.name}


def test_lwf_distillation_changes_the_gradient(sensitive_backbone, tasks):
    learner = make(sensitive_backbone, "lwf")
    method = learner.method
    old, new = tasks
    learner.learn(old)
    ids = learner.backbone.tokenize([e.text for e in new.train])
    states = learner.trunk_states(ids)
    method.begin_task(learner.model, new, states)
    labels = torch.tensor([new.label_index()[e.label] for e in new.train])
    indices = list(range(8))
    params = learner.model.adapter.parameters_of(SHARED)
    with torch.no_grad():  # as after some training steps: the student has left the teacher
        for p in params:
            p.add_(0.2 * torch.randn_like(p))
    with_kd = torch.autograd.grad(method.batch_loss(learner.model, new, indices, states, labels), params)
    alpha, method.alpha = method.alpha, 0.0
    without = torch.autograd.grad(method.batch_loss(learner.model, new, indices, states, labels), params)
    method.alpha = alpha
    with learner.model.adapter.select([SHARED] * 8):
        pooled = learner.backbone(**learner.backbone.collate([ids[i] for i in indices]))
    assert method.distillation(learner.model, pooled, indices).item() > 1e-4
    difference = sum((a - b).abs().sum().item() for a, b in zip(with_kd, without))
    assert difference > 1e-6


# -- replay ------------------------------------------------------------------------------------
def test_reservoir_keeps_a_uniform_sample_of_everything_seen():
    capacity, per_task, n_tasks, runs = 50, 200, 5, 400
    task_counts = Counter()
    position_counts = Counter()
    for seed in range(runs):
        buffer = ReservoirBuffer(capacity, seed)
        for t in range(n_tasks):
            for i in range(per_task):
                buffer.offer(Memory(f"t{t}", str(i), "x"))
        assert len(buffer) == capacity and buffer.seen == per_task * n_tasks
        task_counts.update(m.task for m in buffer.items)
        position_counts.update((int(m.task[1]) * per_task + int(m.text)) // 100 for m in buffer.items)
    # every task holds capacity / n_tasks on average (10): the first task is not pushed out,
    # the last is not over-kept
    expected = runs * capacity / n_tasks
    for t in range(n_tasks):
        assert abs(task_counts[f"t{t}"] - expected) < 4 * expected**0.5, task_counts
    # and so does every block of 100 consecutive examples (chi-square, 9 dof, p < 0.001: 27.9)
    blocks = per_task * n_tasks // 100
    e = runs * capacity / blocks
    chi2 = sum((position_counts[b] - e) ** 2 / e for b in range(blocks))
    assert chi2 < 27.9, position_counts


def test_reservoir_is_reproducible_and_validated():
    a, b = ReservoirBuffer(3, seed=7), ReservoirBuffer(3, seed=7)
    for i in range(20):
        a.offer(Memory("t", str(i), "x"))
        b.offer(Memory("t", str(i), "x"))
    assert a.items == b.items
    assert ReservoirBuffer.from_json(a.to_json()).items == a.items
    with pytest.raises(ValueError, match="buffer capacity must be >= 1, got 0"):
        ReservoirBuffer(0)
    bad = {**a.to_json(), "capacity": 2}
    with pytest.raises(ValueError, match="replay buffer state is inconsistent"):
        ReservoirBuffer.from_json(bad)


def test_replay_mixes_old_tasks_into_batches_and_trains_their_heads(tiny_config, tasks):
    learner = make(tiny_config, "replay", {"buffer_size": 10, "replay_batch_size": 4})
    old, new = tasks
    learner.learn(old)
    assert len(learner.method.buffer) == 10 and {m.task for m in learner.method.buffer.items} == {old.name}
    head = {k: v.clone() for k, v in learner.model.heads.heads[old.name].state_dict().items()}
    learner.learn(new)
    assert any(not torch.equal(v, head[k]) for k, v in learner.model.heads.heads[old.name].state_dict().items()), \
        "replayed rows never reached the old task's head"
    held = Counter(m.task for m in learner.method.buffer.items)
    assert held[old.name] > 0 and held[new.name] > 0 and sum(held.values()) == 10
    learner.delete(old.name)
    assert {m.task for m in learner.method.buffer.items} == {new.name}


# -- forgetting: the harness sees it ------------------------------------------------------------
@pytest.fixture
def conflicting_stream(tmp_path):
    """Task 1 tells animals from food by vocabulary; task 2 uses the same words and tells only
    their order, which pulls the shared scale vectors somewhere else."""
    rng = random.Random(0)
    rows = []
    for split, n in (("train", 48), ("test", 32)):
        for i in range(n):
            label = ("animal", "food")[i % 2]
            w = rng.sample(WORDS[label], 3)
            rows.append({"task": "kinds", "split": split, "label": label,
                         "text": f"{w[0]} and {w[1]} with {w[2]}"})
    for split, n in (("train", 48), ("test", 32)):
        for i in range(n):
            a, f = rng.choice(WORDS["animal"]), rng.choice(WORDS["food"])
            label = ("first", "second")[i % 2]
            rows.append({"task": "order", "split": split, "label": label,
                         "text": f"{a} {f}" if label == "first" else f"{f} {a}"})
    return load_stream(write_jsonl(tmp_path / "conflict.jsonl", rows))


def test_finetune_forgets_while_ia3_does_not(sensitive_backbone, conflicting_stream):
    train = TrainConfig(epochs=4, batch_size=8, lr=0.1, head_lr=0.1)
    reports = {}
    for method in ("finetune", "ia3"):
        learner = ContinualLearner(sensitive_backbone, method=method, train=train, device="cpu")
        reports[method] = run_stream(conflicting_stream, learner)
    R = reports["ia3"]["accuracy_matrix"]
    assert R[0][0] >= 0.8 and R[1][0] == R[0][0]
    assert reports["ia3"]["metrics"]["bwt"] == 0.0
    F = reports["finetune"]["accuracy_matrix"]
    assert F[0][0] == R[0][0]  # the same first task, the same start
    assert reports["finetune"]["metrics"]["bwt"] <= -0.2, F
    assert reports["finetune"]["metrics"]["forgetting"] >= 0.2


# -- joint -------------------------------------------------------------------------------------
def test_joint_learns_all_tasks_at_once_and_reports_only_the_last_row(tiny_config, tasks, tmp_path):
    learner = make(tiny_config, "joint")
    with pytest.raises(ValueError, match="method 'joint' learns all tasks at once"):
        learner.learn(tasks[0])
    assert not learner.tasks and learner.model.adapter.entries() == []
    report = run_joint(tasks, learner, tmp_path / "joint")
    R = report["accuracy_matrix"]
    assert R[0] == [None, None] and all(v is not None for v in R[1])
    assert report["metrics"]["bwt"] is None and report["metrics"]["forgetting"] is None
    assert report["metrics"]["acc"] == pytest.approx(sum(R[1]) / 2)
    steps = {r["train_stats"]["steps"] for r in report["per_task"]}
    assert steps == {2 * 6}  # 48 examples / batch 8, 2 epochs: as many steps as one after another
    assert learner.model.adapter.entries() == [SHARED] and set(learner.model.heads.heads) == {"kinds", "topics"}
    loaded = ContinualLearner.load(tmp_path / "joint" / "model", device="cpu")
    texts = [e.text for e in tasks[1].test]
    assert torch.equal(torch.stack(loaded.logits(texts, "topics")),
                       torch.stack(learner.logits(texts, "topics")))
    with pytest.raises(ValueError, match="joint training starts from an empty model"):
        learner.learn_jointly(tasks)
    with pytest.raises(ValueError, match="method 'ia3' learns tasks one after another"):
        make(tiny_config, "ia3").learn_jointly(tasks)


def test_baseline_options_are_validated():
    with pytest.raises(ValueError, match="ewc_lambda must be >= 0, got -1"):
        make_method("ewc", {"ewc_lambda": -1})
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        make_method("lwf", {"temperature": 0})
    with pytest.raises(ValueError, match="replay_batch_size must be >= 1, got 0"):
        make_method("replay", {"replay_batch_size": 0})


def test_ctt_run_with_a_baseline_and_with_joint(tiny_backbone_dir, toy_stream, tmp_path):
    from typer.testing import CliRunner

    from continual_transformer.cli import app

    common = ["--epochs", "1", "--backbone", str(tiny_backbone_dir), "--max-length", "32",
              "--device", "cpu"]
    result = CliRunner().invoke(app, ["run", str(toy_stream), "--method", "joint", "--out",
                                      str(tmp_path / "joint"), *common], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "BWT n/a" in result.output and "forgetting n/a" in result.output
    report = json.loads((tmp_path / "joint" / "report.json").read_text())
    assert report["method"]["name"] == "joint" and report["accuracy_matrix"][0] == [None, None]
    result = CliRunner().invoke(app, ["run", str(toy_stream), "--method", "lwf", "--out",
                                      str(tmp_path / "lwf"), *common], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "lwf" / "report.json").read_text())
    assert report["method"]["hyperparameters"]["temperature"] == 2.0
    assert report["fwt_reference"].startswith("b_i")  # shared state: FWT is measured
