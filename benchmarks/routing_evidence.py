"""Which evidence should the router read? Candidates measured on trunk features, no training.

    python benchmarks/routing_evidence.py [STREAM] [--tasks 25] [--cache F.pt]
        [--max-train N --max-test N]

The router may read only what the prediction pass computes before any task's layers run: the
mean over tokens of the embedding output and of each trunk layer (layers below the adapted top;
3 of MiniLM's 6 by default), and the text's token ids. This script computes those once for the
first `--tasks` tasks of a stream (cached with `--cache`), holds out a validation split of each
task's training texts (20 %, stratified by task; never the test texts), and fits each candidate
router task after task on the rest, as `ctt run` would:

- LDA on 2048 random features (today's router) of one layer's mean or of several, concatenated;
- the same plus a streaming multinomial naive Bayes over hashed token-id 1-2-grams (per-task
  counts: exactly removable), its log-likelihood weighted (weight chosen on validation);
- for reference, not streaming: TF-IDF (word 1-2 + char_wb 2-5) + logistic regression over
  task ids, trained on all tasks' fit texts at once (needs scikit-learn).

For each it prints routing accuracy on validation and test, and the expected calibration error
(ECE, 15 bins) of the routed task's probability, raw and after a temperature fitted on
validation. Nothing here trains a task's adapter: routing depends only on the frozen trunk.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from continual_transformer.config import DEFAULT_ADAPT_LAYERS, BackboneConfig
from continual_transformer.data.split import held_out_positions
from continual_transformer.data.stream import default_stream_path, load_stream
from continual_transformer.model.backbone import Backbone, masked_mean
from continual_transformer.model.batching import collated
from continual_transformer.model.closed_form import AnalyticClassifier
from continual_transformer.model.calibration import expected_calibration_error, fit_temperature
from continual_transformer.model.lexical_router import LexicalRouter


@torch.inference_mode()
def trunk_means(backbone: Backbone, ids: list[list[int]], trunk_layers: int) -> torch.Tensor:
    """(N, trunk_layers + 1, H): token means of the embedding output and of each trunk layer."""
    out = torch.empty(len(ids), trunk_layers + 1, backbone.hidden_size)
    with backbone.default_attention():
        for rows, batch in collated(backbone, ids):
            hidden, call = backbone.start(**batch)
            means = [masked_mean(hidden.float(), batch["attention_mask"])]
            for layer in range(trunk_layers):
                hidden = backbone.run_layers(hidden, call, layer, layer + 1)
                means.append(masked_mean(hidden.float(), batch["attention_mask"]))
            out[rows] = torch.stack(means, 1).cpu()
    return out


def joined(x: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """(N, len(layers) * H): the chosen layers' means, each unit-normalised, side by side."""
    parts = [x[:, i] / x[:, i].norm(dim=-1, keepdim=True).clamp_min(1e-12) for i in layers]
    return torch.cat(parts, 1)


def ece_report(scores: torch.Tensor, y: np.ndarray, temperature: float) -> tuple[float, float]:
    probs = torch.softmax(scores / temperature, 1)
    confidence, chosen = probs.max(1)
    return expected_calibration_error(confidence.numpy(), chosen.numpy() == y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream", nargs="?", type=Path, default=None)
    parser.add_argument("--tasks", type=int, default=0, help="the first N tasks (0: all)")
    parser.add_argument("--cache", type=Path, default=None, help="save/load the features here (.pt)")
    parser.add_argument("--no-reference", action="store_true", help="skip TF-IDF + LR")
    parser.add_argument("--max-train", type=int, default=0, help="at most N training texts a task (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="at most N test texts a task (0: all)")
    args = parser.parse_args()

    tasks = load_stream(args.stream or default_stream_path())
    if args.tasks:
        tasks = tasks[: args.tasks]
    backbone = Backbone.load(BackboneConfig("default"), device="cpu")
    trunk = backbone.num_layers - DEFAULT_ADAPT_LAYERS
    fit_rows, val_rows, test_rows = [], [], []  # (task index, text, ids slot)
    texts = []
    for k, task in enumerate(tasks):
        train = task.train[: args.max_train or None]
        held = held_out_positions(type(task)(task.name, task.labels, train, ()), 0.2, seed=0)
        for i, example in enumerate(train):
            (val_rows if i in held else fit_rows).append((k, len(texts)))
            texts.append(example.text)
        for example in task.test[: args.max_test or None]:
            test_rows.append((k, len(texts)))
            texts.append(example.text)
    start = time.perf_counter()
    ids = backbone.tokenize(texts)
    if args.cache and args.cache.is_file():
        features = torch.load(args.cache)
    else:
        features = trunk_means(backbone, ids, trunk)
        if args.cache:
            torch.save(features, args.cache)
    print(f"{len(tasks)} tasks; {len(fit_rows)} fit / {len(val_rows)} validation / "
          f"{len(test_rows)} test texts; trunk features in {time.perf_counter() - start:.0f} s")
    names = [t.name for t in tasks]
    split = {name: (np.array([k for k, _ in rows]), [j for _, j in rows])
             for name, rows in (("fit", fit_rows), ("val", val_rows), ("test", test_rows))}

    def lda_scores(layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
        x = joined(features, layers)
        classifier = AnalyticClassifier(in_dim=x.shape[1], n_features=2048)
        y_fit, fit_index = split["fit"]
        for k in range(len(tasks)):  # task after task
            classifier.partial_fit(x[[j for kk, j in zip(y_fit, fit_index) if kk == k]], [names[k]] * int((y_fit == k).sum()))
        return {s: classifier.decision_function(x[split[s][1]]).float() for s in ("val", "test")}

    lexical = LexicalRouter()
    y_fit, fit_index = split["fit"]
    skip = frozenset(backbone.tokenizer.all_special_ids)
    for k in range(len(tasks)):
        lexical.partial_fit([ids[j] for kk, j in zip(y_fit, fit_index) if kk == k], names[k], skip)
    nb = {s: lexical.log_likelihoods([ids[j] for j in split[s][1]], skip) for s in ("val", "test")}
    print(f"lexical router: {lexical.nbytes() / 2**20:.2f} MiB for {len(tasks)} tasks "
          f"({lexical.nbytes() / len(tasks) / 1024:.1f} KiB a task, stored sparse)")

    def show(label: str, scores: dict[str, torch.Tensor]) -> None:
        y_val, y_test = split["val"][0], split["test"][0]
        temperature = fit_temperature(scores["val"], torch.from_numpy(y_val))
        acc = {s: 100 * float((scores[s].argmax(1).numpy() == split[s][0]).mean()) for s in ("val", "test")}
        raw = ece_report(scores["test"], y_test, 1.0)
        tuned = ece_report(scores["test"], y_test, temperature)
        print(f"{label:46}  val {acc['val']:6.2f}  test {acc['test']:6.2f}  "
              f"ECE raw {raw:.4f}  T={temperature:6.3f} ECE {tuned:.4f}", flush=True)

    layer_sets = [(trunk,), (0,), (0, trunk), (1, trunk), (2, trunk), (1, 2, trunk), (0, 1, 2, trunk)]
    results = {}
    for layers in layer_sets:
        results[layers] = lda_scores(layers)
        show(f"LDA RF2048 layers {layers}", results[layers])
    best = max(layer_sets, key=lambda s: float((results[s]["val"].argmax(1).numpy() == split["val"][0]).mean()))
    for layers in dict.fromkeys([(trunk,), best]):
        for weight in (0.02, 0.05, 0.1, 0.2, 0.5):
            show(f"LDA {layers} + {weight} x NB", {s: results[layers][s] + weight * nb[s] for s in nb})
    show("NB alone", nb)

    if not args.no_reference:
        from scipy.sparse import hstack
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
        fit_text = [texts[j] for j in split["fit"][1]]
        x_fit = hstack([words.fit_transform(fit_text), chars.fit_transform(fit_text)]).tocsr()
        model = LogisticRegression(C=10.0, max_iter=2000).fit(x_fit, split["fit"][0])
        for s in ("val", "test"):
            rows = [texts[j] for j in split[s][1]]
            x = hstack([words.transform(rows), chars.transform(rows)]).tocsr()
            print(f"reference TF-IDF + LR (all fit texts at once)    {s} "
                  f"{100 * float((model.predict(x) == split[s][0]).mean()):6.2f}", flush=True)


if __name__ == "__main__":
    main()
