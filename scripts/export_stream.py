#!/usr/bin/env python3
"""Export a JSONL stream (default: the bundled one) to CSV, TSV, Parquet or a `datasets` folder.

    python scripts/export_stream.py --csv stream.csv --parquet stream.parquet
    python scripts/export_stream.py my_stream.jsonl --tsv s.tsv --datasets s_dataset

CSV, TSV and Parquet hold the columns task, split, text, label in the stream's row order, so
`ctt run stream.csv` learns exactly the tasks `ctt run` learns from the JSONL. The `datasets`
folder is a DatasetDict with a `train` and a `test` split (columns task, text, label): the
split is the part a row is in. CSV, TSV and Parquet are written row by row (Parquet in row
groups of 4096), so a stream of any size exports in little memory; the `datasets` export holds
the stream in memory.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from continual_transformer.data.stream import (FIELDS, SPLITS, check_row, default_stream_path,
                                               records_from_file)

ROW_GROUP = 4096


def rows(source: Path):
    """The stream's rows, checked, in file order (field order: task, split, text, label)."""
    for where, record in records_from_file(source):
        row = check_row(record, where)
        yield [row[f] for f in FIELDS]


def export_csv(source: Path, target: Path, delimiter: str = ",") -> int:
    count = 0
    with open(target, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(FIELDS)
        for row in rows(source):
            writer.writerow(row)
            count += 1
    return count


def export_parquet(source: Path, target: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(f, pa.string()) for f in FIELDS])
    count, batch = 0, []
    with pq.ParquetWriter(target, schema) as writer:
        for row in rows(source):
            batch.append(row)
            if len(batch) == ROW_GROUP:
                writer.write_table(_table(pa, schema, batch))
                count, batch = count + len(batch), []
        if batch:
            writer.write_table(_table(pa, schema, batch))
            count += len(batch)
    return count


def _table(pa, schema, batch: list[list[str]]):
    return pa.Table.from_arrays([pa.array(column, pa.string()) for column in zip(*batch)],
                                schema=schema)


def export_datasets(source: Path, target: Path) -> int:
    import datasets

    parts = {split: {"task": [], "text": [], "label": []} for split in SPLITS}
    for task, split, text, label in rows(source):
        for column, value in (("task", task), ("text", text), ("label", label)):
            parts[split][column].append(value)
    datasets.DatasetDict({split: datasets.Dataset.from_dict(columns)
                          for split, columns in parts.items()}).save_to_disk(str(target))
    return sum(len(columns["task"]) for columns in parts.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stream", nargs="?", type=Path, default=None,
                        help="JSONL stream (plain or gzip); default: the bundled stream")
    parser.add_argument("--csv", type=Path, help="write CSV here")
    parser.add_argument("--tsv", type=Path, help="write TSV here")
    parser.add_argument("--parquet", type=Path, help="write Parquet here")
    parser.add_argument("--datasets", type=Path, help="write a datasets folder (save_to_disk) here")
    args = parser.parse_args(argv)
    source = args.stream or default_stream_path()
    targets = [(args.csv, export_csv), (args.tsv, lambda s, t: export_csv(s, t, "\t")),
               (args.parquet, export_parquet), (args.datasets, export_datasets)]
    if not any(target for target, _ in targets):
        parser.error("give at least one of --csv, --tsv, --parquet, --datasets")
    for target, export in targets:
        if target is not None:
            print(f"{target}: {export(source, target)} rows from {source}")


if __name__ == "__main__":
    main()
