#!/usr/bin/env python3
"""Build a long-document stream from the bundled one: ``data/long/long_stream.jsonl.gz``.

Each document is six texts of the same task and label joined by spaces (State of the Union
chunks, Austen paragraphs, Brown paragraphs, Bible verses), so a document runs to 300-900
tokens: several times the encoder's 128. Train documents are made of train texts and test
documents of test texts, so no text is in both splits. The label is the texts' label, so a
classifier that reads only the first 128 tokens sees a sixth to a half of the evidence that
one reading the whole document sees. `wordnet_supersense` is left out (one-line glosses).

    python scripts/build_long_stream.py               # ~2 s
    ctt bench data/long/long_stream.jsonl.gz --methods ia3,tfidf --out runs/long

Sampling uses ``random.Random(f"{task}/{split}")`` over the texts of each label in stream
order, and gzip's mtime is 0: every run writes the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

from continual_transformer.data.stream import default_stream_path, load_stream

TASKS = ("sotu_era", "austen_novel", "brown_genre", "bible_genre")
PER_DOCUMENT = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/long/long_stream.jsonl.gz"))
    args = parser.parse_args()
    tasks = {t.name: t for t in load_stream(default_stream_path())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    counts = {}
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for name in TASKS:
            for split in ("train", "test"):
                by_label: dict[str, list[str]] = {}
                for example in getattr(tasks[name], split):
                    by_label.setdefault(example.label, []).append(example.text)
                rng = random.Random(f"{name}/{split}")
                rows = []
                for label, texts in by_label.items():
                    rng.shuffle(texts)
                    for i in range(0, len(texts) - PER_DOCUMENT + 1, PER_DOCUMENT):
                        rows.append({"task": f"{name}_long", "split": split,
                                     "text": " ".join(texts[i : i + PER_DOCUMENT]), "label": label})
                rng.shuffle(rows)
                counts[f"{name}_long/{split}"] = len(rows)
                out.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
