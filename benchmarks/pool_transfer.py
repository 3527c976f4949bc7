"""Transfer between tasks: a new scale entry started from a related task's entry against one
started from all ones (the pool's choice for a new entry, docs/pool.md).

    python benchmarks/pool_transfer.py                        # the pairs below, scale stream
    python benchmarks/pool_transfer.py --pairs deb_section_apps:deb_fr_section_apps --max-train 300

For each (source, target) pair of the stream: the source is learned (`ia3`, no lexical branch:
the scales and head alone); then the target is learned three times with the same batches and steps:
from all ones and a fresh head; from the source's entry and a fresh head; and as a pool starts
it (the entry from the source when its TransRate gain is above 0, and the head's rows for labels
an old task already knows copied from that task's head, `label_source`). Every `--every` steps the
target's test accuracy is measured. Printed per pair: the TransRate gain of the source's entry
over all ones and the LEEP of its head on the target's training texts (what the pool decides
with, before any training), the final accuracies (their differences to all ones are the forward
transfer), and the steps each start needs to reach the accuracy all ones ends with.
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
from continual_transformer.methods.transfer import (heads_probs, label_entropy, label_source,
                                                    leep, pooled_features, start_head_from,
                                                    transrate)

ROOT = Path(__file__).resolve().parents[1]
# Pairs with the same labels from another source or language (related on purpose), and one
# pair with nothing in common (the control).
PAIRS = ("deb_section_apps:deb_fr_section_apps", "po_program_en:po_program_fr",
         "man_section_en:man_de_section", "sotu_president:deb_fr_section_apps")


class StartFrom(IA3Method):
    """`ia3` whose next task's entry starts as a copy of entry `start` (None: all ones), as a
    pool's new entry does, and whose head starts from `head` (an old task and the labels it
    shares, `label_source`) when set, as a pool's head does."""

    start: str | None = None
    head: tuple[str, list[str]] | None = None

    def begin_task(self, model, task, states) -> None:
        super().begin_task(model, task, states)
        if self.start is not None:
            model.adapter.load_state_of(task.name, model.adapter.state_of(self.start))
        if self.head is not None:
            start_head_from(model.heads, task.name, *self.head)


@torch.inference_mode()
def accuracy(model, name: str, states, labels: torch.Tensor) -> float:
    features = pooled_features(model, states, name).to(model.device)  # (N, H)
    return float((model.heads(features, name).argmax(-1).cpu() == labels).float().mean())


def learn_traced(learner, method: StartFrom, task, start, head, every: int, test_states, test_y):
    """Learn `task` from entry `start` (None: ones) and head `head` (None: the seeded
    initialisation); its test accuracy every `every` steps."""
    method.start, method.head = start, head
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
            method.start, method.head = None, None
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
        # What a pool does: the entry from the source when its gain is above 0 (the default
        # transfer_margin), the head's shared labels from the old head that knows them.
        head_source, shared = label_source(learner.model.heads, tuple(target.labels), target.name)
        pool_start = (source.name if gain > 0 else None,
                      (head_source, shared) if head_source is not None else None)
        runs = {}
        for kind, (start, head) in (("ones", (None, None)), ("entry", (source.name, None)),
                                    ("pool", pool_start)):
            final, trace = learn_traced(learner, method, target, start, head, args.every,
                                        test_states, test_y)
            learner.model.adapter.remove(target.name)
            learner.model.heads.remove(target.name)
            runs[kind] = {"final": final, "trace": trace}
        reference = runs["ones"]["final"]
        steps = {kind: steps_to(run["trace"], reference) for kind, run in runs.items()}
        row = {"pair": pair, "transrate_gain": gain, "leep_gain": leep_gain,
               "pool_start": {"entry": pool_start[0] or "ones", "head": head_source,
                              "shared_labels": len(shared)},
               "accuracy": {kind: run["final"] for kind, run in runs.items()},
               "fwt_vs_ones": {kind: run["final"] - reference for kind, run in runs.items()},
               "steps_to_ones_accuracy": steps, "total_steps": runs["ones"]["trace"][-1][0],
               "seconds": round(time.perf_counter() - began, 1), "runs": runs}
        results.append(row)

        def fewer(kind: str) -> str:
            if steps[kind] is None:
                return "never"
            return f"{steps[kind]} ({100 * (1 - steps[kind] / steps['ones']):.0f} % fewer)"

        print(f"{pair}: TransRate gain {gain:+.3f}, LEEP gain {leep_gain:+.3f}; pool starts entry "
              f"from {pool_start[0] or 'ones'}, head from {head_source or 'scratch'} "
              f"({len(shared)} labels); acc ones {100 * reference:.2f}, entry "
              f"{100 * runs['entry']['final']:.2f}, pool {100 * runs['pool']['final']:.2f} "
              f"(FWT vs ones {100 * row['fwt_vs_ones']['entry']:+.2f}, "
              f"{100 * row['fwt_vs_ones']['pool']:+.2f}); steps to {100 * reference:.2f}: ones "
              f"{steps['ones']}, entry {fewer('entry')}, pool {fewer('pool')} of "
              f"{row['total_steps']}; after {runs['ones']['trace'][0][0]} steps: "
              + ", ".join(f"{k} {100 * r['trace'][0][1]:.2f}" for k, r in runs.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
