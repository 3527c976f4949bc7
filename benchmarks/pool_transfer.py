"""Transfer between tasks: a new scale entry started from a related task's entry against one
started from all ones (the pool's choice for a new entry, docs/pool.md).

    python benchmarks/pool_transfer.py                        # the pairs below, scale stream
    python benchmarks/pool_transfer.py --pairs deb_section_apps:deb_fr_section_apps --max-train 300

For each (source, target) pair of the stream: the source is learned (`ia3`, no lexical branch:
the scales and head alone); then the target is learned twice, from all ones and from the
source's entry, with the same head initialisation, batches and steps. Every `--every` steps the
target's test accuracy is measured. Printed per pair: the TransRate gain of the source's entry
over all ones and the LEEP of its head on the target's training texts (what the pool decides
with, before any training), both final accuracies (their difference is the forward transfer
against all ones), and the steps each start needs to reach the accuracy all ones ends with.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from continual_transformer.config import TrainConfig
from continual_transformer.data.source import load_tasks
from continual_transformer.learner import ContinualLearner
from continual_transformer.methods.base import GradientMethod
from continual_transformer.methods.ia3 import IA3Method
from continual_transformer.methods.transfer import (heads_probs, label_entropy, leep,
                                                    pooled_features, transrate)

ROOT = Path(__file__).resolve().parents[1]
# Pairs with the same labels from another source or language (related on purpose), and one
# pair with nothing in common (the control).
PAIRS = ("deb_section_apps:deb_fr_section_apps", "po_program_en:po_program_fr",
         "man_section_en:man_de_section", "sotu_president:deb_fr_section_apps")


class StartFrom(IA3Method):
    """`ia3` whose next task's entry starts as a copy of entry `start` (None: all ones), as a
    pool's new entry does."""

    start: str | None = None

    def begin_task(self, model, task, states) -> None:
        super().begin_task(model, task, states)
        if self.start is not None:
            model.adapter.load_state_of(task.name, model.adapter.state_of(self.start))


@torch.inference_mode()
def accuracy(model, name: str, states, labels: torch.Tensor) -> float:
    features = pooled_features(model, states, name).to(model.device)  # (N, H)
    return float((model.heads(features, name).argmax(-1).cpu() == labels).float().mean())


def learn_traced(learner, method: StartFrom, task, start, every: int, test_states, test_y):
    """Learn `task` from entry `start` (None: ones); its test accuracy every `every` steps."""
    method.start = start
    trace = []

    def on_step(step: int, steps_per_epoch: int) -> None:
        if step % every == 0:
            trace.append((step, accuracy(learner.model, task.name, test_states, test_y)))

    model = learner.model
    with model.training_kernels():
        states = learner.trunk_states(learner.backbone.tokenize([e.text for e in task.train]))
        stats = GradientMethod.learn(method, model, task, states, None, on_step=on_step)
    final = accuracy(model, task.name, test_states, test_y)
    if not trace or trace[-1][0] != stats["steps"]:
        trace.append((stats["steps"], final))
    return final, trace


def steps_to(trace, target: float) -> int | None:
    return next((step for step, acc in trace if acc >= target - 1e-9), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream", type=Path, default=ROOT / "data/scale/scale_stream.jsonl.gz")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS))
    parser.add_argument("--max-train", type=int, default=400)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    names = {n for pair in args.pairs for n in pair.split(":")}
    tasks = {t.name: t.subsample_train(args.max_train, 0) for t in load_tasks(args.stream)
             if t.name in names}
    train = TrainConfig(epochs=args.epochs, precision="fp32")
    method = StartFrom(train, lexical=False)
    learner = ContinualLearner("default", method=method, device="cpu")
    results = []
    for pair in args.pairs:
        source, target = (tasks[n] for n in pair.split(":"))
        began = time.perf_counter()
        if source.name not in learner.tasks:
            method.start = None
            learner.learn(source)
        test = target.test[: args.max_test]
        index = target.label_index()
        test_states = learner.trunk_states(learner.backbone.tokenize([e.text for e in test]), store=True)
        test_y = torch.tensor([index[e.label] for e in test])
        train_states = learner.trunk_states(learner.backbone.tokenize([e.text for e in target.train]))
        train_y = torch.tensor([index[e.label] for e in target.train])
        ones_rate = transrate(pooled_features(learner.model, train_states, None), train_y)
        source_features = pooled_features(learner.model, train_states, source.name)
        gain = transrate(source_features, train_y) / ones_rate - 1
        leep_gain = (leep(heads_probs(learner.model, [source.name], source_features), train_y,
                          len(target.labels)) + label_entropy(train_y, len(target.labels)))
        runs = {}
        for start in (None, source.name):
            final, trace = learn_traced(learner, method, target, start, args.every, test_states, test_y)
            learner.model.adapter.remove(target.name)
            learner.model.heads.remove(target.name)
            runs["ones" if start is None else "transfer"] = {"final": final, "trace": trace}
        reference = runs["ones"]["final"]
        ones_steps = steps_to(runs["ones"]["trace"], reference)
        transfer_steps = steps_to(runs["transfer"]["trace"], reference)
        row = {"pair": pair, "transrate_gain": gain, "leep_gain": leep_gain,
               "acc_ones": reference, "acc_transfer": runs["transfer"]["final"],
               "fwt_vs_ones": runs["transfer"]["final"] - reference,
               "steps_ones": ones_steps, "steps_transfer": transfer_steps,
               "total_steps": runs["ones"]["trace"][-1][0],
               "seconds": round(time.perf_counter() - began, 1), "runs": runs}
        results.append(row)
        fewer = ("-" if transfer_steps is None
                 else f"{100 * (1 - transfer_steps / ones_steps):.0f} % fewer")
        print(f"{pair}: TransRate gain {gain:+.3f}, LEEP gain {leep_gain:+.3f}; acc ones "
              f"{100 * reference:.2f} transfer {100 * row['acc_transfer']:.2f} (FWT vs ones "
              f"{100 * row['fwt_vs_ones']:+.2f}); steps to {100 * reference:.2f}: ones {ones_steps}, "
              f"transfer {transfer_steps} ({fewer}) of {row['total_steps']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
