"""Headroom for long documents: a task's head reading every chunk of a document, not only its start.

    python scripts/build_long_stream.py
    ctt bench data/long/long_stream.jsonl.gz --methods ia3,tfidf --out runs/long
    python benchmarks/long_chunks.py runs/long/ia3/model data/long/long_stream.jsonl.gz   # ~4 min

The encoder reads the first `max_length` tokens of a text; the lexical branch reads all of it.
For each task, with the heads the model trained (on the first `max_length` tokens), this script
reads each test document as consecutive chunks of `max_length - 2` tokens (each with the
tokenizer's opening and closing tokens), takes the mean of the chunks' label log-probabilities,
and fuses it with a whole-text lexical branch whose C and mix are chosen on the validation split
read the same way (as learning chooses them). It prints, per task and as ACC, the head alone and
fused, reading the first chunk (what `predict` does) and every chunk. A measurement of what
reading documents in chunks would give; prediction does not do it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lexical_features import fused_test_accuracy, neural_logits, print_acc, task_texts

from continual_transformer import ContinualLearner
from continual_transformer.data.stream import load_stream
from continual_transformer.model import lexical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("stream", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its validation split)")
    args = parser.parse_args()
    learner = ContinualLearner.load(args.model, device="cpu", precision="fp32")
    backbone, skip = learner.backbone, learner.model.special_ids
    width = backbone.config.max_length - 2

    def chunked(task, rows) -> torch.Tensor:
        """(N, C) mean over each row's chunks of the head's label log-probabilities."""
        flat, owner = [], []
        for k, row in enumerate(backbone.known_ids(rows)):  # unknown words as the encoder reads them
            body = row[1:-1]  # between the opening and the closing token
            for start in range(0, max(len(body), 1), width):
                flat.append(row[:1] + body[start : start + width] + row[-1:])
                owner.append(k)
        log_probs = torch.log_softmax(neural_logits(learner, task, flat), dim=-1)
        index = torch.tensor(owner)
        total = torch.zeros(len(rows), log_probs.shape[1]).index_add_(0, index, log_probs)
        return total / torch.bincount(index, minlength=len(rows))[:, None]

    results: dict[str, list[float]] = {}
    for task in [t for t in load_stream(args.stream) if t.name in learner.tasks]:
        fit, val, index, whole, test_whole, y = task_texts(backbone, task, args.seed)
        candidates = lexical.Candidates(
            [whole[i] for i in fit], [index[task.train[i].label] for i in fit],
            [whole[i] for i in val], [index[task.train[i].label] for i in val],
            len(task.labels), skip, whole_text=True)
        reads = {
            "first chunk": (neural_logits(learner, task, backbone.encoder_view([whole[i] for i in val])),
                            neural_logits(learner, task, backbone.encoder_view(test_whole))),
            "every chunk": (chunked(task, [whole[i] for i in val]), chunked(task, test_whole)),
        }
        for name, (val_logits, test_logits) in reads.items():
            both, chosen = fused_test_accuracy(candidates, val_logits, test_logits, test_whole, skip, y)
            head = (test_logits.argmax(-1) == y).float().mean().item()
            results.setdefault(f"{name}, head", []).append(head)
            results.setdefault(f"{name}, fused", []).append(both)
            print(f"{task.name:<22} {name:<12} head {100 * head:6.2f}  fused {100 * both:6.2f} "
                  f"(C {chosen['c']:g}, mix {chosen['mix']})", flush=True)
    print_acc(results, 20)


if __name__ == "__main__":
    main()
