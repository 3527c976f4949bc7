"""Reading streams from CSV/TSV, Parquet and `datasets` folders (data/readers.py, data/source.py,
data/split.py): the same tasks as the JSONL, the same checks, messages naming file and row."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from continual_transformer.cli import app
from continual_transformer.data.source import ReadOptions, load_tasks, tasks_from_upload
from continual_transformer.data.split import hold_out_test
from continual_transformer.data.stream import default_stream_path, load_stream
from continual_transformer.types import Example, StreamError, Task
from conftest import toy_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _export_script():
    spec = importlib.util.spec_from_file_location("export_stream", ROOT / "scripts" / "export_stream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


FIELDS = ["task", "split", "text", "label"]


def _toy_table() -> list[list[str]]:
    return [[r[f] for f in FIELDS] for r in toy_rows()]


def _message(info, path) -> str:
    return str(info.value).replace(str(path), "FILE")


# -- the bundled stream in every format --------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The bundled stream exported by scripts/export_stream.py to every format it writes."""
    folder = tmp_path_factory.mktemp("exported")
    export = _export_script()
    paths = {"csv": folder / "stream.csv", "tsv": folder / "stream.tsv",
             "parquet": folder / "stream.parquet", "datasets": folder / "stream_dataset"}
    export.main([f"--{kind}={path}" for kind, path in paths.items()])
    return paths


def test_the_bundled_stream_reads_the_same_from_every_format(exported, tmp_path):
    expected = load_stream(default_stream_path())
    assert [len(t.train) for t in expected] == [1250, 1500, 1250, 1500, 1250]
    for kind, path in exported.items():
        assert load_tasks(path) == expected, kind
    # gzip-compressed CSV; a single Dataset (not a DatasetDict) with a split column
    gz = tmp_path / "stream.csv.gz"
    gz.write_bytes(gzip.compress(exported["csv"].read_bytes()))
    assert load_tasks(gz) == expected
    import datasets
    import pyarrow.parquet as pq

    datasets.Dataset(pq.read_table(exported["parquet"])).save_to_disk(str(tmp_path / "one"))
    assert load_tasks(tmp_path / "one") == expected
    # the format named explicitly, whatever the file is called
    odd = tmp_path / "stream.data"
    odd.write_bytes(exported["parquet"].read_bytes())
    assert load_tasks(odd, ReadOptions(format="parquet")) == expected
    with pytest.raises(StreamError) as info:
        load_tasks(odd)
    assert _message(info, odd).startswith("FILE: cannot tell the format from the file name; name it "
                                          "['.csv', '.csv.gz', '.jsonl', '.jsonl.gz', '.parquet'")


# -- checks and messages: CSV ------------------------------------------------------------------
def _bad_csv(tmp_path, rows, header=FIELDS, options=None, name="bad.csv"):
    path = write_csv(tmp_path / name, header, _toy_table()[:2] + rows)
    with pytest.raises(StreamError) as info:
        load_tasks(path, options)
    return _message(info, path)


@pytest.mark.parametrize("row, message", [
    (["kinds", "train", "  ", "food"], "FILE:4: empty text"),
    (["kinds", "dev", "soup", "food"], "FILE:4: unknown split 'dev'; expected one of ['train', 'test']"),
    (["kinds", "train", "soup", ""], "FILE:4: empty label"),
    (["a b", "train", "soup", "food"],
     "FILE:4: invalid task name 'a b': use 1-64 letters, digits, '_' or '-', starting with a letter or digit"),
    (["kinds", "train", "soup"], "FILE:4: 3 field(s), but the header has 4: ['task', 'split', 'text', 'label']"),
])
def test_csv_row_errors_name_file_line_and_problem(tmp_path, row, message):
    assert _bad_csv(tmp_path, [row]) == message


def test_csv_line_numbers_count_lines_inside_quotes_and_blank_lines(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('task,split,text,label\nkinds,train,"a cat\nand a dog",animal\n\n'
                    'kinds,train,bread,food\nkinds,test,x,plant\n')
    with pytest.raises(StreamError) as info:
        load_tasks(path)
    assert _message(info, path) == ("FILE:6: test label 'plant' of task 'kinds' never appears in its "
                                    "train split; train labels: ['animal', 'food']")
    path.write_text('task,split,text,label\nkinds,train,"never closed,food\n')
    with pytest.raises(StreamError) as info:
        load_tasks(path)
    assert _message(info, path) == "FILE:2: unexpected end of data"  # where the row starts


def test_renamed_columns_and_a_missing_one_names_the_columns_found(tmp_path):
    header = ["task", "part", "review", "stars"]
    path = write_csv(tmp_path / "reviews.csv", header, _toy_table())
    options = ReadOptions(split_column="part", text_column="review", label_column="stars")
    assert load_tasks(path, options) == load_stream(write_jsonl(tmp_path / "t.jsonl", toy_rows()))
    with pytest.raises(StreamError) as info:
        load_tasks(path, ReadOptions(split_column="part", label_column="stars"))
    assert _message(info, path) == "FILE: no text column 'text'; columns: ['task', 'part', 'review', 'stars']"
    with pytest.raises(StreamError) as info:
        load_tasks(path, ReadOptions(text_column="review", label_column="stars"))
    assert _message(info, path) == ("FILE: no split column 'split' (columns: ['task', 'part', 'review', "
                                    "'stars']); give a split column or a test fraction")
    with pytest.raises(StreamError) as info:  # named explicitly: it must be there
        load_tasks(path, ReadOptions(task_column="topic", split_column="part", text_column="review",
                                     label_column="stars"))
    assert _message(info, path) == "FILE: no task column 'topic'; columns: ['task', 'part', 'review', 'stars']"


def test_a_table_without_a_task_column_is_one_task(tmp_path):
    rows = [r[1:] for r in _toy_table() if r[0] == "kinds"]
    path = write_csv(tmp_path / "pets_or_food.csv", FIELDS[1:], rows)
    (task,) = load_tasks(path)
    assert task.name == "pets_or_food" and task.labels == ("animal", "food")
    assert len(task.train) == 24 and len(task.test) == 8
    (task,) = load_tasks(path, ReadOptions(task_name="kinds"))
    assert task == load_stream(write_jsonl(tmp_path / "t.jsonl", toy_rows()))[0]
    spaced = write_csv(tmp_path / "my data.csv", FIELDS[1:], rows)
    with pytest.raises(StreamError) as info:
        load_tasks(spaced)
    assert _message(info, spaced) == ("FILE: no task column 'task' (columns: ['split', 'text', 'label']), "
                                      "and the file name 'my data' is not a task name; give a task "
                                      "name or a task column")


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"^unknown format 'xlsx'; known: \['jsonl', 'csv', 'tsv', 'parquet', 'datasets'\]$"):
        ReadOptions(format="xlsx")
    with pytest.raises(ValueError, match="^text_column and label_column name the same column 'x'$"):
        ReadOptions(text_column="x", label_column="x")
    with pytest.raises(ValueError, match=r"^give a split column or a test fraction, not both: split_column='s', test_fraction=0.2$"):
        ReadOptions(split_column="s", test_fraction=0.2)
    with pytest.raises(ValueError, match=r"^test_fraction must be between 0 and 1 \(exclusive\), got 1.0$"):
        ReadOptions(test_fraction=1.0)
    with pytest.raises(ValueError, match="^give a task column or a task name, not both"):
        ReadOptions(task_column="t", task_name="x")
    with pytest.raises(StreamError, match="^task_name: invalid task name 'a b'"):
        ReadOptions(task_name="a b")
    options = ReadOptions(format="csv", text_column="review", test_fraction=0.25)
    assert ReadOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_missing_and_odd_paths(tmp_path):
    with pytest.raises(StreamError, match="absent.csv: no such stream file$"):
        load_tasks(tmp_path / "absent.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(StreamError, match="folder: a folder, but not one written by datasets' save_to_disk"):
        load_tasks(tmp_path / "folder")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(StreamError, match="empty.csv: no examples \\(the file is empty\\)$"):
        load_tasks(empty)
    header_only = write_csv(tmp_path / "header.csv", FIELDS, [])
    with pytest.raises(StreamError, match="header.csv: no examples$"):
        load_tasks(header_only)


# -- checks and messages: Parquet and datasets ------------------------------------------------
def _columns(rows: list[list]) -> dict[str, list]:
    return {f: [r[i] for r in rows] for i, f in enumerate(FIELDS)}


@pytest.mark.parametrize("row, message", [
    (["kinds", "train", None, "food"], "FILE row 2: field 'text' must be a string, got NoneType None"),
    (["kinds", "train", "soup", ""], "FILE row 2: empty label"),
    (["kinds", "test", "soup", "plant"],
     "FILE row 2: test label 'plant' of task 'kinds' never appears in its train split; "
     "train labels: ['animal', 'food']"),
])
def test_parquet_row_errors_name_the_row_index(tmp_path, row, message):
    path = write_parquet(tmp_path / "bad.parquet", _columns(_toy_table()[:2] + [row]))
    with pytest.raises(StreamError) as info:
        load_tasks(path)
    assert _message(info, path) == message


def test_parquet_integer_labels_are_strings_and_other_types_are_refused(tmp_path):
    rows = [["t", "train", "a", 0], ["t", "train", "b", 1], ["t", "test", "c", 1]]
    (task,) = load_tasks(write_parquet(tmp_path / "ints.parquet", _columns(rows)))
    assert task.labels == ("0", "1") and task.test == (Example("c", "1"),)
    rows[2][3] = 1.5
    rows[0][3], rows[1][3] = 0.0, 1.0
    path = write_parquet(tmp_path / "floats.parquet", _columns(rows))
    with pytest.raises(StreamError) as info:
        load_tasks(path)
    assert _message(info, path) == "FILE row 0: field 'label' must be a string, got float 0.0"


def test_a_corrupt_parquet_file_is_a_stream_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(StreamError, match="broken.parquet: cannot read Parquet file"):
        load_tasks(path)


def test_dataset_messages_name_the_split_and_index(tmp_path):
    import datasets

    def save(parts: dict, name: str) -> Path:
        folder = tmp_path / name
        datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in parts.items()}).save_to_disk(str(folder))
        return folder

    train = {"task": ["t"] * 4, "text": ["a", "b", "c", "d"], "label": ["x", "y", "x", "y"]}
    bad_test = {"task": ["t", "t"], "text": ["e", " "], "label": ["x", "y"]}
    folder = save({"train": train, "test": bad_test}, "bad")
    with pytest.raises(StreamError) as info:
        load_tasks(folder)
    assert _message(info, folder) == "FILE test[1]: empty text"
    folder = save({"train": train, "validation": bad_test}, "validation")
    with pytest.raises(StreamError) as info:
        load_tasks(folder)
    assert _message(info, folder) == ("FILE validation[0]: unknown split 'validation'; expected one "
                                      "of ['train', 'test']")
    # a ClassLabel column gives its names
    features = datasets.Features({"task": datasets.Value("string"), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    labelled = tmp_path / "labelled"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({**train, "label": [0, 1, 0, 1]}, features=features),
        "test": datasets.Dataset.from_dict({"task": ["t"], "text": ["e"], "label": [1]}, features=features),
    }).save_to_disk(str(labelled))
    (task,) = load_tasks(labelled)
    assert task.labels == ("neg", "pos") and task.test == (Example("e", "pos"),)


def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    from continual_transformer.extras import MissingExtra

    path = write_parquet(tmp_path / "s.parquet", _columns(_toy_table()))
    for module in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import fails
    with pytest.raises(MissingExtra, match=r"needs the optional package 'pyarrow', which is not "
                                           r"installed: pip install 'continual-tiny-transformer\[data\]'"):
        load_tasks(path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_dict.json").write_text("{}")
    with pytest.raises(MissingExtra, match=r"'datasets'.*continual-tiny-transformer\[data\]"):
        load_tasks(tmp_path / "ds")
    # CSV needs neither
    assert len(load_tasks(write_csv(tmp_path / "s.csv", FIELDS, _toy_table()))) == 2


# -- a test split drawn from the rows ----------------------------------------------------------
def _task(counts: dict[str, int]) -> Task:
    train = tuple(Example(f"{label} {i}", label) for label, n in counts.items() for i in range(n))
    return Task("t", tuple(sorted(counts)), train)


def test_test_fraction_is_stratified_and_reproducible():
    task = _task({"a": 50, "b": 30, "c": 20})
    split = hold_out_test(task, 0.2, seed=0, source="s")
    assert Counter(e.label for e in split.test) == {"a": 10, "b": 6, "c": 4}
    assert Counter(e.label for e in split.train) == {"a": 40, "b": 24, "c": 16}
    assert sorted(split.train + split.test, key=task.train.index) == list(task.train)
    assert list(split.test) == sorted(split.test, key=task.train.index)  # file order kept
    assert hold_out_test(task, 0.2, seed=0, source="s") == split
    assert hold_out_test(task, 0.2, seed=1, source="s").test != split.test
    # rounding: 0.25 of 7, 7, 6 = 1.75, 1.75, 1.5 -> 5 in all, largest remainders first
    uneven = hold_out_test(_task({"a": 7, "b": 7, "c": 6}), 0.25, seed=0, source="s")
    assert Counter(e.label for e in uneven.test) == {"a": 2, "b": 2, "c": 1}
    # every label keeps a train example, however large the fraction
    most = hold_out_test(_task({"a": 1, "b": 3}), 0.9, seed=0, source="s")
    assert Counter(e.label for e in most.train) == {"a": 1, "b": 1}
    with pytest.raises(StreamError, match=r"^s: task 't' has 2 examples for 2 labels: too few to "
                                          r"hold out a test split$"):
        hold_out_test(_task({"a": 1, "b": 1}), 0.5, seed=0, source="s")


def test_test_fraction_from_a_file_without_a_split_column(tmp_path):
    rows = [[r["task"], r["text"], r["label"]] for r in toy_rows()]
    path = write_csv(tmp_path / "nosplit.csv", ["task", "text", "label"], rows)
    tasks = load_tasks(path, ReadOptions(test_fraction=0.25), seed=7)
    assert [(len(t.train), len(t.test)) for t in tasks] == [(24, 8), (24, 8)]
    assert all(Counter(e.label for e in t.test) == {t.labels[0]: 4, t.labels[1]: 4} for t in tasks)
    assert load_tasks(path, ReadOptions(test_fraction=0.25), seed=7) == tasks
    assert load_tasks(path, ReadOptions(test_fraction=0.25), seed=8) != tasks


# -- uploads (bytes) ---------------------------------------------------------------------------
def test_uploads_read_every_table_format(tmp_path):
    expected = load_stream(write_jsonl(tmp_path / "t.jsonl", toy_rows()))
    data = write_csv(tmp_path / "t.csv", FIELDS, _toy_table()).read_bytes()
    assert tasks_from_upload(data, "t.csv") == expected
    assert tasks_from_upload(data, "upload", content_type="text/csv; charset=utf-8") == expected
    tsv = write_csv(tmp_path / "t.tsv", FIELDS, _toy_table(), delimiter="\t").read_bytes()
    assert tasks_from_upload(tsv, "t.tsv") == expected
    parquet = write_parquet(tmp_path / "t.parquet", _columns(_toy_table())).read_bytes()
    assert tasks_from_upload(parquet, "t.parquet") == expected
    assert tasks_from_upload(parquet, "t.bin", ReadOptions(format="parquet")) == expected
    # a table without a split column: all train rows, for an upload
    rows = [[r["text"], r["label"]] for r in toy_rows() if r["task"] == "kinds"]
    (task,) = tasks_from_upload(write_csv(tmp_path / "pets.csv", ["text", "label"], rows).read_bytes(),
                                "pets.csv")
    assert task.name == "pets" and len(task.train) == 32 and task.test == ()
    with pytest.raises(StreamError, match=r"^t.csv:2: unknown split 'dev'"):
        tasks_from_upload(data.replace(b"kinds,train,", b"kinds,dev,", 2), "t.csv")


# -- the command line --------------------------------------------------------------------------
def _run(args):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _common(backbone, out):
    return ["--out", str(out), "--epochs", "1", "--batch-size", "8", "--backbone", str(backbone),
            "--max-length", "32", "--device", "cpu", "--save-every", "0"]


def test_ctt_run_on_a_csv_with_its_own_columns_and_resume_reads_it_again(tiny_backbone_dir, tmp_path):
    rows = [[r["task"], r["text"], r["label"]] for r in toy_rows()]
    path = write_csv(tmp_path / "mine.csv", ["topic", "body", "y"], rows)
    out = tmp_path / "run"
    options = ["--task-column", "topic", "--text-column", "body", "--label-column", "y",
               "--test-fraction", "0.25", "--seed", "1"]
    result = _run(["run", str(path), *options, *_common(tiny_backbone_dir, out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == ["kinds", "topics"]
    assert report["config"]["data"]["test_fraction"] == 0.25
    assert [(t["train"], t["test"]) for t in report["config"]["stream_summary"]] == [(24, 8), (24, 8)]
    # `--resume --out DIR` alone reads the CSV again with the saved columns and fraction
    result = _run(["run", "--resume", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 task(s) already learned ['kinds', 'topics']" in " ".join(result.output.split())
    # another seed draws another test split: not the same run
    result = _run(["run", str(path), *options[:-1], "2", *_common(tiny_backbone_dir, out)])
    assert result.exit_code == 2 and "it was started with other settings" in result.output


def test_a_bad_last_row_fails_before_anything_is_learned(tiny_backbone_dir, tmp_path):
    path = write_csv(tmp_path / "late.csv", FIELDS, _toy_table() + [["kinds", "train", "", "food"]])
    out = tmp_path / "o"
    result = _run(["run", str(path), *_common(tiny_backbone_dir, out)])
    assert result.exit_code == 2
    assert f"late.csv:{len(_toy_table()) + 2}: empty text" in result.output.replace("\n", "")
    assert not out.exists()
    result = _run(["run", str(path), "--format", "xlsx", *_common(tiny_backbone_dir, out)])
    assert result.exit_code == 2 and "unknown format 'xlsx'" in result.output


def test_ctt_bench_reads_a_csv_with_its_own_columns(tiny_backbone_dir, tmp_path):
    rows = [[r["task"], r["split"], r["text"], r["label"]] for r in toy_rows()]
    path = write_csv(tmp_path / "mine.csv", ["topic", "part", "body", "y"], rows)
    out = tmp_path / "bench"
    result = _run(["bench", str(path), "--methods", "analytic", "--in-process", "--task-column", "topic",
                   "--split-column", "part", "--text-column", "body", "--label-column", "y",
                   "--out", str(out), "--backbone", str(tiny_backbone_dir), "--max-length", "32",
                   "--device", "cpu"])
    assert result.exit_code == 0, result.output
    bench = json.loads((out / "bench.json").read_text())
    assert bench["tasks"] == ["kinds", "topics"]
    assert bench["config"]["data"]["text_column"] == "body"


def test_the_bundled_stream_learned_from_csv_and_parquet_gives_the_jsonl_report(
        exported, tiny_backbone_dir, tmp_path):
    # --max-train and --max-test keep it quick; the same subsamples from every format
    matrices = {}
    for name, path in (("jsonl", default_stream_path()), ("csv", exported["csv"]),
                       ("parquet", exported["parquet"])):
        out = tmp_path / name
        result = _run(["run", str(path), "--max-train", "20", "--max-test", "40",
                       *_common(tiny_backbone_dir, out)])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        matrices[name] = (report["accuracy_matrix"], report["task_free_accuracy_matrix"],
                          report["metrics"])
    assert matrices["csv"] == matrices["jsonl"] == matrices["parquet"]
    report = json.loads((tmp_path / "csv" / "report.json").read_text())
    assert report["config"]["max_test"] == 40 and all(
        t["test"] == 40 for t in report["config"]["stream_summary"]), report["config"]["stream_summary"]
