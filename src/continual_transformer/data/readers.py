"""Readers of stream files by format: JSONL, CSV/TSV, Parquet and `datasets` folders.

Each reader gives the file's columns and a way to read its records (one dict per row) with the
location a message names: `file.csv:12` (the line the row starts on), `file.parquet row 11`,
`folder train[11]` (a `datasets` split and index; `folder row 11` for a single dataset).
Records are read one at a time or in small batches, never the whole file at once: a 1 GB CSV
is not held twice in memory while it is checked. The checks themselves are `stream.Fields`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, TextIO

from ..extras import import_extra
from ..types import StreamError
from .stream import READ_ERRORS, open_text, records_from_file, records_from_lines, text_from_bytes

BATCH_ROWS = 1024  # rows per Parquet / datasets batch: a few MB of text at most


class Records(NamedTuple):
    """A file's column names (None: each JSONL line carries its own keys) and `read(columns)`,
    which yields `(location, record)` for every row, with at least the named columns."""

    columns: list[str] | None
    read: Callable[[list[str]], Iterator[tuple[str, object]]]


def jsonl_file(path: Path) -> Records:
    return Records(None, lambda columns: records_from_file(path))


def jsonl_bytes(data: bytes, source: str) -> Records:
    text = text_from_bytes(data, source)
    return Records(None, lambda columns: records_from_lines(text.split("\n"), source))


def csv_file(path: Path, delimiter: str) -> Records:
    # utf-8-sig: spreadsheets write a byte-order mark that would otherwise stick to the first
    # column's name. newline="": the csv module reads line ends inside quoted fields itself.
    return _csv(lambda: open_text(path, encoding="utf-8-sig", newline=""), str(path), delimiter)


def csv_bytes(data: bytes, source: str, delimiter: str) -> Records:
    text = text_from_bytes(data, source, encoding="utf-8-sig")
    return _csv(lambda: io.StringIO(text, newline=""), source, delimiter)


def _csv(open_handle: Callable[[], TextIO], source: str, delimiter: str) -> Records:
    header = next(_csv_rows(open_handle, source, delimiter), (None, None))[1]
    if header is None:
        raise StreamError(f"{source}: no examples (the file is empty)")
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise StreamError(f"{source}: column(s) {repeated} appear more than once in the header")

    def read(columns: list[str]) -> Iterator[tuple[str, dict]]:
        rows = _csv_rows(open_handle, source, delimiter)
        next(rows)  # the header
        for where, values in rows:
            if len(values) != len(header):
                raise StreamError(f"{where}: {len(values)} field(s), but the header has "
                                  f"{len(header)}: {header}")
            yield where, dict(zip(header, values))

    return Records(header, read)


def _csv_rows(open_handle, source: str, delimiter: str) -> Iterator[tuple[str, list[str]]]:
    """Non-blank rows with `source:line` of the line each starts on (a quoted field may span
    lines, so the reader's own line count is where a row ends); a malformed row names the line
    it starts on."""
    try:
        with open_handle() as handle:
            # strict: a quote left open is an error, not a field that swallows the rest
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            line = 0
            try:
                for values in reader:
                    start, line = line + 1, reader.line_num
                    if values:
                        yield f"{source}:{start}", values
            except csv.Error as exc:
                raise StreamError(f"{source}:{line + 1}: {exc}") from None
    except READ_ERRORS as exc:
        raise StreamError(f"{source}: cannot read stream file: {exc}") from None


def parquet_file(file: Path | bytes, source: str, label_column: str) -> Records:
    """Parquet, read in batches of `BATCH_ROWS` rows and only the columns asked for. Integer
    labels (common in Parquet exports) become their decimal strings."""
    pa = import_extra("pyarrow", "data")
    pq = import_extra("pyarrow.parquet", "data")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(file) if isinstance(file, bytes) else file)
    except (pa.ArrowException, OSError) as exc:
        raise StreamError(f"{source}: cannot read Parquet file: {exc}") from None

    def read(columns: list[str]) -> Iterator[tuple[str, dict]]:
        index = 0
        try:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                values = [_label_strings(batch.column(i).to_pylist())
                          if name == label_column and pa.types.is_integer(batch.column(i).type)
                          else batch.column(i).to_pylist()
                          for i, name in enumerate(batch.schema.names)]
                for row in zip(*values):
                    yield f"{source} row {index}", dict(zip(batch.schema.names, row))
                    index += 1
        except (pa.ArrowException, OSError) as exc:
            raise StreamError(f"{source} row {index}: cannot read Parquet file: {exc}") from None

    return Records(parquet.schema_arrow.names, read)


def dataset_folder(path: Path, label_column: str) -> Records:
    """A folder written by `datasets`' `save_to_disk`: a Dataset, or a DatasetDict whose split
    names (`train`, `test`) give each row's split unless it has a `split` column of its own.
    Splits are read in their saved order, in batches; a ClassLabel label is its name."""
    source = str(path)
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise StreamError(f"{source}: a folder, but not one written by datasets' save_to_disk "
                          "(it has no dataset_info.json or dataset_dict.json)")
    datasets = import_extra("datasets", "data")
    try:
        loaded = datasets.load_from_disk(source)
    except (OSError, ValueError) as exc:
        raise StreamError(f"{source}: cannot read the dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        parts = [(f"{source} {name}", name, part) for name, part in loaded.items()]
    else:
        parts = [(f"{source} row", None, loaded)]
    if not parts:
        raise StreamError(f"{source}: no examples (the dataset has no splits)")
    header = list(parts[0][2].column_names)
    split_from_name = parts[0][1] is not None and "split" not in header
    if split_from_name:
        header.append("split")

    def read(columns: list[str]) -> Iterator[tuple[str, dict]]:
        for prefix, name, part in parts:
            stored = [c for c in columns if not (split_from_name and c == "split")]
            missing = [c for c in stored if c not in part.column_names]
            if missing:
                raise StreamError(f"{source} {name}: no column(s) {missing}; columns: "
                                  f"{part.column_names}")
            feature = part.features.get(label_column)
            names = feature.names if isinstance(feature, datasets.ClassLabel) else None
            index = 0
            for batch in part.with_format(None).select_columns(stored).iter(batch_size=BATCH_ROWS):
                if label_column in batch:
                    batch[label_column] = _label_strings(batch[label_column], names)
                for row in zip(*(batch[c] for c in stored)):
                    record = dict(zip(stored, row))
                    if split_from_name:
                        record["split"] = name
                    yield (f"{prefix}[{index}]" if name else f"{prefix} {index}"), record
                    index += 1

    return Records(header, read)


def _label_strings(values: list, names: list[str] | None = None) -> list:
    """Integer labels as strings: a ClassLabel's name, or the number. Anything else (a missing
    label, -1 for "no label", a float) stays as it is, for the row check to refuse by row."""
    if names is not None:
        return [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in values]
    return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]
