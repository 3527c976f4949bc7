"""`ctt predict MODEL --input FILE`: every row of a text, JSONL, CSV or Parquet file predicted,
streamed, in input order; bad rows named or, with --skip-bad-rows, counted."""

import csv
import json

import pytest
from typer.testing import CliRunner

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.cli import app
from continual_transformer.experiment import score
from continual_transformer.experiment.score import ScoreOptions, score_file
from continual_transformer.types import StreamError
from conftest import toy_rows, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("s") / "toy.jsonl", toy_rows())


@pytest.fixture(scope="module")
def model(tiny_config, stream, tmp_path_factory):
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    for task in load_stream(stream):
        learner.learn(task)
    return learner.save(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def rows(stream):
    """(text, task) of every test example of the toy stream, tasks interleaved."""
    tasks = load_stream(stream)
    return [(e.text, t.name) for pair in zip(*[[(e, t) for e in t.test] for t in tasks])
            for e, t in pair]


def _write(folder, kind, rows, text="text", task="task"):
    path = folder / f"in.{kind}"
    if kind == "txt":
        path.write_text("".join(f"{t}\n" for t, _ in rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({text: t, task: k}) + "\n" for t, k in rows))
    elif kind == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", text, task])
            writer.writerows([i, t, k] for i, (t, k) in enumerate(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({text: [t for t, _ in rows], task: [k for _, k in rows]}), path)
    return path


def _read(path):
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            return [{**r, "row": int(r["row"]), "probability": float(r["probability"]),
                     "routed": r["routed"] == "True"} for r in csv.DictReader(handle)]
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_every_format_gives_the_predictions_of_predict(model, rows, tmp_path, kind):
    learner = ContinualLearner.load(model, device="cpu")
    expected = learner.predict([t for t, _ in rows], task=[k for _, k in rows])
    source = _write(tmp_path, kind, rows, text="body", task="which")
    out = tmp_path / "out.csv"
    result = runner.invoke(app, ["predict", str(model), "--input", str(source), "--output", str(out),
                                 "--text-column", "body", "--task-column", "which", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: {len(rows)} predictions" in " ".join(result.output.split())  # rich wraps lines
    got = _read(out)
    assert [g["row"] for g in got] == list(range(len(rows)))
    assert [(g["task"], g["label"]) for g in got] == [(p.task, p.label) for p in expected]
    assert [g["probability"] for g in got] == pytest.approx(
        [p.probabilities[p.label] for p in expected], abs=1e-6)
    assert not any(g["routed"] for g in got)


def test_plain_text_is_routed_in_chunks_and_streamed_to_jsonl(model, rows, tmp_path, monkeypatch):
    monkeypatch.setattr(score, "CHUNK_ROWS", 5)  # several chunks: order and count must hold
    learner = ContinualLearner.load(model, device="cpu")
    expected = learner.predict([t for t, _ in rows])
    done = []
    result = score_file(learner, _write(tmp_path, "txt", rows), tmp_path / "p.jsonl",
                        progress=done.append)
    got = _read(tmp_path / "p.jsonl")
    assert result.rows == len(rows) and result.skipped == 0
    assert done == [min(n, len(rows)) for n in range(5, len(rows) + 5, 5)]
    assert [(g["task"], g["label"]) for g in got] == [(p.task, p.label) for p in expected]
    assert all(g["routed"] for g in got)
    assert [g["task_probability"] for g in got] == [p.task_probability for p in expected]
    assert all(0 < g["task_probability"] <= 1 for g in got)


def test_a_bad_row_is_named_and_nothing_is_written(model, rows, tmp_path):
    bad = rows[:3] + [(" ", "kinds")] + rows[3:6] + [("a dog", "weather")]
    source = _write(tmp_path, "csv", bad)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["predict", str(model), "--input", str(source), "--output", str(out),
                                 "--task-column", "task", "--device", "cpu"])
    assert result.exit_code == 2
    assert f"{source}:5: empty text" in result.output.replace("\n", "")  # header is line 1
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))

    learner = ContinualLearner.load(model, device="cpu")
    counted = score_file(learner, source, out, ScoreOptions(task_column="task", skip_bad_rows=True))
    assert (counted.rows, counted.skipped) == (len(bad) - 2, 2)
    (tmp_path / "b").mkdir()
    unknown = _write(tmp_path / "b", "csv", rows[:2] + [("a dog", "weather")])
    with pytest.raises(StreamError, match=r"in.csv:4: unknown task 'weather'; known: \['kinds', 'topics'\]"):
        score_file(learner, unknown, out, ScoreOptions(task_column="task"))


def test_input_mistakes_are_clear(model, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("body\nhello\n")
    result = runner.invoke(app, ["predict", str(model), "--input", str(source), "--device", "cpu"])
    assert result.exit_code == 2 and "no column 'text'; columns: ['body']" in result.output.replace("\n", "")
    both = runner.invoke(app, ["predict", str(model), "a text", "--input", str(source)])
    assert both.exit_code == 2 and "give texts to classify, or --input FILE (not both)" in both.output
    with pytest.raises(ValueError, match="give a task or a task column, not both"):
        ScoreOptions(task="kinds", task_column="task")
