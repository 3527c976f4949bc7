"""Measure the choices behind `analytic` and the router on a stream (default: the bundled one).

For every task it computes, once, the frozen backbone's features of all train and test texts:
the pooled last layer (what `analytic` classifies) and the trunk's mean output (what the
router reads; the trunk is the layers below the adapted top, `--trunk-layers`). It then fits the streaming classifier with each solver and feature size and
prints test accuracy:

- analytic: class-incremental accuracy (label over all tasks' labels) and task-aware accuracy;
- router: share of test inputs routed to their own task.

    python benchmarks/analytic_choices.py [STREAM] [--features 0,1024,2048,4096] [--cache F.pt]
        [--trunk-layers 3]

Solvers: ridge (penalty by GCV), lda (shrinkage by GCV), lda@0.1 (fixed relative shrinkage).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from continual_transformer.model.closed_form import AnalyticClassifier
from continual_transformer.model.backbone import Backbone, masked_mean
from continual_transformer.config import DEFAULT_ADAPT_LAYERS, BackboneConfig
from continual_transformer.data.stream import default_stream_path, load_stream
from continual_transformer.model.batching import collated

@torch.inference_mode()
def features(backbone: Backbone, texts: list[str], trunk_layers: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    ids = backbone.tokenize(texts)
    pooled = torch.empty(len(ids), backbone.hidden_size)
    trunk = torch.empty(len(ids), backbone.hidden_size)
    for rows, batch in collated(backbone, ids):  # in text order again below
        hidden, call = backbone.start(**batch)
        hidden = backbone.run_layers(hidden, call, 0, trunk_layers)  # (B, T, H)
        trunk[rows] = masked_mean(hidden, batch["attention_mask"]).float().cpu()
        hidden = backbone.run_layers(hidden, call, trunk_layers, backbone.num_layers)
        pooled[rows] = backbone.pool(hidden, batch["attention_mask"]).float().cpu()
    return pooled, trunk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stream", nargs="?", default=None)
    parser.add_argument("--features", default="0,1024,2048,4096")
    parser.add_argument("--cache", default=None, help="save/load the features here (.pt)")
    parser.add_argument("--trunk-layers", type=int, default=None,
                        help=f"layers the router reads (default: all but the top {DEFAULT_ADAPT_LAYERS})")
    args = parser.parse_args()
    tasks = load_stream(args.stream or default_stream_path())
    backbone = Backbone.load(BackboneConfig())
    trunk_layers = (args.trunk_layers if args.trunk_layers is not None
                    else backbone.num_layers - DEFAULT_ADAPT_LAYERS)
    start = time.perf_counter()
    if args.cache and Path(args.cache).is_file():
        cached = torch.load(args.cache)
    else:
        cached = [(features(backbone, [e.text for e in t.train], trunk_layers),
                   features(backbone, [e.text for e in t.test], trunk_layers)) for t in tasks]
        if args.cache:
            torch.save(cached, args.cache)
    data = [(task, train, test) for task, (train, test) in zip(tasks, cached)]
    print(f"features of {sum(len(t.train) + len(t.test) for t in tasks)} texts: "
          f"{time.perf_counter() - start:.1f}s")
    print(f"{'what':9} {'solver':12} {'D':>5} {'class-inc %':>11} {'task-aware %':>12} "
          f"{'routed %':>8} {'alpha':>7} {'fit s':>6}")
    variants = [("ridge", None), ("lda", None), ("lda", 0.1)]
    for n_features in [int(x) for x in args.features.split(",")]:
        for solver, shrinkage in variants:
            for what in ("analytic", "router"):
                clf = AnalyticClassifier(in_dim=backbone.hidden_size, n_features=n_features,
                                         solver=solver, shrinkage=shrinkage)
                start = time.perf_counter()
                for task, (pooled, trunk), _ in data:
                    X = pooled if what == "analytic" else trunk
                    y = ([f"{task.name}/{e.label}" for e in task.train] if what == "analytic"
                         else [task.name] * len(task.train))
                    clf.partial_fit(X, y)
                clf.solution()
                fit = time.perf_counter() - start
                right = aware = routed = total = 0
                for task, _, (pooled, trunk) in data:
                    X = pooled if what == "analytic" else trunk
                    scores = clf.decision_function(X)
                    if what == "analytic":
                        truth = [f"{task.name}/{e.label}" for e in task.test]
                        predicted = [clf.classes_[i] for i in scores.argmax(1).tolist()]
                        right += sum(p == t for p, t in zip(predicted, truth))
                        columns = [i for i, c in enumerate(clf.classes_) if c.startswith(task.name + "/")]
                        local = [clf.classes_[columns[i]] for i in scores[:, columns].argmax(1).tolist()]
                        aware += sum(p == t for p, t in zip(local, truth))
                        routed += sum(p.split("/")[0] == task.name for p in predicted)
                    else:
                        predicted = [clf.classes_[i] for i in scores.argmax(1).tolist()]
                        routed += sum(p == task.name for p in predicted)
                    total += len(task.test)
                inc = f"{100 * right / total:11.2f}" if what == "analytic" else f"{'':11}"
                ta = f"{100 * aware / total:12.2f}" if what == "analytic" else f"{'':12}"
                label = solver if shrinkage is None or solver == "ridge" else f"{solver}@{shrinkage:g}"
                print(f"{what:9} {label:12} {n_features:5d} {inc} {ta} {100 * routed / total:8.2f} "
                      f"{clf.alpha_:7.3g} {fit:6.1f}", flush=True)


if __name__ == "__main__":
    main()
