"""What the lexical branch reads, measured: refitted beside a model's trained heads.

    ctt run --out /tmp/run                                      # a learned model (DIR/model)
    python benchmarks/lexical_features.py /tmp/run/model [STREAM]   # ~5 min for the bundled stream

For each task of the stream the model holds, with the split `ia3` learned it on (15 %
validation held out of the training texts, seed 0), the task's lexical branch is refitted as
learning does (`lexical.Candidates`: C and mix chosen on validation, refitted on fit +
validation, int8) beside the model's own trained head, for three featurizations, and the fused
test accuracy per task and the ACC are printed:

- `encoder part, words`: token unigrams and bigrams of the first `max_length` tokens as the
  encoder reads them (a word the vocabulary lacks is the unknown token), what branches read
  before they read whole texts;
- `whole text, words`: the same n-grams of the whole text, each word the vocabulary lacks an
  id of its own (`Backbone.tokenize_whole`; the default);
- `whole text, words + chars`: plus the character 3-5-grams of each word (WordPiece pieces
  joined, padded with spaces, as scikit-learn's `char_wb`) at half the words' weight, hashed
  into the same 2^18 columns (this script's `char_features`; not in the library).

The heads are the model's, so only the branch changes between rows; the mix grid is today's
(`lexical.MIX_GRID`). Figures: benchmarks/README.md.
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
            if t >= len(vocab):  # a word the vocabulary lacks (`tokenize_whole`): no pieces
                words.append("")
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
    """The task's head logits (no lexical branch), (N, C), in float32."""
    key = learner.method.adapter_key(task.name)
    out = torch.empty(len(ids), len(task.labels))
    with learner.model.inference("fp32"):
        for rows, batch in collated(learner.backbone, ids):
            pooled = learner.model.top_pooled(learner.model.trunk(batch), [key] * len(rows), torch.float32)
            out[rows] = torch.stack(learner.head_logits(pooled, [task.name] * len(rows)))
    return out


def fused_test_accuracy(candidates: lexical.Candidates, val_logits: torch.Tensor,
                        test_logits: torch.Tensor, test_rows, skip, y_test: torch.Tensor) -> tuple[float, dict]:
    """The branch chosen on validation with these head logits (as learning chooses it), fused
    with the head's test logits: (test accuracy, the choice)."""
    chosen = candidates.choose(val_logits)
    branch = candidates.branch(chosen)
    fused = test_logits if branch is None else \
        lexical.fuse(test_logits, branch.log_probs(test_rows, skip), branch.mix)
    return (fused.argmax(-1) == y_test).float().mean().item(), chosen


def task_texts(backbone, task, seed: int):
    """A task as learning splits it: (fit rows, validation rows, label index, whole training
    ids, whole test ids, test labels)."""
    held = held_out_positions(task, VALIDATION_FRACTION, seed)
    fit = [i for i in range(len(task.train)) if i not in held]
    index = task.label_index()
    return (fit, sorted(held), index, backbone.tokenize_whole([e.text for e in task.train]),
            backbone.tokenize_whole([e.text for e in task.test]),
            torch.tensor([index[e.label] for e in task.test]))


def print_acc(results: dict[str, list[float]], width: int) -> None:
    for name, accuracies in results.items():
        print(f"{name:<{width}} ACC {100 * np.mean(accuracies):.2f}  "
              + " / ".join(f"{100 * a:.2f}" for a in accuracies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("stream", nargs="?", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its validation split)")
    args = parser.parse_args()
    learner = ContinualLearner.load(args.model, device="cpu", precision="fp32")
    tasks = [t for t in load_stream(args.stream or default_stream_path()) if t.name in learner.tasks]
    backbone, skip = learner.backbone, learner.model.special_ids
    vocab = backbone.tokenizer.convert_ids_to_tokens(list(range(backbone.tokenizer.vocab_size)))
    variants = {"encoder part, words": (False, WORDS), "whole text, words": (True, WORDS),
                "whole text, words + chars": (True, char_features(vocab, 3, 5, 0.5))}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for task in tasks:
        fit, val, index, whole, test_whole, y_test = task_texts(backbone, task, args.seed)
        ids, test_ids = backbone.encoder_view(whole), backbone.encoder_view(test_whole)
        longer = np.mean([len(a) > len(b) for a, b in zip(test_whole, test_ids)])
        val_logits = neural_logits(learner, task, [ids[i] for i in val])
        test_logits = neural_logits(learner, task, test_ids)
        neural = (test_logits.argmax(-1) == y_test).float().mean().item()
        for name, (read_whole, features) in variants.items():
            rows, test_rows = (whole, test_whole) if read_whole else (ids, test_ids)
            lexical.row_features = features  # this process only
            try:
                candidates = lexical.Candidates(
                    [rows[i] for i in fit], [index[task.train[i].label] for i in fit],
                    [rows[i] for i in val], [index[task.train[i].label] for i in val],
                    len(task.labels), skip)
                accuracy, chosen = fused_test_accuracy(candidates, val_logits, test_logits,
                                                       test_rows, skip, y_test)
            finally:
                lexical.row_features = WORDS
            results[name].append(accuracy)
            print(f"{task.name:<22} {name:<26} test {100 * accuracy:6.2f} (head alone "
                  f"{100 * neural:.2f}); C {chosen['c']:g}, mix {chosen['mix']}, validation "
                  f"{100 * chosen['val_accuracy']:.2f}; test texts past the encoder's part "
                  f"{100 * longer:.1f} %", flush=True)
    print_acc(results, 26)


if __name__ == "__main__":
    main()
