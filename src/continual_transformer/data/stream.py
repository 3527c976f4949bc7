"""Streams of tasks: the JSONL stream format, and the row validation every format shares.

A stream file holds one JSON object per line (plain or gzip-compressed):

    {"task": "news", "split": "train", "text": "Stocks fell ...", "label": "business"}

Tasks arrive in the order of their first line. The whole file is validated before anything is
returned, so nothing is ever trained on a stream that fails validation. CSV, Parquet and
`datasets` folders are read by `readers.py` into the same rows, checked here (`Fields`,
`check_row`, `tasks_from_rows`); `source.load_tasks` is the one entry for every format.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ..types import Example, StreamError, Task, check_task_name

SPLITS = ("train", "test")
FIELDS = ("task", "split", "text", "label")
# What reading a text file (plain or gzip) raises when the file, not the code, is at fault.
READ_ERRORS = (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError)


def open_text(path: Path, *, encoding: str = "utf-8", newline: str | None = None):
    """A text handle on a plain or gzip-compressed file (told apart by its first bytes)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding=encoding, newline=newline)
    return open(path, encoding=encoding, newline=newline)


def _parse_line(raw: str, where: str) -> object:
    try:
        return json.loads(raw.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise StreamError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def check_row(row: object, where: str, names: Mapping[str, str] | None = None) -> dict:
    """Check one decoded stream row (fields, types, split, non-empty text and label, task name).

    `names` maps a field to the column it was read from, so that a message names the column the
    user knows (`missing field 'review'`); by default each field is its own column.
    """
    if not isinstance(row, dict):
        raise StreamError(f"{where}: expected a JSON object, got {type(row).__name__}")
    names = names or {}
    for field in FIELDS:
        name = names.get(field, field)
        if field not in row:
            raise StreamError(f"{where}: missing field {name!r}")
        if not isinstance(row[field], str):
            raise StreamError(
                f"{where}: field {name!r} must be a string, got {type(row[field]).__name__} "
                f"{row[field]!r}"
            )
        try:
            row[field].encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, written as a \\ud800 escape
            raise StreamError(
                f"{where}: field {name!r} is not valid Unicode ({exc.reason} at character {exc.start})"
            ) from None
    if row["split"] not in SPLITS:
        raise StreamError(f"{where}: unknown split {row['split']!r}; expected one of {list(SPLITS)}")
    if not row["text"].strip():
        raise StreamError(f"{where}: empty text")
    if not row["label"].strip():
        raise StreamError(f"{where}: empty label")
    check_task_name(row["task"], where)
    return row


class Fields:
    """Where a row's four fields come from: a column of the record, or one value for every row.

    A file without a task column is one task (`values={"task": name}`); a split drawn later by a
    test fraction starts as "train" for every row. Columns default to the fields' own names.
    """

    def __init__(self, columns: Mapping[str, str] | None = None,
                 values: Mapping[str, str] | None = None):
        self.values = dict(values or {})
        self.columns = {field: (columns or {}).get(field, field)
                        for field in FIELDS if field not in self.values}

    def row(self, record: object, where: str) -> dict:
        """The checked stream row of one record (a JSON object, a CSV row, a Parquet row)."""
        if not isinstance(record, dict):
            raise StreamError(f"{where}: expected a JSON object, got {type(record).__name__}")
        row = dict(self.values)
        for field, column in self.columns.items():
            if column in record:  # an absent one is reported by check_row, in field order
                row[field] = record[column]
        return check_row(row, where, self.columns)


def records_from_lines(lines: Iterable[str], source: str) -> Iterator[tuple[str, object]]:
    """Decoded JSON values of a stream's lines, each with its `source:line` location; blank lines
    skip."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source}:{number}"
        yield where, _parse_line(raw, where)


def rows_from_lines(lines: Iterable[str], source: str) -> Iterator[tuple[str, dict]]:
    """Checked rows of a stream's lines, each with its `source:line` location; blank lines skip."""
    for where, record in records_from_lines(lines, source):
        yield where, check_row(record, where)


def tasks_from_rows(
    rows: Iterable[tuple[str, dict]], source: str, *, require_test: bool = True
) -> list[Task]:
    """Group validated rows (each with a location string for messages) into tasks, in order.

    Stream files need test examples for every task (they are evaluated); an uploaded task may
    come without them (`require_test=False`).
    """
    order: list[str] = []
    train: dict[str, list[Example]] = {}
    test: dict[str, list[Example]] = {}
    # Where each test label first appears, per task: the first of these whose label the train
    # split lacks is the first bad test row, so no location is kept per row (a large file's test
    # split would otherwise hold one string per row until the end).
    first_test: dict[str, dict[str, str]] = {}
    # One string object per distinct label and task name: a reader makes a new one per row.
    interned: dict[str, str] = {}
    for where, row in rows:
        name = interned.setdefault(row["task"], row["task"])
        if name not in train:
            order.append(name)
            train[name], test[name], first_test[name] = [], [], {}
        label = interned.setdefault(row["label"], row["label"])
        example = Example(row["text"], label)
        if row["split"] == "train":
            train[name].append(example)
        else:
            test[name].append(example)
            first_test[name].setdefault(label, where)
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
        for label, where in first_test[name].items():
            if label not in known:
                raise StreamError(
                    f"{where}: test label {label!r} of task {name!r} never appears in its "
                    f"train split; train labels: {labels}"
                )
        tasks.append(Task(name, tuple(labels), tuple(train[name]), tuple(test[name])))
        del train[name], test[name]  # the tuples are the one copy
    return tasks


def load_stream(path: str | Path) -> list[Task]:
    """Read and validate a whole stream file; raise `StreamError` naming file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"{path}: no such stream file")
    rows = ((where, check_row(record, where)) for where, record in records_from_file(path))
    return tasks_from_rows(rows, str(path))


def records_from_file(path: Path) -> Iterator[tuple[str, object]]:
    """The decoded lines of a JSONL file, read one at a time, each with its `file:line`."""
    try:
        with open_text(path) as handle:
            yield from records_from_lines(handle, str(path))
    except READ_ERRORS as exc:
        raise StreamError(f"{path}: cannot read stream file: {exc}") from None


def tasks_from_bytes(data: bytes, source: str, *, require_test: bool = True) -> list[Task]:
    """Read and validate a stream held in memory (plain or gzip JSONL), e.g. an uploaded file.

    Messages name `source` and the line, exactly as `load_stream` names a file.
    """
    text = text_from_bytes(data, source)
    return tasks_from_rows(rows_from_lines(text.split("\n"), source), source,
                           require_test=require_test)


def text_from_bytes(data: bytes, source: str, encoding: str = "utf-8") -> str:
    """The text of an uploaded file, plain or gzip-compressed."""
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return data.decode(encoding)
    except READ_ERRORS as exc:
        raise StreamError(f"{source}: cannot read stream file: {exc}") from None


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
