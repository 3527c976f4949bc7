"""Streams of tasks: loading and validating JSONL stream files.

A stream file holds one JSON object per line (plain or gzip-compressed):

    {"task": "news", "split": "train", "text": "Stocks fell ...", "label": "business"}

Tasks arrive in the order of their first line. The whole file is validated before anything is
returned, so nothing is ever trained on a stream that fails validation.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from ..types import Example, StreamError, Task, check_task_name

SPLITS = ("train", "test")
FIELDS = ("task", "split", "text", "label")


def _open_text(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _parse_line(raw: str, where: str) -> dict:
    try:
        row = json.loads(raw.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise StreamError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    return check_row(row, where)


def check_row(row: object, where: str) -> dict:
    """Check one decoded stream row (fields, types, split, non-empty text and label, task name)."""
    if not isinstance(row, dict):
        raise StreamError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in FIELDS:
        if field not in row:
            raise StreamError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], str):
            raise StreamError(
                f"{where}: field {field!r} must be a string, got {type(row[field]).__name__} "
                f"{row[field]!r}"
            )
        try:
            row[field].encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, written as a \\ud800 escape
            raise StreamError(
                f"{where}: field {field!r} is not valid Unicode ({exc.reason} at character {exc.start})"
            ) from None
    if row["split"] not in SPLITS:
        raise StreamError(f"{where}: unknown split {row['split']!r}; expected one of {list(SPLITS)}")
    if not row["text"].strip():
        raise StreamError(f"{where}: empty text")
    if not row["label"].strip():
        raise StreamError(f"{where}: empty label")
    check_task_name(row["task"], where)
    return row


def rows_from_lines(lines: Iterable[str], source: str) -> Iterator[tuple[str, dict]]:
    """Checked rows of a stream's lines, each with its `source:line` location; blank lines skip."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source}:{number}"
        yield where, _parse_line(raw, where)


def tasks_from_rows(
    rows: Iterable[tuple[str, dict]], source: str, *, require_test: bool = True
) -> list[Task]:
    """Group validated rows (each with a location string for messages) into tasks, in order.

    Stream files need test examples for every task (they are evaluated); an uploaded task may
    come without them (`require_test=False`).
    """
    order: list[str] = []
    train: dict[str, list[Example]] = {}
    test: dict[str, list[tuple[str, Example]]] = {}
    for where, row in rows:
        name = row["task"]
        if name not in train:
            order.append(name)
            train[name], test[name] = [], []
        example = Example(row["text"], row["label"])
        if row["split"] == "train":
            train[name].append(example)
        else:
            test[name].append((where, example))
    if not order:
        raise StreamError(f"{source}: no examples")
    tasks = []
    for name in order:
        labels = sorted({e.label for e in train[name]})
        if len(labels) < 2:
            raise StreamError(
                f"{source}: task {name!r} has {len(labels)} label(s) in its train split "
                f"{labels}; a task needs at least 2"
            )
        if require_test and not test[name]:
            raise StreamError(f"{source}: task {name!r} has no test examples")
        known = set(labels)
        for where, example in test[name]:
            if example.label not in known:
                raise StreamError(
                    f"{where}: test label {example.label!r} of task {name!r} never appears in its "
                    f"train split; train labels: {labels}"
                )
        tasks.append(Task(name, tuple(labels), tuple(train[name]), tuple(e for _, e in test[name])))
    return tasks


def load_stream(path: str | Path) -> list[Task]:
    """Read and validate a whole stream file; raise `StreamError` naming file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"{path}: no such stream file")

    def rows():
        try:
            with _open_text(path) as handle:
                yield from rows_from_lines(handle, str(path))
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as exc:
            raise StreamError(f"{path}: cannot read stream file: {exc}") from None

    return tasks_from_rows(rows(), str(path))


def tasks_from_bytes(data: bytes, source: str, *, require_test: bool = True) -> list[Task]:
    """Read and validate a stream held in memory (plain or gzip JSONL), e.g. an uploaded file.

    Messages name `source` and the line, exactly as `load_stream` names a file.
    """
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as exc:
        raise StreamError(f"{source}: cannot read stream file: {exc}") from None
    return tasks_from_rows(rows_from_lines(text.split("\n"), source), source,
                           require_test=require_test)


def default_stream_path() -> Path:
    """The bundled default stream (five English tasks; see data/NOTICE)."""
    here = Path(__file__).resolve()
    candidates = [
        here.parent / "default_stream.jsonl.gz",  # installed with the package's data
        here.parents[3] / "data" / "default_stream.jsonl.gz",  # source checkout
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise StreamError(
        "the bundled default stream was not found; looked in "
        + ", ".join(str(c) for c in candidates)
    )


def describe(tasks: list[Task]) -> list[dict]:
    """Per-task counts, for printing and reports."""
    return [
        {
            "task": t.name,
            "labels": list(t.labels),
            "train": len(t.train),
            "test": len(t.test),
            "train_label_counts": dict(Counter(e.label for e in t.train)),
        }
        for t in tasks
    ]
