"""Bulk scoring: every row of a file predicted, streamed (`ctt predict MODEL --input FILE`).

    score_file(learner, "tickets.csv", "predictions.csv", ScoreOptions(text_column="body"))

Input: plain text (one text per line), JSONL, CSV/TSV or Parquet, read row by row (Parquet in
batches) and predicted in chunks of `CHUNK_ROWS` rows, so memory does not grow with the file.
Each row's task is `ScoreOptions.task`, its `task_column`, or, with neither, the router's
choice. Output: one row per input row, in input order (`row`, `task`, `label`, `probability`,
`routed`, and for a routed row `task_probability`, the router's probability of its task), as JSONL or CSV by the output's name; it is written to a temporary file beside the
output and renamed into place when every row is done. A row without a usable text or with an
unknown task stops the scoring, naming the file, line (or row) and reason; with
`skip_bad_rows` it is counted and left out instead.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

from ..data import readers
from ..data.source import format_of
from ..data.stream import READ_ERRORS, open_text
from ..types import StreamError

if TYPE_CHECKING:
    from ..learner import ContinualLearner

INPUT_FORMATS = ("text", "jsonl", "csv", "tsv", "parquet")
CHUNK_ROWS = 1024  # rows predicted at a time (the learner batches them by length within)
OUTPUT_FIELDS = ("row", "task", "label", "probability", "routed", "task_probability")


@dataclass(frozen=True)
class ScoreOptions:
    text_column: str = "text"
    task_column: str | None = None  # a column naming each row's task
    task: str | None = None  # one task for every row (None, without task_column: routed)
    format: str | None = None  # one of INPUT_FORMATS (default: from the name; .txt is text)
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if self.task is not None and self.task_column is not None:
            raise ValueError("give a task or a task column, not both")
        if self.format is not None and self.format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {self.format!r}; known: {list(INPUT_FORMATS)}")


@dataclass(frozen=True)
class ScoreResult:
    rows: int  # rows predicted and written
    skipped: int  # bad rows left out (with skip_bad_rows)
    seconds: float


def score_file(learner: "ContinualLearner", path: str | Path, output: str | Path | None,
               options: ScoreOptions | None = None,
               progress: Callable[[int], None] | None = None, out: TextIO | None = None) -> ScoreResult:
    """Predict every row of `path`; write to `output` (JSONL or CSV by its name) or, without
    one, JSONL lines to `out`. `progress(rows_done)` after each chunk."""
    options = options or ScoreOptions()
    if options.task is not None:
        learner.require(options.task)
    start = time.perf_counter()
    rows = input_rows(Path(path), options)
    if output is None:
        return _score(learner, rows, options, _JsonLines(out), progress, start)
    output = Path(output)
    kind = "csv" if output.name.lower().endswith(".csv") else "jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            writer = _CsvRows(stream) if kind == "csv" else _JsonLines(stream)
            result = _score(learner, rows, options, writer, progress, start)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return result


def _score(learner, rows: Iterator[tuple[str, str, str | None]], options: ScoreOptions, writer,
           progress, start: float) -> ScoreResult:
    done = skipped = 0
    chunk: list[tuple[str, str | None]] = []

    def flush() -> None:
        nonlocal done
        predictions = learner.predict([text for text, _ in chunk], task=[task for _, task in chunk])
        for (_, task), prediction in zip(chunk, predictions):
            writer.write({"row": done, "task": prediction.task, "label": prediction.label,
                          "probability": prediction.probabilities[prediction.label],
                          "routed": task is None, "task_probability": prediction.task_probability})
            done += 1
        chunk.clear()
        if progress is not None:
            progress(done)

    for where, text, task in rows:
        problem = _problem(learner, text, task, options)
        if problem is not None:
            if not options.skip_bad_rows:
                raise StreamError(f"{where}: {problem}")
            skipped += 1
            continue
        chunk.append((text, task))
        if len(chunk) == CHUNK_ROWS:
            flush()
    if chunk:
        flush()
    return ScoreResult(done, skipped, round(time.perf_counter() - start, 3))


def _problem(learner, text, task, options: ScoreOptions) -> str | None:
    if not isinstance(text, str):
        return f"field {options.text_column!r} must be a string, got {type(text).__name__} {text!r:.40}"
    if not text.strip():
        return "empty text"
    if task is not None and task not in learner.tasks:
        return f"unknown task {task!r}; known: {list(learner.tasks)}"
    return None


def input_rows(path: Path, options: ScoreOptions) -> Iterator[tuple[str, str, str | None]]:
    """(location, text, task or None) for every row of `path`, read as it goes."""
    if not path.is_file():
        raise StreamError(f"{path}: no such input file")
    fmt = options.format or ("text" if path.name.lower().endswith((".txt", ".txt.gz"))
                             else format_of(path.name))
    if fmt is None:
        raise StreamError(f"{path}: cannot tell the format from the file name; give the format, "
                          f"one of {list(INPUT_FORMATS)}")
    if fmt == "text":
        if options.task_column is not None:
            raise StreamError(f"{path}: a plain text file has no columns; give --task or none")
        return _lines(path, options.task)
    if fmt == "jsonl":
        records = readers.jsonl_file(path)
    elif fmt in ("csv", "tsv"):
        records = readers.csv_file(path, "," if fmt == "csv" else "\t")
    else:
        records = readers.parquet_file(path, str(path), label_column="")
    columns = [options.text_column] + ([options.task_column] if options.task_column else [])
    missing = [c for c in columns if records.columns is not None and c not in records.columns]
    if missing:
        raise StreamError(f"{path}: no column {missing[0]!r}; columns: {records.columns}")
    return _records(records, columns, options)


def _lines(path: Path, task: str | None) -> Iterator[tuple[str, str, str | None]]:
    number = 0
    try:
        with open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                yield f"{path}:{number}", line.rstrip("\r\n"), task
    except READ_ERRORS as exc:
        raise StreamError(f"{path}:{number + 1}: cannot read the file: {exc}") from None


def _records(records: readers.Records, columns: list[str], options: ScoreOptions):
    for where, record in records.read(columns):
        if not isinstance(record, dict) or options.text_column not in record:
            yield where, None, None  # reported as a row without its text
            continue
        task = record.get(options.task_column) if options.task_column else options.task
        yield where, record[options.text_column], task


class _JsonLines:
    def __init__(self, stream: TextIO | None):
        self.stream = stream

    def write(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False)
        if self.stream is None:
            print(line)
        else:
            self.stream.write(line + "\n")


class _CsvRows:
    def __init__(self, stream: TextIO):
        self.writer = csv.DictWriter(stream, fieldnames=OUTPUT_FIELDS)
        self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
