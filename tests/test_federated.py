"""Federated learning of one task: clients' updates, the server's checks and sums, and whole
runs in Flower's simulation engine and as real SuperLink/SuperNode processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WORDS, write_jsonl
from continual_transformer.config import LearnerSpec, TrainConfig
from continual_transformer.federated.local import (
    TRAINED, client_learner, learn_locally, read_shard)
from continual_transformer.federated.merge import Federation
from continual_transformer.learner import ContinualLearner
from continual_transformer.types import Example, StreamError, Task

ROUTER = {"n_features": 64}
TRAIN = TrainConfig(epochs=2, batch_size=8, lr=0.1, head_lr=0.3, precision="fp32")
LABELS = ("animal", "food", "sport")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def rows(task: str, labels, n: int, split: str, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(WORDS[label], 3)
        out.append({"task": task, "split": split, "label": label,
                    "text": f"{words[0]} and {words[1]} with {words[2]}"})
    return out


def shard_rows(i: int) -> list[dict]:
    """Label-skewed: client 0 sees animal+food, 1 food+sport, 2 sport+animal, 3 all three."""
    pairs = [("animal", "food"), ("food", "sport"), ("sport", "animal"), LABELS]
    return rows("kinds", pairs[i % 4], 18, "train", seed=10 + i)


def as_task(items: list[dict], labels=LABELS) -> Task:
    train = tuple(Example(r["text"], r["label"]) for r in items if r["split"] == "train")
    test = tuple(Example(r["text"], r["label"]) for r in items if r["split"] == "test")
    return Task("kinds", tuple(labels), train, test)


def ia3_spec(tiny_config, **train) -> LearnerSpec:
    return LearnerSpec(tiny_config, "ia3", {"train": TrainConfig(**{**TRAIN.to_dict(), **train}).to_dict(),
                                            "adapt_layers": 1, "lexical": False}, ROUTER)


def federate(server, shards: list[Task], rounds: int, **local) -> Federation:
    """The server's and clients' work without Flower: what the apps exchange."""
    federation = Federation(server, "kinds", LABELS)
    client = client_learner(server.spec())
    for server_round in range(1, (1 if federation.one_round else rounds) + 1):
        start = {k[len(TRAINED):]: v for k, v in federation.trained.items()} or None
        replies = []
        for i, shard in enumerate(shards):
            update = learn_locally(client, shard, LABELS, start=start, server_round=server_round,
                                   statistics=federation.needs_statistics(f"c{i}"), **local)
            replies.append((f"c{i}", update.tensors, update.examples))
        federation.aggregate(server_round, replies, [], min_clients=1)
    return federation


def test_one_client_one_round_is_exactly_learning_the_task(tiny_config):
    """FedAvg over one client for one round is `learn` of its shard, bit for bit: the same
    start, batch order, scales, head and router statistics."""
    spec = ia3_spec(tiny_config)
    shard = as_task(shard_rows(3))
    federation = federate(ContinualLearner.from_spec(spec, device="cpu"), [shard], rounds=1)
    tensors, shared = federation.task_tensors()

    central = ContinualLearner.from_spec(spec, device="cpu")
    central.router.hold_out = False  # as clients learn: no calibration sample leaves them
    central.router.reads_words = False  # nor their words
    central.learn(shard)
    expected = central.task_tensors("kinds")
    # A task learned by clients has no fingerprint of its texts' features (those stay there).
    assert expected.pop("router.fingerprint").shape == (32,)
    assert sorted(tensors) == sorted(expected)
    for name in expected:
        assert torch.equal(tensors[name].to(expected[name].dtype), expected[name]), name
    assert torch.equal(shared["router.gram_upper"], central.shared_tensors()["router.gram_upper"])


def test_federated_ia3_learns_and_router_statistics_are_the_clients_sum(tiny_config, tmp_path):
    spec = ia3_spec(tiny_config)
    shards = [as_task(shard_rows(i)) for i in range(3)]
    test = as_task(rows("kinds", LABELS, 30, "test", seed=99))
    server = ContinualLearner.from_spec(spec, device="cpu")
    federation = federate(server, shards, rounds=3)
    assert federation.evaluate(test) >= 0.6  # chance is 1/3
    assert not server.tasks  # evaluating put the model back as it was

    union = Task("kinds", LABELS, tuple(e for s in shards for e in s.train))
    central = ContinualLearner.from_spec(spec, device="cpu")
    central.router.hold_out = False  # as clients learn
    central.learn(union)
    tensors, shared = federation.task_tensors()
    for name in ("router.sums", "router.counts"):
        assert torch.allclose(tensors[name], central.task_tensors("kinds")[name], rtol=1e-9, atol=1e-9)
    assert torch.allclose(shared["router.gram_upper"], central.shared_tensors()["router.gram_upper"],
                          rtol=1e-9, atol=1e-9)


def test_fedprox_keeps_a_client_nearer_the_global_tensors(tiny_config):
    shard = as_task(shard_rows(0))
    server = ContinualLearner.from_spec(ia3_spec(tiny_config, epochs=3), device="cpu")
    start = {k[len(TRAINED):]: v for k, v in Federation(server, "kinds", LABELS).trained.items()}
    client = client_learner(server.spec())

    def distance(mu: float) -> float:
        update = learn_locally(client, shard, LABELS, start=start, mu=mu, statistics=False)
        return sum(float(((update.tensors[TRAINED + k] - v) ** 2).sum()) for k, v in start.items())

    assert distance(50.0) < 0.5 * distance(0.0)
    assert "kinds" not in client.tasks  # the client's learner is left as it was


def test_analytic_in_one_round_equals_centralised(tiny_config):
    spec = LearnerSpec(tiny_config, "analytic", {"seed": 0})
    shards = [as_task(shard_rows(i)) for i in range(3)]
    server = ContinualLearner.from_spec(spec, device="cpu")
    federation = federate(server, shards, rounds=5)
    assert len(federation.rounds) == 1
    tensors, shared = federation.task_tensors()
    server.import_task(federation.record(), tensors, shared)

    central = ContinualLearner.from_spec(spec, device="cpu")
    central.learn(Task("kinds", LABELS, tuple(e for s in shards for e in s.train)))
    mine, theirs = server.state(), central.state()
    for name, value in theirs.tasks[0].tensors.items():
        assert (mine.tasks[0].tensors[name] - value).abs().max() <= 1e-6, name
    gram = mine.shared_tensors["gram_upper"] - theirs.shared_tensors["gram_upper"]
    assert gram.abs().max() <= 1e-6
    texts = [r["text"] for r in rows("kinds", LABELS, 30, "test", seed=5)]
    ours, central_logits = torch.stack(server.logits(texts, "kinds")), torch.stack(central.logits(texts, "kinds"))
    assert (ours - central_logits).abs().max() <= 1e-6
    assert [p.label for p in server.predict(texts)] == [p.label for p in central.predict(texts)]


def test_replies_of_wrong_shape_or_not_finite_are_refused_never_averaged(tiny_config):
    server = ContinualLearner.from_spec(ia3_spec(tiny_config), device="cpu")
    client = client_learner(server.spec())
    federation = Federation(server, "kinds", LABELS)
    good = learn_locally(client, as_task(shard_rows(0)), LABELS).tensors
    nan = {k: v.clone() for k, v in good.items()}
    nan[TRAINED + "head.bias"][0] = float("nan")
    inf = {k: v.clone() for k, v in good.items()}
    inf["shared/router.gram_upper"][3] = float("inf")
    wide = {k: v.clone() for k, v in good.items()}
    wide[TRAINED + "head.weight"] = torch.zeros(4, 32)
    averaged = federation.aggregate(1, [("good", good, 18), ("nan", nan, 18), ("inf", inf, 18),
                                        ("wide", wide, 100)], [("gone", "client gone: killed")], 1)
    for name, value in averaged.items():
        assert torch.equal(value, good[name]), name
    reasons = {r.client: r.reason for r in federation.refusals}
    assert reasons["nan"] == "client nan: tensor 'trained/head.bias' has 1 values that are NaN or Inf"
    assert reasons["inf"] == "client inf: tensor 'shared/router.gram_upper' has 1 values that are NaN or Inf"
    assert reasons["wide"] == "client wide: tensor 'trained/head.weight' has shape (4, 32), expected (3, 32)"
    assert reasons["gone"] == "client gone: killed"
    assert sorted(federation.statistics) == ["good"]
    with pytest.raises(RuntimeError, match="round 2: 0 usable replies, fewer than min_clients=1"):
        federation.aggregate(2, [("nan", nan, 18)], [], 1)


def test_a_shard_that_fails_validation_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "client.jsonl", shard_rows(0))
    lines = path.read_text().splitlines()
    lines[4] = json.dumps({"task": "kinds", "split": "train", "text": "", "label": "food"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StreamError, match=f"^{path}:5: empty text$"):
        read_shard(path, "kinds")


def test_core_modules_never_import_flower_and_apps_say_how_to_install_it():
    code = ("import sys; import continual_transformer.cli, continual_transformer.learner, "
            "continual_transformer.federated.local, continual_transformer.federated.merge; "
            "assert 'flwr' not in sys.modules, 'flwr imported'; sys.modules['flwr'] = None\n"
            "try:\n    import continual_transformer.federated.apps\n"
            "except ImportError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert out.returncode == 0, out.stderr
    assert "pip install 'continual-tiny-transformer[federated]'" in out.stdout


# -- whole runs with Flower ------------------------------------------------------------------
flwr = pytest.importorskip("flwr")


def test_simulation_survives_a_killed_client_a_nan_client_and_a_bad_shard(tiny_config, tmp_path, caplog):
    """Five simulated clients: two good, one that sends NaN tensors, one killed in the middle
    of round 2, one whose shard fails validation. The run finishes with the good ones, says
    what it refused and why, and the old task in the model is unchanged bit for bit."""
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp

    from continual_transformer.federated.apps import FederatedConfig, query_reply, simulate, train_reply

    model = tmp_path / "model"
    old = ContinualLearner.from_spec(ia3_spec(tiny_config), device="cpu")
    old.learn(Task("topics", ("color", "sport"), tuple(
        Example(r["text"], r["label"]) for r in rows("topics", ("color", "sport"), 16, "train", 1))))
    old.save(model)
    probe = [r["text"] for r in rows("topics", ("color", "sport"), 8, "test", 2)]
    old_logits = torch.stack(ContinualLearner.load(model, "cpu", "fp32").logits(probe, "topics"))

    paths = [write_jsonl(tmp_path / f"client-{i}.jsonl", shard_rows(i)) for i in range(5)]
    bad = paths[4].read_text().splitlines()
    bad[1] = '{"task": "kinds", "split": "train", "text": "a cat"}'
    paths[4].write_text("\n".join(bad) + "\n")
    test = write_jsonl(tmp_path / "test.jsonl", rows("kinds", LABELS, 30, "train", 7)
                       + rows("kinds", LABELS, 30, "test", 8))
    config = FederatedConfig(
        model=str(model), task="kinds", rounds=2, min_clients=2, min_available=5,
        shards=",".join(map(str, paths)), test=str(test), round_timeout=120)

    app = ClientApp()

    @app.query()
    def query(message, context):
        return query_reply(message, context, config)

    @app.train()
    def train(message, context):
        client = int(context.node_config["partition-id"])
        if client == 3 and int(message.content["config"]["server-round"]) == 2:
            os._exit(1)  # the client's process dies in the middle of the round
        reply = train_reply(message, context, config)
        if client == 2:
            tensors = reply.content["arrays"].to_torch_state_dict()
            tensors[TRAINED + "head.weight"][0, 0] = float("nan")
            reply.content["arrays"] = ArrayRecord(tensors)
        return reply

    caplog.set_level(logging.INFO, logger="flwr.continual_transformer")
    # One Ray actor per client: a killed actor also fails the messages queued on it.
    result = simulate(config, 5, client_app_=app, cpus_per_client=0.4)

    log = caplog.text
    assert "client-4.jsonl:2: missing field 'label'" in log
    assert "does not join" in log
    refused = {(r["round"], r["client"].split("(")[-1].rstrip(")")): r["reason"] for r in result.refused}
    assert "tensor 'trained/head.weight' has 1 values that are NaN or Inf" in refused[(1, "client-2.jsonl")]
    assert (2, "client-3.jsonl") in refused and (2, "client-2.jsonl") in refused
    assert len(result.refused) == 3
    assert "refused client node" in log and "NaN or Inf" in log
    federated = result.record["stats"]["federated"]
    assert [len(r["accepted"]) for r in federated["rounds"]] == [3, 2]
    assert federated["clients"] == 3  # statistics from the clients accepted in round 1

    loaded = ContinualLearner.load(model, "cpu", "fp32")
    assert list(loaded.tasks) == ["topics", "kinds"]
    assert torch.equal(torch.stack(loaded.logits(probe, "topics")), old_logits)
    assert loaded.task_tensors("topics").keys() == old.task_tensors("topics").keys()
    for name, value in old.task_tensors("topics").items():
        assert torch.equal(loaded.task_tensors("topics")[name], value), name
    assert result.accuracy_per_round[2] == pytest.approx(loaded.evaluate(as_task(
        [json.loads(line) for line in test.read_text().splitlines()])))


def test_real_superlink_and_two_supernodes_learn_the_task(tiny_backbone_dir, tmp_path):
    """`flower-superlink`, two `flower-supernode`s on 127.0.0.1 and `flwr run` of deploy/flower:
    separate processes over HTTP, each SuperNode reading its own shard."""
    import shutil
    import socket
    import time

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    link, nodes = free_port(), [free_port(), free_port()]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "PYTHONPATH": SRC, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    shards = [write_jsonl(tmp_path / f"client-{i}.jsonl", shard_rows(i)) for i in range(2)]
    test = write_jsonl(tmp_path / "test.jsonl", rows("kinds", LABELS, 12, "train", 7)
                       + rows("kinds", LABELS, 12, "test", 8))
    app = tmp_path / "app"
    shutil.copytree(Path(__file__).resolve().parents[1] / "deploy" / "flower", app)
    model = tmp_path / "model"
    started = []

    def start(*command: str, log: str) -> None:
        out = open(tmp_path / log, "w")
        started.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True))

    try:
        start("flower-superlink", "--insecure", "--port", str(link),
              "--disable-runtime-dependency-installation", log="superlink.log")
        deadline = time.monotonic() + 60
        while True:  # until the SuperLink listens
            try:
                socket.create_connection(("127.0.0.1", link), timeout=1).close()
                break
            except OSError:
                assert started[0].poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "superlink.log").read_text()
                time.sleep(0.2)
        for i, port in enumerate(nodes):
            start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(port), "--node-config", f'shard="{shards[i]}"', log=f"supernode-{i}.log")
        # the ServerApp waits (up to round-timeout) until min-available=2 SuperNodes have joined
        run = subprocess.run(
            ["flwr", "run", str(app), "local", "--stream", "--run-config",
             f"model='{model}' task='kinds' rounds=2 backbone='{tiny_backbone_dir}' max-length=32 "
             f"adapt-layers=1 test='{test}' round-timeout=90.0"],
            capture_output=True, text=True, timeout=240, env=env)
    finally:
        for process in started:  # each in its own session: its SuperExec children go with it
            os.killpg(process.pid, 15)
            process.wait(timeout=30)
    output = run.stdout + run.stderr
    assert "client node" in output and "(client-0.jsonl) joins" in output and "(client-1.jsonl) joins" in output
    assert "round 2: averaged 2 clients" in output
    loaded = ContinualLearner.load(model, "cpu", "fp32")
    assert list(loaded.tasks) == ["kinds"]
    assert loaded.tasks["kinds"].train_examples == 36
    assert loaded.tasks["kinds"].stats["federated"]["clients"] == 2
