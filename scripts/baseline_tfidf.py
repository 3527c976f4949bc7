"""TF-IDF + logistic regression per task, on the same train/test splits as `ctt run`.

A strong classical reference: one independent bag-of-words classifier per task (so no forgetting
either), word 1-2-grams plus character 2-5-grams, regularisation chosen by 5-fold cross-validation
on the training split only.

    python scripts/baseline_tfidf.py [STREAM] [--max-train N] [--seed 0] [--compare runs/demo/report.json]

With `--compare`, the report's final accuracies are printed beside the baseline's. Needs
scikit-learn (installed by `make test` / the `dev` extra).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import FeatureUnion, make_pipeline
from sklearn.feature_extraction.text import TfidfVectorizer

from continual_transformer.data.stream import default_stream_path, load_stream


def tfidf_model(seed: int) -> GridSearchCV:
    features = FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True)),
    ])
    pipeline = make_pipeline(features, LogisticRegression(max_iter=2000, random_state=seed))
    return GridSearchCV(pipeline, {"logisticregression__C": [1.0, 3.0, 10.0, 30.0]}, cv=5, n_jobs=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream", nargs="?", type=Path, default=None)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", type=Path, default=None, help="report.json of a `ctt run`")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args()

    stream = args.stream or default_stream_path()
    tasks = [t.subsample_train(args.max_train, args.seed) for t in load_stream(stream)]
    other = json.loads(args.compare.read_text()) if args.compare else None
    other_acc = dict(zip(other["tasks"], other["accuracy_matrix"][-1])) if other else {}

    results = {}
    header = f"{'task':22} {'train':>6} {'test':>5} {'tfidf %':>8} {'C':>5} {'sec':>6}"
    if other:
        header += f" {other['method']['name'] + ' %':>8} {'diff':>6}"
    print(header)
    for task in tasks:
        start = time.perf_counter()
        model = tfidf_model(args.seed).fit([e.text for e in task.train], [e.label for e in task.train])
        predicted = model.predict([e.text for e in task.test])
        accuracy = float(np.mean([p == e.label for p, e in zip(predicted, task.test)]))
        seconds = time.perf_counter() - start
        results[task.name] = {"accuracy": accuracy, "C": model.best_params_["logisticregression__C"],
                              "seconds": round(seconds, 2)}
        line = (f"{task.name:22} {len(task.train):6d} {len(task.test):5d} {100 * accuracy:8.2f} "
                f"{results[task.name]['C']:5g} {seconds:6.1f}")
        if task.name in other_acc:
            line += f" {100 * other_acc[task.name]:8.2f} {100 * (other_acc[task.name] - accuracy):+6.2f}"
        print(line)
    acc = float(np.mean([r["accuracy"] for r in results.values()]))
    line = f"{'ACC':22} {'':6} {'':5} {100 * acc:8.2f}"
    if other:
        line += f" {'':5} {'':6} {100 * other['metrics']['acc']:8.2f} {100 * (other['metrics']['acc'] - acc):+6.2f}"
    print(line)
    if args.out:
        args.out.write_text(json.dumps({"stream": str(stream), "max_train": args.max_train,
                                        "seed": args.seed, "tasks": results, "acc": acc}, indent=2))


if __name__ == "__main__":
    main()
