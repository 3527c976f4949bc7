"""The one entry for reading tasks from a file of any format: `load_tasks(path, options)`, and
`tasks_from_upload` for a file that arrived over HTTP.

    load_tasks("reviews.csv", ReadOptions(text_column="review", label_column="stars",
                                          test_fraction=0.2), seed=0)

The format comes from the name (`.jsonl`, `.jsonl.gz`, `.csv`, `.tsv` (also gzipped),
`.parquet`, a folder: `datasets`) unless `ReadOptions.format` says it. The columns default to
the stream fields' names (`task`, `split`, `text`, `label`). A file without a task column is
one task, named by `task_name` or after the file; a file without a split column needs a test
fraction, drawn stratified by label with the seed. Every row is checked (`stream.Fields`)
before any task is returned, with messages naming the file and the row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..types import TASK_NAME, StreamError, Task, check_task_name
from . import readers
from .split import hold_out_test
from .stream import Fields, tasks_from_rows

FORMATS = ("jsonl", "csv", "tsv", "parquet", "datasets")
SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".csv": "csv", ".csv.gz": "csv",
            ".tsv": "tsv", ".tsv.gz": "tsv", ".parquet": "parquet"}
CONTENT_TYPES = {"text/csv": "csv", "text/tab-separated-values": "tsv",
                 "application/vnd.apache.parquet": "parquet", "application/x-parquet": "parquet",
                 "application/jsonl": "jsonl", "application/x-ndjson": "jsonl",
                 "application/jsonlines": "jsonl"}


@dataclass(frozen=True)
class ReadOptions:
    """How to read a stream file: its format and which column holds what.

    `task_column=None` reads a `task` column if the file has one; without one the file is one
    task, named `task_name` or after the file. `split_column=None` reads a `split` column if
    there is one; `test_fraction` instead draws the test split (any split column is not read).
    """

    format: str | None = None  # None: from the file name
    text_column: str = "text"
    label_column: str = "label"
    task_column: str | None = None
    split_column: str | None = None
    task_name: str | None = None  # every row is this task (any task column is not read)
    test_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; known: {list(FORMATS)}")
        named = {}
        for option in ("text_column", "label_column", "task_column", "split_column"):
            column = getattr(self, option)
            if column is None:
                continue
            if not isinstance(column, str) or not column:
                raise ValueError(f"{option} must name a column, got {column!r}")
            if column in named:
                raise ValueError(f"{named[column]} and {option} name the same column {column!r}")
            named[column] = option
        if self.task_name is not None:
            check_task_name(self.task_name, "task_name")
            if self.task_column is not None:
                raise ValueError(f"give a task column or a task name, not both: "
                                 f"task_column={self.task_column!r}, task_name={self.task_name!r}")
        if self.test_fraction is not None:
            if isinstance(self.test_fraction, bool) or not 0 < self.test_fraction < 1:
                raise ValueError("test_fraction must be between 0 and 1 (exclusive), got "
                                 f"{self.test_fraction!r}")
            if self.split_column is not None:
                raise ValueError(f"give a split column or a test fraction, not both: "
                                 f"split_column={self.split_column!r}, "
                                 f"test_fraction={self.test_fraction!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "ReadOptions":
        return cls(**(data or {}))


def format_of(name: str) -> str | None:
    """The format a file name's suffix says, or None."""
    suffix = _suffix(name)
    return SUFFIXES[suffix] if suffix else None


def _suffix(name: str) -> str | None:
    lowered = name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if lowered.endswith(s)), None)


def _stem(name: str) -> str:
    suffix = _suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def load_tasks(path: str | Path, options: ReadOptions | None = None, *, seed: int = 0,
               require_test: bool = True) -> list[Task]:
    """Read and check a whole stream file (or `datasets` folder); raise `StreamError` naming the
    file, the row and the problem. Nothing is returned unless every row is good."""
    path = Path(path)
    options = options or ReadOptions()
    if not path.exists():
        raise StreamError(f"{path}: no such stream file")
    fmt = options.format or ("datasets" if path.is_dir() else format_of(path.name))
    if fmt is None:
        raise StreamError(f"{path}: cannot tell the format from the file name; name it "
                          f"{sorted(SUFFIXES)} or give the format, one of {list(FORMATS)}")
    if (fmt == "datasets") != path.is_dir():
        raise StreamError(f"{path}: format {fmt!r} needs "
                          + ("a folder written by datasets' save_to_disk" if fmt == "datasets"
                             else "a file, not a folder"))
    if fmt == "jsonl":
        records = readers.jsonl_file(path)
    elif fmt in ("csv", "tsv"):
        records = readers.csv_file(path, "," if fmt == "csv" else "\t")
    elif fmt == "parquet":
        records = readers.parquet_file(path, str(path), options.label_column)
    else:
        records = readers.dataset_folder(path, options.label_column)
    stem = path.name if path.is_dir() else _stem(path.name)
    return _tasks(records, str(path), stem, options, seed, require_test)


def tasks_from_upload(data: bytes, filename: str, options: ReadOptions | None = None, *,
                      content_type: str | None = None, seed: int = 0,
                      require_test: bool = False) -> list[Task]:
    """Read and check a file held in memory, e.g. an upload; messages name `filename` as
    `load_tasks` names a path. The format: `options.format`, else the name's suffix, else the
    content type, else JSONL. Test rows are optional unless `require_test`."""
    options = options or ReadOptions()
    media = (content_type or "").split(";")[0].strip().lower()
    fmt = options.format or format_of(filename) or CONTENT_TYPES.get(media, "jsonl")
    if fmt == "datasets":
        raise StreamError(f"{filename}: a datasets folder cannot be uploaded; upload it as "
                          "Parquet, CSV, TSV or JSONL")
    if fmt == "jsonl":
        records = readers.jsonl_bytes(data, filename)
    elif fmt in ("csv", "tsv"):
        records = readers.csv_bytes(data, filename, "," if fmt == "csv" else "\t")
    else:
        records = readers.parquet_file(data, filename, options.label_column)
    return _tasks(records, filename, _stem(filename), options, seed, require_test)


def _tasks(records: readers.Records, source: str, stem: str, options: ReadOptions, seed: int,
           require_test: bool) -> list[Task]:
    fields = _fields(records.columns, source, stem, options, require_test)
    rows = ((where, fields.row(record, where))
            for where, record in records.read(list(fields.columns.values())))
    drawn = options.test_fraction is not None
    tasks = tasks_from_rows(rows, source, require_test=require_test and not drawn)
    if drawn:
        tasks = [hold_out_test(t, options.test_fraction, seed, source) for t in tasks]
    return tasks


def _fields(columns: list[str] | None, source: str, stem: str, options: ReadOptions,
            require_test: bool) -> Fields:
    """Which column (or fixed value) gives each field, checked against the file's columns.
    JSONL has no header: its lines are checked one by one."""
    read = {"text": options.text_column, "label": options.label_column}
    values = {}
    if options.task_name is not None:
        values["task"] = options.task_name
    elif options.task_column is not None or columns is None or "task" in columns:
        read["task"] = options.task_column or "task"
    elif TASK_NAME.match(stem):  # a table without a task column is one task
        values["task"] = stem
    else:
        raise StreamError(f"{source}: no task column 'task' (columns: {columns}), and the file "
                          f"name {stem!r} is not a task name; give a task name or a task column")
    if options.test_fraction is not None:
        values["split"] = "train"  # until the test split is drawn
    elif options.split_column is not None or columns is None or "split" in columns:
        read["split"] = options.split_column or "split"
    elif not require_test:  # an uploaded task may come with train rows only
        values["split"] = "train"
    else:
        raise StreamError(f"{source}: no split column 'split' (columns: {columns}); give a split "
                          "column or a test fraction")
    if columns is not None:
        for field, column in read.items():
            if column not in columns:
                raise StreamError(f"{source}: no {field} column {column!r}; columns: {columns}")
    return Fields(read, values)
