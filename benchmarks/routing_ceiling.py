"""How well can any classifier tell a stream's tasks apart? The router against non-continual ceilings.

    python benchmarks/routing_ceiling.py [STREAM]       # default: the bundled stream, ~6 min on 2 cores

The router learns task after task from streaming statistics (LDA on random features of the
trunk's pooled output). This script asks whether its errors are the router's or the data's: it
fits, on ALL tasks' training texts at once (what a continual router never sees), a logistic
regression over task ids on (a) the trunk's pooled output, (b) the pooled output of every layer
of the backbone together, (c) TF-IDF word 1-2-grams; and prints each one's routing accuracy on
the test texts, per task, beside the router's (the same features, learned as `ctt run` does).
When the ceilings are no higher than the router, the remaining errors are texts whose task the
text does not tell (overlapping domains), not a weakness of the router. Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from continual_transformer.config import BackboneConfig, DEFAULT_ADAPT_LAYERS
from continual_transformer.data.source import load_tasks
from continual_transformer.data.stream import default_stream_path
from continual_transformer.model.backbone import Backbone, masked_mean
from continual_transformer.model.batching import collated
from continual_transformer.model.router import Router


@torch.inference_mode()
def pooled_layers(backbone: Backbone, texts: list[str]) -> torch.Tensor:
    """(N, L + 1, H): the mean over tokens of the embedding output and of every layer's output."""
    ids = backbone.tokenize(texts)
    out = torch.empty(len(ids), backbone.num_layers + 1, backbone.hidden_size)
    with backbone.default_attention():
        for rows, batch in collated(backbone, ids):
            hidden, call = backbone.start(batch["input_ids"], batch["attention_mask"])
            pooled = [masked_mean(hidden, batch["attention_mask"])]
            for layer in range(backbone.num_layers):
                hidden = backbone.run_layers(hidden, call, layer, layer + 1)
                pooled.append(masked_mean(hidden, batch["attention_mask"]))
            out[rows] = torch.stack(pooled, 1).float()
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream", nargs="?", type=Path, default=None)
    parser.add_argument("--trunk-layers", type=int, default=None,
                        help="layers below the adapted top [default: the library's, 6 - 3]")
    parser.add_argument("--c", type=float, default=10.0, help="inverse L2 strength of the regressions")
    args = parser.parse_args()

    tasks = load_tasks(args.stream or default_stream_path())
    names = [t.name for t in tasks]
    backbone = Backbone.load(BackboneConfig("default"), device="cpu")
    trunk = args.trunk_layers if args.trunk_layers is not None else backbone.num_layers - DEFAULT_ADAPT_LAYERS
    start = time.perf_counter()
    train_texts = [e.text for t in tasks for e in t.train]
    test_texts = [e.text for t in tasks for e in t.test]
    y_train = np.array([t.name for t in tasks for _ in t.train])
    y_test = np.array([t.name for t in tasks for _ in t.test])
    train, test = pooled_layers(backbone, train_texts), pooled_layers(backbone, test_texts)
    print(f"features of {len(train_texts)} + {len(test_texts)} texts in {time.perf_counter() - start:.0f} s")

    predictions = {}
    router = Router(backbone.hidden_size)  # the router's defaults, learned task after task
    for task in tasks:
        rows = torch.from_numpy(y_train == task.name)
        router.partial_fit(train[rows, trunk], task.name)
    predictions[f"router (continual; trunk = {trunk} layers)"] = np.array(router.predict(test[:, trunk]))

    def regression(x_train, x_test):
        model = LogisticRegression(C=args.c, max_iter=5000).fit(x_train, y_train)
        return model.predict(x_test)

    predictions["all tasks at once: trunk output"] = regression(
        unit(train[:, trunk].numpy()), unit(test[:, trunk].numpy()))
    every = lambda x: np.concatenate([unit(x[:, i].numpy()) for i in range(x.shape[1])], 1)
    predictions["all tasks at once: every layer"] = regression(every(train), every(test))
    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    predictions["all tasks at once: TF-IDF 1-2-grams"] = regression(
        words.fit_transform(train_texts), words.transform(test_texts))

    width = max(len(k) for k in predictions)
    print(f"{'routing accuracy %':{width}}  {'all':>6}  " + "  ".join(f"{n[:12]:>12}" for n in names))
    for label, predicted in predictions.items():
        per_task = [100 * np.mean(predicted[y_test == n] == n) for n in names]
        print(f"{label:{width}}  {100 * np.mean(predicted == y_test):6.2f}  "
              + "  ".join(f"{a:12.2f}" for a in per_task))


if __name__ == "__main__":
    main()
