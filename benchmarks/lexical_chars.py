"""Would character n-grams help the lexical branch? Refitted beside a model's trained heads.

    ctt run --out /tmp/run                                   # a learned model (DIR/model)
    python benchmarks/lexical_chars.py /tmp/run/model [STREAM]   # ~4 min for the bundled stream

For each task of the stream the model holds, with the split `ia3` learned it on (15 %
validation held out of the training texts, seed 0), this script refits the task's lexical
branch as learning does (`lexical.Candidates`: C and mix chosen on validation, refitted on fit +
validation, int8) beside the model's own trained head, for three featurizations, and prints the
fused test accuracy per task and the ACC:

- `words`: today's (token unigrams and bigrams); it reproduces the model's own accuracies;
- `words+char2-5`: plus the character 2-5-grams of each word (WordPiece pieces joined, padded
  with spaces, as scikit-learn's `char_wb`), hashed into the same 2^18 columns;
- `words+char3-5 x0.5`: character 3-5-grams at half the words' weight.

The variants replace `lexical.row_features` for this script's process only.

Measured on the bundled stream (the `ctt run` model of 2026-12-06; AVX2 machine): words 78.09
(94.25 / 72.92 / 71.00 / 78.54 / 73.75); words+char2-5 77.63; words+char3-5 x0.5 78.53 (94.00 /
72.71 / 71.25 / 80.21 / 74.50): above on three tasks, below on two; choosing per task on
validation would give 78.48. Not adopted: short of the +4-over-TF-IDF target (78.93) either
way, and not measured on other streams.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np
import torch

from continual_transformer import ContinualLearner
from continual_transformer.data.split import held_out_positions
from continual_transformer.data.stream import default_stream_path, load_stream
from continual_transformer.methods.ia3 import VALIDATION_FRACTION
from continual_transformer.model import lexical
from continual_transformer.model.batching import collated

WORDS = lexical.row_features


def char_features(vocab: list[str], low: int, high: int, weight: float):
    """`row_features` plus each word's hashed character n-grams (`low`..`high`), tf x `weight`."""
    keys_of: dict[str, int] = {}

    def row_features(ids, skip):
        columns, tf = WORDS(ids, skip)
        words: list[str] = []
        for t in ids:
            if t in skip:
                continue
            piece = vocab[t]
            if piece.startswith("##") and words:
                words[-1] += piece[2:]
            else:
                words.append(piece)
        keys = []
        for word in words:
            if not any(c.isalpha() for c in word):
                continue
            padded = f" {word} "
            for n in range(low, high + 1):
                for i in range(len(padded) - n + 1):
                    gram = padded[i : i + n]
                    if gram not in keys_of:  # crc32: the same column in every process
                        keys_of[gram] = zlib.crc32(gram.encode()) + (1 << 41)
                    keys.append(keys_of[gram])
        if not keys:
            return columns, tf
        hashed, counts = np.unique((np.array(keys, dtype=np.int64) * lexical._MULTIPLIER) & lexical._MASK,
                                   return_counts=True)
        merged, where = np.unique(np.concatenate([columns, hashed]), return_inverse=True)
        values = np.zeros(len(merged))
        np.add.at(values, where, np.concatenate([tf, weight * (1.0 + np.log(counts))]))
        return merged, values

    return row_features


def neural_logits(learner: ContinualLearner, task, ids) -> torch.Tensor:
    """The task's head logits (no lexical branch), (N, C)."""
    key = learner.method.adapter_key(task.name)
    out = torch.empty(len(ids), len(task.labels))
    with learner.model.inference("fp32"):
        for rows, batch in collated(learner.backbone, ids):
            pooled = learner.model.top_pooled(learner.model.trunk(batch), [key] * len(rows), torch.float32)
            out[rows] = torch.stack(learner.head_logits(pooled, [task.name] * len(rows)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("stream", nargs="?", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its validation split)")
    args = parser.parse_args()
    learner = ContinualLearner.load(args.model, device="cpu", precision="fp32")
    tasks = [t for t in load_stream(args.stream or default_stream_path()) if t.name in learner.tasks]
    tokenizer = learner.backbone.tokenizer
    vocab = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    skip = learner.model.special_ids
    variants = {"words": WORDS, "words+char2-5": char_features(vocab, 2, 5, 1.0),
                "words+char3-5 x0.5": char_features(vocab, 3, 5, 0.5)}
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for task in tasks:
            held = held_out_positions(task, VALIDATION_FRACTION, args.seed)
            fit = [i for i in range(len(task.train)) if i not in held]
            val = sorted(held)
            index = task.label_index()
            ids = learner.backbone.tokenize([e.text for e in task.train])
            test_ids = learner.backbone.tokenize([e.text for e in task.test])
            y_test = torch.tensor([index[e.label] for e in task.test])
            val_logits = neural_logits(learner, task, [ids[i] for i in val])
            test_logits = neural_logits(learner, task, test_ids)
            neural = (test_logits.argmax(-1) == y_test).float().mean().item()
            for name, features in variants.items():
                lexical.row_features = features
                candidates = lexical.Candidates(
                    [ids[i] for i in fit], [index[task.train[i].label] for i in fit],
                    [ids[i] for i in val], [index[task.train[i].label] for i in val],
                    len(task.labels), skip)
                chosen = candidates.choose(val_logits)
                branch = candidates.branch(chosen)
                fused = test_logits if branch is None else \
                    lexical.fuse(test_logits, branch.log_probs(test_ids, skip), branch.mix)
                accuracy = (fused.argmax(-1) == y_test).float().mean().item()
                results[name].append(accuracy)
                print(f"{task.name:<20} {name:<20} test {100 * accuracy:6.2f} (head alone "
                      f"{100 * neural:.2f}); C {chosen['c']:g}, mix {chosen['mix']}, validation "
                      f"{100 * chosen['val_accuracy']:.2f}", flush=True)
    finally:
        lexical.row_features = WORDS
    for name, accuracies in results.items():
        print(f"{name:<20} ACC {100 * np.mean(accuracies):.2f}  "
              + " / ".join(f"{100 * a:.2f}" for a in accuracies))


if __name__ == "__main__":
    main()
