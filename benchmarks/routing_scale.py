"""Routing as tasks multiply: the router at tasks 10, 25, 50, 100 of the scale stream.

    python benchmarks/routing_scale.py [STREAM] [--max-train 200 --max-test 60] [--cache F.pt]
        [--milestones 10,25,50,100] [--out DIR]

Routing depends only on the frozen trunk, never on a task's adapter, so this measures the
library's `Router` (calibration included) on trunk features computed once, without training any
task (a full 100-task `ia3` run takes about an hour here: see benchmarks/scale.py for that).
Per task it takes the first `--max-train` training and `--max-test` test texts (stated in the
output; a cap keeps the trunk pass within minutes on 2 cores), holds out 20 % of the training
texts as a validation split, and learns the rest task after task. At each milestone:

- routing accuracy on the test texts of the tasks seen, by the router as the library builds it
  (trunk features and the texts' words, weighted as its calibration texts choose), and by the
  same router on the trunk features alone (`lexical_alpha=None`);
- the router's expected calibration error (ECE) on them, and its temperature;
- the threshold on the routed task's probability that gives 95 % precision on the validation
  split, and on test: the share of texts answered (not "ambiguous") and their routing accuracy;
- the router's bytes (shared + per task);
- routing's share of a routed prediction's time: the router's milliseconds per text against the
  whole encoder's (all layers, batches of `--batch`, timed once on `--latency-texts` test texts);
- reference, not streaming: TF-IDF (word 1-2 + char_wb 2-5 grams) + logistic regression over
  task ids, retrained on all fit texts of the tasks seen so far (needs scikit-learn).

Writes routing_scale.json and routing_scale.png (both accuracy curves) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from continual_transformer.config import DEFAULT_ADAPT_LAYERS, BackboneConfig
from continual_transformer.data.split import held_out_positions
from continual_transformer.data.stream import load_stream
from continual_transformer.model.backbone import Backbone, masked_mean
from continual_transformer.model.batching import collated
from continual_transformer.model.calibration import expected_calibration_error
from continual_transformer.model.router import Router

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STREAM = ROOT / "data" / "scale" / "scale_stream.jsonl.gz"


@torch.inference_mode()
def trunk_features(backbone: Backbone, texts: list[str], trunk_layers: int) -> torch.Tensor:
    """(N, H): the mean over tokens of the trunk's output, as the prediction pass computes it."""
    ids = backbone.tokenize(texts)
    out = torch.empty(len(ids), backbone.hidden_size)
    with backbone.default_attention():
        for rows, batch in collated(backbone, ids):
            hidden, call = backbone.start(**batch)
            hidden = backbone.run_layers(hidden, call, 0, trunk_layers)  # (B, T, H)
            out[rows] = masked_mean(hidden.float(), batch["attention_mask"]).cpu()
    return out


@torch.inference_mode()
def forward_ms_per_text(backbone: Backbone, texts: list[str], batch: int, repeats: int = 3) -> float:
    """Median over `repeats` of the milliseconds per text of the whole encoder (trunk and top,
    unadapted) in batches of `batch`: the pass a routed prediction makes besides routing."""
    ids = backbone.tokenize(texts)
    times = []
    with backbone.default_attention():
        for _ in range(repeats):
            start = time.perf_counter()
            for rows, collated_batch in collated(backbone, ids, max_rows=batch):
                hidden, call = backbone.start(**collated_batch)
                hidden = backbone.run_layers(hidden, call, 0, backbone.num_layers)
                masked_mean(hidden.float(), collated_batch["attention_mask"])
            times.append((time.perf_counter() - start) / len(texts))
    return 1000 * float(np.median(times))


def threshold_for_precision(confidence: np.ndarray, correct: np.ndarray, precision: float) -> float:
    """The lowest threshold whose answers (confidence >= it) are right at least `precision`."""
    order = np.argsort(-confidence)
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(running >= precision)[0]
    return float(confidence[order][ok[-1]]) if len(ok) else 1.0


def reference_accuracy(fit_texts, fit_y, test_texts, test_y) -> float:
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
    x_fit = hstack([words.fit_transform(fit_texts), chars.fit_transform(fit_texts)]).tocsr()
    model = LogisticRegression(C=10.0, max_iter=1000).fit(x_fit, fit_y)
    x_test = hstack([words.transform(test_texts), chars.transform(test_texts)]).tocsr()
    return float((model.predict(x_test) == np.asarray(test_y)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream", nargs="?", type=Path, default=DEFAULT_STREAM)
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--max-test", type=int, default=60)
    parser.add_argument("--milestones", default="10,25,50,100")
    parser.add_argument("--cache", type=Path, default=None, help="save/load the features here (.pt)")
    parser.add_argument("--out", type=Path, default=Path("routing_scale_out"))
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--batch", type=int, default=32, help="rows per routing / encoder call, as predict")
    parser.add_argument("--latency-texts", type=int, default=256,
                        help="test texts the encoder pass is timed on (routing's share of latency)")
    args = parser.parse_args()
    milestones = [int(m) for m in args.milestones.split(",")]

    tasks = load_stream(args.stream)[: max(milestones)]
    rows = {"fit": [], "val": [], "test": []}  # (task index, text)
    for k, task in enumerate(tasks):
        train = task.train[: args.max_train]
        held = held_out_positions(type(task)(task.name, task.labels, train, ()), 0.2, seed=0)
        for i, example in enumerate(train):
            rows["val" if i in held else "fit"].append((k, example.text))
        rows["test"] += [(k, e.text) for e in task.test[: args.max_test]]
    texts = [t for split in ("fit", "val", "test") for _, t in rows[split]]
    backbone = Backbone.load(BackboneConfig("default"), device="cpu")
    trunk = backbone.num_layers - DEFAULT_ADAPT_LAYERS
    start = time.perf_counter()
    if args.cache and args.cache.is_file():
        features = torch.load(args.cache)
    else:
        features = trunk_features(backbone, texts, trunk)
        if args.cache:
            torch.save(features, args.cache)
    print(f"{len(tasks)} tasks, at most {args.max_train} train / {args.max_test} test texts each: "
          f"{len(rows['fit'])} fit / {len(rows['val'])} validation / {len(rows['test'])} test; "
          f"trunk features in {time.perf_counter() - start:.0f} s", flush=True)
    ids = backbone.tokenize(texts)  # the words the router reads, from the same token ids
    offset, split = 0, {}
    for name in ("fit", "val", "test"):
        y = np.array([k for k, _ in rows[name]])
        split[name] = (y, features[offset : offset + len(y)], [t for _, t in rows[name]],
                       ids[offset : offset + len(y)])
        offset += len(y)

    rng = np.random.default_rng(0)
    sample = [rows["test"][i][1] for i in rng.choice(len(rows["test"]), min(args.latency_texts, len(rows["test"])), replace=False)]
    forward_ms = forward_ms_per_text(backbone, sample, args.batch)
    print(f"encoder pass (all {backbone.num_layers} layers) {forward_ms:.3f} ms per text in batches "
          f"of {args.batch}, median of 3 over {len(sample)} test texts", flush=True)
    names = [t.name for t in tasks]
    special = frozenset(backbone.tokenizer.all_special_ids)
    router = Router(backbone.hidden_size, skip=special)
    trunk_only = Router(backbone.hidden_size, lexical_alpha=None)
    results, learned = [], 0
    for m in milestones:
        for k in range(learned, m):
            y, x, _, fit_ids = split["fit"]
            mine = np.flatnonzero(y == k)
            router.partial_fit(x[torch.from_numpy(mine)], names[k], [fit_ids[i] for i in mine])
            trunk_only.partial_fit(x[torch.from_numpy(mine)], names[k])
        learned = m
        t0 = time.perf_counter()
        router.prepare()
        solve = time.perf_counter() - t0
        measured = {}
        for name in ("val", "test"):
            y, x, _, split_ids = split[name]
            seen = np.flatnonzero(y < m)
            rows_seen, ids_seen = x[torch.from_numpy(seen)], [split_ids[i] for i in seen]
            t0 = time.perf_counter()
            ranked = [r for i in range(0, len(rows_seen), args.batch)
                      for r in router.rank(rows_seen[i : i + args.batch], None, 1,
                                           ids_seen[i : i + args.batch])]
            seconds = time.perf_counter() - t0
            chosen = np.array([names.index(r[0][0]) for r in ranked])
            confidence = np.array([r[0][1] for r in ranked])
            measured[name] = (chosen == y[seen], confidence, seconds / max(len(seen), 1))
        y, x, _, _ = split["test"]
        seen = torch.from_numpy(y < m)
        trunk_right = np.array([names.index(t) for t in trunk_only.predict(x[seen])]) == y[y < m]
        correct, confidence, per_text = measured["test"]
        threshold = threshold_for_precision(measured["val"][1], measured["val"][0], 0.95)
        answered = confidence >= threshold
        size = router.nbytes()
        row = {
            "tasks": m, "test_texts": int(len(correct)),
            "routing_accuracy": round(float(correct.mean()), 4),
            "lexical_weight": router.lexical_weight,
            "routing_accuracy_trunk_only": round(float(trunk_right.mean()), 4),
            "ece": round(expected_calibration_error(confidence, correct), 4),
            "temperature": round(router.temperature, 4),
            "threshold_95": round(threshold, 4),
            "answered_share": round(float(answered.mean()), 4),
            "answered_accuracy": round(float(correct[answered].mean()), 4) if answered.any() else None,
            "router_bytes_shared": size["shared"], "router_bytes_tasks": size["tasks"],
            "router_bytes_per_task_max": size["per_task_max"],
            "solve_seconds": round(solve, 2), "route_ms_per_text": round(1000 * per_text, 3),
            "encoder_ms_per_text": round(forward_ms, 3),
            "routing_share_of_latency": round(1000 * per_text / (1000 * per_text + forward_ms), 4),
        }
        if not args.no_reference:
            fy, _, ft, _ = split["fit"]
            ty, _, tt, _ = split["test"]
            t0 = time.perf_counter()
            row["reference_tfidf_lr"] = round(reference_accuracy(
                [t for t, k in zip(ft, fy) if k < m], fy[fy < m],
                [t for t, k in zip(tt, ty) if k < m], ty[ty < m]), 4)
            row["reference_seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        print(json.dumps(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing_scale.json").write_text(json.dumps(
        {"stream": str(args.stream), "max_train": args.max_train, "max_test": args.max_test,
         "milestones": results}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(milestones, [100 * r["routing_accuracy"] for r in results], "o-",
            label="router: trunk + words (streaming)")
    ax.plot(milestones, [100 * r["routing_accuracy_trunk_only"] for r in results], "^:",
            label="router: trunk alone (streaming)")
    if not args.no_reference:
        ax.plot(milestones, [100 * r["reference_tfidf_lr"] for r in results], "s--",
                label="TF-IDF + LR (all texts at once)")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("routing accuracy (%)")
    ax.set_title("task routing on the scale stream")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "routing_scale.png", dpi=120)
    print(f"wrote {args.out / 'routing_scale.json'}, {args.out / 'routing_scale.png'}")


if __name__ == "__main__":
    main()
