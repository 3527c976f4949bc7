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

The budget study (`--budget-epochs`, `--seeds`): a point of one long run's trace is not what a
user who trains fewer steps gets (the schedule's warmup and decay fit the budget), and one test
set of a few hundred texts moves by a point with one text. So, for pairs whose pool start is not
all ones, both starts are also trained to the end of each shorter schedule (1 and 2 epochs, and
--epochs), once per seed (batch order and head initialisation), and the median accuracy over the
seeds is printed per budget: the steps each start needs to reach all ones' median at --epochs,
and each budget's accuracy side by side (higher accuracy at the same steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
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


def learn_traced(learner, method: StartFrom, task, states, start, head, every: int, test_states,
                 test_y, train: TrainConfig | None = None):
    """Learn `task` (its training texts' trunk `states`) from entry `start` (None: ones) and
    head `head` (None: the seeded initialisation), with `train` (None: the method's); its test
    accuracy every `every` steps (0: at the end only)."""
    method.start, method.head = start, head
    trace = []

    def on_step(step: int, steps_per_epoch: int) -> None:
        if every and step % every == 0:
            trace.append((step, accuracy(learner.model, task.name, test_states, test_y)))

    model = learner.model
    kept, method.train = method.train, train or method.train  # begin_task seeds the head from it
    try:
        with model.training_kernels():
            stats = GradientMethod.learn(method, model, task, states, None, on_step=on_step)
    finally:
        method.train = kept
    final = accuracy(model, task.name, test_states, test_y)
    if not trace or trace[-1][0] != stats["steps"]:
        trace.append((stats["steps"], final))
    return final, trace


def steps_to(trace, target: float) -> int | None:
    return next((step for step, acc in trace if acc >= target - 1e-9), None)


def budget_study(learner, method: StartFrom, task, states, starts: dict, test_states, test_y,
                 epochs: list[int], seeds: list[int]) -> dict:
    """Each start trained to the end of a shorter schedule (`epochs` each, its warmup and decay
    fitted to that budget, as a user who trains fewer epochs gets), once per seed (batch order
    and head initialisation): {kind: {epochs: [accuracy per seed]}}."""
    out = {}
    for kind, (start, head) in starts.items():
        out[kind] = {}
        for n in epochs:
            out[kind][n] = []
            for seed in seeds:
                train = dataclasses.replace(method.train, epochs=n, seed=seed)
                final, _ = learn_traced(learner, method, task, states, start, head, 0,
                                        test_states, test_y, train)
                learner.model.adapter.remove(task.name)
                learner.model.heads.remove(task.name)
                out[kind][n].append(final)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream", type=Path, default=ROOT / "data/scale/scale_stream.jsonl.gz")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS))
    parser.add_argument("--max-train", type=int, default=400)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--budget-epochs", default="1,2",
                        help="shorter schedules (epochs, comma-separated) trained to their end "
                             "from ones and from the pool's start, against --epochs from ones; "
                             "'' skips this study")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the budget study")
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
        with learner.model.training_kernels():  # as `learn` runs it; shared by every run below
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
            final, trace = learn_traced(learner, method, target, train_states, start, head,
                                        args.every, test_states, test_y)
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
        budgets = sorted({int(n) for n in args.budget_epochs.split(",") if n} | {args.epochs})
        if len(budgets) > 1 and pool_start != (None, None):  # else the pool's runs are ones' runs
            seeds = [int(n) for n in args.seeds.split(",")]
            study = budget_study(learner, method, target, train_states,
                                 {"ones": (None, None), "pool": pool_start}, test_states, test_y,
                                 budgets, seeds)
            medians = {k: {n: statistics.median(a) for n, a in per.items()} for k, per in study.items()}
            goal = medians["ones"][args.epochs]
            fewest = {k: next((n for n in budgets if m[n] >= goal - 1e-9), None)
                      for k, m in medians.items()}
            per_epoch = row["total_steps"] / args.epochs
            row["budget"] = {"seeds": seeds, "accuracy": study, "median": medians,
                             "goal": goal, "fewest_epochs": fewest,
                             "steps": {k: None if n is None else round(n * per_epoch)
                                       for k, n in fewest.items()}}
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
        if "budget" in row:
            b = row["budget"]
            table = "; ".join(f"{k} " + ", ".join(f"{n} ep {100 * m:.2f}" for n, m in per.items())
                              for k, per in b["median"].items())
            saved = ("never" if b["steps"]["pool"] is None else
                     f"{b['steps']['pool']} ({100 * (1 - b['steps']['pool'] / b['steps']['ones']):.0f} % fewer)")
            print(f"  budget study, median of seeds {b['seeds']}: {table}; steps to ones' "
                  f"{100 * b['goal']:.2f} at {args.epochs} epochs: ones {b['steps']['ones']}, "
                  f"pool {saved}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
