import gzip
import json

import pytest

from continual_transformer.data.stream import load_stream
from continual_transformer.types import Example, StreamError, Task
from conftest import toy_rows, write_jsonl


def test_tasks_in_order_of_first_line(toy_stream):
    tasks = load_stream(toy_stream)
    assert [t.name for t in tasks] == ["kinds", "topics"]
    assert tasks[0].labels == ("animal", "food")
    assert len(tasks[0].train) == 24 and len(tasks[0].test) == 8


def test_gzip_stream_reads_the_same(tmp_path, toy_stream):
    gz = tmp_path / "toy.jsonl.gz"
    gz.write_bytes(gzip.compress(toy_stream.read_bytes()))
    assert load_stream(gz) == load_stream(toy_stream)


def _bad(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(StreamError) as info:
        load_stream(path)
    return str(info.value).replace(str(path), "FILE")


GOOD = json.dumps({"task": "t", "split": "train", "text": "a", "label": "x"})


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"task": "t", "split": "train", "text": "a"', "FILE:2: invalid JSON: Expecting ',' delimiter (column 44)"),
        ('[1, 2]', "FILE:2: expected a JSON object, got list"),
        ('{"task": "t", "split": "train", "label": "x"}', "FILE:2: missing field 'text'"),
        ('{"task": "t", "split": "train", "text": 5, "label": "x"}',
         "FILE:2: field 'text' must be a string, got int 5"),
        ('{"task": "t", "split": "dev", "text": "a", "label": "x"}',
         "FILE:2: unknown split 'dev'; expected one of ['train', 'test']"),
        ('{"task": "t", "split": "train", "text": "  ", "label": "x"}', "FILE:2: empty text"),
        ('{"task": "a b", "split": "train", "text": "a", "label": "x"}',
         "FILE:2: invalid task name 'a b': use 1-64 letters, digits, '_' or '-', starting with a letter or digit"),
    ],
)
def test_line_errors_name_file_line_and_problem(tmp_path, line, message):
    assert _bad(tmp_path, [GOOD, line]) == message


def test_task_with_one_label(tmp_path):
    rows = [GOOD, json.dumps({"task": "t", "split": "test", "text": "b", "label": "x"})]
    assert _bad(tmp_path, rows) == (
        "FILE: task 't' has 1 label(s) in its train split ['x']; a task needs at least 2"
    )


def test_task_without_test_examples(tmp_path):
    rows = [GOOD, json.dumps({"task": "t", "split": "train", "text": "b", "label": "y"})]
    assert _bad(tmp_path, rows) == "FILE: task 't' has no test examples"


def test_test_label_unseen_in_train(tmp_path):
    rows = [
        GOOD,
        json.dumps({"task": "t", "split": "train", "text": "b", "label": "y"}),
        json.dumps({"task": "t", "split": "test", "text": "c", "label": "z"}),
    ]
    assert _bad(tmp_path, rows) == (
        "FILE:3: test label 'z' of task 't' never appears in its train split; train labels: ['x', 'y']"
    )


def test_empty_file_and_missing_file(tmp_path):
    assert _bad(tmp_path, []) == "FILE: no examples"
    with pytest.raises(StreamError, match="no such stream file"):
        load_stream(tmp_path / "absent.jsonl")


def test_truncated_gzip_is_a_stream_error(tmp_path, toy_stream):
    path = tmp_path / "broken.jsonl.gz"
    data = gzip.compress(toy_stream.read_bytes())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StreamError, match="cannot read stream file"):
        load_stream(path)


def test_subsample_is_stratified_and_reproducible(tmp_path):
    task = load_stream(write_jsonl(tmp_path / "s.jsonl", toy_rows(n_train=40)))[0]
    small = task.subsample_train(10, seed=3)
    assert len(small.train) == 10
    assert sorted(e.label for e in small.train) == ["animal"] * 5 + ["food"] * 5
    assert small == task.subsample_train(10, seed=3)
    assert small.test == task.test
    assert task.subsample_train(None, seed=3) is task


def test_subsample_below_label_count_is_refused():
    task = Task("t", ("a", "b", "c"), tuple(Example(str(i), "abc"[i % 3]) for i in range(9)))
    with pytest.raises(ValueError, match="max_train=2 is below the 3 labels"):
        task.subsample_train(2, seed=0)


def test_stream_bytes_read_like_a_file(tmp_path, toy_stream):
    from continual_transformer.data.stream import tasks_from_bytes

    data = toy_stream.read_bytes()
    assert tasks_from_bytes(data, "upload.jsonl") == load_stream(toy_stream)
    assert tasks_from_bytes(gzip.compress(data), "upload.jsonl") == load_stream(toy_stream)
    bad = data + b'{"task": "kinds", "split": "dev", "text": "a", "label": "food"}\n'
    line = data.count(b"\n") + 1
    with pytest.raises(StreamError, match=rf"^upload.jsonl:{line}: unknown split 'dev'"):
        tasks_from_bytes(bad, "upload.jsonl")
    with pytest.raises(StreamError, match="^upload.jsonl: cannot read stream file"):
        tasks_from_bytes(b"\xff\xfe\x00", "upload.jsonl")


def test_uploaded_task_may_come_without_test_examples():
    from continual_transformer.data.stream import tasks_from_bytes

    rows = [{"task": "t", "split": "train", "text": f"x{i}", "label": "ab"[i % 2]} for i in range(4)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with pytest.raises(StreamError, match="has no test examples"):
        tasks_from_bytes(data, "u")
    (task,) = tasks_from_bytes(data, "u", require_test=False)
    assert task.test == () and task.labels == ("a", "b")


def test_lone_surrogate_is_refused(tmp_path):
    # valid JSON, but no tokenizer can encode it: refused before anything trains
    path = tmp_path / "s.jsonl"
    path.write_text('{"task": "t", "split": "train", "text": "a \\ud800 b", "label": "x"}\n')
    with pytest.raises(StreamError, match=r"s.jsonl:1: field 'text' is not valid Unicode \(surrogates not allowed at character 2\)"):
        load_stream(path)
