"""Federated learning of one bundled task with Flower's simulation engine, against centralised
training on the union of the clients' shards (the real MiniLM backbone, CPU).

    python benchmarks/federated.py [--task wordnet_supersense] [--clients 4] [--rounds 6]
                                   [--epochs 1] [--max-train 1000] [--out runs/bench-federated]

Prints: (1) ia3: centralised accuracy (lexical branch off, as federated tasks have none), the
federated accuracy after each round, the rounds needed to come within 2 points, bytes each
client sent per round; (2) analytic: the largest difference between the federated (one round)
and centralised statistics and logits, and whether every predicted label is the same; (3) a
run in which one client is killed in round 2 and one sends NaN tensors: what was refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from continual_transformer.config import BackboneConfig, LearnerSpec, TrainConfig
from continual_transformer.data.source import load_tasks
from continual_transformer.data.stream import default_stream_path
from continual_transformer.federated.apps import (
    FederatedConfig, query_reply, simulate, simulate_stream, train_reply)
from continual_transformer.learner import ContinualLearner
from continual_transformer.types import Task


def centralised(spec: LearnerSpec, union: Task, test: Task) -> tuple[ContinualLearner, float, float]:
    learner = ContinualLearner.from_spec(spec, device="cpu")
    start = time.perf_counter()
    learner.learn(union)
    seconds = time.perf_counter() - start
    return learner, learner.evaluate(Task(union.name, union.labels, union.train, test.test)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="wordnet_supersense")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-federated"))
    parser.add_argument("--faults-only", action="store_true",
                        help="only part 3, on the shards part 1 wrote to --out before")
    parser.add_argument("--analytic-only", action="store_true", help="only part 2")
    args = parser.parse_args()
    if args.faults_only:
        return faults(args, default_stream_path())
    shutil.rmtree(args.out, ignore_errors=True)
    stream = default_stream_path()
    task = {t.name: t for t in load_tasks(stream)}[args.task]
    union = task.subsample_train(args.max_train, 0)
    backbone = BackboneConfig("default")
    if args.analytic_only:
        return analytic(args, stream, task, union, backbone)

    # -- 1. ia3 ----------------------------------------------------------------------------
    config = FederatedConfig(task=args.task, rounds=args.rounds, epochs=args.epochs, min_clients=2)
    start = time.perf_counter()
    result = simulate_stream(stream, config, args.clients, args.out / "ia3", alpha=args.alpha,
                             union_max_train=args.max_train)
    fed_seconds = time.perf_counter() - start
    shards = [len(load_tasks(p, require_test=False)[0].train) for p in
              sorted((args.out / "ia3" / "shards").iterdir())]
    labels = [sorted({e.label for e in load_tasks(p, require_test=False)[0].train}) for p in
              sorted((args.out / "ia3" / "shards").iterdir())]
    spec = LearnerSpec(backbone, "ia3", {"train": TrainConfig().to_dict(), "adapt_layers": None,
                                         "lexical": False})
    _, central_accuracy, central_seconds = centralised(spec, union, task)
    print(f"\n== ia3: task {args.task}, {len(union.train)} training texts over {args.clients} "
          f"label-skewed clients (Dirichlet alpha {args.alpha}): {shards} texts")
    for i, found in enumerate(labels):
        print(f"   client {i} labels: {found}")
    print(f"centralised (3 epochs on the union, no lexical branch): {100 * central_accuracy:.2f} % "
          f"({central_seconds:.1f} s)")
    needed = None
    for rnd, accuracy in sorted(result.accuracy_per_round.items(), key=lambda kv: int(kv[0])):
        sent = result.bytes_per_client_round.get(rnd) or result.bytes_per_client_round.get(str(rnd))
        print(f"round {rnd}: federated {100 * accuracy:.2f} %; bytes sent per client {sent}")
        if needed is None and accuracy >= central_accuracy - 0.02:
            needed = rnd
    final = result.accuracy_per_round[max(result.accuracy_per_round)]
    print(f"final: federated {100 * final:.2f} % vs centralised {100 * central_accuracy:.2f} % "
          f"(difference {100 * (final - central_accuracy):+.2f} points); within 2 points after "
          f"round {needed}; federated run {fed_seconds:.1f} s")

    analytic(args, stream, task, union, backbone)
    faults(args, stream)


def analytic(args, stream, task, union, backbone) -> None:
    """Part 2: analytic in one round against centralised, statistics, logits, probabilities."""
    config = FederatedConfig(task=args.task, method="analytic", min_clients=2)
    simulate_stream(stream, config, args.clients, args.out / "analytic", alpha=args.alpha,
                    union_max_train=args.max_train)
    federated = ContinualLearner.load(args.out / "analytic" / "model", "cpu", "fp32")
    central = ContinualLearner.from_spec(LearnerSpec(backbone, "analytic", {"seed": 0}), device="cpu")
    central.learn(union)
    mine, theirs = federated.state(), central.state()
    stats = max(float((mine.tasks[0].tensors[k] - v).abs().max()) for k, v in theirs.tasks[0].tensors.items())
    gram = float((mine.shared_tensors["gram_upper"] - theirs.shared_tensors["gram_upper"]).abs().max())
    texts = [e.text for e in task.test]
    ours = torch.stack(federated.logits(texts, args.task, precision="fp32"))
    reference = torch.stack(central.logits(texts, args.task, precision="fp32"))
    same = [p.label for p in federated.predict(texts, task=args.task, precision="fp32")] == \
           [p.label for p in central.predict(texts, task=args.task, precision="fp32")]
    print(f"\n== analytic, one round, {args.clients} clients: largest difference from centralised: "
          f"class statistics {stats:.3g}, Gram matrix {gram:.3g}, logits on {len(texts)} test texts "
          f"{float((ours - reference).abs().max()):.3g} (relative to the largest logit "
          f"{float((ours - reference).abs().max() / reference.abs().max()):.3g}), predicted "
          f"probabilities {float((ours.softmax(-1) - reference.softmax(-1)).abs().max()):.3g}; "
          f"identical labels: {same}; accuracy "
          f"{100 * federated.evaluate(task):.2f} % (centralised {100 * central.evaluate(task):.2f} %)")


def faults(args, stream) -> None:
    # Each client gets its own Ray actor (cpus_per_client 0.5 on 2 CPUs, 4 clients): a killed
    # actor also fails the messages queued on it, so clients sharing one would die with it.
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp

    paths = sorted((args.out / "ia3" / "shards").iterdir())
    config = FederatedConfig(model=str(args.out / "faults" / "model"), task=args.task, rounds=2,
                             epochs=args.epochs, min_clients=2, min_available=len(paths),
                             shards=",".join(map(str, paths)), test=str(stream))
    app = ClientApp()

    @app.query()
    def query(message, context):
        return query_reply(message, context, config)

    @app.train()
    def train(message, context):
        client = int(context.node_config["partition-id"])
        if client == 1 and int(message.content["config"]["server-round"]) == 2:
            os._exit(1)  # killed in the middle of round 2
        reply = train_reply(message, context, config)
        if client == 2:
            tensors = reply.content["arrays"].to_torch_state_dict()
            tensors["trained/head.weight"][0, 0] = float("nan")
            reply.content["arrays"] = ArrayRecord(tensors)
        return reply

    faulty = simulate(config, len(paths), client_app_=app, cpus_per_client=0.5)
    print("\n== faults: client 1 killed in round 2, client 2 sends NaN every round")
    for refusal in faulty.refused:
        print(f"refused in round {refusal['round']}: {refusal['reason'][:200]}")
    print("rounds:", json.dumps(faulty.record["stats"]["federated"]["rounds"]))
    print(f"finished: task saved with {faulty.record['stats']['federated']['clients']} clients' "
          f"statistics; test accuracy per round {faulty.accuracy_per_round}")


if __name__ == "__main__":
    main()
